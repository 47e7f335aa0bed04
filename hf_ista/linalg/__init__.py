"""Batched linear algebra shared by the optimizers, usable on its own."""
from .dct import dct, dct_columns, dct_matrix

__all__ = ["dct", "dct_columns", "dct_matrix"]
