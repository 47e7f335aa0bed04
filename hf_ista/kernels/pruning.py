"""Pruning kernels (magnitude, Wanda, OBS, I-OBS): the mask selection and the OBS column sweep,
each Triton kernel next to its torch twin (same signature, same numbers).

* :func:`select_mask` — which weights to prune: per row, the ``counts[r]`` lowest scores (ties go
  to the lower column index), or, with ``n:m``, the ``m - n`` lowest of every ``m`` consecutive
  columns. With ``square=True`` the score is the saliency ``w**2 / d[col]`` computed on the fly
  (magnitude: ``d = 1``; Wanda: ``d = 1 / diag(H)``; OBS: ``d = [H^-1]_jj`` or the squared
  diagonal of its Cholesky factor), otherwise ``w`` already holds the scores.
* :func:`obs_sweep` — the inner loop of the block-wise OBS prune (SparseGPT): for each column ``i``
  of a block, left to right, prune the masked weights of that column and spread the error over
  the columns to its right, ``W[:, i:] -= err ⊗ U[i, i:]`` with ``err = (w_i - q_i) / U_ii``; for
  N:M it also picks each group's mask when the sweep reaches the group (as SparseGPT does). The
  Triton kernel keeps a tile of rows in registers for the whole block: one launch per block instead
  of ``block`` tiny rank-one updates.

Matmuls (the lazy update of the columns after the block) stay in torch. Every float tensor here is
fp32 and contiguous; masks are ``torch.bool`` (True = prune).
"""
from __future__ import annotations

import torch

from .backend import device_of, triton_available, use_triton

# Rows longer than this are selected by torch even on the Triton path: one program sorts one row in
# registers, which stops being sensible far beyond a Llama MLP row (11008 columns).
MAX_TRITON_ROW = 16384

# ---------------------------------------------------------------------------------------------
# torch twins
# ---------------------------------------------------------------------------------------------


def _scores(w: torch.Tensor, d: torch.Tensor | None, square: bool) -> torch.Tensor:
    # "+ 0.0" turns -0.0 into +0.0, so the int32 view of a non-negative score orders like the float
    s = w * w / d if square else w
    return s + 0.0


def select_mask_torch(w: torch.Tensor, d: torch.Tensor | None, counts: torch.Tensor | None,
                      n: int = 0, m: int = 0, square: bool = True) -> torch.Tensor:
    """Prune mask (True = prune) of ``w`` ``[rows, cols]``; see the module docstring."""
    s = _scores(w, d, square)
    rows, cols = s.shape
    if m:
        g = s.view(rows, cols // m, m)
        j = torch.arange(m, device=s.device)
        # rank inside the group: how many members score lower, or the same at a lower index
        lower = (g[..., None, :] < g[..., :, None]) | ((g[..., None, :] == g[..., :, None]) & (j[None, :] < j[:, None]))
        return (lower.sum(-1) < m - n).view(rows, cols)
    # A unique sort key per element: the score's bits above, the column below.
    keys = (s.view(torch.int32).to(torch.int64) << 32) | torch.arange(cols, device=s.device)
    ordered = torch.sort(keys, dim=1).values
    last = ordered.gather(1, (counts.to(torch.int64) - 1).clamp_(min=0)[:, None])
    return (keys <= last) & (counts[:, None] > 0)


def obs_sweep_torch(w: torch.Tensor, u: torch.Tensor, prune: torch.Tensor, q: torch.Tensor,
                    err: torch.Tensor, n: int = 0, m: int = 0) -> None:
    """One OBS block: ``w`` ``[rows, b]`` (updated in place), ``u`` ``[b, b]`` the block of the upper
    Cholesky factor of ``H^-1``, ``prune`` ``[rows, b]``; writes the pruned block to ``q`` and the
    scaled errors (for the lazy update of the later columns) to ``err``.

    With ``m > 0`` (N:M), ``prune`` is an output: at every ``m``-th column the group's mask is chosen
    from the saliency ``w² / U_jj²`` of its weights as the columns before it left them (SparseGPT)."""
    for i in range(w.shape[1]):
        if m and i % m == 0:
            d = torch.diagonal(u)[i:i + m]
            prune[:, i:i + m] = select_mask_torch(w[:, i:i + m], d * d, None, n, m)
        col = w[:, i]
        kept = torch.where(prune[:, i], 0.0, col)
        e = (col - kept) / u[i, i]
        q[:, i] = kept
        err[:, i] = e
        w[:, i:] -= e[:, None] * u[i, i:][None, :]


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _select_rows_kernel(w_ptr, d_ptr, counts_ptr, prune_ptr, cols, SQUARE: tl.constexpr,
                            BLOCK: tl.constexpr):
        # One program per row: sort the row's keys (score bits << 32 | column) and prune the keys up
        # to the counts[row]-th smallest.
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK)
        live = j < cols
        x = tl.load(w_ptr + row * cols + j, mask=live, other=0.0)
        if SQUARE:
            x = tl.math.div_rn(x * x, tl.load(d_ptr + j, mask=live, other=1.0))
        x = x + 0.0
        keys = (x.to(tl.int32, bitcast=True).to(tl.int64) << 32) | j.to(tl.int64)
        keys = tl.where(live, keys, 0x7FFFFFFFFFFFFFFF)
        ordered = tl.sort(keys)
        count = tl.load(counts_ptr + row).to(tl.int32)
        last = tl.sum(tl.where(j == count - 1, ordered, 0), axis=0)
        prune = (keys <= last) & (count > 0)
        tl.store(prune_ptr + row * cols + j, prune.to(tl.int8), mask=live)

    @triton.jit
    def _select_nm_kernel(w_ptr, d_ptr, prune_ptr, cols, N: tl.constexpr, M: tl.constexpr,
                          SQUARE: tl.constexpr, GROUPS: tl.constexpr):
        # One program per (row, GROUPS groups of M): rank each member inside its group by pairwise
        # comparison (M is small), prune the M - N lowest.
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        j = tl.arange(0, M)
        col = g[:, None] * M + j[None, :]
        live = col < cols
        x = tl.load(w_ptr + row * cols + col, mask=live, other=0.0)
        if SQUARE:
            x = tl.math.div_rn(x * x, tl.load(d_ptr + col, mask=live, other=1.0))
        x = x + 0.0
        a = x[:, :, None]  # the member being ranked
        b = x[:, None, :]  # the others
        lower = (b < a) | ((b == a) & (j[None, None, :] < j[None, :, None]))
        rank = tl.sum(lower.to(tl.int32), axis=2)
        tl.store(prune_ptr + row * cols + col, (rank < M - N).to(tl.int8), mask=live)

    @triton.jit
    def _obs_sweep_kernel(w_ptr, u_ptr, prune_ptr, q_ptr, err_ptr, rows, b, N: tl.constexpr, M: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # A tile of ROWS rows x the whole block stays in registers while its columns are swept.
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK)
        live_r = r < rows
        tile = live_r[:, None] & (c[None, :] < b)
        w = tl.load(w_ptr + r[:, None] * b + c[None, :], mask=tile, other=0.0)
        for i in range(0, b):
            if M > 0:
                if i % M == 0:
                    # N:M: choose this group's mask from the weights as the sweep has left them
                    j = tl.arange(0, M)
                    at = c[None, None, :] == (i + j)[None, :, None]
                    group = tl.sum(tl.where(at, w[:, None, :], 0.0), axis=2)  # [ROWS, M]
                    d = tl.load(u_ptr + (i + j) * b + (i + j))
                    s = tl.math.div_rn(group * group, (d * d)[None, :]) + 0.0
                    a = s[:, :, None]
                    o = s[:, None, :]
                    lower = (o < a) | ((o == a) & (j[None, None, :] < j[None, :, None]))
                    rank = tl.sum(lower.to(tl.int32), axis=2)
                    tl.store(prune_ptr + r[:, None] * b + (i + j)[None, :], (rank < M - N).to(tl.int8),
                             mask=live_r[:, None])
                    tl.debug_barrier()  # the flags are read back below, by other threads
            at_i = c[None, :] == i
            col = tl.sum(tl.where(at_i, w, 0.0), axis=1)  # exact: one term is not zero
            prune = tl.load(prune_ptr + r * b + i, mask=live_r, other=0) != 0
            kept = tl.where(prune, 0.0, col)
            e = tl.math.div_rn(col - kept, tl.load(u_ptr + i * b + i))
            tl.store(q_ptr + r * b + i, kept, mask=live_r)
            tl.store(err_ptr + r * b + i, e, mask=live_r)
            u_row = tl.load(u_ptr + i * b + c, mask=(c >= i) & (c < b), other=0.0)
            w = tl.where(c[None, :] >= i, w - e[:, None] * u_row[None, :], w)
        tl.store(w_ptr + r[:, None] * b + c[None, :], w, mask=tile)


# Correctly rounded division, no fused multiply-add: GPU numbers match the twins.
_EXACT = {"enable_fp_fusion": False}
_NM_GROUPS = 64
_SWEEP_ROWS = 16


def select_mask_triton(w, d, counts, n: int = 0, m: int = 0, square: bool = True) -> torch.Tensor:
    rows, cols = w.shape
    out = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    d_arg = d if square else w  # never read when square is False
    if m:
        grid = (rows, triton.cdiv(cols // m, _NM_GROUPS))
        _select_nm_kernel[grid](w, d_arg, out, cols, N=n, M=m, SQUARE=square, GROUPS=_NM_GROUPS, **_EXACT)
    else:
        _select_rows_kernel[(rows,)](w, d_arg, counts, out, cols, SQUARE=square,
                                     BLOCK=triton.next_power_of_2(cols), **_EXACT)
    return out.bool()


def obs_sweep_triton(w, u, prune, q, err, n: int = 0, m: int = 0) -> None:
    rows, b = w.shape
    _obs_sweep_kernel[(triton.cdiv(rows, _SWEEP_ROWS),)](
        w, u, prune.view(torch.int8), q, err, rows, b, N=n, M=m, ROWS=_SWEEP_ROWS,
        BLOCK=triton.next_power_of_2(b), **_EXACT,
    )


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def _check_pattern(cols: int, n: int, m: int, counts) -> None:
    if m:
        if not 0 <= n <= m or cols % m:
            raise ValueError(f"n:m={n}:{m} is invalid for {cols} columns: expected 0 <= n <= m and m dividing cols")
    elif counts is None:
        raise ValueError("counts is required for unstructured selection (m=0)")


def select_mask(w: torch.Tensor, d: torch.Tensor | None, counts: torch.Tensor | None,
                n: int = 0, m: int = 0, square: bool = True) -> torch.Tensor:
    """Prune mask (True = prune) for ``w`` ``[rows, cols]`` fp32: the ``counts[r]`` (int32) lowest
    scores of each row, or with ``m > 0`` all but the ``n`` highest of each group of ``m``.
    Scores are ``w**2 / d`` (``d`` ``[cols]``) when ``square``, else ``w`` itself (non-negative)."""
    _check_pattern(w.shape[1], n, m, counts)
    w = w.contiguous()
    counts = None if counts is None else counts.to(device=w.device, dtype=torch.int32).contiguous()
    # Triton ranks an n:m group with tl.arange(0, m): a power of two only.
    if not use_triton(w) or (not m and w.shape[1] > MAX_TRITON_ROW) or (m & (m - 1)):
        return select_mask_torch(w, d, counts, n, m, square)
    with device_of(w):
        return select_mask_triton(w, d, counts, n, m, square)


def obs_sweep(w: torch.Tensor, u: torch.Tensor, prune: torch.Tensor, q: torch.Tensor, err: torch.Tensor,
              n: int = 0, m: int = 0) -> None:
    """The column sweep of one OBS block (see :func:`obs_sweep_torch`); with ``m > 0`` it also
    chooses the N:M mask, written to ``prune``."""
    if not all(t.is_contiguous() for t in (w, prune, q, err)):
        raise ValueError("obs_sweep: w, prune, q and err must be contiguous (they are written in place)")
    if m:
        _check_pattern(w.shape[1], n, m, None)
    if not use_triton(w) or (m & (m - 1)):
        return obs_sweep_torch(w, u, prune, q, err, n, m)
    with device_of(w):
        obs_sweep_triton(w, u.contiguous(), prune, q, err, n, m)
