"""Capacity ρ(R) of a format from its GMSE: ρ = Lc · tanh(F · log_{1/4}(GMSE))^C (arXiv 2506.01863).

The dense-equivalent size of an N-parameter model trained in R is N · ρ(R). GMSE 0 (dense) gives
ρ = Lc; GMSE ≥ 1 (no better than zeros) gives 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .formats import Dense, Format, SparseInt, parse_format


@dataclass(frozen=True)
class FamilyConstants:
    F: float = 0.41
    C: float = 1.39
    Lc: float = 1.0


@dataclass
class ScalingLaw:
    """L(N, D, R) = A·(N·ρ(R))^(−α) + B·D^(−β) + E with per-family (F, C, Lc).

    The defaults are the published Llama/C4 fit (α 0.13, β 0.33, E 1.3, F 0.41, C 1.39, Lc 1; A and B
    were not published, so ``predict`` needs them set). ``families`` maps a format family (``int``,
    ``sparse``, ...) to its constants; families not listed use ``default``."""
    A: Optional[float] = None
    alpha: float = 0.13
    B: Optional[float] = None
    beta: float = 0.33
    E: float = 1.3
    families: dict = field(default_factory=dict)
    default: FamilyConstants = field(default_factory=FamilyConstants)

    def constants(self, family: str) -> FamilyConstants:
        return self.families.get(family, self.default)

    def capacity(self, fmt) -> float:
        return capacity(fmt, law=self)

    def predict(self, N: float, D: float, fmt="dense") -> float:
        if self.A is None or self.B is None:
            raise ValueError("this law has no A / B (the published fit does not give them): fit one with fit_law")
        return self.A * (N * self.capacity(fmt)) ** (-self.alpha) + self.B * D ** (-self.beta) + self.E

    def dense_equivalent(self, N: float, fmt) -> float:
        return N * self.capacity(fmt)


PUBLISHED = ScalingLaw()


def rho_from_gmse(gmse: float, F: float = 0.41, C: float = 1.39, Lc: float = 1.0) -> float:
    if gmse <= 0:
        return Lc
    if gmse >= 1:
        return 0.0
    return Lc * math.tanh(F * math.log(gmse) / math.log(0.25)) ** C


def capacity(fmt, law: Optional[ScalingLaw] = None, gmse: Optional[float] = None) -> float:
    """ρ of ``fmt`` (a Format or a spec string) under ``law`` (default: the published constants);
    ``gmse`` overrides the format's own (e.g. one read from a run record)."""
    fmt = parse_format(fmt)
    law = law or PUBLISHED
    k = law.constants(fmt.family)
    if isinstance(fmt, Dense):
        return k.Lc if fmt.family in law.families else 1.0
    return rho_from_gmse(fmt.gmse() if gmse is None else gmse, k.F, k.C, k.Lc)


def product_capacity(fmt: SparseInt, law: Optional[ScalingLaw] = None) -> dict:
    """ρ of a sparse-then-quantised format computed two ways: from its own GMSE (``direct``) and as
    ρ(Sparse)·ρ(Int) (``product``, the paper's product rule), with their ratio."""
    sparse, quant = fmt.parts
    direct = capacity(fmt, law)
    product = capacity(sparse, law) * capacity(quant, law)
    return {"direct": direct, "sparse": capacity(sparse, law), "int": capacity(quant, law),
            "product": product, "ratio": direct / product if product else math.nan}


def format_family(fmt) -> str:
    return parse_format(fmt).family


__all__ = ["FamilyConstants", "ScalingLaw", "PUBLISHED", "capacity", "rho_from_gmse", "product_capacity",
           "Format"]
