"""Trainer callbacks: thin wrappers that call the algorithms in :mod:`hf_ista.pruning` (and, later,
``scaling``) and log what they did. Use them as ``Trainer(..., callbacks=[...])``."""
from .iobs import IOBSPruningCallback

__all__ = ["IOBSPruningCallback"]
