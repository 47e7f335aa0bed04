"""The only place that touches transformers / PEFT internals."""
from __future__ import annotations

_registered = False


def register() -> None:
    """Register everything hf_ista adds to the Hugging Face stack (idempotent)."""
    global _registered
    if _registered:
        return
    from . import peft as _peft
    from . import transformers as _transformers

    _transformers.register()
    _peft.register()
    _registered = True
