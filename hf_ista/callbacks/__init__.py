"""Trainer callbacks: thin, they call the algorithms and log."""
from .aurac import AURACCallback, aurac

__all__ = ["AURACCallback", "aurac"]
