"""What the low-rank optimizers (LDAdam, DCT-AdamW, LoRDO) share.

A parameter is *low-rank* when its group sets ``rank``, it is a matrix, ``rank`` is below its
shorter side (a "low-rank" step at full rank would cost more than AdamW and add nothing: a LoRA
adapter under ``"all-linear"``, say) and both sides are below ``FULL_RANK_SIDE`` (so a
vocabulary-sized embedding or LM head stays full rank even when targeted; a small-vocabulary
``lm_head`` that ``"all-linear"`` targets is low-rank). Every other parameter gets plain AdamW
inside the same optimizer.

The math runs in fp32 with autocast off (``IstaOptimizer.step``); with ``allow_tf32`` on (e.g.
``TrainingArguments(tf32=True)``) the projection matmuls on CUDA run in TF32, as every matmul does.

A low-rank parameter is handled in its *oriented* view ``A`` of shape ``[n, N]``, ``n <= N`` (the
matrix itself, or its transpose when it has more rows than columns), so the subspace is always
spanned by ``r`` orthonormal columns ``B`` (``n x r``), the projected gradient is ``B^T A``
(``r x N``) and the Adam moments live in that ``r x N`` space: LDAdam's left projection when
rows <= cols and right projection otherwise are this one case.
"""
from __future__ import annotations

import math

import torch

from ..kernels import lowrank as K
from ._base import IstaOptimizer, check_arg

FULL_RANK_SIDE = 32_000  # a matrix with a side this long gets AdamW
ADAMW_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})

def oriented(x: torch.Tensor) -> torch.Tensor:
    """The view of a matrix with its shorter side first."""
    return x if x.shape[0] <= x.shape[1] else x.T


# Error feedback: what the projection lost, kept in fp32 or quantised per block of QUANT_BLOCK
# elements (8 bits: 256 levels, 4 bits: 16), or not kept.
ERROR_FEEDBACK = ("none", "fp32", "8bit", "4bit")
ERROR_KEYS = {
    "none": frozenset(),
    "fp32": frozenset({"error"}),
    "8bit": frozenset({"error_codes", "error_scales"}),
    "4bit": frozenset({"error_codes", "error_scales"}),
}
QUANT_BLOCK = 64


def init_error(state: dict, mode: str, shape: tuple, device) -> None:
    """The error state of ``mode``; an fp32 error has ``shape``, codes cover as many elements."""
    numel = math.prod(shape)
    if mode == "fp32":
        state["error"] = torch.zeros(shape, dtype=torch.float32, device=device)
    elif mode != "none":
        bits = 8 if mode == "8bit" else 4
        state["error_codes"] = torch.zeros(K.code_bytes(numel, bits, QUANT_BLOCK), dtype=torch.uint8, device=device)
        state["error_scales"] = torch.zeros(K.n_blocks(numel, QUANT_BLOCK), 2, dtype=torch.float32, device=device)


def error_shapes(keys, numel: int) -> dict:
    """The shapes of the quantised error state (for checkpoint checks); 8 or 4 bits: the codes' size says."""
    if "error_codes" not in keys:
        return {}
    return {"error_scales": (K.n_blocks(numel, QUANT_BLOCK), 2),
            "error_codes": {(K.code_bytes(numel, 8, QUANT_BLOCK),), (K.code_bytes(numel, 4, QUANT_BLOCK),)}}


def _bits(state: dict) -> int:
    return 8 if state["error_codes"].numel() == state["error_scales"].shape[0] * QUANT_BLOCK else 4


def add_error(state: dict, grad: torch.Tensor) -> torch.Tensor:
    """``g + e`` in fp32, oriented, in a new tensor (``grad`` is left as the Trainer gave it); with no
    error kept, ``grad``'s oriented fp32 view itself (the Trainer's gradient when it is fp32: callers
    write only to a copy they passed in)."""
    g = oriented(grad).float()
    if "error" in state:
        return g + oriented(state["error"])
    if "error_codes" in state:
        g = g.contiguous()  # the kernels index it flat
        return K.dequantize_add(g, state["error_codes"], state["error_scales"], _bits(state), QUANT_BLOCK,
                                out=torch.empty_like(g))
    return g


def store_error(state: dict, error: torch.Tensor) -> None:
    """Keep ``error`` (fp32, oriented) as the state says: as is, quantised, or not at all."""
    if "error" in state:
        oriented(state["error"]).copy_(error)
    elif "error_codes" in state:
        K.quantize(error.contiguous(), state["error_codes"], state["error_scales"], _bits(state), QUANT_BLOCK)


def adamw_update(p: torch.Tensor, state: dict, lr: float, weight_decay: float, betas, eps: float) -> None:
    """One AdamW step of ``p`` with its ``state`` (``step``, fp32 ``exp_avg`` / ``exp_avg_sq``,
    created on the first call); the math in fp32 whatever ``p``'s dtype."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    state["step"] += 1
    beta1, beta2 = betas
    t = state["step"]
    direction = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    K.subspace_adam(p.grad.float().contiguous(), state["exp_avg"], state["exp_avg_sq"], direction, beta1, beta2,
                    1 - beta1 ** t, 1 - beta2 ** t, eps)
    if p.dtype == torch.float32:
        p.mul_(1 - lr * weight_decay).add_(direction, alpha=-lr)
    else:
        p.copy_(p.float().mul_(1 - lr * weight_decay).add_(direction, alpha=-lr))


def transport_moments(m: torch.Tensor, v: torch.Tensor, change: torch.Tensor, rotated: torch.Tensor, step: int,
                      betas) -> None:
    """Carry Adam moments formed at ``step`` in basis ``P_old`` into basis ``P_new`` in place
    (LDAdam's projection-aware moments): ``change = P_new^T P_old``, ``rotated = change @ m``;
    ``m <- rotated`` and ``v <- |(C∘C)(v / bc2 - m² / bc1²) + rotated² / bc1²| bc2`` (the variance
    each new coordinate inherits, plus its rotated mean squared), ``bc = 1 - beta^step``."""
    beta1, beta2 = betas
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    variance = v / bc2 - m * m / bc1 ** 2
    v.copy_(((change * change) @ variance).addcmul_(rotated, rotated, value=1 / bc1 ** 2).abs_().mul_(bc2))
    m.copy_(rotated)


class LowRankAdam(IstaOptimizer):
    """Base class: AdamW for full-rank parameters, the subspace Adam step and the parameter update
    for low-rank ones. Subclasses define ``_low_rank_update(p, group)`` (the step of one low-rank
    parameter) and ``_low_rank_shapes`` (its state's shapes, for checkpoint checks)."""

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        rank = group.get("rank")
        check_arg("rank", rank, rank is None or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1),
                  "None (plain AdamW for the group) or an integer >= 1")
        for p in group["params"]:
            # The math runs in fp32: a float64 parameter would silently lose its precision.
            check_arg("params", f"tensor of dtype {p.dtype}", p.dtype in (torch.float32, torch.bfloat16, torch.float16),
                      "float32, bfloat16 or float16 tensors")

    @staticmethod
    def is_low_rank(p: torch.Tensor, group: dict) -> bool:
        rank = group.get("rank")
        return rank is not None and p.ndim == 2 and rank < min(p.shape) and max(p.shape) < FULL_RANK_SIDE

    def _state_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        """The shape each state tensor of ``p`` must have under ``group`` (used to check a loaded
        checkpoint: a state that lands on another parameter must not be accepted)."""
        if not self.is_low_rank(p, group):
            return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
        r, N = group["rank"], max(p.shape)
        return {"exp_avg": (r, N), "exp_avg_sq": (r, N), **self._low_rank_shapes(p, group, keys)}

    def _low_rank_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        return {}

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if self.is_low_rank(p, group):
            self._low_rank_update(p, group)
        else:
            self._adamw_update(p, group)

    def _adam_direction(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """Advance ``state``'s moments with ``grad`` (fp32, their shape) at ``state["step"]`` and
        return the Adam direction ``m̂ / (sqrt(v̂) + eps)``."""
        beta1, beta2 = group["betas"]
        t = state["step"]
        direction = torch.empty_like(grad)
        K.subspace_adam(grad, state["exp_avg"], state["exp_avg_sq"], direction, beta1, beta2,
                        1 - beta1 ** t, 1 - beta2 ** t, group["eps"])
        return direction

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        adamw_update(p, self.state[p], group["lr"], group["weight_decay"], group["betas"], group["eps"])

    @staticmethod
    def _apply_low_rank(p: torch.Tensor, group: dict, basis: torch.Tensor, direction: torch.Tensor) -> None:
        """``p <- p (1 - lr wd) - lr basis @ direction`` in ``p``'s oriented view (fp32 math)."""
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        view = oriented(p)
        if p.dtype == torch.float32:
            view.addmm_(basis, direction, beta=decay, alpha=-lr)
        else:
            view.copy_(torch.addmm(view.float(), basis, direction, beta=decay, alpha=-lr))
