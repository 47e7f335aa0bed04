"""Unified scaling laws for compressed representations (arXiv 2506.01863): formats and their GMSE,
capacity ρ, the law L = A·(Nρ)^−α + B·D^−β + E and its fit, and training through a format."""
from .capacity import PUBLISHED, FamilyConstants, ScalingLaw, capacity, product_capacity, rho_from_gmse
from .formats import VQ, Dense, Format, Fp4, Int, Sparse, SparseInt, parse_format
from .law import FitResult, fit_law, plot_fit

__all__ = ["PUBLISHED", "FamilyConstants", "ScalingLaw", "capacity", "product_capacity", "rho_from_gmse",
           "VQ", "Dense", "Format", "Fp4", "Int", "Sparse", "SparseInt", "parse_format", "FitResult", "fit_law",
           "plot_fit", "apply_format", "remove_format"]


def __getattr__(name):
    if name in ("apply_format", "remove_format"):
        from . import train_formats
        return getattr(train_formats, name)
    raise AttributeError(name)
