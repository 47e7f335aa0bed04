"""hf_ista: IST Austria DAS-lab methods for the Hugging Face stack.

``import hf_ista`` registers the optimizers as ``TrainingArguments(optim=...)`` names and the
MatryoshkaLoRA adapter as a PEFT type (``MatryoshkaLoraConfig``).
"""
from . import integrations
from .optim import DASH, DCTAdamW, LDAdam, LoRDO, MicroAdam, SparseGGT, SparseMFAC, state_bytes
from .peft.matryoshka_lora import MatryoshkaLoraConfig

__version__ = "0.1.0"
__all__ = ["DASH", "DCTAdamW", "LDAdam", "LoRDO", "MatryoshkaLoraConfig", "MicroAdam", "SparseGGT", "SparseMFAC",
           "state_bytes", "__version__"]

integrations.register()
