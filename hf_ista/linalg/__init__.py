"""Batched linear algebra shared by the optimizers, usable on its own."""
from .dct import dct, dct_columns, dct_matrix
from .inv_root import inv_root

__all__ = ["dct", "dct_columns", "dct_matrix", "inv_root"]
