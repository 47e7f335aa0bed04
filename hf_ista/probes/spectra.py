"""Spectra of weight matrices: stable rank ‖W‖_F²/‖W‖₂² and the entropy-effective rank
exp(H(p)) with p_i = σ_i/Σσ_j (Roy & Vetterli, 2007)."""
from __future__ import annotations

import math

import torch
from torch import nn


def stable_rank(singular_values: torch.Tensor) -> float:
    s = singular_values.double()
    return float((s ** 2).sum() / s.max() ** 2)


def effective_rank(singular_values: torch.Tensor) -> float:
    s = singular_values.double()
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def matrix_spectrum(weight: torch.Tensor) -> dict:
    s = torch.linalg.svdvals(weight.detach().double())
    return {"stable_rank": stable_rank(s), "effective_rank": effective_rank(s), "shape": list(weight.shape),
            "top_singular_value": float(s[0])}


def linear_layers(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` whose name's last part is not in ``skip``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in skip}


@torch.no_grad()
def probe_spectra(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), progress: bool = False) -> dict[str, dict]:
    """Per linear layer, :func:`matrix_spectrum` of its weight."""
    from tqdm.auto import tqdm

    layers = linear_layers(model, skip)
    return {name: matrix_spectrum(m.weight) for name, m in tqdm(layers.items(), desc="probe spectra",
                                                                 disable=not progress)}
