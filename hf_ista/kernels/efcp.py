"""EFCP kernels (sparse M-FAC, sparse GGT): each Triton kernel next to its torch twin.

Layout of one parameter with ``d`` elements (see :func:`layout`):

* it is cut into ``n_chunks`` chunks of ``chunk <= 32768`` elements (padded to
  ``D = n_chunks * chunk``); top-k keeps ``k_chunk`` entries per chunk, so every chunk, and every
  DDP rank, selects the same number of entries and the kernels parallelise over chunks;
* the ring buffer of ``m`` compressed gradients is ``indices`` (int32, or int64 for a parameter of
  2**31 elements or more) and ``values`` (fp32), both ``[m, n_chunks, k_chunk]``. Indices are
  *parameter-relative* (``chunk_start + offset``), never narrowed: the authors' int16 packing of
  block-relative offsets >= 32768 cannot happen here;
* the error-feedback buffer ``error`` is fp32 ``[D]``.

With ``k_chunk == chunk`` (density 1) rows are dense: ``indices`` is empty and ``values`` holds the
whole padded gradient; :func:`row_dots` and :func:`combine_rows` are then plain matmuls on every
backend (the job cuBLAS does best).

Selection order is fixed so both twins agree bit for bit: the ``k_chunk`` largest ``|acc|`` of a
chunk, ties broken towards the lower position, written in ascending position order.

Public functions dispatch through :func:`hf_ista.kernels.use_triton`; ``*_torch`` and ``*_triton``
are the two implementations, both public so tests can compare them.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .backend import device_of, triton_available, use_triton

CHUNK_MAX = 32768
_OFFSET_BITS = 15  # log2(CHUNK_MAX): the tie-break field of the torch twin's sort key


class Layout(NamedTuple):
    numel: int
    n_chunks: int
    chunk: int
    k_chunk: int

    @property
    def padded(self) -> int:
        return self.n_chunks * self.chunk

    @property
    def k(self) -> int:
        return self.n_chunks * self.k_chunk

    @property
    def dense(self) -> bool:
        return self.k_chunk == self.chunk

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.int32 if self.padded < 2**31 else torch.int64


def layout(numel: int, density: float) -> Layout:
    n_chunks = max(1, math.ceil(numel / CHUNK_MAX))
    chunk = max(1, math.ceil(numel / n_chunks))
    k_chunk = min(chunk, max(1, math.ceil(density * chunk)))
    return Layout(numel, n_chunks, chunk, k_chunk)


# ---------------------------------------------------------------------------------------------
# torch twins
# ---------------------------------------------------------------------------------------------


def compress_torch(grad, error, indices, values, c, row: int, chunk: int) -> None:
    """Error feedback and top-k, in place.

    ``acc = error + grad`` (``grad`` flat with ``d <= D`` elements, zero beyond); ring row ``row``
    of ``indices`` / ``values`` gets the top-k of ``|acc|`` per chunk; ``c`` (fp32 ``[D]``) the
    compressed gradient as a dense vector; ``error = acc - c``. Dense rows (empty ``indices``):
    ``c = grad`` (the error is always 0 and ``error`` is empty).
    """
    d = grad.numel()
    if indices.numel() == 0:  # dense rows: the error stays 0 and is not stored (``error`` is empty)
        c.zero_()[:d] = grad.reshape(-1)
        values[row] = c.view(values.shape[1:])
        return
    acc = error.clone()
    acc[:d] += grad.reshape(-1).float()
    n_chunks, k_chunk = indices.shape[1:]
    a2 = acc.view(n_chunks, chunk)
    offsets = torch.arange(chunk, device=acc.device)
    # magnitude bits high, reversed offset low: one topk = k largest, ties to the lower position
    key = (a2.abs().view(torch.int32).to(torch.int64) << _OFFSET_BITS) | (CHUNK_MAX - 1 - offsets)
    top = key.topk(k_chunk, dim=1, sorted=False).indices.sort(dim=1).values
    picked = a2.gather(1, top)
    values[row] = picked
    indices[row] = (top + torch.arange(n_chunks, device=acc.device)[:, None] * chunk).to(indices.dtype)
    c.zero_().view(n_chunks, chunk).scatter_(1, top, picked)
    error.copy_(acc - c)


def row_dots_torch(indices, values, x, out) -> torch.Tensor:
    """``out[r] = <row r of the window, x>`` for a dense fp32 ``x`` of ``D`` elements (``G·x``)."""
    m = values.shape[0]
    if indices.numel() == 0:
        return torch.mv(values.view(m, -1), x, out=out)
    flat = indices.view(m, -1).long()
    return torch.sum(values.view(m, -1) * x[flat], dim=1, out=out)


def combine_rows_torch(indices, values, w, out) -> torch.Tensor:
    """``out += Σ_r w[r] · row r`` scattered into the dense fp32 ``out`` of ``D`` elements (``Gᵀ·w``)."""
    m = values.shape[0]
    if indices.numel() == 0:
        return out.add_(w @ values.view(m, -1))
    contrib = (values.view(m, -1) * w[:, None]).view(-1)
    flat = indices.view(-1).long()
    if out.is_cuda:  # CUDA index_add_ adds duplicates in any order: one row at a time (deterministic)
        for r in range(m):
            out.index_add_(0, indices[r].reshape(-1).long(), contrib.view(m, -1)[r])
        return out
    return out.index_add_(0, flat, contrib)  # the CPU adds in index order: rows 0..m-1


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    from ._topk import chunk_threshold

    @triton.jit
    def _compress_kernel(grad_ptr, err_ptr, idx_ptr, val_ptr, c_ptr, row_offset, d, chunk, k_chunk,
                         BLOCK: tl.constexpr):
        # One program per chunk. 1) acc = error + grad, written back into error. 2) binary search
        # on the magnitude bits for the k-th largest |acc|. 3) ordered compaction of the chosen
        # entries into the ring row, c = chosen entries (dense), error = acc - c.
        j = tl.program_id(0).to(tl.int64)
        start = j * chunk
        for s in range(0, chunk, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            i = start + offs
            live = offs < chunk
            e = tl.load(err_ptr + i, mask=live, other=0.0)
            g = tl.load(grad_ptr + i, mask=live & (i < d), other=0.0).to(tl.float32)
            tl.store(err_ptr + i, e + g, mask=live)
        tl.debug_barrier()
        threshold, ties_wanted = chunk_threshold(err_ptr + start, chunk, k_chunk, BLOCK)
        ties_seen = 0
        written = 0
        out = row_offset + j * k_chunk
        for s in range(0, chunk, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            live = offs < chunk
            x = tl.load(err_ptr + start + offs, mask=live, other=0.0)
            bits = tl.abs(x).to(tl.int32, bitcast=True)
            tie = ((bits == threshold) & live).to(tl.int32)
            tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie
            chosen = (((bits > threshold) & live) | ((tie == 1) & (tie_rank < ties_wanted))).to(tl.int32)
            slot = written + tl.cumsum(chosen, axis=0) - chosen
            keep = chosen == 1
            tl.store(idx_ptr + out + slot, (start + offs).to(idx_ptr.dtype.element_ty), mask=keep)
            tl.store(val_ptr + out + slot, x, mask=keep)
            tl.store(c_ptr + start + offs, tl.where(keep, x, 0.0), mask=live)
            tl.store(err_ptr + start + offs, tl.where(keep, 0.0, x), mask=live)
            ties_seen += tl.sum(tie, axis=0)
            written += tl.sum(chosen, axis=0)

    @triton.jit
    def _row_dots_kernel(idx_ptr, val_ptr, x_ptr, out_ptr, k, BLOCK: tl.constexpr):
        # One program per ring row: a sparse row times a dense vector, summed in a fixed order.
        r = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, k, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            live = offs < k
            idx = tl.load(idx_ptr + r * k + offs, mask=live, other=0).to(tl.int64)
            v = tl.load(val_ptr + r * k + offs, mask=live, other=0.0)
            acc += v * tl.load(x_ptr + idx, mask=live, other=0.0)
        tl.store(out_ptr + r, tl.sum(acc, axis=0))

    @triton.jit
    def _combine_rows_kernel(idx_ptr, val_ptr, w_ptr, out_ptr, m, n_chunks, k_chunk, BLOCK: tl.constexpr):
        # One program per chunk: every row's entries of chunk j land in chunk j of ``out`` (indices
        # are parameter-relative and chunk-ordered), which only this program touches, so rows are
        # added in order 0..m-1 without atomics: deterministic, as DDP ranks must be.
        j = tl.program_id(0).to(tl.int64)
        for r in range(m):
            w = tl.load(w_ptr + r)
            row = (r * n_chunks + j) * k_chunk
            for s in range(0, k_chunk, BLOCK):
                offs = s + tl.arange(0, BLOCK)
                live = offs < k_chunk
                idx = tl.load(idx_ptr + row + offs, mask=live, other=0).to(tl.int64)
                v = tl.load(val_ptr + row + offs, mask=live, other=0.0)
                # offsets are distinct within a row, so this read-modify-write has no conflicts
                tl.store(out_ptr + idx, tl.load(out_ptr + idx, mask=live, other=0.0) + w * v, mask=live)
            tl.debug_barrier()


# IEEE arithmetic, no fused multiply-add: GPU numbers follow the twins' and agree across ranks.
_EXACT = {"enable_fp_fusion": False}


def _block(n: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(n, 1)))


def compress_triton(grad, error, indices, values, c, row: int, chunk: int) -> None:
    if indices.numel() == 0:  # dense rows: nothing to select
        return compress_torch(grad, error, indices, values, c, row, chunk)
    m, n_chunks, k_chunk = indices.shape
    _compress_kernel[(n_chunks,)](grad.reshape(-1), error, indices, values, c, row * n_chunks * k_chunk,
                                  grad.numel(), chunk, k_chunk, BLOCK=_block(chunk, 2048), **_EXACT)


def row_dots_triton(indices, values, x, out) -> torch.Tensor:
    if indices.numel() == 0:
        return row_dots_torch(indices, values, x, out)
    m = values.shape[0]
    k = values[0].numel()
    _row_dots_kernel[(m,)](indices, values, x, out, k, BLOCK=_block(k), **_EXACT)
    return out


def combine_rows_triton(indices, values, w, out) -> torch.Tensor:
    if indices.numel() == 0:
        return combine_rows_torch(indices, values, w, out)
    m, n_chunks, k_chunk = indices.shape
    _combine_rows_kernel[(n_chunks,)](indices, values, w.contiguous(), out, m, n_chunks, k_chunk,
                                      BLOCK=_block(k_chunk), **_EXACT)
    return out


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def compress(grad, error, indices, values, c, row: int, chunk: int) -> None:
    if not use_triton(error):
        return compress_torch(grad, error, indices, values, c, row, chunk)
    with device_of(error):
        compress_triton(grad, error, indices, values, c, row, chunk)


def row_dots(indices, values, x, out) -> torch.Tensor:
    if not use_triton(x):
        return row_dots_torch(indices, values, x, out)
    with device_of(x):
        return row_dots_triton(indices, values, x, out)


def combine_rows(indices, values, w, out) -> torch.Tensor:
    if not use_triton(out):
        return combine_rows_torch(indices, values, w, out)
    with device_of(out):
        return combine_rows_triton(indices, values, w, out)
