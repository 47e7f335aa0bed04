"""The orthonormal DCT-II basis, as a matrix and as a fast transform (Makhoul's FFT route).

``dct_matrix(n)`` is ``Q`` with the basis vectors as columns,
``Q[j, k] = c_k cos(pi k (2j + 1) / (2n))``, ``c_0 = sqrt(1/n)``, ``c_k = sqrt(2/n)``; it is
orthogonal, so ``Q^T A`` are the coefficients of the columns of ``A`` on the basis and
``Q[:, idx] (Q^T A)[idx]`` their projection on the chosen basis vectors.
"""
from __future__ import annotations

import functools
import math

import torch


def dct_columns(n: int, index: torch.Tensor) -> torch.Tensor:
    """``dct_matrix(n)[:, index]`` from the closed form (``n x len(index)``, fp32, on ``index``'s
    device), without building the ``n x n`` matrix; computed in fp64, so the values are the same."""
    j = torch.arange(n, dtype=torch.float64, device=index.device)
    k = index.to(torch.float64)
    scale = torch.where(k == 0, math.sqrt(1 / n), math.sqrt(2 / n))
    return (torch.cos(math.pi * (2 * j[:, None] + 1) * k[None, :] / (2 * n)) * scale).float()


@functools.lru_cache(maxsize=None)
def _dct_matrix(n: int, device: torch.device) -> torch.Tensor:
    return dct_columns(n, torch.arange(n, device=device))


def dct_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``n x n`` orthonormal DCT-II basis (fp32), built once per ``(n, device)`` and shared:
    do not modify it in place."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is invalid: expected an integer >= 1")
    return _dct_matrix(n, torch.device(device))


@functools.lru_cache(maxsize=None)
def _twiddle(n: int, device: torch.device) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    scale = torch.full((n,), math.sqrt(2 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1 / n)
    return (torch.polar(scale, -math.pi * k / (2 * n))).to(device=device, dtype=torch.complex64)


def dct(a: torch.Tensor) -> torch.Tensor:
    """``dct_matrix(n)^T @ a`` for ``a`` of shape ``[n, N]`` in ``O(n log n)`` per column.

    Makhoul (1980): reorder each column as ``v = (a_0, a_2, a_4, ..., a_5, a_3, a_1)``; then
    ``X_k = Re(exp(-i pi k / 2n) FFT(v)_k)``.
    """
    n = a.shape[0]
    v = torch.cat((a[0::2], a[1::2].flip(0)))
    spectrum = torch.fft.fft(v.float(), dim=0)
    return (spectrum * _twiddle(n, a.device)[:, None]).real.contiguous()
