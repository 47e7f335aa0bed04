"""Sparsity patterns and the masks of the two baselines that need no solver (magnitude, Wanda).

A pattern is ``"unstructured"`` (every row of a layer loses the same share of its weights, or with
``scope="layer"`` the layer as a whole does) or ``"N:M"``: at most ``N`` non-zeros in every group of
``M`` consecutive input columns (NVIDIA's convention: ``"2:4"`` keeps 2 of 4, 50 %).
Masks are ``torch.bool`` with True where a weight is pruned.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from hf_ista.kernels.pruning import select_mask

SCOPES = ("row", "layer")


@dataclass(frozen=True)
class Pattern:
    n: int = 0  # non-zeros kept per group (N:M); 0 with m = 0 means unstructured
    m: int = 0
    scope: str = "row"

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        return (self.m - self.n) / self.m if self.m else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def parse_pattern(pattern: str, scope: str = "row") -> Pattern:
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is invalid: expected one of {SCOPES}")
    if pattern == "unstructured":
        return Pattern(scope=scope)
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"pattern={pattern!r} is invalid: expected 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")
    return Pattern(int(match[1]), int(match[2]))


def pruned_count(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights a share ``sparsity`` prunes (round half up, so 0.5 of 7 is 4)."""
    return math.floor(sparsity * numel + 0.5)


def row_counts(rows: int, start: int, stop: int, sparsity: float, device) -> torch.Tensor:
    """Per-row prune counts for columns ``[start, stop)`` such that the counts of consecutive column
    blocks add up to exactly ``pruned_count(sparsity, cols)`` per row."""
    count = pruned_count(sparsity, stop) - pruned_count(sparsity, start)
    return torch.full((rows,), count, dtype=torch.int32, device=device)


def select(scores: torch.Tensor, d: torch.Tensor | None, pattern: Pattern, sparsity: float,
           square: bool = True, done: int = 0) -> torch.Tensor:
    """Prune mask of the column block ``scores`` ``[rows, b]`` (which starts at column ``done`` of its
    layer): ``square`` means the scores are ``scores**2 / d``, as in :func:`select_mask`."""
    rows, b = scores.shape
    if pattern.structured:
        return select_mask(scores, d, None, pattern.n, pattern.m, square)
    if pattern.scope == "row":
        return select_mask(scores, d, row_counts(rows, done, done + b, sparsity, scores.device), square=square)
    # one ranking across the whole block: all rows compete for the block's share
    flat = scores * scores / d if square else scores
    count = row_counts(1, rows * done, rows * (done + b), sparsity, scores.device)
    return select_mask(flat.reshape(1, -1), None, count, square=False).view(rows, b)


def magnitude_mask(weight: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """Prune the smallest |w| (scores w²: the same order)."""
    w = weight.float()
    return select(w, torch.ones(w.shape[1], device=w.device), pattern, sparsity)


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """Wanda: prune the smallest |w_ij|·‖x_j‖. With H = 2XXᵀ/n, ‖x_j‖² ∝ H_jj, so the scores
    w²·H_jj = w² / (1/H_jj) give the same order."""
    w = weight.float()
    return select(w, 1.0 / torch.diagonal(hessian).float(), pattern, sparsity)


def check_mask(mask: torch.Tensor, pattern: Pattern) -> None:
    """Raise if ``mask`` breaks ``pattern`` (a safety net before weights are overwritten)."""
    if pattern.structured:
        kept = (~mask).view(mask.shape[0], -1, pattern.m).sum(-1)
        if int(kept.max()) > pattern.n:
            raise AssertionError(f"mask keeps {int(kept.max())} of {pattern.m} somewhere; pattern {pattern}")
