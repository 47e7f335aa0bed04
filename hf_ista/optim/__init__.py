"""hf_ista optimizers: one file each, all ``torch.optim.Optimizer`` subclasses."""
from ._base import IstaOptimizer, state_bytes
from .microadam import MicroAdam

__all__ = ["IstaOptimizer", "MicroAdam", "state_bytes"]
