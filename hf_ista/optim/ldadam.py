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
state, not ``p.grad``: ``model.zero_grad()`` and gradient accumulation cannot touch it. It is kept
in fp32 (``error_feedback="fp32"``, the method as published), or quantised to 8 or 4 bits per block
of 64 (1.125 / 0.625 bytes per parameter instead of 4), or not at all (``"none"``). Basis and
moments are fp32.
"""
from __future__ import annotations

import torch

from ._base import check_arg
from ._lowrank import (ADAMW_KEYS, ERROR_FEEDBACK, ERROR_KEYS, LowRankAdam, add_error, error_shapes, init_error,
                       oriented, store_error, transport_moments)


class LDAdam(LowRankAdam):
    """Low-dimensional Adam.

    Args:
        lr: learning rate (> 0).
        betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay); the paper's
            betas are ``(0.908, 0.99)``.
        rank: ``None`` keeps a group on plain AdamW; an integer makes the group's matrices low-rank.
            Set it per group (the Trainer puts ``optim_target_modules`` in a group with ``rank``).
        rho: weight of the momentum in the power iteration's target, in ``[0, 1)``.
        error_feedback: ``"fp32"`` (default), ``"8bit"``, ``"4bit"`` or ``"none"``: how the error is kept.
    """

    state_keys = (ADAMW_KEYS,) + tuple(frozenset({"step", "basis", "exp_avg", "exp_avg_sq"}) | keys
                                       for keys in ERROR_KEYS.values())

    def __init__(self, params, lr: float = 1e-3, betas=(0.908, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int | None = None, rho: float = 0.908,
                 error_feedback: str = "fp32"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, rho=rho,
                        error_feedback=error_feedback)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        rho = group["rho"]
        check_arg("rho", rho, isinstance(rho, (int, float)) and 0 <= rho < 1, "a number in [0, 1)")
        check_arg("error_feedback", group["error_feedback"], group["error_feedback"] in ERROR_FEEDBACK,
                  f"one of {ERROR_FEEDBACK}")

    def _low_rank_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        return {"basis": (min(p.shape), group["rank"]), "error": tuple(p.shape), **error_shapes(keys, p.numel())}

    def _init_low_rank(self, p: torch.Tensor, group: dict) -> dict:
        n, N = oriented(p).shape
        r = group["rank"]
        state = self.state[p]
        state["step"] = 0
        state["basis"] = torch.zeros(n, r, dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros(r, N, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(r, N, dtype=torch.float32, device=p.device)
        init_error(state, group["error_feedback"], tuple(p.shape), p.device)
        return state

    def _low_rank_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p] or self._init_low_rank(p, group)
        beta1, beta2 = group["betas"]
        basis, m, v = state["basis"], state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = state["step"]

        a = add_error(state, p.grad)
        if t == 1:
            new_basis = torch.linalg.svd(a, full_matrices=False).U[:, : basis.shape[1]]
        else:
            lifted_momentum = basis @ m
            b = (group["rho"] / (1 - beta1 ** (t - 1))) * lifted_momentum + (1 - group["rho"]) * a
            new_basis = torch.linalg.qr(b @ (b.T @ basis)).Q  # b bᵀ P without the n x n product
        projected = new_basis.T @ a
        if t > 1:
            change = new_basis.T @ basis
            rotated = change @ m
        if group["error_feedback"] != "none":
            # e = a - P_t ĝ + c (P_{t-1} m_{t-1} - P_t m̃) = (a + c P_{t-1} m_{t-1}) - P_t (ĝ + c m̃)
            c = beta1 / (1 - beta1)
            kept, lost = (a, projected) if t == 1 else (a + c * lifted_momentum, projected + c * rotated)
            store_error(state, torch.addmm(kept, new_basis, lost, alpha=-1))
        if t > 1:
            transport_moments(m, v, change, rotated, t - 1, group["betas"])
        basis.copy_(new_basis)
        direction = self._adam_direction(state, projected, group)
        self._apply_low_rank(p, group, basis, direction)
