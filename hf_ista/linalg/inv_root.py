"""Inverse p-th roots of batches of symmetric positive semi-definite matrices, ``(X + eps s I)^(-1/p)``.

Shampoo needs ``L^(-1/4)`` and ``R^(-1/4)`` of every block; DASH computes them for a whole stack of
blocks at once (``X`` of shape ``[batch, n, n]``) with one of four methods:

* ``"evd"`` — ``eigh``, eigenvalues clamped at 0, ``Q diag((λ + eps s)^(-1/p)) Qᵀ``: the reference.
* ``"cn"`` — coupled Newton (Distributed Shampoo's default): ``T = ((p+1) I − M) / p``,
  ``Y ← Y T``, ``M ← T^p M``, from ``M = z A``, ``Y = z^(1/p) I`` with ``z = (p+1)/2``; integer ``p``.
* ``"ndb"`` — Newton–Denman–Beavers (the Newton–Schulz form): with ``E = 1.5 I − 0.5 Z Y``,
  ``Y ← Y E``, ``Z ← E Z`` from ``Y = A``, ``Z = I``; ``Y → A^(1/2)``, ``Z → A^(-1/2)``.
  ``p = 2`` is one run; ``p = 4`` takes the square root, then the inverse square root of that.
* ``"cheby"`` — a Chebyshev polynomial of ``y ↦ (y + eps)^(-1/p)`` on ``[0, 1]`` (coefficients by
  numpy's Chebyshev interpolation, computed once per ``(p, degree, eps)``), evaluated on
  ``S = 2 A − I`` with Clenshaw's recurrence; ``p`` any positive number.

Every method first divides ``X`` by a per-matrix scale ``s ≈ λ_max`` so that ``A = X / s`` has its
spectrum in ``[0, 1]`` — the iterations converge there, and the polynomial is fitted there:
``"fro"`` uses the Frobenius norm (always an upper bound, loose by up to ``sqrt(n)``), ``"power"``
a batched power iteration (tight; ``POWER_MARGIN`` times the estimate, never above the Frobenius
norm; Chebyshev evaluates on an interval ``CHEBY_WIDEN`` times wider, as power iteration
approaches ``λ_max`` from below). The damping is *relative*: ``eps s`` is added to the diagonal, so the condition
number of what is inverted is at most ``(1 + eps) / eps`` and the result does not depend on the
gradients' scale. All four compute the same function ``(X + eps s I)^(-1/p)`` and are compared with
each other in the tests; the iterative ones get there to a tolerance that worsens with the
condition number and improves with ``steps`` / ``degree``.

The batched matmuls run in fp32 (cuBLAS on GPUs); ``baddbmm``'s ``alpha`` / ``beta`` already fuse
the elementwise part of each Newton or Clenshaw step into the matmul, so there is no separate
kernel for it. A zero matrix gives 0 (not inf or NaN): its scale is floored at ``TINY``.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

METHODS = ("evd", "cn", "ndb", "cheby")
SCALINGS = ("fro", "power")
POWER_MARGIN = 1.05  # power iteration approaches λ_max from below
# The Newton iterations converge for a spectrum in (0, 2), so that margin is enough for them; a
# polynomial is only valid on the interval it was fitted on, so with power scaling Chebyshev maps
# [0, CHEBY_WIDEN s] onto its interval (the authors' factor 2 over the estimate).
CHEBY_WIDEN = 2.0 / POWER_MARGIN
POWER_STEPS = 10
TINY = 1e-30  # the scale of an all-zero matrix


def _eye(X: torch.Tensor) -> torch.Tensor:
    return torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand_as(X)


def _power_vector(n: int, device) -> torch.Tensor:
    """A fixed start vector (the same on every DDP rank and every run), not orthogonal to a likely
    top eigenvector as the all-ones vector can be."""
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(n, 1, generator=gen) + 0.5
    return (v / v.norm()).to(device)


def spectral_scale(X: torch.Tensor, scaling: str = "fro", margin: float = POWER_MARGIN,
                   steps: int = POWER_STEPS) -> torch.Tensor:
    """A per-matrix bound ``s`` of the top eigenvalue of each PSD matrix of ``X`` (``[batch, n, n]``),
    shaped ``[batch, 1, 1]`` and at least ``TINY``: the Frobenius norm (a sure upper bound), or
    ``margin`` times the power-iteration estimate, capped at the Frobenius norm."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r} is invalid: expected one of {SCALINGS}")
    fro = torch.linalg.matrix_norm(X).clamp_min(TINY)[:, None, None]
    if scaling == "fro":
        return fro
    v = _power_vector(X.shape[-1], X.device).expand(X.shape[0], -1, -1)
    for _ in range(steps):
        w = X @ v
        v = w / w.norm(dim=1, keepdim=True).clamp_min(TINY)
    rayleigh = (v.mT @ X @ v).clamp_min(TINY)
    return torch.minimum(margin * rayleigh, fro)


def _evd(A: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(A)
    powers = (values.clamp_min(0) + eps).pow(-1.0 / p)
    return (vectors * powers[:, None, :]) @ vectors.mT


def _coupled_newton(A: torch.Tensor, p: float, steps: int) -> torch.Tensor:
    # M = Y^p A is invariant; Y -> A^(-1/p) as M -> I. Eigenvalues of M start in (0, (p+1)/2].
    z = (p + 1) / 2
    eye = _eye(A)
    M = z * A
    Y = eye * z ** (1 / p)
    for _ in range(steps):
        T = (p + 1) / p * eye - M / p
        Y = Y @ T
        M = torch.linalg.matrix_power(T, int(p)) @ M
    return Y


def _newton_db(A: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^(1/2), A^(-1/2))`` for ``A`` with its spectrum in ``(0, 1]``."""
    eye = _eye(A)
    Y, Z = A, eye.clone()
    for _ in range(steps):
        E = torch.baddbmm(eye, Z, Y, beta=1.5, alpha=-0.5)  # 1.5 I - 0.5 Z Y
        Y, Z = Y @ E, E @ Z
    return Y, Z


@functools.lru_cache(maxsize=64)
def chebyshev_coefficients(p: float, degree: int, eps: float) -> tuple[float, ...]:
    """Chebyshev coefficients of ``y ↦ (y + eps)^(-1/p)`` on ``[0, 1]`` (interpolation at the
    Chebyshev points of the first kind, which is near-minimax)."""
    series = np.polynomial.chebyshev.Chebyshev.interpolate(lambda y: (y + eps) ** (-1.0 / p), degree,
                                                           domain=[0.0, 1.0])
    return tuple(float(c) for c in series.coef)


def _chebyshev(A: torch.Tensor, p: float, eps: float, degree: int) -> torch.Tensor:
    coef = chebyshev_coefficients(float(p), int(degree), float(eps))
    eye = _eye(A)
    S = 2 * A - eye  # the spectrum mapped from [0, 1] to [-1, 1]
    b1 = torch.zeros_like(A)
    b2 = torch.zeros_like(A)
    for c in coef[:0:-1]:  # Clenshaw: b_k = c_k I + 2 S b_{k+1} - b_{k+2}
        b1, b2 = torch.baddbmm(c * eye - b2, S, b1, alpha=2.0), b1
    return torch.baddbmm(coef[0] * eye - b2, S, b1)


def inv_root(X: torch.Tensor, p: float = 4, method: str = "ndb", eps: float = 1e-6, scaling: str = "fro",
             steps: int = 10, degree: int = 40) -> torch.Tensor:
    """``(X + eps s I)^(-1/p)`` for a PSD matrix or a batch of them, ``s`` an upper bound of the top
    eigenvalue of each (see the module doc); computed in fp32, returned in fp32.

    Args:
        X: ``[n, n]`` or ``[batch, n, n]``, symmetric positive semi-definite.
        p: the root; ``"ndb"`` takes 2 or 4, ``"cn"`` an integer >= 1, the others any ``p > 0``.
        method: ``"evd"``, ``"cn"``, ``"ndb"`` or ``"cheby"``.
        eps: damping relative to the scale ``s``, > 0 (``"evd"`` also takes 0 for a PD ``X``).
        scaling: ``"fro"`` or ``"power"``: how ``s`` is found.
        steps: Newton iterations (``"cn"``; ``"ndb"`` runs this many for each square root).
        degree: the Chebyshev polynomial's degree (``"cheby"``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {METHODS}")
    expected = {"ndb": "2 or 4", "cn": "an integer >= 1"}.get(method, "a number > 0")
    if (not (isinstance(p, (int, float)) and p > 0) or (method == "ndb" and p not in (2, 4))
            or (method == "cn" and not float(p).is_integer())):
        raise ValueError(f"p={p!r} is invalid: expected {expected} for method {method!r}")
    if not (isinstance(eps, (int, float)) and (eps > 0 or (eps == 0 and method == "evd"))):
        raise ValueError(f"eps={eps!r} is invalid: expected a number > 0 (0 only with method 'evd')")
    if X.ndim not in (2, 3) or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"X of shape {tuple(X.shape)} is invalid: expected [n, n] or [batch, n, n]")
    single = X.ndim == 2
    X = X.float()[None] if single else X.float()
    s = spectral_scale(X, scaling)
    if method == "cheby":
        # The same function on a wider interval: (X + eps s I) / (w s) = A' + (eps / w) I.
        widen = CHEBY_WIDEN if scaling == "power" else 1.0
        out = _chebyshev(X / (widen * s), p, eps / widen, degree) * widen ** (-1.0 / p)
    elif method == "evd":
        out = _evd(X / s, p, eps)
    else:
        A = X / s
        A.diagonal(dim1=-2, dim2=-1).add_(eps)  # A + eps I, in place (no identity matmul)
        A = A / (1 + eps)  # back into (0, 1]: the Newton iterations need it
        if method == "cn":
            out = _coupled_newton(A, p, steps)
        else:
            sqrt, inv_sqrt = _newton_db(A, steps)
            out = inv_sqrt if p == 2 else _newton_db(sqrt, steps)[1]
        out = out * (1 + eps) ** (-1.0 / p)
    out = out * s.pow(-1.0 / p)
    return out[0] if single else out
