"""DCT-AdamW (arXiv 2505.17967): Adam in a dynamic subspace picked from a fixed DCT basis.

For a low-rank parameter in its oriented view ``A`` (``[n, N]``, ``n <= N``, see ``_lowrank``),
with ``Q`` the ``n x n`` orthonormal DCT-II basis (one per size and device, shared by all layers):

1. ``a = g + e`` (the error feedback, when enabled)
2. every ``update_proj_gap`` steps (and at the first): ``S = Q^T a`` (a matmul, or Makhoul's FFT
   route for large ``n``); score each basis vector by the l1 norm of its row of ``S``; keep the
   ``r`` best (``idx``, sorted); the projected gradient is ``S[idx]`` itself. Other steps:
   ``ĝ = Q[:, idx]^T a``. Only ``idx`` is stored per layer.
3. with ``rotate_moments``, when ``idx`` changes the moments follow their basis vectors:
   ``R = Q[:, new]^T Q[:, old]`` is a selection matrix (``Q`` is orthogonal), so a row of ``m, v``
   moves to where its basis vector now sits and rows of new vectors start at zero.
4. error feedback ``e = a - Q[:, idx] ĝ``, kept in fp32 or quantised to 8 or 4 bits per block
5. Adam on ``ĝ``; ``p <- p (1 - lr wd) - lr Q[:, idx] (m̂ / (sqrt(v̂) + eps))``
"""
from __future__ import annotations

import torch

from ..kernels import lowrank as K
from ..linalg import dct, dct_columns, dct_matrix
from ._base import check_arg
from ._lowrank import (ADAMW_KEYS, ERROR_FEEDBACK, ERROR_KEYS, LowRankAdam, add_error, error_shapes, init_error,
                       oriented, store_error)

FFT_CHOICES = ("auto", "on", "off")
# ``fft="auto"`` takes Makhoul's route from this basis size on, per device type. CPU: measured with
# benchmarks/lowrank.py (1 thread; FFT / matmul 0.96 at n = 512 and 0.59 at n = 1024 for an
# n x 2.75n weight). CUDA: not measured yet (no GPU was available); the CPU value until it is.
FFT_MIN_SIZE = {"cpu": 1024, "cuda": 1024}
_LOW_RANK_KEYS = frozenset({"step", "indices", "exp_avg", "exp_avg_sq"})


class DCTAdamW(LowRankAdam):
    """AdamW in a dynamic DCT subspace.

    Args:
        lr: learning rate (> 0).
        betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        rank: ``None`` keeps a group on plain AdamW; an integer makes the group's matrices low-rank.
        update_proj_gap: steps between two choices of the basis vectors (>= 1).
        error_feedback: ``"none"``, ``"fp32"``, ``"8bit"`` (256 levels) or ``"4bit"`` (16 levels,
            the default: as good as fp32 in the fine-tuning sweep, at 0.625 bytes per parameter).
        rotate_moments: carry the moments over to the new basis vectors when they change (default:
            with error feedback it closed most of the gap to AdamW in the sweep,
            benchmarks/results/convergence-cpu-nano-finetune-dct-options.json).
        fft: ``"auto"`` (FFT from ``FFT_MIN_SIZE`` on), ``"on"`` or ``"off"`` (always the matmul).
    """

    state_keys = (ADAMW_KEYS,) + tuple(_LOW_RANK_KEYS | keys for keys in ERROR_KEYS.values())

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int | None = None, update_proj_gap: int = 1,
                 error_feedback: str = "4bit", rotate_moments: bool = True, fft: str = "auto"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, error_feedback=error_feedback,
                        rotate_moments=rotate_moments, fft=fft)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        gap = group["update_proj_gap"]
        check_arg("update_proj_gap", gap, isinstance(gap, int) and not isinstance(gap, bool) and gap >= 1,
                  "an integer >= 1")
        check_arg("error_feedback", group["error_feedback"], group["error_feedback"] in ERROR_FEEDBACK,
                  f"one of {ERROR_FEEDBACK}")
        check_arg("rotate_moments", group["rotate_moments"], isinstance(group["rotate_moments"], bool), "a bool")
        check_arg("fft", group["fft"], group["fft"] in FFT_CHOICES, f"one of {FFT_CHOICES}")

    def _init_low_rank(self, p: torch.Tensor, group: dict) -> dict:
        n, N = oriented(p).shape
        r = group["rank"]
        state = self.state[p]
        state["step"] = 0
        state["indices"] = torch.zeros(r, dtype=torch.int64, device=p.device)
        state["exp_avg"] = torch.zeros(r, N, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(r, N, dtype=torch.float32, device=p.device)
        init_error(state, group["error_feedback"], (n, N), p.device)
        return state

    def _low_rank_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        n, N = min(p.shape), max(p.shape)
        return {"indices": (group["rank"],), "error": (n, N), **error_shapes(keys, n * N)}

    def _transform(self, a: torch.Tensor, group: dict) -> torch.Tensor:
        """``Q^T a``: the coefficients of every column of ``a`` on the whole basis."""
        n = a.shape[0]
        use_fft = group["fft"] == "on" or (
            group["fft"] == "auto" and n >= FFT_MIN_SIZE.get(a.device.type, FFT_MIN_SIZE["cuda"])
        )
        return dct(a) if use_fft else dct_matrix(n, a.device).T @ a

    def _low_rank_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p] or self._init_low_rank(p, group)
        indices, m, v = state["indices"], state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = state["step"]

        a = add_error(state, p.grad)

        n = a.shape[0]
        if t == 1 or t % group["update_proj_gap"] == 0:
            coefficients = self._transform(a, group)
            scores = K.row_abs_sum(coefficients, torch.empty(n, dtype=torch.float32, device=a.device))
            chosen = scores.topk(indices.numel(), sorted=False).indices.sort().values
            if group["rotate_moments"] and t > 1:
                self._follow_basis(m, v, indices, chosen, n)
            indices.copy_(chosen)
            projected = coefficients.index_select(0, indices)
            basis = dct_columns(n, indices)  # n x r: the FFT route never builds the n x n matrix
        else:
            basis = dct_columns(n, indices)
            projected = basis.T @ a

        if group["error_feedback"] != "none":
            store_error(state, torch.addmm(a, basis, projected, alpha=-1))
        direction = self._adam_direction(state, projected, group)
        self._apply_low_rank(p, group, basis, direction)

    @staticmethod
    def _follow_basis(m: torch.Tensor, v: torch.Tensor, old: torch.Tensor, new: torch.Tensor, n: int) -> None:
        """``m <- R m``, ``v <- R v`` with ``R = Q[:, new]^T Q[:, old]``, a selection matrix."""
        slot = torch.full((n,), -1, dtype=torch.int64, device=m.device)
        slot[old] = torch.arange(old.numel(), device=m.device)
        source = slot[new]
        kept = (source >= 0)[:, None]
        for moment in (m, v):
            moment.copy_(torch.where(kept, moment.index_select(0, source.clamp(min=0)), 0.0))
