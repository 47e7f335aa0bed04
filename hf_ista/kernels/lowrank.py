"""Low-rank optimizer kernels (LDAdam, DCT-AdamW): the elementwise and reduction work around the
matmuls, each Triton kernel next to its torch twin (same signature, same numbers).

* :func:`row_abs_sum` — the l1 norm of each row of a matrix: DCT-AdamW's score of each basis
  vector (row ``k`` of ``S = Q^T A`` holds the gradient's coefficients on basis vector ``k``).
* :func:`subspace_adam` — the Adam moment update and the direction ``m̂ / (sqrt(v̂) + eps)``, on the
  projected gradient (or, for parameters kept on AdamW, on the gradient itself).
* :func:`quantize` / :func:`dequantize_add` — error feedback in 8 bits (256 levels) or 4 bits
  (16 levels, element ``2i`` in the low nibble and ``2i + 1`` in the high nibble of byte ``i``),
  one fp32 ``(low, step)`` pair per block of ``block`` elements; a value comes back within half a
  step of what went in.

Matmuls stay in torch (cuBLAS on GPUs). Every tensor here is fp32 and contiguous, except the codes.
"""
from __future__ import annotations

import math

import torch

from .backend import device_of, triton_available, use_triton

# ---------------------------------------------------------------------------------------------
# torch twins
# ---------------------------------------------------------------------------------------------


def row_abs_sum_torch(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.sum(s.abs(), dim=1, out=out)


def subspace_adam_torch(g, m, v, u, beta1: float, beta2: float, bc1: float, bc2: float, eps: float) -> None:
    """``m, v`` <- Adam moments with gradient ``g`` (in place); ``u`` <- ``(m/bc1) / (sqrt(v/bc2) + eps)``."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    torch.div(m / bc1, (v / bc2).sqrt_().add_(eps), out=u)
    u.masked_fill_(v == 0, 0.0)  # eps may be 0: no 0/0


def n_blocks(numel: int, block: int) -> int:
    return math.ceil(numel / block)


def code_bytes(numel: int, bits: int, block: int) -> int:
    return n_blocks(numel, block) * block * bits // 8


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as ``[n_blocks, block]``, the tail padded with its last value, and the validity mask."""
    flat = x.reshape(-1)
    pad = n_blocks(flat.numel(), block) * block - flat.numel()
    valid = torch.ones(flat.numel() + pad, dtype=torch.bool, device=x.device)
    if pad:
        flat = torch.cat((flat, flat[-1:].expand(pad)))
        valid[-pad:] = False
    return flat.view(-1, block), valid.view(-1, block)


def quantize_torch(x, codes, scales, bits: int, block: int) -> None:
    """Quantise ``x`` per block to ``bits`` (8 or 4): ``scales[b] = (low, step)``, codes packed."""
    levels = (1 << bits) - 1
    blocks, valid = _blocks(x.float(), block)
    lo, hi = blocks.amin(1), blocks.amax(1)
    step = (hi - lo) / levels
    live = (step > 0)[:, None]
    q = ((blocks - lo[:, None]) / torch.where(live, step[:, None], 1.0) + 0.5).floor_().clamp_(0, levels)
    q = torch.where(live & valid, q, 0.0).to(torch.uint8).view(-1)
    scales.copy_(torch.stack((lo, step), dim=1))
    if bits == 4:
        q = q.view(-1, 2)
        q = q[:, 0] | (q[:, 1] << 4)
    codes.copy_(q)


def dequantize_add_torch(g, codes, scales, bits: int, block: int, out) -> torch.Tensor:
    """``out = g + Q^-1(codes, scales)`` (``out`` may be ``g``)."""
    q = torch.stack((codes & 0xF, codes >> 4), dim=-1).view(-1) if bits == 4 else codes
    values = scales[:, :1] + q.view(-1, block).float() * scales[:, 1:]
    return torch.add(g, values.view(-1)[: g.numel()].view_as(g), out=out)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _row_abs_sum_kernel(s_ptr, out_ptr, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            acc += tl.abs(tl.load(s_ptr + row * N + cols, mask=cols < N, other=0.0))
        tl.store(out_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def _subspace_adam_kernel(g_ptr, m_ptr, v_ptr, u_ptr, numel, beta1, beta2, bc1, bc2, eps,
                              BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < numel
        g = tl.load(g_ptr + i, mask=live, other=0.0)
        m = tl.load(m_ptr + i, mask=live, other=0.0) * beta1 + (1 - beta1) * g
        v = tl.load(v_ptr + i, mask=live, other=0.0) * beta2 + (1 - beta2) * g * g
        tl.store(m_ptr + i, m, mask=live)
        tl.store(v_ptr + i, v, mask=live)
        denom = tl.where(v > 0, tl.sqrt_rn(tl.math.div_rn(v, bc2)) + eps, 1.0)  # eps may be 0: no 0/0
        tl.store(u_ptr + i, tl.where(v > 0, tl.math.div_rn(tl.math.div_rn(m, bc1), denom), 0.0), mask=live)

    @triton.jit
    def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, numel, block, LEVELS: tl.constexpr,
                         PACK: tl.constexpr, HALF: tl.constexpr):
        # Each program owns one block, read as PACK interleaved lanes of HALF elements, so a 4-bit
        # byte (lanes 0 and 1) is formed in registers; PACK = 1 for 8 bits.
        b = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, HALF)
        base = b * block
        in_block = j * PACK < block
        ie = base + j * PACK
        xe = tl.load(x_ptr + ie, mask=in_block & (ie < numel), other=float("inf"))
        lo = tl.min(xe, axis=0)
        hi = tl.max(tl.where(xe == float("inf"), float("-inf"), xe), axis=0)
        if PACK == 2:
            io = ie + 1
            xo = tl.load(x_ptr + io, mask=in_block & (io < numel), other=float("inf"))
            lo = tl.minimum(lo, tl.min(xo, axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(xo == float("inf"), float("-inf"), xo), axis=0))
        step = tl.math.div_rn(hi - lo, LEVELS * 1.0)
        gate = (step > 0).to(tl.float32)  # a constant block: every code 0, step 0
        safe = tl.where(step > 0, step, 1.0)
        qe = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(xe - lo, safe) + 0.5), 0.0), LEVELS * 1.0)
        qe = tl.where(ie < numel, qe * gate, 0.0).to(tl.uint8)
        if PACK == 2:
            qo = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(xo - lo, safe) + 0.5), 0.0), LEVELS * 1.0)
            qo = tl.where(io < numel, qo * gate, 0.0).to(tl.uint8)
            tl.store(codes_ptr + b * (block // 2) + j, qe | (qo << 4), mask=in_block)
        else:
            tl.store(codes_ptr + base + j, qe, mask=in_block)
        tl.store(scales_ptr + 2 * b, lo)
        tl.store(scales_ptr + 2 * b + 1, step)

    @triton.jit
    def _dequantize_add_kernel(g_ptr, codes_ptr, scales_ptr, out_ptr, numel, block, BITS: tl.constexpr,
                               BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < numel
        if BITS == 4:
            byte = tl.load(codes_ptr + i // 2, mask=live, other=0).to(tl.int32)
            q = (byte >> ((i % 2) * 4).to(tl.int32)) & 0xF
        else:
            q = tl.load(codes_ptr + i, mask=live, other=0).to(tl.int32)
        b = i // block
        lo = tl.load(scales_ptr + 2 * b, mask=live, other=0.0)
        step = tl.load(scales_ptr + 2 * b + 1, mask=live, other=0.0)
        g = tl.load(g_ptr + i, mask=live, other=0.0)
        tl.store(out_ptr + i, g + (lo + q.to(tl.float32) * step), mask=live)


# Correctly rounded division and square root, no fused multiply-add: GPU numbers match the twins
# and every DDP rank computes the same update.
_EXACT = {"enable_fp_fusion": False}
_BLOCK = 1024


def row_abs_sum_triton(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n, N = s.shape
    _row_abs_sum_kernel[(n,)](s, out, N, BLOCK=min(_BLOCK, triton.next_power_of_2(N)), **_EXACT)
    return out


def subspace_adam_triton(g, m, v, u, beta1: float, beta2: float, bc1: float, bc2: float, eps: float) -> None:
    numel = g.numel()
    _subspace_adam_kernel[(triton.cdiv(numel, _BLOCK),)](
        g, m, v, u, numel, beta1, beta2, bc1, bc2, eps, BLOCK=_BLOCK, **_EXACT
    )


def quantize_triton(x, codes, scales, bits: int, block: int) -> None:
    pack = 2 if bits == 4 else 1
    _quantize_kernel[(scales.shape[0],)](
        x, codes, scales, x.numel(), block, LEVELS=(1 << bits) - 1, PACK=pack,
        HALF=triton.next_power_of_2(block // pack), **_EXACT,
    )


def dequantize_add_triton(g, codes, scales, bits: int, block: int, out) -> torch.Tensor:
    numel = g.numel()
    _dequantize_add_kernel[(triton.cdiv(numel, _BLOCK),)](
        g, codes, scales, out, numel, block, BITS=bits, BLOCK=_BLOCK, **_EXACT
    )
    return out


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def _check_bits(bits: int, block: int) -> None:
    if bits not in (4, 8) or block < 2 or block % 2:
        raise ValueError(f"bits must be 4 or 8 and block an even integer >= 2, got bits={bits}, block={block}")


def row_abs_sum(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if not use_triton(s):
        return row_abs_sum_torch(s, out)
    with device_of(s):
        return row_abs_sum_triton(s, out)


def subspace_adam(g, m, v, u, beta1: float, beta2: float, bc1: float, bc2: float, eps: float) -> None:
    if not use_triton(g):
        return subspace_adam_torch(g, m, v, u, beta1, beta2, bc1, bc2, eps)
    with device_of(g):
        subspace_adam_triton(g, m, v, u, beta1, beta2, bc1, bc2, eps)


def quantize(x, codes, scales, bits: int, block: int) -> None:
    _check_bits(bits, block)
    if not use_triton(x):
        return quantize_torch(x, codes, scales, bits, block)
    with device_of(x):
        quantize_triton(x, codes, scales, bits, block)


def dequantize_add(g, codes, scales, bits: int, block: int, out) -> torch.Tensor:
    _check_bits(bits, block)
    if not use_triton(g):
        return dequantize_add_torch(g, codes, scales, bits, block, out)
    with device_of(g):
        return dequantize_add_triton(g, codes, scales, bits, block, out)
