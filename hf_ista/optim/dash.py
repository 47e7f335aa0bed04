"""DASH (arXiv 2602.02016): block Shampoo with every block of every layer stacked into one batch.

Each parameter is seen as a matrix and cut into blocks (``_blocks``: at most ``block_size`` a side,
edges zero-padded). Blocks of the same shape from all parameters of a param group are *stacked*:
their states are slices of one 3-D tensor per kind, so a step is a few batched matmuls whatever
the number of layers. Per stacked block, with gradient ``G`` and 1-based step ``t``:

1. ``L <- beta_lr L + (1 - beta_lr) G Gᵀ``,  ``R <- beta_lr R + (1 - beta_lr) Gᵀ G``
2. ``M <- beta_g M + (1 - beta_g) G`` (the EMA of the gradient); with ``grafting="adam"`` also
   ``A <- beta_graft A + (1 - beta_graft) G²`` and the Adam direction ``D = M̂ / (sqrt(Â) + graft_eps)``
3. every ``precond_freq`` steps from ``start_step`` on: ``L̄ = L^(-1/4)``, ``R̄ = R^(-1/4)``
   (``hf_ista.linalg.inv_root``: ``evd``, ``cn``, ``ndb`` or ``cheby``, damping ``eps`` relative to
   each block's top eigenvalue, ``scaling`` ``fro`` or ``power``)
4. ``U = L̄ M R̄``, rescaled to the Frobenius norm of ``D`` (``grafting="adam"``; the rescale cancels
   ``M``'s bias correction) or bias-corrected (``grafting="none"``); before ``start_step``, ``U = D``
   (or ``M̂``)
5. ``p <- p (1 - lr wd) - lr U``, with each parameter's own group's ``lr`` and ``weight_decay``

Vectors and scalars get AdamW with betas ``(beta_g, beta_graft)`` and ``graft_eps`` (``one_dim=
"adamw"``), or are preconditioned as one-row matrices (``one_dim="shampoo"``: full-matrix AdaGrad
of the vector, per block). ``batched=False`` runs the same algorithm one block at a time — the
Distributed-Shampoo-style baseline of ``benchmarks/dash.py``.

State per preconditioned parameter: ``L``, ``R``, ``L_root``, ``R_root``, ``momentum`` and
(grafting) ``graft``, all fp32 and all views into the group's stacks; ``state_dict()`` saves them as
they are and ``load_state_dict`` restacks them at the next step, bit-exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels import dash as K
from ..linalg.inv_root import METHODS, SCALINGS, inv_root
from ._base import IstaOptimizer, check_arg
from ._blocks import block_grid, block_shape, from_blocks, matrix_shape, to_blocks
from ._lowrank import ADAMW_KEYS, adamw_update

SHAMPOO_KEYS = frozenset({"step", "L", "R", "L_root", "R_root", "momentum"})
GRAFTINGS = ("adam", "none")
ONE_DIM = ("adamw", "shampoo")


@dataclass
class _Stack:
    """The parameters of one group whose blocks have one shape, and their stacked states."""

    params: list[torch.Tensor]
    offsets: list[int]  # index of each parameter's first block in the stack
    counts: list[int]  # number of blocks of each parameter
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def blocks(self, members: list[torch.Tensor]) -> torch.Tensor:
        """Indices of the blocks of ``members`` in the stack."""
        spans = {id(p): (offset, count) for p, offset, count in zip(self.params, self.offsets, self.counts)}
        return torch.cat([torch.arange(spans[id(p)][0], sum(spans[id(p)])) for p in members])


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class DASH(IstaOptimizer):
    """Batched block Shampoo with Adam grafting.

    Args:
        lr: learning rate (> 0); weight_decay: decoupled, as in AdamW (>= 0).
        block_size: largest side of a block (>= 2); larger matrices are cut, their edges padded.
        inv_root: ``"ndb"`` (Newton-DB, default), ``"cn"`` (coupled Newton), ``"cheby"``
            (Chebyshev) or ``"evd"`` (eigendecomposition).
        precond_freq: steps between recomputations of the inverse roots (>= 1).
        scaling: ``"power"`` or ``"fro"``: the bound of each block's top eigenvalue the roots scale by.
        grafting: ``"adam"`` (the update takes Adam's per-block norm) or ``"none"``.
        beta_lr, beta_g, beta_graft: EMA factors of ``L``/``R``, of the gradient, of its square; in [0, 1).
        eps: damping of ``L`` and ``R`` relative to their top eigenvalue, > 0 (``"cheby"`` is only
            accurate from about 1e-3 on at degree 40: see ``hf_ista.linalg.inv_root``).
        graft_eps: Adam's epsilon in the grafted direction (>= 0).
        newton_steps: iterations of ``"cn"`` and ``"ndb"`` (per square root); cheby_degree: the
            Chebyshev polynomial's degree.
        start_step: first step that is preconditioned (earlier steps take the grafted direction).
        one_dim: ``"adamw"`` or ``"shampoo"`` for vectors.
        batched: stack the blocks (``True``) or loop over them one by one (``False``, for comparison).
    """

    state_keys = (ADAMW_KEYS, SHAMPOO_KEYS | {"graft"}, SHAMPOO_KEYS)

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, block_size: int = 1024,
                 inv_root: str = "ndb", precond_freq: int = 10, scaling: str = "power", grafting: str = "adam",
                 beta_lr: float = 0.95, beta_g: float = 0.9, beta_graft: float = 0.95, eps: float = 1e-6,
                 graft_eps: float = 1e-8, newton_steps: int = 10, cheby_degree: int = 40, start_step: int = 1,
                 one_dim: str = "adamw", batched: bool = True):
        defaults = dict(lr=lr, weight_decay=weight_decay, block_size=block_size, inv_root=inv_root,
                        precond_freq=precond_freq, scaling=scaling, grafting=grafting, beta_lr=beta_lr,
                        beta_g=beta_g, beta_graft=beta_graft, eps=eps, graft_eps=graft_eps,
                        newton_steps=newton_steps, cheby_degree=cheby_degree, start_step=start_step,
                        one_dim=one_dim, batched=batched)
        self._stacks: dict[tuple, _Stack] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------ checks

    def _check_group(self, group: dict) -> None:
        def integer(name, low):
            v = group[name]
            check_arg(name, v, isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}")

        def number(name, ok, expected):
            v = group[name]
            check_arg(name, v, isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v), expected)

        number("lr", lambda v: v > 0, "a number > 0")
        number("weight_decay", lambda v: v >= 0, "a number >= 0")
        for name in ("beta_lr", "beta_g", "beta_graft"):
            number(name, lambda v: 0 <= v < 1, "a number in [0, 1)")
        number("eps", lambda v: v > 0, "a number > 0")
        number("graft_eps", lambda v: v >= 0, "a number >= 0")
        integer("block_size", 2)
        integer("precond_freq", 1)
        integer("newton_steps", 1)
        integer("cheby_degree", 1)
        integer("start_step", 1)
        for name, choices in (("inv_root", METHODS), ("scaling", SCALINGS), ("grafting", GRAFTINGS),
                              ("one_dim", ONE_DIM)):
            check_arg(name, group[name], group[name] in choices, f"one of {choices}")
        check_arg("batched", group["batched"], isinstance(group["batched"], bool), "True or False")
        for p in group["params"]:
            check_arg("params", f"tensor of dtype {p.dtype}", p.dtype in (torch.float32, torch.bfloat16, torch.float16),
                      "float32, bfloat16 or float16 tensors")

    @staticmethod
    def is_preconditioned(p: torch.Tensor, group: dict) -> bool:
        return p.ndim >= 2 or (p.ndim == 1 and group["one_dim"] == "shampoo")

    def _state_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        if not self.is_preconditioned(p, group):
            return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
        rows, cols = matrix_shape(p.shape)
        br, bc = block_shape(rows, cols, group["block_size"])
        n = block_grid(rows, cols, br, bc)
        n = n[0] * n[1]
        return {"L": (n, br, br), "R": (n, bc, bc), "L_root": (n, br, br), "R_root": (n, bc, bc),
                "momentum": (n, br, bc), "graft": (n, br, bc)}

    # ------------------------------------------------------------------------------ stacks

    def _stack_keys(self) -> dict[tuple, list[torch.Tensor]]:
        """Every preconditioned parameter of every group, by (group, block shape, device)."""
        keys: dict[tuple, list[torch.Tensor]] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.numel() and self.is_preconditioned(p, group):
                    shape = block_shape(*matrix_shape(p.shape), group["block_size"])
                    keys.setdefault((index, *shape, p.device), []).append(p)
        return keys

    def _names(self, group: dict) -> tuple[str, ...]:
        return ("L", "R", "L_root", "R_root", "momentum") + (("graft",) if group["grafting"] == "adam" else ())

    def _is_current(self, stack: _Stack, params: list[torch.Tensor], names) -> bool:
        """Whether every parameter's state still is its slice of ``stack`` (a ``load_state_dict``
        replaces the states with tensors of their own)."""
        if not _same(stack.params, params):
            return False
        for p, offset in zip(params, stack.offsets):
            state = self.state[p]
            for name in names:
                if name not in state or state[name].data_ptr() != stack.tensors[name][offset].data_ptr():
                    return False
        return True

    def _build(self, key: tuple, params: list[torch.Tensor], group: dict) -> _Stack:
        """Stack the states of ``params`` (new ones start at zero) and make each state a slice."""
        _, br, bc, device = key
        counts = []
        for p in params:
            down, across = block_grid(*matrix_shape(p.shape), br, bc)
            counts.append(down * across)
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        stack = _Stack(params, offsets, counts)
        shapes = {"L": (br, br), "R": (bc, bc), "L_root": (br, br), "R_root": (bc, bc), "momentum": (br, bc),
                  "graft": (br, bc)}
        for name in self._names(group):
            parts = [self.state[p][name] if name in self.state[p] else
                     torch.zeros(n, *shapes[name], dtype=torch.float32, device=device) for p, n in zip(params, counts)]
            stack.tensors[name] = torch.cat(parts)
        for p, offset, n in zip(params, offsets, counts):
            state = self.state[p]
            state.setdefault("step", 0)
            for name in self._names(group):
                state[name] = stack.tensors[name][offset:offset + n]
        return stack

    # ------------------------------------------------------------------------------ the step

    def _update_all(self, work: list[tuple[torch.Tensor, dict]]) -> None:
        live = {id(p) for p, _ in work}
        for p, group in work:
            if not self.is_preconditioned(p, group):
                adamw_update(p, self.state[p], group["lr"], group["weight_decay"],
                             (group["beta_g"], group["beta_graft"]), group["graft_eps"])
        for key, params in self._stack_keys().items():
            group = self.param_groups[key[0]]
            stack = self._stacks.get(key)
            if stack is None or not self._is_current(stack, params, self._names(group)):
                stack = self._stacks[key] = self._build(key, params, group)
            # Parameters skipped once (a NaN gradient) are a step behind: each step count apart.
            by_step: dict[int, list[torch.Tensor]] = {}
            for p in params:
                if id(p) in live:
                    by_step.setdefault(self.state[p]["step"], []).append(p)
            for members in by_step.values():
                self._step_members(stack, members, group)

    def _step_members(self, stack: _Stack, members: list[torch.Tensor], group: dict) -> None:
        names = self._names(group)
        whole = _same(members, stack.params)
        index = None if whole else stack.blocks(members).to(stack.tensors["L"].device)
        states = {n: (t if whole else t.index_select(0, index)) for n, t in stack.tensors.items()}
        count, br, bc = states["momentum"].shape
        grads = torch.empty(count, br, bc, dtype=torch.float32, device=states["momentum"].device)
        offset = 0
        for p in members:
            rows, cols = matrix_shape(p.shape)
            n = self.state[p]["L"].shape[0]
            to_blocks(p.grad.float().reshape(rows, cols), br, bc, out=grads[offset:offset + n])
            offset += n
            self.state[p]["step"] += 1
        t = self.state[members[0]]["step"]
        if group["batched"]:
            update = self._precondition(grads, states, group, t)
        else:  # the one-block-at-a-time baseline: the same math on each block's slice
            update = torch.cat([self._precondition(grads[i:i + 1], {n: s[i:i + 1] for n, s in states.items()},
                                                   group, t) for i in range(grads.shape[0])])
        if not whole:
            for name in names:
                stack.tensors[name].index_copy_(0, index, states[name])
        offset = 0
        for p in members:
            n = self.state[p]["L"].shape[0]
            delta = from_blocks(update[offset:offset + n], *matrix_shape(p.shape)).reshape(p.shape)
            offset += n
            lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
            if p.dtype == torch.float32:
                p.mul_(decay).add_(delta, alpha=-lr)
            else:
                p.copy_(p.float().mul_(decay).add_(delta, alpha=-lr))

    @staticmethod
    def _precondition(grads: torch.Tensor, states: dict, group: dict, t: int) -> torch.Tensor:
        """Steps 1-4 for a batch of blocks: update the states in place, return the update ``U``."""
        K.symmetric_ema(grads, states["L"], group["beta_lr"])
        K.symmetric_ema(grads.mT, states["R"], group["beta_lr"])
        momentum, bc_g = states["momentum"], 1 - group["beta_g"] ** t
        if group["grafting"] == "adam":
            direction = torch.empty_like(grads)
            sq_norms = torch.empty(grads.shape[0], dtype=torch.float32, device=grads.device)
            K.graft_moments(grads, momentum, states["graft"], direction, group["beta_g"], group["beta_graft"],
                            bc_g, 1 - group["beta_graft"] ** t, group["graft_eps"], sq_norms)
        else:
            momentum.lerp_(grads, 1 - group["beta_g"])
            direction = momentum / bc_g
        start = group["start_step"]
        if t < start:
            return direction
        if (t - start) % group["precond_freq"] == 0:
            for factor in ("L", "R"):
                states[f"{factor}_root"].copy_(inv_root(
                    states[factor], 4, group["inv_root"], eps=group["eps"], scaling=group["scaling"],
                    steps=group["newton_steps"], degree=group["cheby_degree"]))
        update = states["L_root"] @ momentum @ states["R_root"]
        if group["grafting"] == "adam":
            norms = torch.linalg.vector_norm(update, dim=(1, 2))
            scale = torch.where(norms > 0, sq_norms.sqrt() / norms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
            return update.mul_(scale[:, None, None])
        return update.div_(bc_g)
