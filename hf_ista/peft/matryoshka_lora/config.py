"""``MatryoshkaLoraConfig``: the PEFT config of a MatryoshkaLoRA adapter, and the arithmetic that
follows from it (training ranks, per-rank scales, the fixed diagonal P).

Notation (PEFT's layout): ``A`` is ``(r, in)``, ``B`` is ``(out, r)``; the rank-``t`` prefix is
``A[:t]``, ``B[:, :t]`` and ``delta_t(x) = x A[:t]^T B[:, :t]^T``. Each rank ``t`` has a multiplier
``m(t) = base_scale * s(t)``:

=============  ======  ===============  ====================================================
rank_scaling   s(t)    base_scale       m(t)
=============  ======  ===============  ====================================================
``none``       1       lora_alpha / r   lora_alpha / r at every rank (LoRA's scaling)
``rank``       1 / t   lora_alpha       lora_alpha / t (LoRA's alpha/r rule at each rank)
``sqrt``       1 / √t  lora_alpha       lora_alpha / √t (rsLoRA's alpha/√r rule at each rank)
=============  ======  ===============  ====================================================

so ``m(r)`` is exactly PEFT's LoRA (``none``, ``rank``) or rsLoRA (``sqrt``) scaling.

**Training** (no rank set) runs the *mean* of the rank-``t`` models of the training ranks ``S``:
``y = W0 x + (1/|S|) Σ_{t∈S} m(t) delta_t(x) = W0 x + (base_scale/|S|) x A^T diag(P) B^T`` with
``P_i = Σ_{t∈S, t≥i} s(t)`` (:func:`matryoshka_diagonal`): one forward, every prefix gets gradient
in every step. Dividing by ``|S|`` keeps the output scale from growing with the number of training
ranks. The modes are choices of ``S``:

* ``matryoshka``: ``S = train_ranks`` (default: powers of two up to ``r``, ``r`` included);
* ``lora``: ``S = {r}``, so ``P = s(r) * 1``: plain LoRA;
* ``dylora``: ``S = {t}`` with one ``t`` drawn uniformly from ``train_ranks`` per training forward
  (the same ``t`` in every layer); outside training it runs the mean of its draws, which is the
  ``matryoshka`` forward.

**Serving rank r'** (``set_rank(r')``), by ``serve_rule``:

* ``truncate`` (default): the training forward cut to its first ``r'`` directions,
  ``y = W0 x + c x A[:r']^T diag(D[:r']) B[:, :r']^T`` where ``c * D`` is the mode's training
  diagonal (``matryoshka``/``dylora``: ``(base_scale/|S|) P``; ``lora``: ``m(r) * 1``). Equivalently
  ``(1/|S|) Σ_{t∈S} m(t) delta_{min(t, r')}``: every model of the trained mean cut to ``r'``. This is
  the normalisation that matches the training objective: serving ``r' = r`` *is* the trained
  forward, and a lower rank drops the directions with the smallest weights ``P_i``.
* ``rescale``: ``y = W0 x + m(r') delta_{r'}(x)`` (ALGORITHMS.md's inference rule): the rank-``r'``
  member alone on its own scale — exactly what DyLoRA trains when it draws ``r'``, but for
  ``matryoshka`` not what was trained: the member weighs its directions ``m(r')`` where the mean
  weighs them ``(base_scale/|S|) P_i`` (measured in ``benchmarks/matryoshka.py``: far worse at
  high ranks).

P follows from the config and is never saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from peft.config import PeftConfig

MODES = ("matryoshka", "lora", "dylora")
RANK_SCALINGS = ("none", "rank", "sqrt")
BIASES = ("none", "all", "lora_only")
SERVE_RULES = ("truncate", "rescale")
PEFT_TYPE = "MATRYOSHKA_LORA"


def default_train_ranks(r: int) -> list[int]:
    """Powers of two below ``r``, and ``r`` itself."""
    ranks = [1 << i for i in range(r.bit_length()) if (1 << i) < r]
    return ranks + [r]


def rank_scale(t: int, rank_scaling: str) -> float:
    """``s(t)``: 1, ``1/t`` or ``1/√t``."""
    if rank_scaling == "none":
        return 1.0
    if rank_scaling == "rank":
        return 1.0 / t
    if rank_scaling == "sqrt":
        return 1.0 / math.sqrt(t)
    raise ValueError(f"rank_scaling={rank_scaling!r} is invalid: expected one of {RANK_SCALINGS}")


def base_scale(lora_alpha: float, r: int, rank_scaling: str) -> float:
    """The rank-independent factor of ``m(t)``: ``lora_alpha / r`` for ``none``, else ``lora_alpha``."""
    return lora_alpha / r if rank_scaling == "none" else float(lora_alpha)


def matryoshka_diagonal(r: int, train_ranks: list[int], rank_scaling: str) -> torch.Tensor:
    """``P`` (length ``r``, fp32): ``P_i = Σ_{t∈S, t≥i} s(t)`` for 1-based ``i`` (unnormalised).

    ``x A^T diag(P) B^T = Σ_{t∈S} s(t) x A[:t]^T B[:, :t]^T``.
    """
    p = torch.zeros(r, dtype=torch.float64)
    for t in train_ranks:
        p[:t] += rank_scale(t, rank_scaling)  # rank t feeds prefix entries 1..t
    return p.float()


@dataclass
class MatryoshkaLoraConfig(PeftConfig):
    """Config of a MatryoshkaLoRA adapter: one adapter trained at once for every rank of
    ``train_ranks``, served at any rank with ``set_rank``. See the module docstring for the math.

    Args:
        r: the full rank.
        mode: ``matryoshka`` (fixed diagonal P), ``lora`` (plain LoRA) or ``dylora`` (one sampled
            rank per training forward): the baselines are one switch away.
        train_ranks: the ranks trained (``matryoshka``) or sampled (``dylora``); default powers of
            two up to ``r``, ``r`` included. Sorted, unique, in ``[1, r]``.
        rank_scaling: ``none``, ``rank`` or ``sqrt``: ``s(t)`` and the multiplier ``m(t)``.
        serve_rule: ``truncate`` (default: the trained forward cut to rank r') or ``rescale``
            (the rank-r' member on its own scale ``m(r')``); ``set_rank(r', rule=...)`` overrides it.
        lora_alpha, lora_dropout, bias, target_modules, exclude_modules, modules_to_save,
        layers_to_transform, layers_pattern: as in PEFT's ``LoraConfig`` (``bias='lora_only'``
            trains the biases of the adapted layers).
        init_lora_weights: True: A Kaiming-uniform, B zero (the adapter starts as a no-op), as LoRA;
            False: B random too (for tests).
    """

    r: int = field(default=8, metadata={"help": "full rank of the adapter"})
    mode: Literal["matryoshka", "lora", "dylora"] = field(
        default="matryoshka", metadata={"help": f"one of {MODES}"})
    train_ranks: Optional[list[int]] = field(
        default=None, metadata={"help": "ranks trained together; default powers of two up to r, r included"})
    rank_scaling: Literal["none", "rank", "sqrt"] = field(
        default="sqrt", metadata={"help": f"per-rank scale s(t), one of {RANK_SCALINGS}"})
    serve_rule: Literal["truncate", "rescale"] = field(
        default="truncate", metadata={"help": f"how set_rank(r') serves rank r', one of {SERVE_RULES}"})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "module names or a regex; 'all-linear' for every linear but the output"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": f"one of {BIASES}"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "other modules to train and save (e.g. a classifier head)"})
    init_lora_weights: bool = field(default=True, metadata={"help": "B starts at zero (LoRA's init)"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer list name"})

    def __post_init__(self):
        super().__post_init__()
        from peft.utils import PeftType

        if PEFT_TYPE not in PeftType._value2member_map_:
            from ...integrations.peft import check_version

            check_version()  # an unsupported peft: say which versions work
            raise ValueError("PeftType has no MATRYOSHKA_LORA: `import hf_ista` registers it")
        self.peft_type = PeftType(PEFT_TYPE)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r={self.r!r} is invalid: expected an integer >= 1")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is invalid: expected one of {MODES}")
        if self.rank_scaling not in RANK_SCALINGS:
            raise ValueError(f"rank_scaling={self.rank_scaling!r} is invalid: expected one of {RANK_SCALINGS}")
        if self.serve_rule not in SERVE_RULES:
            raise ValueError(f"serve_rule={self.serve_rule!r} is invalid: expected one of {SERVE_RULES}")
        if self.bias not in BIASES:
            raise ValueError(f"bias={self.bias!r} is invalid: expected one of {BIASES}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is invalid: expected a float in [0, 1)")
        if self.train_ranks is None:
            self.train_ranks = default_train_ranks(self.r)
        ranks = list(self.train_ranks)
        if (not ranks or any(not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= self.r for t in ranks)
                or ranks != sorted(set(ranks))):
            raise ValueError(f"train_ranks={self.train_ranks!r} is invalid: expected sorted unique integers "
                             f"in [1, r={self.r}]")
        self.train_ranks = ranks
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (set(self.exclude_modules) if isinstance(self.exclude_modules, list)
                                else self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")
