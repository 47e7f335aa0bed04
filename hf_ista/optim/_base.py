"""What every hf_ista optimizer shares: argument checks, the NaN/inf guard, lossless
``load_state_dict`` and :func:`state_bytes`."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch


def check_arg(name: str, value, ok: bool, expected: str) -> None:
    """Raise a ``ValueError`` naming the argument, the value and what was expected."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def check_adam_args(lr, betas, eps, weight_decay) -> None:
    check_arg("lr", lr, isinstance(lr, (int, float)) and lr > 0, "a number > 0")
    check_arg(
        "betas", betas,
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
        "two numbers in [0, 1)",
    )
    check_arg("eps", eps, isinstance(eps, (int, float)) and eps >= 0, "a number >= 0")
    check_arg("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0,
              "a number >= 0")


class IstaOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses set ``state_keys`` (the keys of an initialised per-parameter state, or
    a tuple of the key sets it may have),
    implement ``_check_group`` and ``_update(param, group)`` (or ``_update_all``), and get the rest
    from here."""

    state_keys: frozenset[str] | tuple[frozenset[str], ...] = frozenset()

    def __init__(self, params, defaults: dict):
        self._hyper_keys = frozenset(defaults)  # torch and wrappers may add keys to self.defaults
        super().__init__(params, defaults)  # every group goes through add_param_group: checked there

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, then the argument checks on the completed group
        (a group added after construction is checked too; a rejected one is not kept)."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict) -> None:
        check_adam_args(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # An empty parameter has nothing to update (and no layout): skipped.
        work = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None and p.numel()]
        for p, _ in work:
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients (parameter of "
                                 f"shape {tuple(p.shape)}); use a dense embedding (sparse=False)")
        with _no_autocast():  # a step inside autocast must not run its matmuls in bf16
            finite = self._finite(p for p, _ in work)
            self._update_all([pair for pair, ok in zip(work, finite) if ok])
        return loss

    def _update_all(self, work: list[tuple[torch.Tensor, dict]]) -> None:
        """Update every ``(param, group)`` of ``work`` (their gradients are finite). One at a time
        here; an optimizer that batches parameters together overrides this."""
        for param, group in work:
            self._update(param, group)

    def _state_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        """The shape (or set of shapes) each state tensor of ``p`` must have under ``group``, for the
        checks of ``load_state_dict``; keys left out are not checked."""
        return {}

    def _finite(self, params: Iterable[torch.Tensor]) -> list[bool]:
        """Which gradients are all finite. One host sync per step for all parameters: skipping a
        poisoned update is data-dependent control flow, so the algorithm needs it."""
        params = list(params)
        if not params:
            return []
        device = params[0].grad.device
        # max |g| is NaN or inf exactly when some entry is; one fused call for all gradients.
        peaks = torch._foreach_norm([p.grad for p in params], float("inf"))
        flags = torch.isfinite(torch.stack([peak.to(device) for peak in peaks])).tolist()
        bad = [tuple(p.shape) for p, ok in zip(params, flags) if not ok]
        if bad:
            warnings.warn(
                f"{type(self).__name__}: skipped the update of {len(bad)} parameter(s) whose gradient "
                f"holds NaN or inf (shapes {bad[:4]}{'...' if len(bad) > 4 else ''}); their state is unchanged",
                RuntimeWarning, stacklevel=3,
            )
        return flags

    def _check_shapes(self, state_dict: dict) -> None:
        """Refuse a checkpoint whose states would land on parameters of another shape (the
        parameters or their order changed since it was saved): torch only checks group sizes."""
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            settings = {**group, **{k: v for k, v in saved_group.items() if k != "params"}}
            for param_id, p in zip(saved_group["params"], group["params"]):
                param_state = saved.get(param_id) or {}
                if not param_state:
                    continue
                for key, shape in self._state_shapes(p, settings, frozenset(param_state)).items():
                    value = param_state.get(key)
                    allowed = shape if isinstance(shape, set) else {shape}
                    if torch.is_tensor(value) and tuple(value.shape) not in allowed:
                        raise ValueError(
                            f"this checkpoint does not fit {type(self).__name__}'s parameters: the state "
                            f"{key!r} of parameter {param_id} has shape {tuple(value.shape)}, expected "
                            f"{' or '.join(map(str, sorted(allowed)))} for a parameter of shape {tuple(p.shape)}; "
                            f"were the parameters, their order or optim_target_modules changed?"
                        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict and keep every saved state tensor's dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor of a floating-point
        parameter to that parameter's dtype, which would turn packed uint8 / int16 buffers and
        bf16 values into something else. We let torch do its bookkeeping, then restore the
        saved tensors with their own dtype on the parameter's device.
        """
        saved = state_dict["state"]
        allowed = self.state_keys if isinstance(self.state_keys, tuple) else (self.state_keys,)
        for param_id, param_state in saved.items():
            if param_state and any(allowed) and frozenset(param_state) not in allowed:
                raise ValueError(
                    f"this checkpoint was not written by {type(self).__name__}: parameter {param_id} "
                    f"has state keys {sorted(param_state)}, expected one of {[sorted(k) for k in allowed]}"
                )
        missing = {k for k in self._hyper_keys if any(k not in g for g in state_dict["param_groups"])}
        if missing:
            raise ValueError(
                f"this checkpoint was not written by {type(self).__name__}: its param_groups lack "
                f"{sorted(missing)}"
            )
        self._check_shapes(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for param_id, param in zip(ids, params):
            for key, value in saved.get(param_id, {}).items():
                if torch.is_tensor(value):
                    self.state[param][key] = value.to(device=param.device)


def _no_autocast() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def _collect(t: torch.Tensor, spans: dict) -> None:
    """Record the byte range of ``t`` in its storage (tensor subclasses: of their inner tensors)."""
    # Tensor subclasses (torchao's quantised states) hold their bytes in inner tensors.
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            _collect(getattr(t, n), spans)
        return
    if t.device.type == "meta" or t.numel() == 0:
        return
    size = t.element_size()
    start = t.storage_offset() * size
    extent = (1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))) * size
    spans.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((start, start + extent))


def _walk(obj, spans: dict, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        _collect(obj, spans)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk(v, spans, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _walk(v, spans, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        # Some optimizers keep their state in objects of their own (a preconditioner per
        # parameter, e.g. pytorch-optimizer's ScalableShampoo): their tensors count too.
        _walk(vars(obj), spans, seen)


def _union_length(ranges: list) -> int:
    total, end = 0, -1
    for lo, hi in sorted(ranges):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of an optimizer's state (any ``torch.optim.Optimizer``).

    Counts every tensor in ``optimizer.state`` (nested containers, the attributes of objects kept
    there and tensor subclasses included) once, however many parameters share it; views of one buffer count each of its bytes once.
    Python scalars (a step counter) count as 0.
    """
    inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps one
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        optimizer = inner
    spans: dict = {}
    _walk(list(optimizer.state.values()), spans, set())
    return sum(_union_length(r) for r in spans.values())
