"""Kernels of the compressed-format training (``hf_ista.scaling``): each Triton kernel next to its
torch twin, bitwise equal in fp32.

* :func:`fake_quant` — INT-b fake quantisation of rows with given per-row scales (the scales, an
  RMS times the grid's clip, are a cheap reduction left to torch): ``u = x / s``,
  ``q = (floor((clamp(u, −1, 1) + 1)·h + 0.5) / h − 1)·s`` with ``h = (2^b − 1)/2`` (the grid
  ``linspace(−s, s, 2^b)``), and the STE trust-region mask ``|u| ≤ 1``.
* :func:`topk_mask` — per row, the ``k`` largest magnitudes (ties: the first in index order), the
  k-th largest found by a binary search on the magnitude bits (``_topk.chunk_threshold``).
"""
from __future__ import annotations

import torch

from .backend import device_of, triton_available, use_triton

# ---------------------------------------------------------------------------------------------
# torch twins
# ---------------------------------------------------------------------------------------------


def fake_quant_torch(x: torch.Tensor, scale: torch.Tensor, bits: int):
    """``x`` ``(rows, cols)``, ``scale`` ``(rows, 1)``: (reconstruction, inside-clip bool mask)."""
    half = (2 ** bits - 1) / 2
    u = x / scale
    idx = torch.floor((u.clamp(-1.0, 1.0) + 1.0) * half + 0.5)
    return (idx / half - 1.0) * scale, u.abs() <= 1.0


def topk_mask_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` ``(rows, cols)``: True at each row's ``k`` largest ``|x|``, ties taken in index order."""
    a = x.abs()
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    thr = a.topk(k, dim=-1).values[:, -1:]
    greater = a > thr
    ties = a == thr
    wanted = k - greater.sum(-1, keepdim=True)
    rank = torch.cumsum(ties.to(torch.int64), dim=-1) - ties.to(torch.int64)
    return greater | (ties & (rank < wanted))


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from ._topk import chunk_threshold

    @triton.jit
    def _fake_quant_kernel(x_ptr, scale_ptr, out_ptr, inside_ptr, cols, half, BLOCK: tl.constexpr):
        # One program: BLOCK entries of one row; the same operations, in the same order, as the twin.
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < cols
        s = tl.load(scale_ptr + r)
        x = tl.load(x_ptr + r * cols + offs, mask=live, other=0.0)
        u = tl.math.div_rn(x, s)  # IEEE division, as torch
        c = tl.minimum(tl.maximum(u, -1.0), 1.0)
        idx = tl.floor((c + 1.0) * half + 0.5)
        q = (tl.math.div_rn(idx, half) - 1.0) * s
        tl.store(out_ptr + r * cols + offs, q, mask=live)
        tl.store(inside_ptr + r * cols + offs, (tl.abs(u) <= 1.0).to(tl.int8), mask=live)

    @triton.jit
    def _topk_mask_kernel(x_ptr, mask_ptr, cols, k, BLOCK: tl.constexpr):
        # One program per row: threshold bits of the k-th largest |x|, then the mask in index order.
        r = tl.program_id(0).to(tl.int64)
        base = x_ptr + r * cols
        threshold, ties_wanted = chunk_threshold(base, cols, k, BLOCK)
        ties_seen = 0
        for s in range(0, cols, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            live = offs < cols
            bits = tl.abs(tl.load(base + offs, mask=live, other=0.0)).to(tl.int32, bitcast=True)
            tie = ((bits == threshold) & live).to(tl.int32)
            tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
            chosen = ((bits > threshold) & live) | ((tie == 1) & (tie_rank < ties_wanted))
            tl.store(mask_ptr + r * cols + offs, chosen.to(tl.int8), mask=live)
            ties_seen += tl.sum(tie, axis=0)


# IEEE arithmetic, no fused multiply-add: the GPU numbers follow the twins'.
_EXACT = {"enable_fp_fusion": False}


def _block(n: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(n, 1)))


def fake_quant_triton(x: torch.Tensor, scale: torch.Tensor, bits: int):
    x, scale = x.contiguous(), scale.contiguous()
    rows, cols = x.shape
    out = torch.empty_like(x)
    inside = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
    block = _block(cols)
    with device_of(x):
        _fake_quant_kernel[(rows, triton.cdiv(cols, block))](x, scale, out, inside, cols, (2 ** bits - 1) / 2,
                                                             BLOCK=block, **_EXACT)
    return out, inside.bool()


def topk_mask_triton(x: torch.Tensor, k: int) -> torch.Tensor:
    rows, cols = x.shape
    if k <= 0 or k >= cols:
        return torch.full_like(x, k >= cols and k > 0, dtype=torch.bool)
    x = x.contiguous()
    mask = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
    with device_of(x):
        _topk_mask_kernel[(rows,)](x, mask, cols, k, BLOCK=_block(cols, 2048), **_EXACT)
    return mask.bool()


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def _kernel_ok(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.dim() == 2 and use_triton(x)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int):
    """INT-``bits`` fake quantisation of the rows of ``x`` with per-row ``scale`` ``(rows, 1)``."""
    if _kernel_ok(x):
        return fake_quant_triton(x, scale.to(x.dtype), bits)
    return fake_quant_torch(x, scale, bits)


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of each row's ``k`` largest magnitudes (ties in index order)."""
    if _kernel_ok(x):
        return topk_mask_triton(x, k)
    return topk_mask_torch(x, k)
