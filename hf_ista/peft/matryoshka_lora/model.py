"""``MatryoshkaLoraModel``: the PEFT tuner that puts :class:`MatryoshkaLoraLinear` layers into a
model, draws DyLoRA's rank once per training forward, and serves a chosen rank (``set_rank``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PEFT_TYPE, MatryoshkaLoraConfig
from .layer import MatryoshkaLoraLayer, MatryoshkaLoraLinear, get_rank, matryoshka_layers, set_rank


class MatryoshkaLoraModel(BaseTuner):
    """MatryoshkaLoRA for a transformers (or any torch) model; built by ``get_peft_model``."""

    # transformers' load_adapter and delete_adapter assume the prefix is the lower-cased PEFT type + "_"
    prefix: str = PEFT_TYPE.lower() + "_"
    tuner_layer_cls = MatryoshkaLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config: MatryoshkaLoraConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if isinstance(target, MatryoshkaLoraLayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise ValueError(f"target_modules matched {current_key!r}, a {type(base).__name__}; MatryoshkaLoRA "
                             f"targets nn.Linear and transformers' Conv1D")
        new_module = MatryoshkaLoraLinear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter trains only once it is made active
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        # PeftModel.forward calls the wrapped model directly, inside this context (the hook PEFT's own
        # LoRA uses for mixed-adapter batches): the one place a tuner sees each whole-model forward.
        if self.training:
            self._draw_dylora_ranks()
        yield

    def forward(self, *args: Any, **kwargs: Any):  # the tuner called directly, without PeftModel
        if self.training:
            self._draw_dylora_ranks()
        return super().forward(*args, **kwargs)

    def _draw_dylora_ranks(self) -> None:
        """DyLoRA: one rank per training forward, the same in every layer (drawn from torch's RNG, so
        ``set_seed`` makes it reproducible; gradient checkpointing's recomputation reuses it)."""
        for name in self.active_adapters:
            config = self.peft_config[name]
            if getattr(config, "mode", None) != "dylora":
                continue
            ranks = config.train_ranks
            rank = ranks[int(torch.randint(len(ranks), ()))]
            for layer in matryoshka_layers(self.model):
                if name in layer.sampled_rank:
                    layer.sampled_rank[name] = rank

    def set_rank(self, rank: Optional[int], adapter_names: Optional[list[str]] = None,
                 rule: Optional[str] = None) -> None:
        """Serve the rank-``rank`` prefix (``None``: the training forward of the adapter's mode) by
        ``rule`` (``truncate`` | ``rescale``; ``None``: as before, first the config's ``serve_rule``)."""
        set_rank(self.model, rank, adapter_names or self.active_adapters, rule)

    def get_rank(self, adapter_name: Optional[str] = None) -> Optional[int]:
        return get_rank(self.model, adapter_name or self.active_adapters[0])
