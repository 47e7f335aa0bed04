"""hf_ista: IST Austria DAS-lab methods for the Hugging Face stack.

``import hf_ista`` registers the optimizers as ``TrainingArguments(optim=...)`` names.
"""
from . import integrations
from .optim import DASH, DCTAdamW, LDAdam, MicroAdam, SparseGGT, SparseMFAC, state_bytes

__version__ = "0.1.0"
__all__ = ["DASH", "DCTAdamW", "LDAdam", "MicroAdam", "SparseGGT", "SparseMFAC", "state_bytes", "__version__"]

integrations.register()
