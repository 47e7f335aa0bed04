"""Training in a compressed format: the targeted ``nn.Linear`` weights are replaced (through
``torch.nn.utils.parametrize``) by their reconstruction in the format, recomputed from the latent
full-precision weights at every forward pass, with a straight-through estimator (STE) backward:

* INT / FP4 / sparse+INT: the gradient reaches a latent weight only inside the trust region (the
  grid's clip range, |w| ≤ scale·max level); outside it is zeroed.
* sparse: the mask is recomputed at every step (magnitude top-k per row); the plain STE passes the
  dense gradient to every latent weight. ``rbbm=p`` selects the RBBM backward rule: the gradient
  reaches the kept weights and the weights below T_p = RMS(θ)·Φ⁻¹(0.5 + p) (the smallest ones), not
  those in the band between T_p and the top-k threshold. (This reading of the rule is ours.)
* VQ: plain STE.

The optimizer sees the latent weights (``module.parametrizations.weight.original``); ``remove_format``
bakes the compressed weights in.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .formats import Dense, Format, Sparse, SparseInt, parse_format, topk_mask


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, fmt, rbbm):
        out, mask = fmt.ste(w)
        if rbbm is not None and isinstance(fmt, (Sparse, SparseInt)):
            density = fmt.density
            kept = topk_mask(w, density) if not (isinstance(fmt, Sparse) and fmt.pattern != "unstructured") \
                else fmt.mask(w)
            t_p = float(w.detach().pow(2).mean().sqrt()) * _norm_ppf(0.5 + rbbm)
            rb = kept | (w.abs() < t_p)
            mask = rb if mask is None else (mask & rb)
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return (grad * mask if ctx.has_mask else grad), None, None


def _norm_ppf(q: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class FormatSTE(nn.Module):
    """Parametrization: weight -> its reconstruction in ``fmt`` (STE backward)."""

    def __init__(self, fmt: Format, rbbm: Optional[float] = None):
        super().__init__()
        if rbbm is not None and not 0 < rbbm < 0.5:
            raise ValueError(f"rbbm={rbbm!r} is invalid: expected p in (0, 0.5)")
        self.fmt, self.rbbm = fmt, rbbm

    def forward(self, w):
        return _STE.apply(w, self.fmt, self.rbbm)


def _targets(model: nn.Module, targets):
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is out_emb:
            continue
        if targets in (None, "all-linear"):
            chosen.append((name, module))
        elif isinstance(targets, str):
            if re.search(targets, name):
                chosen.append((name, module))
        elif any(name == t or name.endswith("." + t) for t in targets):
            chosen.append((name, module))
    if not chosen:
        raise ValueError(f"apply_format: targets={targets!r} matched no nn.Linear")
    return chosen


def apply_format(model: nn.Module, fmt, targets="all-linear", rbbm: Optional[float] = None) -> list[str]:
    """Train ``targets`` (``"all-linear"``: every ``nn.Linear`` but the output embedding; a regex; or
    a list of module names / suffixes) through ``fmt``. Returns the names of the modules changed and
    records the format on the model (``model.hf_ista_format``, read by ``ScalingLawCallback``)."""
    fmt = parse_format(fmt)
    chosen = _targets(model, targets)
    if not isinstance(fmt, Dense):
        for _, module in chosen:
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError("apply_format: a target already has a parametrized weight (remove_format first)")
            parametrize.register_parametrization(module, "weight", FormatSTE(fmt, rbbm))
    model.hf_ista_format = fmt
    return [n for n, _ in chosen]


def remove_format(model: nn.Module) -> None:
    """Bake the compressed weights into plain parameters and drop the parametrizations."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, FormatSTE) for p in module.parametrizations.weight):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
