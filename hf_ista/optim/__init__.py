"""hf_ista optimizers: one file each, all ``torch.optim.Optimizer`` subclasses."""
from ._base import IstaOptimizer, state_bytes
from .dash import DASH
from .dct_adamw import DCTAdamW
from .efcp import SparseGGT, SparseMFAC
from .ldadam import LDAdam
from .lordo import LoRDO
from .microadam import MicroAdam

__all__ = ["DASH", "DCTAdamW", "IstaOptimizer", "LDAdam", "LoRDO", "MicroAdam", "SparseGGT", "SparseMFAC", "state_bytes"]
