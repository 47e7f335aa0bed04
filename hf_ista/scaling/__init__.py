"""Unified scaling laws for compressed representations (arXiv 2506.01863): formats and their GMSE,
capacity ρ, the law L = A·(Nρ)^−α + B·D^−β + E and its fit, and training through a format."""
from .capacity import PUBLISHED, FamilyConstants, ScalingLaw, capacity, product_capacity, rho_from_gmse
from .formats import VQ, Dense, Format, Fp4, Int, Sparse, SparseInt, parse_format
from .law import FitResult, fit_law, plot_fit
from .train_formats import apply_format, remove_format

__all__ = ["PUBLISHED", "FamilyConstants", "ScalingLaw", "capacity", "product_capacity", "rho_from_gmse",
           "VQ", "Dense", "Format", "Fp4", "Int", "Sparse", "SparseInt", "parse_format", "FitResult", "fit_law",
           "plot_fit", "apply_format", "remove_format"]

