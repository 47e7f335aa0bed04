"""Activation statistics of hidden states: kurtosis, max|x|/RMS and the share of outlier features.

``kurtosis`` is Pearson's (not excess): E[(x-μ)⁴]/σ⁴, 3 for a Gaussian, 6 for a Laplace. An outlier
feature (a scale-free take on LLM.int8()'s |x| >= 6) is a hidden dimension where some token deviates from the tensor's mean by
more than ``threshold`` (6) standard deviations of the whole tensor. Statistics are streamed over
batches (float64 moments), so several eval batches give one number per layer.
"""
from __future__ import annotations

import torch
from torch import nn

OUTLIER_SIGMAS = 6.0


class RunningStats:
    """Moments of all entries and per-feature extremes of ``[..., features]`` tensors seen so far."""

    def __init__(self):
        self.count = 0
        self.sums = torch.zeros(4, dtype=torch.float64)  # Σx, Σx², Σx³, Σx⁴
        self.max_abs = 0.0
        self.feature_max = None
        self.feature_min = None

    def update(self, x: torch.Tensor) -> None:
        # reduce where the activations are (float64 except on MPS, which has none); keep only the
        # four sums and two feature vectors on the CPU
        x = x.detach().reshape(-1, x.shape[-1])
        x = x.to(torch.float32 if x.device.type == "mps" else torch.float64)
        self.count += x.numel()
        self.sums += torch.stack([x.sum(), (x ** 2).sum(), (x ** 3).sum(), (x ** 4).sum()]).cpu().double()
        self.max_abs = max(self.max_abs, float(x.abs().max()))
        high, low = x.max(0).values.cpu().double(), x.min(0).values.cpu().double()
        self.feature_max = high if self.feature_max is None else torch.maximum(self.feature_max, high)
        self.feature_min = low if self.feature_min is None else torch.minimum(self.feature_min, low)

    def result(self, threshold: float = OUTLIER_SIGMAS) -> dict:
        if not self.count:
            raise ValueError("no activations recorded: expected at least one forward pass")
        m1, m2, m3, m4 = (self.sums / self.count).tolist()
        var = m2 - m1 * m1
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
        sigma = max(var, 0.0) ** 0.5
        deviation = torch.maximum(self.feature_max - m1, m1 - self.feature_min)
        return {"kurtosis": central4 / var ** 2 if var > 0 else float("nan"),
                "max_over_rms": self.max_abs / m2 ** 0.5 if m2 > 0 else float("nan"),
                "outlier_fraction": float((deviation > threshold * sigma).double().mean())}


def activation_stats(x: torch.Tensor, threshold: float = OUTLIER_SIGMAS) -> dict:
    """``kurtosis``, ``max_over_rms``, ``outlier_fraction`` of one tensor whose last dim is features."""
    stats = RunningStats()
    stats.update(x)
    return stats.result(threshold)


def kurtosis(x: torch.Tensor) -> float:
    return activation_stats(x)["kurtosis"]


def outlier_fraction(x: torch.Tensor, threshold: float = OUTLIER_SIGMAS) -> float:
    return activation_stats(x, threshold)["outlier_fraction"]


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks of the first ``nn.ModuleList`` in ``model`` (a transformer's decoder layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            return {f"{name}.{i}": block for i, block in enumerate(module)}
    raise ValueError("model has no nn.ModuleList of blocks: pass layers={name: module}")


@torch.no_grad()
def probe_activations(model: nn.Module, batches: list[dict], layers: dict[str, nn.Module] | None = None,
                      threshold: float = OUTLIER_SIGMAS, progress: bool = False) -> dict[str, dict]:
    """Per layer (default: every decoder block's output hidden states), the statistics of
    :class:`RunningStats` over the forward passes of ``batches`` (dicts of model inputs)."""
    from tqdm.auto import tqdm

    layers = default_layers(model) if layers is None else layers
    stats = {name: RunningStats() for name in layers}

    def hook(name):
        def record(_module, _inputs, output):
            stats[name].update(output[0] if isinstance(output, (tuple, list)) else output)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="probe activations", disable=not progress):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: s.result(threshold) for name, s in stats.items()}
