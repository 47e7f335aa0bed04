"""``prune(model, calibration=..., sparsity=0.5, method="iobs")``: prune every targeted linear layer
of a model in place, in the order the layers run, each on the inputs of the already-pruned layers
before it, and report what it cost."""
from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Mapping

import torch
from torch import nn

from .calibration import (HessianCollector, Stage, _Stop, _to, calibration_batches, capture_block_inputs,
                          find_blocks, next_calls, next_group)
from .masks import Pattern, check_mask, magnitude_mask, parse_pattern, wanda_mask
from .obs import damped_hessian, iobs_prune, obs_prune, row_errors
from .report import LayerReport, PruningReport

METHODS = ("magnitude", "wanda", "obs", "iobs")


def name_matches(name: str, pattern: str) -> bool:
    """``"re:<regex>"`` (full match), a glob (``"*.mlp.*"``), or a name or its last parts (``"q_proj"``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def select_targets(model: nn.Module, targets=None, ignore=None) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` matching ``targets`` (default: all but the LM head) and no ``ignore``."""
    for arg, value in (("targets", targets), ("ignore", ignore)):
        if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
            raise ValueError(f"{arg}={value!r} is invalid: expected a list of module name patterns")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if targets is None and (module is head or name.split(".")[-1] == "lm_head"):
            continue
        if targets is not None and not any(name_matches(name, p) for p in targets):
            continue
        if any(name_matches(name, p) for p in ignore or ()):
            continue
        chosen[name] = module
    if not chosen:
        raise ValueError(f"targets={targets!r}, ignore={ignore!r} select no nn.Linear of the model")
    return chosen


def _sparsity_of(name: str, sparsity, pattern: Pattern) -> float | None:
    value = sparsity
    if isinstance(sparsity, Mapping):
        value = next((v for p, v in sparsity.items() if name_matches(name, p)), None)
        if value is None:
            return None  # a layer no key names stays dense
    if value is None and pattern.structured:
        return pattern.sparsity
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"sparsity={value!r} (layer {name}) is invalid: expected a number in [0, 1)")
    if pattern.structured and abs(value - pattern.sparsity) > 1e-9:
        raise ValueError(f"sparsity={value!r} contradicts pattern={pattern}: it prunes exactly {pattern.sparsity:g}")
    return float(value)


def _check(method, iterations, damp, block_size) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {METHODS}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations={iterations!r} is invalid: expected an integer >= 1")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0:
        raise ValueError(f"damp={damp!r} is invalid: expected a number >= 0")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is invalid: expected an integer >= 1")


@torch.no_grad()
def prune_layer(layer: nn.Linear, hessian: torch.Tensor | None, method: str, pattern: Pattern, sparsity: float,
                iterations: int = 3, damp: float = 0.01, block_size: int = 128):
    """Prune one layer in place; return ``(relative error, relative error after each iteration)``."""
    weight = layer.weight.detach().float().clone()
    history = []
    if method == "magnitude":
        mask = magnitude_mask(weight, pattern, sparsity)
        pruned = weight.masked_fill(mask, 0.0)
    elif method == "wanda":
        mask = wanda_mask(weight, hessian, pattern, sparsity)
        pruned = weight.masked_fill(mask, 0.0)
    elif method == "obs":
        pruned, mask = obs_prune(weight, damped_hessian(hessian, damp), pattern, sparsity, block_size)
    else:
        pruned, mask, history = iobs_prune(weight, hessian, damped_hessian(hessian, damp), pattern, sparsity,
                                           iterations, block_size)
    check_mask(mask, pattern)
    layer.weight.data.copy_(pruned.masked_fill(mask, 0.0).to(layer.weight.dtype))
    if hessian is None:
        return float("nan"), []
    reference = float(row_errors(torch.zeros_like(weight), weight, hessian).sum())  # ‖WX‖² in the same units
    scale = 1.0 / reference if reference > 0 else float("nan")
    error = float(row_errors(weight, layer.weight.detach().float(), hessian).sum()) * scale
    return error, [e * scale for e in history]


def prune(model: nn.Module, calibration=None, sparsity=None, pattern: str = "unstructured", method: str = "iobs",
          iterations: int = 3, num_samples: int = 128, targets=None, ignore=None, damp: float = 0.01,
          block_size: int = 128, scope: str = "row", batch_size: int = 8, progress: bool = False) -> PruningReport:
    """Prune ``model``'s linear layers in place and return a :class:`PruningReport`.

    ``calibration``: a ``datasets.Dataset``, a DataLoader or an iterable of batches (tensors or dicts
    of model inputs); only ``magnitude`` runs without it (its report then has no errors).
    ``method``: ``magnitude``, ``wanda``, ``obs`` (one-shot, SparseGPT-style) or ``iobs``
    (``iterations`` I-OBS iterations; 1 is ``obs``). ``pattern``: ``"unstructured"`` or ``"N:M"``
    (N kept in every M). ``sparsity``: a share, or ``{module name pattern: share}`` (layers no key
    matches stay dense); default 0.5, or what an N:M pattern implies. ``scope``: unstructured masks
    per ``"row"`` (every row the same share) or per ``"layer"`` (one ranking for the whole layer).
    ``targets`` / ``ignore``: module name patterns (default: every ``nn.Linear`` but the LM head).
    ``damp``: share of ``mean(diag H)`` added to ``H``'s diagonal. ``block_size``: columns per OBS block.
    """
    start = time.perf_counter()
    _check(method, iterations, damp, block_size)
    kind = parse_pattern(pattern, scope)
    if sparsity is None and not kind.structured:
        sparsity = 0.5
    if not isinstance(sparsity, Mapping) and sparsity is not None:
        _sparsity_of("(every layer)", sparsity, kind)
    chosen = select_targets(model, targets, ignore)
    shares = {name: _sparsity_of(name, sparsity, kind) for name in chosen}
    layers = {name: layer for name, layer in chosen.items() if shares[name] is not None}
    if calibration is None and method != "magnitude":
        raise ValueError(f"calibration is required for method={method!r} (only 'magnitude' needs no data)")
    report = PruningReport(method, str(kind), iterations if method == "iobs" else 1, 0)

    def do(name: str, hessian) -> None:
        t = time.perf_counter()
        error, history = prune_layer(layers[name], hessian, method, kind, shares[name], iterations, damp, block_size)
        w = layers[name].weight
        report.layers.append(LayerReport(name, tuple(w.shape), shares[name], float((w == 0).float().mean()),
                                         error, time.perf_counter() - t, history))
        bar.update(1)

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    bar = tqdm(total=len(layers), desc=f"{method} pruning", unit="layer", disable=not progress)
    try:
        with torch.no_grad():
            if calibration is None:
                for name in layers:
                    do(name, None)
            else:
                batches = calibration_batches(calibration, num_samples, batch_size)
                report.num_samples = sum((b if isinstance(b, torch.Tensor) else next(iter(b.values()))).shape[0]
                                         for b in batches)
                for stage, pending in _stages(model, layers, batches):
                    while pending:
                        group = next_group(stage, pending)
                        for name, hessian in _hessians(stage, {n: pending.pop(n) for n in group}).items():
                            do(name, hessian)
    finally:
        bar.close()
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report


def _stages(model, layers, batches):
    """``(stage, its pending layers)`` in order: one per decoder block, or the whole model."""
    found = find_blocks(model, layers)
    if found is None:
        device = next(model.parameters()).device
        extra = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
        calls = [((), {**_to(b, device), **extra}) if isinstance(b, dict) else ((_to(b, device),), extra)
                 for b in batches]
        yield Stage(model, calls), dict(layers)
        return
    prefix, blocks = found
    calls = capture_block_inputs(model, blocks[0], batches)
    for i, block in enumerate(blocks):
        inside = f"{prefix}.{i}."
        stage = Stage(block, calls)
        yield stage, {n: layer for n, layer in layers.items() if n.startswith(inside)}
        if i + 1 < len(blocks):
            calls = next_calls(calls, stage.run())  # the pruned block's outputs feed the next one


def _hessians(stage: Stage, group: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Run ``stage`` over its calls with hooks on ``group``, stopping after its last layer."""
    collector = HessianCollector(group)

    def stop(_module, _inputs, _output):
        raise _Stop

    last = list(group.values())[-1]
    handle = last.register_forward_hook(stop)
    try:
        stage.run(hooks_stop=True)
    finally:
        handle.remove()
        hessians = collector.hessians()  # also removes its hooks
    return hessians
