"""``MatryoshkaLoraLinear``: a PEFT tuner layer around an ``nn.Linear`` or transformers' ``Conv1D``
that adds ``scale * x A[:r']^T diag(d) B[:, :r']^T`` to the base output (the math, and what ``d``,
``scale`` and ``r'`` are in each mode, is in :mod:`.config`).

The rank a layer runs at is state: ``serve_rank[adapter]`` is ``None`` (the training forward of the
adapter's mode) or the rank ``r'`` it serves, by ``serve_rule[adapter]`` (``truncate`` or
``rescale``, :mod:`.config`), both set with :func:`set_rank`. The adapter path is
:func:`hf_ista.kernels.matryoshka_lora.matryoshka_lora` (Triton on CUDA, its torch twin elsewhere).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...kernels.matryoshka_lora import matryoshka_lora
from .config import SERVE_RULES, MatryoshkaLoraConfig, base_scale, matryoshka_diagonal, rank_scale


class MatryoshkaLoraLayer(BaseTunerLayer):
    """What every MatryoshkaLoRA layer holds, per adapter name."""

    adapter_layer_names = ("matryoshka_lora_A", "matryoshka_lora_B")
    other_param_names = ("r", "settings", "serve_rank", "serve_rule", "sampled_rank", "matryoshka_lora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.settings: dict[str, MatryoshkaLoraConfig] = {}  # mode, ranks, scaling of each adapter
        self.serve_rank: dict[str, Optional[int]] = {}
        self.serve_rule: dict[str, str] = {}
        self.sampled_rank: dict[str, Optional[int]] = {}  # dylora: set by the tuner for each training forward
        self.matryoshka_lora_A = nn.ParameterDict({})  # (r, in)
        self.matryoshka_lora_B = nn.ParameterDict({})  # (out, r)
        self.matryoshka_lora_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merged_terms: dict[str, tuple] = {}  # what merge() added, so unmerge() removes exactly that
        self._diagonals: dict[tuple, torch.Tensor] = {}
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise ValueError(f"MatryoshkaLoRA targets nn.Linear and transformers' Conv1D, got {type(base).__name__}; "
                             f"choose target_modules that name such layers")
        self.conv1d = isinstance(base, Conv1D)  # weight stored (in, out): merge transposes
        if self.conv1d:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: MatryoshkaLoraConfig) -> None:
        r = config.r
        self.r[adapter_name] = r
        self.settings[adapter_name] = config
        self.serve_rank[adapter_name] = None
        self.serve_rule[adapter_name] = config.serve_rule
        self.sampled_rank[adapter_name] = None
        self.matryoshka_lora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
        self.matryoshka_lora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.matryoshka_lora_dropout.update(nn.ModuleDict({adapter_name: dropout}))
        # LoRA's init: A as nn.Linear's default, B zero, so the adapter starts as a no-op
        nn.init.kaiming_uniform_(self.matryoshka_lora_A[adapter_name], a=math.sqrt(5))
        if config.init_lora_weights:
            nn.init.zeros_(self.matryoshka_lora_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.matryoshka_lora_B[adapter_name], a=math.sqrt(5))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- the rank -------------------------------------------------------------------------------

    def set_rank(self, rank: Optional[int], adapter_name: str, rule: Optional[str] = None) -> None:
        """Serve ``adapter_name`` at ``rank`` (``None``: back to its training forward), by ``rule``
        (``truncate`` | ``rescale``; ``None`` keeps the current one, first the config's ``serve_rule``)."""
        if self.merged:
            raise ValueError("set_rank on a merged adapter: unmerge it first (merge_and_unload merges the "
                             "current rank once and for all)")
        r = self.r[adapter_name]
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= r):
            raise ValueError(f"rank={rank!r} is invalid for adapter {adapter_name!r}: expected an integer in [1, {r}] "
                             f"or None (the training rank)")
        if rule is not None and rule not in SERVE_RULES:
            raise ValueError(f"rule={rule!r} is invalid: expected one of {SERVE_RULES}")
        self.serve_rank[adapter_name] = rank
        if rule is not None:
            self.serve_rule[adapter_name] = rule

    def _terms(self, adapter: str, device: torch.device) -> tuple[int, torch.Tensor, float]:
        """``(r', d, scale)`` of the adapter's current forward (the rules: :mod:`.config`)."""
        cfg, r = self.settings[adapter], self.r[adapter]
        base = base_scale(cfg.lora_alpha, r, cfg.rank_scaling)
        rank = self.serve_rank[adapter]
        if rank is None and cfg.mode == "dylora" and self.training:
            rank = self.sampled_rank[adapter]
            if rank is None:
                raise RuntimeError("mode='dylora' draws one rank per training forward for the whole model; that "
                                   "needs the PEFT model of get_peft_model(...) (or set_rank before training)")
            return rank, self._diagonal(adapter, ("member", rank), device), base
        if rank is not None and self.serve_rule[adapter] == "rescale":
            return rank, self._diagonal(adapter, ("member", rank), device), base
        # the training diagonal (dylora: the mean of its draws), truncated to the rank served
        rank = r if rank is None else rank
        if cfg.mode == "lora":
            return rank, self._diagonal(adapter, ("member", r), device)[:rank], base
        return rank, self._diagonal(adapter, ("P",), device)[:rank], base / len(cfg.train_ranks)

    def _diagonal(self, adapter: str, key: tuple, device: torch.device) -> torch.Tensor:
        """``P`` (key ``("P",)``) or ``s(t) * 1`` of length ``t`` (key ``("member", t)``), built once
        per device."""
        cache = (adapter, key, device)
        if cache not in self._diagonals:
            cfg = self.settings[adapter]
            if key[0] == "P":
                d = matryoshka_diagonal(self.r[adapter], cfg.train_ranks, cfg.rank_scaling)
            else:
                d = torch.full((key[1],), rank_scale(key[1], cfg.rank_scaling), dtype=torch.float32)
            self._diagonals[cache] = d.to(device)
        return self._diagonals[cache]

    # -- merge ----------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str, terms: Optional[tuple] = None) -> torch.Tensor:
        """The base weight's change at the adapter's current rank, in the base weight's layout."""
        a, b = self.matryoshka_lora_A[adapter], self.matryoshka_lora_B[adapter]
        rank, d, scale = terms or self._terms(adapter, a.device)
        delta = (b[:, :rank].float() * (d * scale)) @ a[:rank].float()  # (out, in)
        return delta.T if self.conv1d else delta


class MatryoshkaLoraLinear(nn.Module, MatryoshkaLoraLayer):
    """MatryoshkaLoRA around an ``nn.Linear`` or a ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MatryoshkaLoraConfig, **kwargs) -> None:
        super().__init__()
        MatryoshkaLoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add each adapter's change at its current rank to the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for adapter in adapter_names:
            if adapter not in self.matryoshka_lora_A:
                continue
            terms = self._terms(adapter, weight.device)
            delta = self.get_delta_weight(adapter, terms).to(weight.dtype)
            with torch.no_grad():
                if safe_merge:
                    merged = weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights of adapter {adapter!r}")
                    weight.data = merged
                else:
                    weight.data.add_(delta)
            self._merged_terms[adapter] = terms
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            terms = self._merged_terms.pop(adapter)
            with torch.no_grad():
                weight.data -= self.get_delta_weight(adapter, terms).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.matryoshka_lora_A:
                continue
            a, b = self.matryoshka_lora_A[adapter], self.matryoshka_lora_B[adapter]
            rank, d, scale = self._terms(adapter, a.device)
            # The adapter runs in its own dtype (PEFT keeps it fp32 under a bf16 base).
            xd = self.matryoshka_lora_dropout[adapter](x).to(a.dtype)
            result = matryoshka_lora(xd, a[:rank], b[:, :rank], result.to(a.dtype), d, scale)
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "matryoshka_lora." + super().__repr__()


def matryoshka_layers(model: nn.Module) -> list[MatryoshkaLoraLayer]:
    return [m for m in model.modules() if isinstance(m, MatryoshkaLoraLayer)]


def set_rank(model: nn.Module, rank: Optional[int], adapter_names: Optional[list[str]] = None,
             rule: Optional[str] = None) -> None:
    """Serve every MatryoshkaLoRA layer of ``model`` at ``rank`` (``None``: the training forward), by
    ``rule`` (``truncate`` | ``rescale``, see :mod:`.config`; ``None``: as before, first the config's).

    Works on a ``PeftModel`` and on a transformers model with adapters from ``load_adapter``;
    ``adapter_names`` defaults to each layer's active adapters.
    """
    layers = matryoshka_layers(model)
    if not layers:
        raise ValueError("set_rank: the model has no MatryoshkaLoRA layer")
    for layer in layers:
        for name in adapter_names or layer.active_adapters:
            if name in layer.r:
                layer.set_rank(rank, name, rule)


def get_rank(model: nn.Module, adapter_name: Optional[str] = None) -> Optional[int]:
    """The rank ``model`` serves (``None``: the training forward) for ``adapter_name`` (default: active)."""
    for layer in matryoshka_layers(model):
        name = adapter_name or layer.active_adapters[0]
        if name in layer.serve_rank:
            return layer.serve_rank[name]
    raise ValueError(f"get_rank: no MatryoshkaLoRA layer holds adapter {adapter_name!r}")


@contextmanager
def serving_rank(model: nn.Module, rank: Optional[int]):
    """``set_rank(model, rank)`` for the block, then every layer's ranks exactly as they were."""
    saved = [(layer, dict(layer.serve_rank), dict(layer.serve_rule)) for layer in matryoshka_layers(model)]
    try:
        set_rank(model, rank)
        yield
    finally:
        for layer, ranks, rules in saved:
            layer.serve_rank.update(ranks)
            layer.serve_rule.update(rules)
