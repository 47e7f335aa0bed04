"""LoRDO (arXiv 2602.04396): low-rank Adam on each worker, no per-step communication; every
``sync_every`` steps the workers average their pseudo-gradients, take the outer step and share a
new projection.

For a low-rank parameter in its oriented view (``[n, N]``, ``n <= N``, see ``_lowrank``), with the
shared basis ``Q`` (``n x r``), error ``E``, low-rank moments ``u, v`` (``r x N``), on each worker:

1. ``G = clip(g, clip)``: the gradient scaled to Frobenius norm at most ``clip`` (0: not clipped)
2. ``ĝ = Q^T (G + E)``; ``E = G + E - Q ĝ``  (error feedback: what the subspace did not take)
3. Adam moments on ``ĝ``; ``D = Q (û / (sqrt(v̂) + eps))``, the low-rank Adam direction
4. ``F = (|D| / |G|) G / mu``: the clipped gradient at the Frobenius norm of ``D``
5. ``θ <- θ (1 - lr wd) - lr ((1 - omega) F + omega D)``

The normalisation of step 4 is ours (the paper's is not public in full): the full-rank term takes
the size of the low-rank Adam direction, so ``omega`` only mixes two directions of one size, the
update keeps Adam's scale whatever the gradients' scale, and when ``D`` shrinks (noisy gradients:
the momentum cancels) the momentum-free ``F`` shrinks with it. Dividing ``G`` column by column by
the root of the mean second moment of its projected coordinates, tried first, trained worse here
(eval loss 2.33 against 2.00 on the quickstart task, one process, ``omega=0.5``): it keeps ``F`` at
full size when ``D`` is small. ``mu`` rescales ``F`` on top. ``omega=1`` is pure low-rank Adam
(``F`` is not computed). Every other parameter takes plain AdamW steps.

Error feedback is off by default. With ``Q`` fixed between synchronisations ``Q^T E = 0``, so ``E``
acts only when ``Q`` changes, and then it injects everything the subspaces missed since the start
in one step; those coordinates' second moments jump and freeze them for the next ~1/(1-beta2)
steps. Measured on the quickstart task (2 workers, ``omega=0.8``): eval loss 1.663 without, 1.700
with it at ``sync_every=16``; one process at ``sync_every=8``: 1.816 without, 2.222 with.

Every ``sync_every`` steps (:meth:`LoRDO.synchronize`) every parameter's pseudo-gradient
``Δ = θ - θ_anchor`` is averaged across the workers (all-reduce, in the parameter's dtype: the
bytes DDP would send for one step), the outer step ``θ = θ_anchor + outer_lr Δ̄`` (Nesterov momentum
``outer_momentum`` if set) puts every worker on the same parameters, and ``Q`` becomes the top-r
left singular subspace of ``Δ̄`` (computed by rank 0 and broadcast, so all workers share it
exactly); the moments are carried into the new basis as LDAdam does. The first ``Q`` is the top-r
subspace of rank 0's first gradient (of the weight itself where that gradient is not finite),
broadcast. With one process nothing is sent and the same algorithm runs.

Moments, error and anchor are each worker's own: checkpoints keep them per rank
(:class:`hf_ista.callbacks.LoRDOCallback`). With several processes the model must not be
all-reducing gradients: the callback gives DDP a hook that sends nothing
(:func:`disable_gradient_sync`).
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from ._base import check_arg
from ._lowrank import (ADAMW_KEYS, ERROR_FEEDBACK, ERROR_KEYS, LowRankAdam, adamw_update, add_error, error_shapes,
                       init_error, oriented, store_error, transport_moments)

BUCKET_BYTES = 25 * 2 ** 20  # pseudo-gradients travel in buckets of this size (DDP's default)


def _key_sets() -> tuple[frozenset, ...]:
    """Every key set a LoRDO parameter state may have: an anchor, then AdamW or low-rank moments
    once it had a finite gradient, a basis for low-rank ones, an outer momentum after a sync."""
    sets = []
    for low_rank, moments, outer in itertools.product((False, True), (False, True), (False, True)):
        for error in (ERROR_KEYS.values() if low_rank else [frozenset()]):
            keys = {"anchor"} | (ADAMW_KEYS if moments else set()) | ({"outer_buf"} if outer else set())
            if low_rank:
                keys |= {"basis"} | error
            sets.append(frozenset(keys))
    return tuple(dict.fromkeys(sets))


def _buckets(tensors: list[torch.Tensor]):
    """Runs of consecutive tensors of one dtype, each closed once it holds ``BUCKET_BYTES``."""
    bucket, size = [], 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or size >= BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def _flat_collective(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective`` (in place) on ``tensors`` packed into one flat buffer, then unpack."""
    flat = torch.cat([t.flatten() for t in tensors])
    collective(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def top_subspace(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` left singular vectors of ``x`` (``n x N``, ``n <= N``) as ``n x rank``
    orthonormal columns, from the eigenvectors of the ``n x n`` Gram matrix."""
    _, vectors = torch.linalg.eigh(x @ x.T)
    return vectors[:, -rank:].flip(1).contiguous()


def ddp_bytes_per_step(optimizer: torch.optim.Optimizer) -> int:
    """What DDP's gradient all-reduce passes to its collectives for one step of ``optimizer``'s
    parameters (every trainable one's gradient, in its dtype)."""
    return sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"] if p.requires_grad)


def disable_gradient_sync(ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Make a DDP model keep every worker's own gradient: its buckets go through torch's
    ``noop_hook`` (no all-reduce, no division by the world size). Idempotent."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    if not getattr(ddp_model, "_hf_ista_local_gradients", False):
        ddp_model.register_comm_hook(None, noop_hook)
        ddp_model._hf_ista_local_gradients = True


class LoRDO(LowRankAdam):
    """Low-rank Adam with infrequent communication.

    Args:
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        rank: ``None`` keeps a group on plain AdamW; an integer makes the group's matrices low-rank.
        sync_every: local steps between two synchronisations (K).
        omega: weight of the low-rank Adam direction, in ``[0, 1]``; ``1 - omega`` goes to the
            normalised full-rank gradient. ``1`` is pure low-rank Adam.
        clip: the Frobenius norm each low-rank gradient is clipped to (``0``: no clipping).
        mu: the full-rank term is divided by ``mu`` (> 0).
        error_feedback: ``"none"`` (default), ``"fp32"`` (the published method), ``"8bit"`` or
            ``"4bit"``: how ``E`` is kept. See the module docstring for why it is off by default.
        outer_lr: the outer step's learning rate (``1``: the workers' average).
        outer_momentum: Nesterov momentum of the outer step, in ``[0, 1)`` (``0``: none, no buffer).
        all_reduce_gradients: ``True`` keeps DDP's per-step gradient all-reduce: *low-rank DDP*, the
            baseline LoRDO is measured against. Every worker takes the same step, so the periodic
            average is skipped; the basis is still refreshed from Δ every ``sync_every`` steps.
        process_group: the ``torch.distributed`` group to average over (default: the whole world).
    """

    state_keys = _key_sets()

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int | None = None, sync_every: int = 16, omega: float = 0.5, clip: float = 1.0,
                 mu: float = 1.0, error_feedback: str = "none", outer_lr: float = 1.0, outer_momentum: float = 0.0,
                 all_reduce_gradients: bool = False, process_group=None):
        check_arg("sync_every", sync_every, isinstance(sync_every, int) and sync_every >= 1, "an integer >= 1")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, omega=omega,
                        clip=clip, mu=mu, error_feedback=error_feedback, outer_lr=outer_lr,
                        outer_momentum=outer_momentum)
        super().__init__(params, defaults)
        self.sync_every = sync_every
        self.all_reduce_gradients = bool(all_reduce_gradients)
        self.process_group = process_group
        self.local_steps = 0  # steps since the last synchronisation
        self.syncs = 0
        self.bytes_communicated = 0  # bytes this process passed to collectives

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_arg("omega", group["omega"], isinstance(group["omega"], (int, float)) and 0 <= group["omega"] <= 1,
                  "a number in [0, 1]")
        check_arg("clip", group["clip"], isinstance(group["clip"], (int, float)) and group["clip"] >= 0,
                  "a number >= 0 (0: no clipping)")
        check_arg("mu", group["mu"], isinstance(group["mu"], (int, float)) and group["mu"] > 0, "a number > 0")
        check_arg("error_feedback", group["error_feedback"], group["error_feedback"] in ERROR_FEEDBACK,
                  f"one of {ERROR_FEEDBACK}")
        check_arg("outer_lr", group["outer_lr"], isinstance(group["outer_lr"], (int, float)) and group["outer_lr"] > 0,
                  "a number > 0")
        momentum = group["outer_momentum"]
        check_arg("outer_momentum", momentum, isinstance(momentum, (int, float)) and 0 <= momentum < 1,
                  "a number in [0, 1)")

    # -- communication -------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_available() and dist.is_initialized() else 1

    def _source(self) -> int:
        """The global rank that computes what is broadcast: rank 0 of the group."""
        return 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)

    def _is_source(self) -> bool:
        return self.world_size == 1 or dist.get_rank() == self._source()

    def _all_reduce(self, t: torch.Tensor) -> None:
        self.bytes_communicated += t.numel() * t.element_size()
        dist.all_reduce(t, group=self.process_group)

    def _broadcast(self, t: torch.Tensor) -> None:
        self.bytes_communicated += t.numel() * t.element_size()
        dist.broadcast(t, src=self._source(), group=self.process_group)

    def ddp_bytes_per_step(self) -> int:
        return ddp_bytes_per_step(self)

    def _share_bases(self, params: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """Set each low-rank ``params[i]``'s basis to the top-r subspace of ``sources[i]`` as rank 0
        computes it, on every process (one broadcast for all; only rank 0 reads ``sources``)."""
        bases = [self.state[p]["basis"] for p in params]
        if self._is_source():
            for basis, x in zip(bases, sources):
                basis.copy_(top_subspace(x, basis.shape[1]))
        if self.world_size > 1 and bases:
            _flat_collective(bases, self._broadcast)

    # -- the local step ------------------------------------------------------------------------

    def _all_params(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    def _start(self) -> None:
        """At the first step, on every process: each parameter's anchor, and the first bases."""
        new = [(p, g) for p, g in self._all_params() if "anchor" not in self.state[p]]
        low_rank, sources = [], []
        for p, group in new:
            self.state[p]["anchor"] = p.detach().clone()
            if self.is_low_rank(p, group):
                n, _ = oriented(p).shape
                self.state[p]["basis"] = torch.zeros(n, group["rank"], dtype=torch.float32, device=p.device)
                low_rank.append(p)
                if self._is_source():  # rank 0's first gradient where it is finite, else the weight itself
                    finite = p.grad is not None and bool(torch.isfinite(p.grad).all())
                    sources.append(oriented(p.grad if finite else p.detach()).float())
        self._share_bases(low_rank, sources)

    def _update_all(self, work: list[tuple[torch.Tensor, dict]]) -> None:
        self._start()
        for p, group in work:
            self._update(p, group)
        self.local_steps += 1
        if self.local_steps >= self.sync_every:
            self.synchronize()

    def _adamw_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        moments = {k: state[k] for k in ADAMW_KEYS if k in state}
        adamw_update(p, moments, group["lr"], group["weight_decay"], group["betas"], group["eps"])
        state.update(moments)

    def _low_rank_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        basis = state["basis"]
        r, N = basis.shape[1], max(p.shape)
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(r, N, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(r, N, dtype=torch.float32, device=p.device)
            init_error(state, group["error_feedback"], tuple(p.shape), p.device)
        state["step"] += 1

        grad = oriented(p.grad).float()
        if group["clip"] > 0:  # (on the device: no host sync) a new tensor either way, p.grad stays
            grad = grad * (group["clip"] / torch.linalg.vector_norm(grad)).clamp_(max=1.0)
        else:
            grad = grad.clone()
        a = add_error(state, grad)
        projected = basis.T @ a
        if group["error_feedback"] != "none":
            store_error(state, torch.addmm(a, basis, projected, alpha=-1))
        direction = self._adam_direction(state, projected, group)
        omega = group["omega"]
        if omega == 1:
            self._apply_low_rank(p, group, basis, direction)
            return
        # F = (|d| / |G|) G / mu (|Q d| = |d|: Q is orthonormal), then (1 - omega) F + omega Q d in G's buffer
        scale = torch.linalg.vector_norm(direction) / torch.linalg.vector_norm(grad).clamp_(min=1e-30)
        update = grad.mul_(scale.mul_((1 - omega) / group["mu"])).addmm_(basis, direction, alpha=omega)
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        view = oriented(p)
        if p.dtype == torch.float32:
            view.mul_(decay).add_(update, alpha=-lr)
        else:
            view.copy_(view.float().mul_(decay).add_(update, alpha=-lr))

    def _low_rank_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        return {"basis": (min(p.shape), group["rank"]), "error": tuple(p.shape), **error_shapes(keys, p.numel())}

    def _state_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        shapes = {"anchor": tuple(p.shape), "outer_buf": tuple(p.shape)}
        if self.is_low_rank(p, group):
            r, N = group["rank"], max(p.shape)
            return {**shapes, "exp_avg": (r, N), "exp_avg_sq": (r, N), **self._low_rank_shapes(p, group, keys)}
        return {**shapes, "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    # -- the synchronisation -------------------------------------------------------------------

    @torch.no_grad()
    def synchronize(self) -> None:
        """Average the pseudo-gradients of every parameter across the workers, take the outer step
        and share the new bases. Every process must call it at the same step (``step()`` does, every
        ``sync_every`` steps); a call before the first step does nothing."""
        params = [(p, g) for p, g in self._all_params() if "anchor" in self.state[p]]
        if not params:
            return
        deltas = [(p.float() - self.state[p]["anchor"].float()).to(p.dtype) for p, _ in params]
        world = self.world_size
        averaged = world > 1 and not self.all_reduce_gradients  # under DDP every Δ already is the mean
        if averaged:
            self._average(deltas)
        low_rank, sources = [], []
        for (p, group), delta in zip(params, deltas):
            state = self.state[p]
            mean = delta.float().div_(world) if averaged else delta.float()
            step = mean
            if group["outer_momentum"] > 0:
                buf = state.setdefault("outer_buf", torch.zeros(p.shape, dtype=torch.float32, device=p.device))
                buf.mul_(group["outer_momentum"]).add_(mean)
                step = mean.add(buf, alpha=group["outer_momentum"])  # Nesterov
            unchanged = not averaged and group["outer_lr"] == 1 and group["outer_momentum"] == 0
            if not unchanged:  # θ already is θ_anchor + Δ (exactly, which the sum would round)
                p.copy_(torch.add(state["anchor"].float(), step, alpha=group["outer_lr"]))
            state["anchor"].copy_(p)
            if "basis" in state:
                low_rank.append((p, group))
                sources.append(oriented(mean))
        old = [self.state[p]["basis"].clone() for p, _ in low_rank]
        self._share_bases([p for p, _ in low_rank], sources)
        for (p, group), previous in zip(low_rank, old):
            state = self.state[p]
            if state.get("step", 0) > 0:
                change = state["basis"].T @ previous
                transport_moments(state["exp_avg"], state["exp_avg_sq"], change, change @ state["exp_avg"],
                                  state["step"], group["betas"])
        self.local_steps = 0
        self.syncs += 1

    def _average(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` across the workers in place, one all-reduce per bucket."""
        for bucket in _buckets(tensors):
            _flat_collective(bucket, self._all_reduce)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["lordo"] = {"local_steps": self.local_steps, "syncs": self.syncs,
                        "bytes_communicated": self.bytes_communicated, "sync_every": self.sync_every}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        if "lordo" not in state_dict:
            raise ValueError("this checkpoint was not written by LoRDO: it has no 'lordo' entry (local steps, "
                             "syncs and bytes communicated)")
        state_dict = dict(state_dict)
        counters = state_dict.pop("lordo")
        if counters["local_steps"] >= self.sync_every:  # refused before anything is loaded
            raise ValueError(f"this checkpoint was saved {counters['local_steps']} steps after a synchronisation, "
                             f"which sync_every={self.sync_every} does not allow (it was {counters['sync_every']})")
        super().load_state_dict(state_dict)
        self.local_steps = counters["local_steps"]
        self.syncs = counters["syncs"]
        self.bytes_communicated = counters["bytes_communicated"]
