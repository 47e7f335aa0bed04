"""Kernels: each family lives in one module with its Triton kernel and its torch twin.

The backend is chosen in one place, :mod:`hf_ista.kernels.backend`.
"""
from .backend import get_backend, set_backend, triton_available, use_triton

__all__ = ["get_backend", "set_backend", "triton_available", "use_triton"]
