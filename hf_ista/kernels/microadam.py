"""MicroAdam kernels: each Triton kernel next to its torch twin (same signature, same numbers).

Data layout of one parameter with ``d`` elements (see :func:`layout`):

* the flat fp32 accumulator ``a`` is padded to ``D = n_chunks * chunk`` elements; top-k runs per
  chunk of at most 32768 elements so a chunk-relative index always fits int16;
* the sparse ring buffer is ``indices`` (int16) and ``values`` of shape ``[m, n_chunks, k_chunk]``;
* the 4-bit error is ``error`` (uint8, element ``2i`` in the low nibble, ``2i+1`` in the high one)
  with one bf16 (min, max) pair per quantisation block in ``minmax`` (shape ``[n_qblocks, 2]``).

Selection order is fixed so both twins agree bit for bit: the k largest ``|a|`` of a chunk, ties
broken towards the lower position, written in ascending position order.

Public functions dispatch through :func:`hf_ista.kernels.use_triton`; ``*_torch`` and
``*_triton`` are the two implementations, both public so tests can compare them.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .backend import device_of, triton_available, use_triton

CHUNK_MAX = 32768  # chunk-relative indices are stored as int16
_OFFSET_BITS = 15  # log2(CHUNK_MAX)


class Layout(NamedTuple):
    numel: int
    n_chunks: int
    chunk: int
    k_chunk: int
    padded: int  # D = n_chunks * chunk
    n_qblocks: int

    @property
    def k(self) -> int:
        return self.n_chunks * self.k_chunk


def layout(numel: int, density: float, quant_block_size: int) -> Layout:
    n_chunks = math.ceil(numel / CHUNK_MAX)
    chunk = math.ceil(numel / n_chunks)
    k_chunk = min(chunk, max(1, math.ceil(density * chunk)))
    padded = n_chunks * chunk
    return Layout(numel, n_chunks, chunk, k_chunk, padded, math.ceil(padded / quant_block_size))


# ---------------------------------------------------------------------------------------------
# torch twins: vectorised, the path every CPU user runs
# ---------------------------------------------------------------------------------------------


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(-1)


def dequant_add_torch(grad, error, minmax, out, quant_block_size: int) -> torch.Tensor:
    """``out[:d] = grad + Q^-1(error)[:d]``; ``out[d:] = 0``."""
    d = grad.numel()
    lo, hi = minmax.float().unbind(-1)
    codes = _unpack_nibbles(error).view(-1, quant_block_size).float()
    deq = codes * ((hi - lo) / 15)[:, None] + lo[:, None]
    out[:d] = grad.reshape(-1).float() + deq.view(-1)[:d]
    out[d:] = 0
    return out


def select_topk_torch(a, indices, values, row: int, chunk: int) -> None:
    """Write the top-k of ``|a|`` per chunk into ring row ``row`` (int16 offsets, values cast)."""
    n_chunks, k_chunk = indices.shape[1:]
    a2 = a.view(n_chunks, chunk)
    offsets = torch.arange(chunk, device=a.device)
    # Magnitude bits in the high part, reversed offset in the low part: one topk gives the
    # k largest with ties to the lower position, exactly as the Triton threshold search does.
    key = (a2.abs().view(torch.int32).to(torch.int64) << _OFFSET_BITS) | (CHUNK_MAX - 1 - offsets)
    top = key.topk(k_chunk, dim=1, sorted=False).indices.sort(dim=1).values
    indices[row] = top.to(torch.int16)
    values[row] = a2.gather(1, top).to(values.dtype)


def compress_error_torch(a, row_indices, error, minmax, quant_block_size: int, chunk: int) -> None:
    """Zero the selected entries of ``a`` and quantise the rest to 4 bits per block."""
    n_chunks = row_indices.shape[0]
    a.view(n_chunks, chunk).scatter_(1, row_indices.long(), 0.0)
    blocks = torch.zeros(minmax.shape[0] * quant_block_size, dtype=torch.float32, device=a.device)
    blocks[: a.numel()] = a
    blocks = blocks.view(-1, quant_block_size)
    bounds = torch.stack((blocks.amin(1), blocks.amax(1)), dim=1).to(torch.bfloat16)
    minmax.copy_(bounds)
    lo, hi = bounds.float().unbind(-1)
    # (x - lo) * 15 / (hi - lo), a true division (not a reciprocal): an entry zeroed above in a
    # block with lo == -hi then lands exactly on 7.5 and rounds up to 8 in both twins, instead of
    # to 7 or 8 by the rounding of 15 / (hi - lo).
    live = (hi > lo)[:, None]
    span = torch.where(live, (hi - lo)[:, None], 1.0)
    codes = ((blocks - lo[:, None]) * 15.0 / span + 0.5).floor_().clamp_(0, 15)
    codes = torch.where(live, codes, 0.0).to(torch.uint8).view(-1, 2)
    error.copy_(codes[:, 0] | (codes[:, 1] << 4))


def window_weights(step: int, m: int, beta1: float, beta2: float, device) -> torch.Tensor:
    """``[m, 2]`` fp32: ``beta1**age, beta2**age`` of each ring row at 1-based ``step``."""
    age = ((step - 1 - torch.arange(m, device=device)) % m).float()
    return torch.stack((torch.pow(beta1, age), torch.pow(beta2, age)), dim=1)


def window_update_torch(param, indices, values, weights, lr, weight_decay, c1, c2, eps, chunk) -> None:
    """Rebuild m̂, v̂ from the window and apply ``p <- p(1 - lr wd) - lr m̂ / (sqrt(v̂) + eps)``.

    ``c1 = (1 - beta1) / (1 - beta1**t)`` and ``c2 = (1 - beta2) / (1 - beta2**t)`` fold the
    (1 - beta) factor of the EMA and the bias correction into one scale each.
    """
    m, n_chunks, k_chunk = indices.shape
    flat_idx = (indices.long() + torch.arange(n_chunks, device=param.device)[:, None] * chunk).view(-1)
    vals = values.float().view(m, -1)
    moments = torch.zeros(2, n_chunks * chunk, dtype=torch.float32, device=param.device)
    first, second = vals * weights[:, :1], vals.square() * weights[:, 1:]
    if param.is_cuda:  # CUDA index_add_ adds duplicates in any order: one row at a time instead
        for r, row_idx in enumerate(flat_idx.view(m, -1)):
            moments[0].index_add_(0, row_idx, first[r])
            moments[1].index_add_(0, row_idx, second[r])
    else:  # the CPU adds in index order: rows 0..m-1, as on CUDA
        moments[0].index_add_(0, flat_idx, first.view(-1))
        moments[1].index_add_(0, flat_idx, second.view(-1))
    # Only the window's entries move (besides weight decay): compute the update there alone.
    # Duplicate indices write the same value; padded positions (>= d) hold no parameter.
    idx = flat_idx[flat_idx < param.numel()]
    mom1, mom2 = c1 * moments[0, idx], c2 * moments[1, idx]
    update = torch.where(mom2 > 0, mom1 / (mom2.sqrt() + eps), 0.0)  # eps may be 0
    flat = param.view(-1)
    decay = 1 - lr * weight_decay
    old = flat[idx].float()
    if decay != 1:
        flat.mul_(decay)
    flat[idx] = (old * decay - lr * update).to(flat.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from ._topk import chunk_threshold

    @triton.jit
    def _bf16_bits_to_f32(bits16):
        return ((bits16.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_bf16_bits(x):
        """Round-to-nearest-even fp32 -> bf16 as integer ops (the interpreter's cast is wrong)."""
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b

    @triton.jit
    def _dequant_add_kernel(grad_ptr, err_ptr, mm_ptr, out_ptr, d, D, qb, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < D
        byte = tl.load(err_ptr + i // 2, mask=live, other=0).to(tl.int32)
        code = ((byte >> ((i % 2) * 4)) & 0xF).to(tl.float32)
        q = i // qb
        lo = _bf16_bits_to_f32(tl.load(mm_ptr + 2 * q, mask=live, other=0))
        hi = _bf16_bits_to_f32(tl.load(mm_ptr + 2 * q + 1, mask=live, other=0))
        g = tl.load(grad_ptr + i, mask=i < d, other=0.0).to(tl.float32)
        out = tl.where(i < d, g + (code * tl.math.div_rn(hi - lo, 15.0) + lo), 0.0)
        tl.store(out_ptr + i, out, mask=live)

    @triton.jit
    def _select_topk_kernel(a_ptr, idx_ptr, val_ptr, row_offset, chunk, k_chunk, BLOCK: tl.constexpr):
        # One program per chunk. Binary search on the magnitude bits for the k-th largest value,
        # then an ordered compaction: no sort, bounded registers, any chunk size up to 32768.
        j = tl.program_id(0).to(tl.int64)  # offsets in int64: tensors may exceed 2**31 bytes
        base = a_ptr + j * chunk
        threshold, ties_wanted = chunk_threshold(base, chunk, k_chunk, BLOCK)
        ties_seen = 0
        written = 0
        out = row_offset + j * k_chunk
        for s in range(0, chunk, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            live = offs < chunk
            x = tl.load(base + offs, mask=live, other=0.0)
            bits = tl.abs(x).to(tl.int32, bitcast=True)
            tie = ((bits == threshold) & live).to(tl.int32)
            tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
            chosen = (((bits > threshold) & live) | ((tie == 1) & (tie_rank < ties_wanted))).to(tl.int32)
            slot = written + tl.cumsum(chosen, axis=0) - chosen
            keep = chosen == 1
            tl.store(idx_ptr + out + slot, offs.to(tl.int16), mask=keep)
            tl.store(val_ptr + out + slot, x.to(val_ptr.dtype.element_ty), mask=keep)
            ties_seen += tl.sum(tie, axis=0)
            written += tl.sum(chosen, axis=0)

    @triton.jit
    def _zero_selected_kernel(a_ptr, idx_ptr, chunk, k_chunk, BLOCK: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)  # offsets in int64: tensors may exceed 2**31 bytes
        for s in range(0, k_chunk, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            live = offs < k_chunk
            idx = tl.load(idx_ptr + j * k_chunk + offs, mask=live, other=0).to(tl.int32)
            tl.store(a_ptr + j * chunk + idx, tl.zeros([BLOCK], dtype=tl.float32), mask=live)

    @triton.jit
    def _quantize_kernel(a_ptr, err_ptr, mm_ptr, D, qb, BLOCK: tl.constexpr):
        # One program per quantisation block; even and odd elements are loaded apart so the
        # two nibbles of a byte are packed without a reshape.
        q = tl.program_id(0).to(tl.int64)
        half = qb // 2
        lo = float("inf")
        hi = float("-inf")
        for s in range(0, half, BLOCK):
            h = s + tl.arange(0, BLOCK)
            i = q * qb + 2 * h
            live = h < half
            xe = tl.load(a_ptr + i, mask=live & (i < D), other=0.0)
            xo = tl.load(a_ptr + i + 1, mask=live & (i + 1 < D), other=0.0)
            lo = tl.minimum(lo, tl.min(tl.where(live, tl.minimum(xe, xo), float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(live, tl.maximum(xe, xo), float("-inf")), axis=0))
        lo_bits = _round_to_bf16_bits(lo)
        hi_bits = _round_to_bf16_bits(hi)
        tl.store(mm_ptr + 2 * q, (lo_bits >> 16).to(tl.int16))
        tl.store(mm_ptr + 2 * q + 1, (hi_bits >> 16).to(tl.int16))
        lo = lo_bits.to(tl.float32, bitcast=True)
        hi = hi_bits.to(tl.float32, bitcast=True)
        # IEEE division (div_rn), as the torch twin: exact .5 ties round the same way in both.
        span = tl.where(hi > lo, hi - lo, 1.0)
        gate = tl.where(hi > lo, 1.0, 0.0)
        for s in range(0, half, BLOCK):
            h = s + tl.arange(0, BLOCK)
            i = q * qb + 2 * h
            live = h < half
            xe = tl.load(a_ptr + i, mask=live & (i < D), other=0.0)
            xo = tl.load(a_ptr + i + 1, mask=live & (i + 1 < D), other=0.0)
            ye = tl.floor(tl.math.div_rn((xe - lo) * 15.0, span) + 0.5) * gate
            yo = tl.floor(tl.math.div_rn((xo - lo) * 15.0, span) + 0.5) * gate
            ce = tl.minimum(tl.maximum(ye, 0.0), 15.0).to(tl.int32)
            co = tl.minimum(tl.maximum(yo, 0.0), 15.0).to(tl.int32)
            tl.store(err_ptr + q * half + h, (ce | (co << 4)).to(tl.uint8), mask=live)

    @triton.jit
    def _window_update_kernel(p_ptr, idx_ptr, val_ptr, w_ptr, mom1_ptr, mom2_ptr, m, d, chunk, k_chunk,
                              lr, decay, c1, c2, eps, n_chunks, BLOCK: tl.constexpr):
        # One program per chunk: scatter the window into this chunk's slice of the scratch
        # moments (only this program touches it), then one dense pass applies the update.
        j = tl.program_id(0).to(tl.int64)  # offsets in int64: tensors may exceed 2**31 bytes
        mom1 = mom1_ptr + j * chunk
        mom2 = mom2_ptr + j * chunk
        for s in range(0, chunk, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            zero = tl.zeros([BLOCK], dtype=tl.float32)
            tl.store(mom1 + offs, zero, mask=offs < chunk)
            tl.store(mom2 + offs, zero, mask=offs < chunk)
        tl.debug_barrier()
        for r in range(m):
            w1 = tl.load(w_ptr + 2 * r)
            w2 = tl.load(w_ptr + 2 * r + 1)
            row = (r * n_chunks + j) * k_chunk
            for s in range(0, k_chunk, BLOCK):
                offs = s + tl.arange(0, BLOCK)
                live = offs < k_chunk
                idx = tl.load(idx_ptr + row + offs, mask=live, other=0).to(tl.int32)
                v = tl.load(val_ptr + row + offs, mask=live, other=0.0).to(tl.float32)
                # Offsets are distinct within a row (zero rows add 0), so no atomics; the barrier
                # below adds rows in order 0..m-1: deterministic, as DDP ranks must be.
                tl.store(mom1 + idx, tl.load(mom1 + idx, mask=live, other=0.0) + w1 * v, mask=live)
                tl.store(mom2 + idx, tl.load(mom2 + idx, mask=live, other=0.0) + w2 * (v * v), mask=live)
            tl.debug_barrier()
        for s in range(0, chunk, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            i = j * chunk + offs
            live = (offs < chunk) & (i < d)
            mh = c1 * tl.load(mom1 + offs, mask=live, other=0.0)
            vh = c2 * tl.load(mom2 + offs, mask=live, other=0.0)
            p = tl.load(p_ptr + i, mask=live, other=0.0).to(tl.float32)
            p = p * decay - lr * tl.where(vh > 0, tl.math.div_rn(mh, tl.sqrt_rn(vh) + eps), 0.0)  # eps may be 0
            tl.store(p_ptr + i, p.to(p_ptr.dtype.element_ty), mask=live)


# Correctly rounded division and square root, no fused multiply-add: the GPU kernels then give
# the torch twins' numbers (bit for bit where the op order matches), and every DDP rank the same.
_EXACT = {"enable_fp_fusion": False}


def _block(n: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(n, 1)))


def dequant_add_triton(grad, error, minmax, out, quant_block_size: int) -> torch.Tensor:
    D = out.numel()
    block = 1024
    _dequant_add_kernel[(triton.cdiv(D, block),)](
        grad.reshape(-1), error, minmax.view(torch.int16), out, grad.numel(), D, quant_block_size, BLOCK=block, **_EXACT
    )
    return out


def select_topk_triton(a, indices, values, row: int, chunk: int) -> None:
    m, n_chunks, k_chunk = indices.shape
    _select_topk_kernel[(n_chunks,)](
        a, indices, values, row * n_chunks * k_chunk, chunk, k_chunk, BLOCK=_block(chunk, 2048), **_EXACT
    )


def compress_error_triton(a, row_indices, error, minmax, quant_block_size: int, chunk: int) -> None:
    n_chunks, k_chunk = row_indices.shape
    _zero_selected_kernel[(n_chunks,)](a, row_indices, chunk, k_chunk, BLOCK=_block(k_chunk), **_EXACT)
    _quantize_kernel[(minmax.shape[0],)](
        a, error, minmax.view(torch.int16), a.numel(), quant_block_size, BLOCK=_block(quant_block_size // 2), **_EXACT
    )


def window_update_triton(param, indices, values, weights, lr, weight_decay, c1, c2, eps, chunk) -> None:
    m, n_chunks, k_chunk = indices.shape
    scratch = torch.empty(2, n_chunks * chunk, dtype=torch.float32, device=param.device)
    _window_update_kernel[(n_chunks,)](
        param, indices, values, weights.contiguous(), scratch[0], scratch[1], m, param.numel(), chunk,
        k_chunk, lr, 1 - lr * weight_decay, c1, c2, eps, n_chunks, BLOCK=_block(chunk), **_EXACT,
    )


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def dequant_add(grad, error, minmax, out, quant_block_size: int) -> torch.Tensor:
    if not use_triton(out):
        return dequant_add_torch(grad, error, minmax, out, quant_block_size)
    with device_of(out):
        return dequant_add_triton(grad, error, minmax, out, quant_block_size)


def select_topk(a, indices, values, row: int, chunk: int) -> None:
    if not use_triton(a):
        return select_topk_torch(a, indices, values, row, chunk)
    with device_of(a):
        select_topk_triton(a, indices, values, row, chunk)


def compress_error(a, row_indices, error, minmax, quant_block_size: int, chunk: int) -> None:
    if not use_triton(a):
        return compress_error_torch(a, row_indices, error, minmax, quant_block_size, chunk)
    with device_of(a):
        compress_error_triton(a, row_indices, error, minmax, quant_block_size, chunk)


def window_update(param, indices, values, weights, lr, weight_decay, c1, c2, eps, chunk) -> None:
    if not use_triton(param):
        return window_update_torch(param, indices, values, weights, lr, weight_decay, c1, c2, eps, chunk)
    with device_of(param):
        window_update_triton(param, indices, values, weights, lr, weight_decay, c1, c2, eps, chunk)
