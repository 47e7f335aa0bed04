"""MatryoshkaLoRA as a PEFT method: ``get_peft_model``, ``PeftModel.from_pretrained`` and
transformers' ``load_adapter`` find it by its ``peft_type``.

PEFT's ``register_peft_method`` fills its mappings but only for a name already in the closed
``PeftType`` enum, and transformers calls ``.value`` on the type, so a plain string will not do:
we add the member to the enum first. Tested on the PEFT versions in ``SUPPORTED``; elsewhere the
adapter is not registered and building its config raises :func:`check_version`'s error.
"""
from __future__ import annotations

from packaging.version import Version

from .transformers import _extend_enum, check_supported

SUPPORTED = (Version("0.21"), Version("0.22"))  # [low, high): the tuner hooks we rely on are 0.21's


def check_version(installed: str | None = None) -> Version:
    if installed is None:
        import peft

        installed = peft.__version__
    return check_supported("peft", installed, SUPPORTED, "hf_ista's MatryoshkaLoRA registers with")


def register() -> bool:
    """Register MATRYOSHKA_LORA with PEFT (idempotent); False when this peft is not supported."""
    try:
        check_version()
    except ImportError:
        return False  # the optimizers still work; the adapter's config says why it cannot
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType, register_peft_method

    from ..peft.matryoshka_lora import MatryoshkaLoraConfig, MatryoshkaLoraModel
    from ..peft.matryoshka_lora.config import PEFT_TYPE

    _extend_enum(PeftType, PEFT_TYPE)
    if PeftType(PEFT_TYPE) not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_TYPE.lower(), config_cls=MatryoshkaLoraConfig,
                             model_cls=MatryoshkaLoraModel, prefix=MatryoshkaLoraModel.prefix)
    return True
