"""MatryoshkaLoRA as a PEFT adapter type (``peft_type: MATRYOSHKA_LORA``), in PEFT's tuner layout:
``config.py`` (the config and the arithmetic of P), ``layer.py`` (the tuner layer), ``model.py``
(the tuner). ``import hf_ista`` registers it with PEFT (:mod:`hf_ista.integrations.peft`).
"""
from .config import MatryoshkaLoraConfig, default_train_ranks, matryoshka_diagonal, rank_scale
from .layer import MatryoshkaLoraLayer, MatryoshkaLoraLinear, get_rank, serving_rank, set_rank
from .model import MatryoshkaLoraModel

__all__ = ["MatryoshkaLoraConfig", "MatryoshkaLoraLayer", "MatryoshkaLoraLinear", "MatryoshkaLoraModel",
           "default_train_ranks", "get_rank", "matryoshka_diagonal", "rank_scale", "serving_rank", "set_rank"]
