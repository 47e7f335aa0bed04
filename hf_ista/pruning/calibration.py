"""Calibration: turn what the user passes into model inputs, and collect each layer's Hessian
``H = 2XXᵀ/n`` from the inputs it sees in the already-pruned model, one group of layers at a time.

The model is run in *stages*. For a decoder (a ``nn.ModuleList`` of blocks holding every targeted
layer) a stage is one block: its inputs are captured once at block 0 and afterwards are the outputs
of the pruned block before it, so a block runs only on cached hidden states. For any other model the
single stage is the whole model, fed the calibration batches. Within a stage, the layers are pruned
in the order they run; layers that read the same input tensor (q/k/v, gate/up) form one group and
share one forward pass. Only the current group's Hessians are held in memory.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class _Stop(Exception):
    """Raised from a hook to end a forward pass once what was needed has been seen."""


# ---------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------


def calibration_batches(calibration, num_samples: int, batch_size: int = 8) -> list:
    """The first ``num_samples`` rows of ``calibration`` as a list of batches, each a tensor (fed as
    the model's first argument) or a dict of tensors (fed as keyword arguments; ``labels`` dropped).

    ``calibration``: a ``datasets.Dataset`` (its ``input_ids`` and, if present, ``attention_mask``
    columns), a ``DataLoader`` or any iterable of such batches."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid: expected an integer >= 1")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(calibration, datasets.Dataset):
        if "input_ids" not in calibration.column_names:
            raise ValueError(f"calibration: a Dataset needs an 'input_ids' column, got {calibration.column_names}")
        columns = [c for c in ("input_ids", "attention_mask") if c in calibration.column_names]
        rows = calibration.select(range(min(num_samples, len(calibration)))).with_format("torch", columns=columns)
        calibration = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration, Iterable):
        raise ValueError("calibration is invalid: expected a datasets.Dataset, a DataLoader or an iterable of "
                         f"batches (tensors or dicts of tensors), got {type(calibration).__name__}")
    batches, seen = [], 0
    for batch in calibration:
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]  # a TensorDataset's DataLoader yields [inputs, (targets)]
        if isinstance(batch, dict) or hasattr(batch, "keys"):
            batch = {k: v for k, v in dict(batch).items() if k != "labels" and isinstance(v, torch.Tensor)}
            size = next(iter(batch.values())).shape[0] if batch else 0
            take = min(size, num_samples - seen)
            batch = {k: v[:take] for k, v in batch.items()}
        elif isinstance(batch, torch.Tensor):
            size = batch.shape[0]
            take = min(size, num_samples - seen)
            batch = batch[:take]
        else:
            raise ValueError(f"calibration: a batch must be a tensor or a dict of tensors, got {type(batch).__name__}")
        if take:
            batches.append(batch)
            seen += take
        if seen >= num_samples:
            break
    if not batches:
        raise ValueError("calibration is empty: expected at least one sample")
    return batches


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def run_model(model: nn.Module, batch) -> None:
    device = next(model.parameters()).device
    extra = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    batch = _to(batch, device)
    if isinstance(batch, dict):
        model(**batch, **extra)
    else:
        model(batch, **extra)


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


def find_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` whose blocks contain every targeted layer (a decoder's layers), if any."""
    owned = set(targets)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            inside = {f"{name}.{i}.{sub}" for i, block in enumerate(module) for sub, _ in block.named_modules()}
            if owned <= inside:
                return name, module
    return None


class Stage:
    """A module and the calls that feed it: ``(args, kwargs)`` per calibration batch."""

    def __init__(self, module: nn.Module, calls: list):
        self.module = module
        self.calls = calls

    def run(self, hooks_stop: bool = False) -> list:
        outputs = []
        for args, kwargs in self.calls:
            try:
                outputs.append(self.module(*args, **kwargs))
            except _Stop:
                if not hooks_stop:
                    raise
                outputs.append(None)
        return outputs


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list) -> list:
    """``(args, kwargs)`` of every call of ``block`` (the first decoder block) over ``batches``; the
    forward pass stops there."""
    calls = []

    def grab(_module, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_model(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


def next_calls(calls: list, outputs: list) -> list:
    """The calls of the next block: this block's output replaces the hidden states."""
    out = []
    for (args, kwargs), output in zip(calls, outputs):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if args:
            out.append(((hidden, *args[1:]), kwargs))
        else:
            out.append(((), {**kwargs, "hidden_states": hidden}))
    return out


class HessianCollector:
    """Forward hooks that accumulate ``Σ 2xxᵀ`` (fp32) and the token count for a group of layers."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.sums = {name: None for name in layers}
        self.counts = dict.fromkeys(layers, 0)
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            outer = 2.0 * x.T @ x
            self.sums[name] = outer if self.sums[name] is None else self.sums[name].add_(outer)
            self.counts[name] += x.shape[0]
        return hook

    def hessians(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return {name: s / self.counts[name] for name, s in self.sums.items() if s is not None}


def next_group(stage: Stage, pending: dict[str, nn.Linear]) -> list[str]:
    """The pending layers that run first in ``stage``, with those reading the very same input tensor
    (one forward pass over the first call: hooks record the order, the last one stops the pass)."""
    seen: list[tuple[str, int]] = []
    handles = []

    def hook_for(name):
        def hook(_module, inputs):
            seen.append((name, id(inputs[0])))
            if len(seen) == len(pending):
                raise _Stop
        return hook

    for name, layer in pending.items():
        handles.append(layer.register_forward_pre_hook(hook_for(name)))
    args, kwargs = stage.calls[0]
    try:
        with torch.no_grad():
            stage.module(*args, **kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError(f"layers {sorted(pending)} never ran on the calibration data")
    first = seen[0][1]
    group = []
    for name, tensor_id in seen:
        if tensor_id != first:
            break
        if name not in group:
            group.append(name)
    return group
