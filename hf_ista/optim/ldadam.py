"""LDAdam (arXiv 2410.16103): Adam whose moments live in a rank-r subspace that follows the
gradient, with projection-aware moments and generalised error feedback.

For a low-rank parameter in its oriented view (``[n, N]``, ``n <= N``, see ``_lowrank``), with
gradient ``g``, error ``e``, basis ``P`` (``n x r``, orthonormal), moments ``m, v`` (``r x N``) and
``t`` the 1-based step:

1. ``a = g + e``
2. ``t = 1``: ``P_t`` = the top-r left singular vectors of ``a``. Otherwise one warm-started block
   power iteration: ``b = rho P_{t-1} m_{t-1} / (1 - beta1^(t-1)) + (1 - rho) a``,
   ``P_t = QR(b b^T P_{t-1})`` (``m_{t-1}`` is bias-corrected with the step it was formed at).
3. ``ĝ = P_t^T a``; ``e = a - P_t ĝ``
4. ``C = P_t^T P_{t-1}``; ``m̃ = C m_{t-1}``
5. ``e += beta1 / (1 - beta1) (P_{t-1} m_{t-1} - P_t m̃)``  (the momentum lost by the change of basis)
6. ``v = |(C∘C)(v / bc2 - m² / bc1²) + m̃² / bc1²| bc2``, ``m = m̃`` with ``bc = 1 - beta^(t-1)``
7. Adam in the subspace on ``ĝ``; ``p <- p (1 - lr wd) - lr P_t (m̂ / (sqrt(v̂) + eps))``

Steps 4-6 are skipped at ``t = 1`` (the moments are still zero). The error ``e`` is optimizer
state (in the parameter's dtype; fp32 for fp16 parameters, whose range it can exceed), not ``p.grad``: ``model.zero_grad()`` and gradient accumulation
cannot touch it. Basis and moments are fp32.
"""
from __future__ import annotations

import torch

from ._base import check_arg
from ._lowrank import ADAMW_KEYS, LowRankAdam, oriented


class LDAdam(LowRankAdam):
    """Low-dimensional Adam.

    Args:
        lr: learning rate (> 0).
        betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay); the paper's
            betas are ``(0.908, 0.99)``.
        rank: ``None`` keeps a group on plain AdamW; an integer makes the group's matrices low-rank.
            Set it per group (the Trainer puts ``optim_target_modules`` in a group with ``rank``).
        rho: weight of the momentum in the power iteration's target, in ``[0, 1)``.
    """

    state_keys = (ADAMW_KEYS, frozenset({"step", "basis", "exp_avg", "exp_avg_sq", "error"}))

    def __init__(self, params, lr: float = 1e-3, betas=(0.908, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int | None = None, rho: float = 0.908):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, rho=rho)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        rho = group["rho"]
        check_arg("rho", rho, isinstance(rho, (int, float)) and 0 <= rho < 1, "a number in [0, 1)")

    def _low_rank_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        return {"basis": (min(p.shape), group["rank"]), "error": tuple(p.shape)}

    def _init_low_rank(self, p: torch.Tensor, group: dict) -> dict:
        n, N = oriented(p).shape
        r = group["rank"]
        state = self.state[p]
        state["step"] = 0
        state["basis"] = torch.zeros(n, r, dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros(r, N, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(r, N, dtype=torch.float32, device=p.device)
        # bf16 and fp32 have the range the error needs; fp16 (max 65504) does not: it gets fp32.
        dtype = p.dtype if p.dtype in (torch.float32, torch.bfloat16) else torch.float32
        state["error"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return state

    def _low_rank_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p] or self._init_low_rank(p, group)
        beta1, beta2 = group["betas"]
        basis, m, v = state["basis"], state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = state["step"]

        a = oriented(p.grad).float() + oriented(state["error"]).float()
        if t == 1:
            new_basis = torch.linalg.svd(a, full_matrices=False).U[:, : basis.shape[1]]
        else:
            lifted_momentum = basis @ m
            b = (group["rho"] / (1 - beta1 ** (t - 1))) * lifted_momentum + (1 - group["rho"]) * a
            new_basis = torch.linalg.qr(b @ (b.T @ basis)).Q  # b bᵀ P without the n x n product
        projected = new_basis.T @ a
        error = a - new_basis @ projected
        if t > 1:
            change = new_basis.T @ basis
            rotated = change @ m
            error += (beta1 / (1 - beta1)) * (lifted_momentum - new_basis @ rotated)
            bc1, bc2 = 1 - beta1 ** (t - 1), 1 - beta2 ** (t - 1)
            variance = v / bc2 - m * m / bc1 ** 2
            v.copy_(((change * change) @ variance).addcmul_(rotated, rotated, value=1 / bc1 ** 2).abs_().mul_(bc2))
            m.copy_(rotated)
        oriented(state["error"]).copy_(error)
        basis.copy_(new_basis)
        direction = self._adam_direction(state, projected, group)
        self._apply_low_rank(p, group, basis, direction)
