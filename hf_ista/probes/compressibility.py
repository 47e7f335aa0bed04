"""How much the loss rises when the linear weights are compressed: INT8 / INT4 round-to-nearest
(symmetric, one scale per output channel) and 50 % magnitude pruning (per row). The original weights
are put back bit-exactly afterwards."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from hf_ista.pruning.masks import magnitude_mask, parse_pattern

from .spectra import linear_layers


def quantize_rtn(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest with scale max|w_row| / (2^(bits-1) - 1), dequantised back."""
    if bits < 2:
        raise ValueError(f"bits={bits!r} is invalid: expected an integer >= 2")
    qmax = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / qmax
    return (torch.clamp(torch.round(w / scale), -qmax, qmax) * scale).to(weight.dtype)


def magnitude_prune(weight: torch.Tensor, sparsity: float = 0.5) -> torch.Tensor:
    mask = magnitude_mask(weight, parse_pattern("unstructured"), sparsity)
    return weight.masked_fill(mask, 0)


COMPRESSIONS = {"int8": lambda w: quantize_rtn(w, 8), "int4": lambda w: quantize_rtn(w, 4),
                "prune50": lambda w: magnitude_prune(w, 0.5)}


@contextlib.contextmanager
def compressed(layers: dict[str, nn.Linear], compress):
    """Within the block, every layer's weight is ``compress(weight)``; restored exactly on exit."""
    originals = {name: m.weight.detach().clone() for name, m in layers.items()}
    try:
        with torch.no_grad():
            for name, m in layers.items():
                m.weight.copy_(compress(originals[name]))
        yield
    finally:
        with torch.no_grad():
            for name, m in layers.items():
                m.weight.copy_(originals[name])


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean of ``model(**batch).loss`` over ``batches`` (each has ``labels``)."""
    was_training = model.training
    model.eval()
    try:
        return sum(float(model(**batch).loss) for batch in batches) / len(batches)
    finally:
        model.train(was_training)


def probe_compressibility(model: nn.Module, batches: list[dict], skip: tuple[str, ...] = ("lm_head",),
                          progress: bool = False) -> dict:
    """``loss`` of the model as is, ``<name>_loss`` and ``<name>_loss_increase`` (compressed minus
    uncompressed) for each of :data:`COMPRESSIONS` applied to every linear layer but ``skip``."""
    from tqdm.auto import tqdm

    if not batches:
        raise ValueError("batches is empty: expected at least one batch with labels")
    layers = linear_layers(model, skip)
    base = mean_loss(model, batches)
    result = {"loss": base}
    for name, compress in tqdm(COMPRESSIONS.items(), desc="probe compressibility", disable=not progress):
        with compressed(layers, compress):
            loss = mean_loss(model, batches)
        result[f"{name}_loss"] = loss
        result[f"{name}_loss_increase"] = loss - base
    return result
