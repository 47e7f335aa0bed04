"""The OBS solvers: one-shot OBS (SparseGPT-style, block-wise with lazy updates), the exact least
squares on a given support, and the I-OBS iterations that re-select the support.

A linear layer's problem is ``min ‖(W − Ŵ)X‖²`` over sparse ``Ŵ``; each row ``w`` is its own problem
``f(ŵ) = (ŵ − w)ᵀ H (ŵ − w)`` with ``H = 2XXᵀ/n`` (damped), so rows never interact except through
a layer-wide mask.

Why the I-OBS iterations look the way they do: on this quadratic the Newton point from *any*
iterate is the dense ``W`` itself (the gradient is ``2H(ŵ − w)``), so projecting the Newton point
again would only repeat the first iteration. What the current iterate adds is information about
its support: at the exact solution ``ŵ`` on support ``S``

* removing a kept weight ``i`` costs ``ŵ_i² / [(H_SS)⁻¹]_ii`` (the OBS saliency within ``S``), and
* adding a pruned weight ``j`` gains ``((ŵ − w)H)_j² / s_j``, with ``s_j = H_jj − H_jS (H_SS)⁻¹ H_Sj``
  its curvature once ``S`` is re-optimised (the Schur complement),

both exact changes of ``f``. An iteration keeps the highest of these scores within the pattern
(the same count per row, or per group of ``M``), solves the least squares exactly on the new
support, and keeps, row by row, whichever of the old and new solutions has the lower error. The
reconstruction error therefore never increases from one iteration to the next.

The exact solve costs ``O(rows · cols³)`` per iteration (a batched Cholesky per row, rows in
chunks): cheap for the layers of small models, slow for a 4096-wide Llama layer.
"""
from __future__ import annotations

import torch

from hf_ista.kernels.pruning import obs_sweep, select_mask

from .masks import Pattern, select

# Elements of one [rows, cols, cols] batch in the exact solve (fp32: 64 MiB).
_SOLVE_ELEMENTS = 1 << 24


def damped_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp·mean(diag H)·I`` in fp32; an input that never fired (H_jj = 0) gets H_jj = 1, so the
    matrix stays invertible (its weights see only zeros, so any value is as good)."""
    h = hessian.float().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return h


def hessian_inverse_cholesky(hessian_damped: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``): row ``i`` of ``U`` divided by ``U_ii`` is
    the OBS update for pruning column ``i`` once the columns before it are fixed."""
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian_damped))
    return torch.linalg.cholesky(inverse, upper=True).contiguous()


def obs_prune(weight: torch.Tensor, hessian_damped: torch.Tensor, pattern: Pattern, sparsity: float,
              block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot OBS: columns left to right in blocks of ``block_size``; each block's mask is chosen by
    the saliency ``w² / U_jj²`` of its current (already compensated) weights, its columns are swept
    by :func:`obs_sweep`, and the columns after the block get the block's errors in one matmul.

    Returns the pruned weight (fp32) and the mask (True = pruned). For N:M the mask of a whole block
    is chosen at the block's start (SparseGPT re-chooses each group of ``M`` after the columns
    before it in the block are swept; the block-start choice lets one kernel sweep the block)."""
    w = weight.float().clone()
    rows, cols = w.shape
    if pattern.structured:
        block_size = max(pattern.m, block_size // pattern.m * pattern.m)
    u = hessian_inverse_cholesky(hessian_damped.float())
    pruned = torch.empty_like(w)
    mask = torch.empty(rows, cols, dtype=torch.bool, device=w.device)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = w[:, start:stop].contiguous()
        u_block = u[start:stop, start:stop].contiguous()
        block_mask = select(block, torch.diagonal(u_block) ** 2, pattern, sparsity, done=start)
        q = torch.empty_like(block)
        err = torch.empty_like(block)
        obs_sweep(block, u_block, block_mask, q, err)
        pruned[:, start:stop] = q
        mask[:, start:stop] = block_mask
        w[:, stop:] -= err @ u[start:stop, stop:]  # the lazy update of everything to the right
    return pruned, mask


def row_errors(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``(ŵ − w)ᵀ H (ŵ − w)`` for every row (fp32)."""
    delta = pruned.float() - weight.float()
    return ((delta @ hessian.float()) * delta).sum(1)


def _row_chunks(rows: int, cols: int):
    step = max(1, _SOLVE_ELEMENTS // (cols * cols))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _masked_system(hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row, ``H`` restricted to the kept columns, with 1 on the diagonal of the pruned ones:
    solving it gives the least squares on the support and exact zeros elsewhere."""
    k = keep.float()
    a = k[:, :, None] * hessian[None] * k[:, None, :]
    return a + torch.diag_embed(1.0 - k)


def solve_on_support(weight: torch.Tensor, hessian_damped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The exact minimiser of ``(ŵ − w)ᵀ H (ŵ − w)`` per row subject to ``ŵ = 0`` where ``mask``."""
    w = weight.float()
    out = torch.empty_like(w)
    rhs = w @ hessian_damped
    for rows in _row_chunks(*w.shape):
        keep = ~mask[rows]
        factor = torch.linalg.cholesky(_masked_system(hessian_damped, keep))
        out[rows] = torch.cholesky_solve((rhs[rows] * keep)[..., None], factor)[..., 0] * keep
    return out


def solve_and_score(weight: torch.Tensor, hessian_damped: torch.Tensor, mask: torch.Tensor):
    """The exact solution on the support of ``mask`` and the score of every weight there: removal
    cost for kept weights, addition gain for pruned ones (see the module docstring)."""
    w = weight.float()
    h = hessian_damped
    out = torch.empty_like(w)
    scores = torch.empty_like(w)
    rhs = w @ h
    for rows in _row_chunks(*w.shape):
        keep = ~mask[rows]
        k = keep.float()
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(_masked_system(h, keep)))
        x = (inverse @ (rhs[rows] * k)[..., None])[..., 0] * k
        cost = x * x / torch.diagonal(inverse, dim1=1, dim2=2)
        coupling = k[:, :, None] * h[None]  # H_Sj: rows of the support, every column
        schur = torch.diagonal(h) - (coupling * (inverse @ coupling)).sum(1)
        gradient = (x - w[rows]) @ h  # half the gradient of f
        gain = gradient * gradient / schur.clamp_min(torch.finfo(torch.float32).tiny)
        out[rows] = x
        scores[rows] = torch.where(keep, cost, gain).clamp_min(0.0)
    return out, scores


def iobs_prune(weight: torch.Tensor, hessian: torch.Tensor, hessian_damped: torch.Tensor, pattern: Pattern,
               sparsity: float, iterations: int = 3, block_size: int = 128):
    """I-OBS: iteration 1 is :func:`obs_prune`; each further one re-selects the support from the
    current iterate and re-solves exactly (module docstring). Returns the pruned weight, its mask and
    the summed row error ``Σ (ŵ − w)ᵀ H (ŵ − w)`` (undamped ``H``) after every iteration."""
    pruned, mask = obs_prune(weight, hessian_damped, pattern, sparsity, block_size)
    errors = row_errors(weight, pruned, hessian)
    history = [float(errors.sum())]
    counts = mask.sum(1, dtype=torch.int32)  # fixed from here on, so a layer mask keeps its total
    for _ in range(iterations - 1):
        # the exact solution on the current support (better than the sweep's, which freezes each
        # column once swept) and the scores it gives
        exact, scores = solve_and_score(weight, hessian_damped, mask)
        pruned, errors, _ = _better(weight, hessian, pruned, errors, exact)
        if pattern.structured:
            candidate_mask = select(scores, None, pattern, sparsity, square=False)
        else:
            candidate_mask = select_mask(scores, None, counts, square=False)
        candidate = solve_on_support(weight, hessian_damped, candidate_mask)
        pruned, errors, better = _better(weight, hessian, pruned, errors, candidate)
        mask = torch.where(better[:, None], candidate_mask, mask)
        history.append(float(errors.sum()))
    return pruned, mask, history


def _better(weight, hessian, pruned, errors, candidate):
    """Row by row, whichever of ``pruned`` (with row ``errors``) and ``candidate`` has the lower error."""
    candidate_errors = row_errors(weight, candidate, hessian)
    better = candidate_errors < errors
    return (torch.where(better[:, None], candidate, pruned), torch.where(better, candidate_errors, errors), better)


# ---------------------------------------------------------------------------------------------
# The vector form of the paper (sparse recovery): one I-OBS step
# ---------------------------------------------------------------------------------------------


def obs_project(theta: torch.Tensor, hessian_inverse: torch.Tensor, k: int) -> torch.Tensor:
    """Project ``theta`` onto ``k``-sparse vectors with OBS: keep the ``k`` largest saliencies
    ``θ_p² / [H⁻¹]_pp``, and correct the kept ones for the removed set ``P``:
    ``δθ = −H⁻¹[:, P] ([H⁻¹]_PP)⁻¹ θ_P``."""
    if not 0 < k <= theta.numel():
        raise ValueError(f"k={k!r} is invalid: expected 0 < k <= {theta.numel()}")
    saliency = theta * theta / torch.diagonal(hessian_inverse)
    removed = torch.ones_like(theta, dtype=torch.bool)
    removed[torch.topk(saliency, k).indices] = False
    correction = hessian_inverse[:, removed] @ torch.linalg.solve(hessian_inverse[removed][:, removed], theta[removed])
    out = theta - correction
    out[removed] = 0.0
    return out


def iobs_step(theta: torch.Tensor, gradient: torch.Tensor, hessian_inverse: torch.Tensor, k: int) -> torch.Tensor:
    """``θ ← OBS-project(θ − H⁻¹∇f(θ))``: the Newton point, projected with curvature."""
    return obs_project(theta - hessian_inverse @ gradient, hessian_inverse, k)
