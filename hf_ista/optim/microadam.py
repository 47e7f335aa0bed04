"""MicroAdam (arXiv 2405.15593): Adam over a window of top-k compressed gradients, with the
compression error fed back through a 4-bit buffer. About 1 byte of state per parameter.

Per parameter of ``d`` elements, with ``t`` the 1-based step:

1. ``a = g + Q^-1(e)``                                 dequantise the error and add it
2. top-k of ``|a|`` (per chunk of <= 32768 elements) -> ring row ``(t - 1) mod m``
3. zero the selected entries of ``a``; ``e = Q(a)``      4-bit, per-block bf16 min/max
4. ``m̂, v̂`` rebuilt from the window with weights ``beta**age``; decoupled weight decay;
   ``p <- p - lr m̂ / (sqrt(v̂) + eps)``                  only the window's indices move

With ``density=1`` and ``m >= t`` this is exactly AdamW.
"""
from __future__ import annotations

import torch

from ..kernels import microadam as K
from ._base import IstaOptimizer, check_arg

VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MicroAdam(IstaOptimizer):
    """Compressed-gradient Adam with error feedback.

    Args:
        lr: learning rate (> 0).
        m: number of sparse gradients kept in the window (>= 1).
        density: fraction of entries kept per gradient, in (0, 1].
        quant_block_size: elements per 4-bit quantisation block of the error (even, >= 2).
        betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        values_dtype: storage of the window's values, ``"bf16"`` (default), ``"fp16"`` or ``"fp32"``.
    """

    state_keys = frozenset({"step", "indices", "values", "error", "error_minmax"})

    def __init__(self, params, lr: float = 1e-3, m: int = 10, density: float = 0.01,
                 quant_block_size: int = 64, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, values_dtype: str = "bf16"):
        defaults = dict(lr=lr, m=m, density=density, quant_block_size=quant_block_size,
                        betas=tuple(betas), eps=eps, weight_decay=weight_decay, values_dtype=values_dtype)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        m, density, qb = group["m"], group["density"], group["quant_block_size"]
        check_arg("m", m, isinstance(m, int) and m >= 1, "an integer >= 1")
        check_arg("density", density, isinstance(density, (int, float)) and 0 < density <= 1, "a number in (0, 1]")
        check_arg("quant_block_size", qb, isinstance(qb, int) and qb >= 2 and qb % 2 == 0, "an even integer >= 2")
        check_arg("values_dtype", group["values_dtype"], group["values_dtype"] in VALUE_DTYPES,
                  f"one of {sorted(VALUE_DTYPES)}")
        for p in group["params"]:
            check_arg("params", f"tensor of dtype {p.dtype}", p.is_floating_point(), "floating-point tensors")

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        lay = K.layout(p.numel(), group["density"], group["quant_block_size"])
        shape = (group["m"], lay.n_chunks, lay.k_chunk)
        state = self.state[p]
        state["step"] = 0
        state["indices"] = torch.zeros(shape, dtype=torch.int16, device=p.device)
        state["values"] = torch.zeros(shape, dtype=VALUE_DTYPES[group["values_dtype"]], device=p.device)
        state["error"] = torch.zeros(lay.n_qblocks * group["quant_block_size"] // 2, dtype=torch.uint8, device=p.device)
        state["error_minmax"] = torch.zeros(lay.n_qblocks, 2, dtype=torch.bfloat16, device=p.device)
        return state

    def step(self, closure=None):
        self._weights = {}  # window weights depend only on (step, m, betas, device): once per step
        return super().step(closure)

    def _window_weights(self, t: int, m: int, beta1: float, beta2: float, device) -> torch.Tensor:
        key = (t, m, beta1, beta2, device)
        if key not in self._weights:
            self._weights[key] = K.window_weights(t, m, beta1, beta2, device)
        return self._weights[key]

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p] or self._init_state(p, group)
        indices, values = state["indices"], state["values"]
        error, minmax = state["error"], state["error_minmax"]
        # The layout follows from the state itself, so a loaded checkpoint is self-describing.
        m, n_chunks, _ = indices.shape
        chunk = -(-p.numel() // n_chunks)
        quant_block_size = 2 * error.numel() // minmax.shape[0]
        beta1, beta2 = group["betas"]
        lr = group["lr"]

        state["step"] += 1
        t = state["step"]
        a = torch.empty(n_chunks * chunk, dtype=torch.float32, device=p.device)
        K.dequant_add(p.grad, error, minmax, a, quant_block_size)
        K.select_topk(a, indices, values, (t - 1) % m, chunk)
        K.compress_error(a, indices[(t - 1) % m], error, minmax, quant_block_size, chunk)

        weights = self._window_weights(t, m, beta1, beta2, p.device)
        c1 = (1 - beta1) / (1 - beta1 ** t)
        c2 = (1 - beta2) / (1 - beta2 ** t)
        flat = p if p.is_contiguous() else p.contiguous()
        K.window_update(flat, indices, values, weights, lr, group["weight_decay"], c1, c2, group["eps"], chunk)
        if flat is not p:
            p.copy_(flat)
