"""Triton device code shared by the top-k kernels (MicroAdam's window, EFCP's compressor): the k-th
largest magnitude of a chunk, found without sorting."""
from __future__ import annotations

from .backend import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_threshold(base, chunk, k_chunk, BLOCK: tl.constexpr):
        """``(threshold, ties_wanted)`` for the fp32 values ``base[0:chunk]``: the bit pattern of the
        k-th largest ``|x|`` (a binary search on the magnitude bits: a non-negative float orders as
        its bits do; bounded registers, any chunk size) and how many entries equal to it the top-k
        takes (the first ones, in index order, so the choice is deterministic)."""
        lo = 0
        hi = 0x7F800000  # bits of +inf: every finite magnitude is below
        for _ in range(31):
            mid = lo + (hi - lo + 1) // 2
            count = 0
            for s in range(0, chunk, BLOCK):
                offs = s + tl.arange(0, BLOCK)
                live = offs < chunk
                bits = tl.abs(tl.load(base + offs, mask=live, other=0.0)).to(tl.int32, bitcast=True)
                count += tl.sum(((bits >= mid) & live).to(tl.int32), axis=0)
            if count >= k_chunk:
                lo = mid
            else:
                hi = mid - 1
        greater = 0
        for s in range(0, chunk, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            live = offs < chunk
            bits = tl.abs(tl.load(base + offs, mask=live, other=0.0)).to(tl.int32, bitcast=True)
            greater += tl.sum(((bits > lo) & live).to(tl.int32), axis=0)
        return lo, k_chunk - greater
