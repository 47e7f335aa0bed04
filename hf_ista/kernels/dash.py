"""DASH kernels: the work around the batched matmuls of block Shampoo, each Triton kernel next to
its torch twin (same signature, same numbers up to fp32 rounding).

* :func:`symmetric_ema` — ``out <- beta out + (1 - beta) X Xᵀ`` for a stack of blocks ``X``
  (``[batch, n, k]``, any strides: ``G`` gives Shampoo's ``L``, ``G.mT`` its ``R``). The Triton
  kernel computes only the tiles on and above the diagonal and mirrors them, so it does half the
  multiply-adds of ``baddbmm`` and its result is exactly symmetric.
* :func:`graft_moments` — one pass over the stacked gradient for Adam grafting: the EMA of the
  gradient ``m``, the EMA of its square ``a``, the grafted direction ``d = m̂ / (sqrt(â) + eps)``
  and each block's ``‖d‖²`` (per-chunk partial sums, added in a fixed order: no atomics, so every
  DDP rank gets the same norms).

The Newton-DB and Chebyshev steps are matmuls whose elementwise part ``baddbmm``'s ``alpha`` and
``beta`` already fuse (``hf_ista.linalg.inv_root``); the grafting rescale is one norm and one
scale per block in torch. All tensors are fp32.
"""
from __future__ import annotations

import torch

from .backend import device_of, triton_available, use_triton

# ---------------------------------------------------------------------------------------------
# torch twins
# ---------------------------------------------------------------------------------------------


def symmetric_ema_torch(x: torch.Tensor, out: torch.Tensor, beta: float) -> None:
    torch.baddbmm(out, x, x.mT, beta=beta, alpha=1 - beta, out=out)


def graft_moments_torch(g, m, a, d, beta_g: float, beta_a: float, bc_g: float, bc_a: float, eps: float,
                        sq_norms: torch.Tensor) -> None:
    """``m, a`` <- EMAs of ``g`` and ``g²`` (in place); ``d`` <- ``(m/bc_g) / (sqrt(a/bc_a) + eps)``;
    ``sq_norms[b]`` <- ``‖d[b]‖²``. ``g, m, a, d``: ``[batch, ...]`` contiguous; ``sq_norms``: ``[batch]``."""
    m.mul_(beta_g).add_(g, alpha=1 - beta_g)
    a.mul_(beta_a).addcmul_(g, g, value=1 - beta_a)
    torch.div(m / bc_g, (a / bc_a).sqrt_().add_(eps), out=d)
    d.masked_fill_(a == 0, 0.0)  # eps may be 0: no 0/0
    torch.sum(d.reshape(d.shape[0], -1).square(), dim=1, out=sq_norms)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _symmetric_ema_kernel(x_ptr, out_ptr, n, k, sxb, sxn, sxk, beta, TILE: tl.constexpr,
                              BK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        ti = tl.program_id(1)
        tj = tl.program_id(2)
        if ti <= tj:  # the upper triangle of tiles; each is mirrored below the diagonal
            rows = ti * TILE + tl.arange(0, TILE)
            cols = tj * TILE + tl.arange(0, TILE)
            acc = tl.zeros([TILE, TILE], dtype=tl.float32)
            for start in range(0, k, BK):
                kk = start + tl.arange(0, BK)
                xi = tl.load(x_ptr + b * sxb + rows[:, None] * sxn + kk[None, :] * sxk,
                             mask=(rows[:, None] < n) & (kk[None, :] < k), other=0.0)
                xj = tl.load(x_ptr + b * sxb + cols[:, None] * sxn + kk[None, :] * sxk,
                             mask=(cols[:, None] < n) & (kk[None, :] < k), other=0.0)
                acc = tl.dot(xi, tl.trans(xj), acc, input_precision="ieee")
            base = out_ptr + b * n * n
            upper = base + rows[:, None] * n + cols[None, :]
            live = (rows[:, None] < n) & (cols[None, :] < n)
            value = beta * tl.load(upper, mask=live, other=0.0) + (1 - beta) * acc
            if ti == tj:
                value = 0.5 * (value + tl.trans(value))
                tl.store(upper, value, mask=live)
            else:
                tl.store(upper, value, mask=live)
                lower = base + cols[:, None] * n + rows[None, :]
                tl.store(lower, tl.trans(value), mask=(cols[:, None] < n) & (rows[None, :] < n))

    @triton.jit
    def _graft_moments_kernel(g_ptr, m_ptr, a_ptr, d_ptr, partial_ptr, block_numel, n_chunks, beta_g, beta_a,
                              bc_g, bc_a, eps, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        j = c * BLOCK + tl.arange(0, BLOCK)
        live = j < block_numel
        i = b * block_numel + j
        g = tl.load(g_ptr + i, mask=live, other=0.0)
        m = tl.load(m_ptr + i, mask=live, other=0.0) * beta_g + (1 - beta_g) * g
        a = tl.load(a_ptr + i, mask=live, other=0.0) * beta_a + (1 - beta_a) * g * g
        tl.store(m_ptr + i, m, mask=live)
        tl.store(a_ptr + i, a, mask=live)
        denom = tl.where(a > 0, tl.sqrt_rn(tl.math.div_rn(a, bc_a)) + eps, 1.0)  # eps may be 0: no 0/0
        d = tl.where(a > 0, tl.math.div_rn(tl.math.div_rn(m, bc_g), denom), 0.0)
        tl.store(d_ptr + i, d, mask=live)
        tl.store(partial_ptr + b * n_chunks + c, tl.sum(d * d, axis=0))


# Correctly rounded division and square root, no fused multiply-add outside the matmul tiles.
_EXACT = {"enable_fp_fusion": False}
_TILE, _BK, _BLOCK = 64, 32, 1024


def symmetric_ema_triton(x: torch.Tensor, out: torch.Tensor, beta: float) -> None:
    batch, n, k = x.shape
    tiles = triton.cdiv(n, _TILE)
    _symmetric_ema_kernel[(batch, tiles, tiles)](x, out, n, k, *x.stride(), beta, TILE=_TILE, BK=_BK, **_EXACT)


def graft_moments_triton(g, m, a, d, beta_g: float, beta_a: float, bc_g: float, bc_a: float, eps: float,
                         sq_norms: torch.Tensor) -> None:
    batch = g.shape[0]
    block_numel = g.numel() // batch
    n_chunks = triton.cdiv(block_numel, _BLOCK)
    partial = torch.empty(batch, n_chunks, dtype=torch.float32, device=g.device)
    _graft_moments_kernel[(batch, n_chunks)](g, m, a, d, partial, block_numel, n_chunks, beta_g, beta_a,
                                             bc_g, bc_a, eps, BLOCK=_BLOCK, **_EXACT)
    torch.sum(partial, dim=1, out=sq_norms)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def symmetric_ema(x: torch.Tensor, out: torch.Tensor, beta: float) -> None:
    """``out <- beta out + (1 - beta) x xᵀ`` for ``x`` ``[batch, n, k]`` (fp32, any strides) and
    ``out`` ``[batch, n, n]`` (fp32, contiguous, symmetric)."""
    if x.ndim != 3 or out.shape != (x.shape[0], x.shape[1], x.shape[1]) or not out.is_contiguous():
        raise ValueError(f"symmetric_ema: x {tuple(x.shape)} and out {tuple(out.shape)} do not fit "
                         f"([batch, n, k] and a contiguous [batch, n, n])")
    if not use_triton(x):
        return symmetric_ema_torch(x, out, beta)
    with device_of(x):
        symmetric_ema_triton(x, out, beta)


def graft_moments(g, m, a, d, beta_g: float, beta_a: float, bc_g: float, bc_a: float, eps: float,
                  sq_norms: torch.Tensor) -> None:
    """Adam grafting moments and direction for a stack of blocks (see the module doc)."""
    if not use_triton(g):
        return graft_moments_torch(g, m, a, d, beta_g, beta_a, bc_g, bc_a, eps, sq_norms)
    with device_of(g):
        graft_moments_triton(g, m, a, d, beta_g, beta_a, bc_g, bc_a, eps, sq_norms)
