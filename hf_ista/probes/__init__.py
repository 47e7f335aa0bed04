"""Solution probes: measurements of a trained model that say what kind of solution an optimizer found,
usable on any ``nn.Module`` without a Trainer.

* ``activations``: kurtosis, max|x|/RMS and outlier-feature share of each block's hidden states;
* ``spectra``: stable rank and entropy-effective rank of each linear weight;
* ``compressibility``: loss increase after INT8 / INT4 round-to-nearest and 50 % magnitude pruning;
* ``sharpness``: top Hessian eigenvalue of the loss (power iteration on Hessian-vector products).

:func:`run_probes` runs the chosen ones and returns per-layer figures and a flat ``summary``.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from .activations import activation_stats, kurtosis, outlier_fraction, probe_activations
from .compressibility import magnitude_prune, probe_compressibility, quantize_rtn
from .sharpness import hessian_vector_product, probe_sharpness, top_hessian_eigenvalue
from .spectra import effective_rank, matrix_spectrum, probe_spectra, stable_rank

PROBES = ("activations", "spectra", "compressibility", "sharpness")


def check_probes(probes) -> list[str]:
    probes = [probes] if isinstance(probes, str) else list(probes)
    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise ValueError(f"probes={probes!r} is invalid: expected a non-empty list of {PROBES}")
    return probes


def take_batches(batches, num_batches: int, device=None) -> list[dict]:
    """The first ``num_batches`` batches of an iterable (a DataLoader), tensors moved to ``device``."""
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} is invalid: expected an integer >= 1")
    taken = []
    for batch in batches:
        taken.append({k: v.to(device) if device is not None else v for k, v in batch.items()
                      if isinstance(v, torch.Tensor)})
        if len(taken) == num_batches:
            break
    if not taken:
        raise ValueError("the eval data is empty: expected at least one batch")
    return taken


def summarize(result: dict) -> dict[str, float]:
    """Flat summary figures of a :func:`run_probes` result (means / maxima over layers)."""
    summary = {}
    if "activations" in result:
        layers = result["activations"].values()
        summary["activation_kurtosis_mean"] = statistics.fmean(v["kurtosis"] for v in layers)
        summary["activation_kurtosis_max"] = max(v["kurtosis"] for v in layers)
        summary["activation_max_over_rms_max"] = max(v["max_over_rms"] for v in layers)
        summary["outlier_fraction_mean"] = statistics.fmean(v["outlier_fraction"] for v in layers)
    if "spectra" in result:
        layers = result["spectra"].values()
        summary["stable_rank_mean"] = statistics.fmean(v["stable_rank"] for v in layers)
        summary["effective_rank_mean"] = statistics.fmean(v["effective_rank"] for v in layers)
    if "compressibility" in result:
        summary.update({k: v for k, v in result["compressibility"].items() if k.endswith("increase") or k == "loss"})
    if "sharpness" in result:
        summary["hessian_top_eigenvalue"] = result["sharpness"]["top_eigenvalue"]
    return summary


def run_probes(model: nn.Module, batches, probes=PROBES, num_batches: int = 8, power_iterations: int = 20,
               sharpness_batches: int | None = None, progress: bool = True) -> dict:
    """Run ``probes`` on ``model`` with the first ``num_batches`` of ``batches`` (dicts with
    ``input_ids``, ``labels``); sharpness uses the first ``sharpness_batches`` of them (default all)
    and at most ``power_iterations`` Hessian-vector products. Returns ``{probe: per-layer figures,
    "summary": {...}, "settings": {...}}``."""
    probes = check_probes(probes)
    if not isinstance(power_iterations, int) or power_iterations < 1:
        raise ValueError(f"power_iterations={power_iterations!r} is invalid: expected an integer >= 1")
    if sharpness_batches is not None and (not isinstance(sharpness_batches, int) or sharpness_batches < 1):
        raise ValueError(f"sharpness_batches={sharpness_batches!r} is invalid: expected an integer >= 1 or None")
    device = next(model.parameters()).device
    needs_data = any(p != "spectra" for p in probes)
    taken = take_batches(batches, num_batches, device) if needs_data else []
    result = {}
    if "activations" in probes:
        result["activations"] = probe_activations(model, taken, progress=progress)
    if "spectra" in probes:
        result["spectra"] = probe_spectra(model, progress=progress)
    if "compressibility" in probes:
        result["compressibility"] = probe_compressibility(model, taken, progress=progress)
    if "sharpness" in probes:
        result["sharpness"] = probe_sharpness(model, taken[:sharpness_batches], power_iterations, progress=progress)
    result["summary"] = summarize(result)
    result["settings"] = {"probes": probes, "num_batches": len(taken), "power_iterations": power_iterations,
                          "sharpness_batches": len(taken[:sharpness_batches]) if "sharpness" in probes else None}
    return result


__all__ = ["PROBES", "activation_stats", "check_probes", "effective_rank", "hessian_vector_product", "kurtosis",
           "magnitude_prune", "matrix_spectrum", "outlier_fraction", "probe_activations", "probe_compressibility",
           "probe_sharpness", "probe_spectra", "quantize_rtn", "run_probes", "stable_rank", "summarize",
           "take_batches", "top_hessian_eigenvalue"]
