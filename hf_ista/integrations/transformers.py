"""Our optimizers as ``TrainingArguments(optim=...)`` names.

transformers has no public registry of optimizer names: ``OptimizerNames`` is a closed enum that
``TrainingArguments`` and ``HfArgumentParser`` read, and the Trainer maps a name to a class through
``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``. We add a member to the enum and a handler
to that table, for the transformers versions we have tested, and refuse others with a clear error.

Adding an optimizer is one file in ``hf_ista/optim/`` and one ``OptimizerSpec`` in ``OPTIMIZERS``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from packaging.version import Version

SUPPORTED = (Version("5.20"), Version("6.0"))  # [low, high)


@dataclass(frozen=True)
class Hyper:
    """One typed ``optim_args`` key: its type, default and the check its value must pass."""

    type: type  # int, float, bool, str or tuple (floats written "a:b")
    default: Any
    check: Callable[[Any], bool] = lambda v: True
    expected: str = ""
    choices: tuple = ()

    def parse(self, key: str, text: str) -> Any:
        try:
            if self.type is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = lowered in ("true", "1", "yes")
            elif self.type is tuple:
                value = tuple(float(x) for x in text.split(":"))
            elif self.type is int:
                value = int(text)
            else:
                value = self.type(text)
        except ValueError:
            raise ValueError(
                f"optim_args: {key}={text!r} is not a valid {self.type.__name__}; expected {self.describe()}"
            ) from None
        if (self.choices and value not in self.choices) or not self.check(value):
            raise ValueError(f"optim_args: {key}={text!r} is out of range; expected {self.describe()}")
        return value

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        return self.expected or self.type.__name__


@dataclass(frozen=True)
class OptimizerSpec:
    """An entry of the optimizer table."""

    cls_path: str  # "module:Class"
    hypers: dict[str, Hyper] = field(default_factory=dict)
    adam_like: bool = True  # takes betas / eps from TrainingArguments' adam_* fields
    low_rank: bool = False  # ``optim_target_modules`` get a group with ``rank``, the rest AdamW

    def load_cls(self):
        module, name = self.cls_path.split(":")
        return getattr(importlib.import_module(module), name)


_BETAS = Hyper(tuple, None, lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two floats in [0, 1) as b1:b2")
_EPS = Hyper(float, None, lambda v: v >= 0, "a float >= 0")
_RANK = Hyper(int, 16, lambda v: v >= 1, "an integer >= 1")
_WINDOW = Hyper(int, 32, lambda v: v >= 1, "an integer >= 1")
_DENSITY = Hyper(float, 0.01, lambda v: 0 < v <= 1, "a float in (0, 1]")
_MOMENTUM = Hyper(float, 0.0, lambda v: 0 <= v < 1, "a float in [0, 1)")

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "microadam": OptimizerSpec(
        "hf_ista.optim.microadam:MicroAdam",
        {
            "m": Hyper(int, 10, lambda v: v >= 1, "an integer >= 1"),
            "density": Hyper(float, 0.01, lambda v: 0 < v <= 1, "a float in (0, 1]"),
            "quant_block_size": Hyper(int, 64, lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"),
            "values_dtype": Hyper(str, "bf16", choices=("bf16", "fp16", "fp32")),
            "betas": _BETAS,
            "eps": _EPS,
        },
    ),
    "ldadam": OptimizerSpec(
        "hf_ista.optim.ldadam:LDAdam",
        {
            "rank": _RANK,
            "rho": Hyper(float, 0.908, lambda v: 0 <= v < 1, "a float in [0, 1)"),
            "error_feedback": Hyper(str, "fp32", choices=("none", "fp32", "8bit", "4bit")),
            "betas": _BETAS,
            "eps": _EPS,
        },
        low_rank=True,
    ),
    "dct_adamw": OptimizerSpec(
        "hf_ista.optim.dct_adamw:DCTAdamW",
        {
            "rank": _RANK,
            "update_proj_gap": Hyper(int, 1, lambda v: v >= 1, "an integer >= 1"),
            "error_feedback": Hyper(str, "4bit", choices=("none", "fp32", "8bit", "4bit")),
            "rotate_moments": Hyper(bool, True, expected="true or false"),
            "fft": Hyper(str, "auto", choices=("auto", "on", "off")),
            "betas": _BETAS,
            "eps": _EPS,
        },
        low_rank=True,
    ),
    "dash": OptimizerSpec(
        "hf_ista.optim.dash:DASH",
        {
            "block_size": Hyper(int, 1024, lambda v: v >= 2, "an integer >= 2"),
            "inv_root": Hyper(str, "ndb", choices=("ndb", "cn", "cheby", "evd")),
            "precond_freq": Hyper(int, 10, lambda v: v >= 1, "an integer >= 1"),
            "scaling": Hyper(str, "power", choices=("power", "fro")),
            "grafting": Hyper(str, "adam", choices=("adam", "none")),
            "beta_lr": Hyper(float, 0.95, lambda v: 0 <= v < 1, "a float in [0, 1)"),
            "beta_g": Hyper(float, 0.9, lambda v: 0 <= v < 1, "a float in [0, 1)"),
            "beta_graft": Hyper(float, 0.95, lambda v: 0 <= v < 1, "a float in [0, 1)"),
            "eps": Hyper(float, 1e-6, lambda v: v > 0, "a float > 0 (relative to λ_max)"),
            "graft_eps": Hyper(float, 1e-8, lambda v: v >= 0, "a float >= 0"),
            "newton_steps": Hyper(int, 10, lambda v: v >= 1, "an integer >= 1"),
            "cheby_degree": Hyper(int, 40, lambda v: v >= 1, "an integer >= 1"),
            "start_step": Hyper(int, 1, lambda v: v >= 1, "an integer >= 1"),
            "one_dim": Hyper(str, "adamw", choices=("adamw", "shampoo")),
        },
        adam_like=False,
    ),
    "sparse_mfac": OptimizerSpec(
        "hf_ista.optim.efcp:SparseMFAC",
        {
            "m": _WINDOW,
            "density": _DENSITY,
            "damp": Hyper(float, 1e-6, lambda v: v > 0, "a float > 0"),
            "momentum": _MOMENTUM,
        },
        adam_like=False,
    ),
    "sparse_ggt": OptimizerSpec(
        "hf_ista.optim.efcp:SparseGGT",
        {
            "m": _WINDOW,
            "density": _DENSITY,
            "eps": Hyper(float, 1e-4, lambda v: v > 0, "a float > 0"),
            "momentum": _MOMENTUM,
            "rcond": Hyper(float, 1e-10, lambda v: 0 <= v < 1, "a float in [0, 1)"),
        },
        adam_like=False,
    ),
    "lordo": OptimizerSpec(
        "hf_ista.optim.lordo:LoRDO",
        {
            "rank": _RANK,
            "sync_every": Hyper(int, 16, lambda v: v >= 1, "an integer >= 1"),
            "omega": Hyper(float, 0.5, lambda v: 0 <= v <= 1, "a float in [0, 1]"),
            "clip": Hyper(float, 1.0, lambda v: v >= 0, "a float >= 0 (0: no clipping)"),
            "mu": Hyper(float, 1.0, lambda v: v > 0, "a float > 0"),
            "error_feedback": Hyper(str, "none", choices=("none", "fp32", "8bit", "4bit")),
            "outer_lr": Hyper(float, 1.0, lambda v: v > 0, "a float > 0"),
            "outer_momentum": Hyper(float, 0.0, lambda v: 0 <= v < 1, "a float in [0, 1)"),
            "all_reduce_gradients": Hyper(bool, False, expected="true or false"),
            "betas": _BETAS,
            "eps": _EPS,
        },
        low_rank=True,
    ),
}


def parse_optim_args(name: str, optim_args: str | None) -> dict[str, Any]:
    """Typed, checked ``optim_args`` for optimizer ``name`` (only the keys given)."""
    spec = OPTIMIZERS[name]
    out: dict[str, Any] = {}
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"optim_args: {item!r} is not key=value (optimizer {name!r})")
        if key not in spec.hypers:
            raise ValueError(
                f"optim_args: unknown key {key!r} for optimizer {name!r}; accepted keys: {sorted(spec.hypers)}"
            )
        out[key] = spec.hypers[key].parse(key, text)
    return out


def optimizer_kwargs(name: str, args) -> dict[str, Any]:
    """Constructor keyword arguments for ``name`` from a ``TrainingArguments``."""
    spec = OPTIMIZERS[name]
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    if spec.adam_like:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    kwargs.update(parse_optim_args(name, args.optim_args))
    if spec.low_rank:
        kwargs.setdefault("rank", spec.hypers["rank"].default)
    return kwargs


def low_rank_param_groups(model, target_modules, rank: int, weight_decay: float) -> list[dict]:
    """Param groups for a low-rank optimizer, chosen as transformers chooses them for GaLore.

    The weights of the ``nn.Linear`` modules that ``target_modules`` names (names, a regex, or
    ``"all-linear"``, with transformers' own matching) form a group with ``rank``; every other
    trainable parameter is AdamW (``rank=None``). Weight decay follows the Trainer's rule (none on
    biases and norms), which transformers' GaLore path drops.
    """
    from torch import nn
    from transformers.trainer import Trainer
    from transformers.trainer_optimizer import check_target_module_exists

    if not isinstance(target_modules, (str, list)):
        raise TypeError(f"optim_target_modules must be a list of module names, a regex string or "
                        f"'all-linear', got {target_modules!r}")
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    targets = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (all_linear or check_target_module_exists(target_modules, name))
    }
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not targets & {n for n, _ in named}:
        raise ValueError(f"optim_target_modules={target_modules!r} matches no trainable nn.Linear weight of "
                         f"the model; use module names, a regex or 'all-linear'")
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [
        {"params": [p for n, p in named if n in targets], "rank": rank, "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in targets and n in decay], "rank": None,
         "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in targets and n not in decay], "rank": None,
         "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def check_supported(package: str, installed: str, supported: tuple, what: str) -> Version:
    """``installed`` as a Version, or an ImportError saying ``what`` needs ``package`` in ``supported``
    (``[low, high)``) and how to install it."""
    found = Version(installed)
    low, high = supported
    if not (low <= found < high):
        raise ImportError(
            f"{what} {package} >= {low}, < {high}; found {found}. "
            f"Install a supported version: pip install '{package}>={low},<{high}'"
        )
    return found


def _check_version(installed: str | None = None) -> Version:
    if installed is None:
        import transformers

        installed = transformers.__version__
    return check_supported("transformers", installed, SUPPORTED, "hf_ista registers its optimizers with")


def _extend_enum(enum_cls, value: str) -> None:
    """Add ``value`` to a closed ``str`` Enum in place (idempotent)."""
    if value in enum_cls._value2member_map_:
        return
    member = str.__new__(enum_cls, value)
    member._name_ = value.upper()
    member._value_ = value
    member.__objclass__ = enum_cls
    enum_cls._member_map_[member._name_] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member._name_)
    type.__setattr__(enum_cls, member._name_, member)


def _handler(ctx):
    """The Trainer's handler for every name in ``OPTIMIZERS``."""
    name = ctx.args.optim.value if hasattr(ctx.args.optim, "value") else str(ctx.args.optim)
    spec, kwargs = OPTIMIZERS[name], optimizer_kwargs(name, ctx.args)
    if spec.low_rank:
        if ctx.model is None:
            raise ValueError(f"optim={name!r} needs the model to choose its low-rank weights")
        # Without optim_target_modules every linear layer is low-rank (GaLore would refuse).
        targets = ctx.args.optim_target_modules or "all-linear"
        kwargs["params"] = low_rank_param_groups(ctx.model, targets, kwargs["rank"], ctx.args.weight_decay)
    return spec.load_cls(), kwargs


def register() -> None:
    """Make every name of ``OPTIMIZERS`` a valid ``optim`` for TrainingArguments and the Trainer."""
    _check_version()
    try:
        from transformers import trainer_optimizer
        from transformers.training_args import OptimizerNames

        handlers = trainer_optimizer._OPTIMIZER_HANDLERS
    except (ImportError, AttributeError) as err:  # pragma: no cover - depends on the installed version
        raise ImportError(
            f"hf_ista cannot find transformers' optimizer table ({err}); this transformers is not one "
            f"hf_ista supports ({SUPPORTED[0]} <= version < {SUPPORTED[1]})"
        ) from err
    for name in OPTIMIZERS:
        _extend_enum(OptimizerNames, name)
        handlers[OptimizerNames(name)] = _handler
    _add_default_callback()


def _add_default_callback() -> None:
    """Give every Trainer the LoRDO callback (inert for other optimizers): ``optim="lordo"`` alone
    then runs without DDP's per-step all-reduce and keeps each rank's state in checkpoints.
    ``transformers.trainer.DEFAULT_CALLBACKS`` is the list every Trainer starts its callbacks from."""
    from transformers import trainer

    from ..callbacks.lordo import LoRDOCallback

    if not isinstance(getattr(trainer, "DEFAULT_CALLBACKS", None), list):  # pragma: no cover
        raise ImportError("hf_ista cannot find transformers.trainer.DEFAULT_CALLBACKS; this transformers is not one "
                          f"hf_ista supports ({SUPPORTED[0]} <= version < {SUPPORTED[1]})")
    if LoRDOCallback not in trainer.DEFAULT_CALLBACKS:
        trainer.DEFAULT_CALLBACKS.append(LoRDOCallback)
