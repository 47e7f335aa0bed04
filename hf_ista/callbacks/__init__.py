"""Trainer callbacks: thin wrappers that call the algorithms (``hf_ista.pruning``, the AURAC of
``hf_ista.peft``'s adapters) and log what they did. Use them as ``Trainer(..., callbacks=[...])``."""
from .aurac import AURACCallback, aurac
from .iobs import IOBSPruningCallback
from .lordo import LoRDOCallback
from .probes import SolutionProbesCallback
from .scaling_law import ScalingLawCallback

__all__ = ["AURACCallback", "IOBSPruningCallback", "LoRDOCallback", "ScalingLawCallback", "SolutionProbesCallback", "aurac"]
