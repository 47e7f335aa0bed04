"""The one switch between Triton kernels and their torch twins.

``HF_ISTA_KERNELS=auto|triton|torch`` is read once, at import; ``set_backend`` changes it later.
``auto`` runs Triton on CUDA tensors and torch elsewhere; ``triton`` forces Triton (on CPU tensors
it needs ``TRITON_INTERPRET=1``); ``torch`` forces the twins.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

_CHOICES = ("auto", "triton", "torch")


def _checked(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"HF_ISTA_KERNELS must be one of {_CHOICES}, got {name!r}")
    return name


_backend = _checked(os.environ.get("HF_ISTA_KERNELS", "auto").strip().lower() or "auto")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Select ``auto``, ``triton`` or ``torch`` for every kernel call from now on."""
    global _backend
    _backend = _checked(name)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a kernel called on ``tensor`` runs its Triton version."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        if not triton_available():
            raise RuntimeError("HF_ISTA_KERNELS=triton but triton is not installed: pip install triton")
        return True
    return tensor.is_cuda and triton_available()


def device_of(tensor: torch.Tensor):
    """Context that makes ``tensor``'s CUDA device current: Triton launches on the current device,
    so a parameter on ``cuda:1`` must not be launched from ``cuda:0``."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
