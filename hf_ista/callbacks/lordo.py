"""What LoRDO needs from a ``transformers.Trainer`` run on several processes: DDP without its
per-step gradient all-reduce, every rank's own state in checkpoints, the bytes sent in the logs,
and a last synchronisation so the saved model is the workers' average (unless
``load_best_model_at_end`` put a best checkpoint's weights on every rank).

``import hf_ista`` adds this callback to every Trainer (it does nothing unless the optimizer is
:class:`~hf_ista.optim.lordo.LoRDO`), so ``TrainingArguments(optim="lordo")`` is enough.
"""
from __future__ import annotations

import os
import warnings

import torch
from transformers import TrainerCallback

from ..optim.lordo import LoRDO, disable_gradient_sync

RANK_STATE = "lordo_rank{rank}.pt"  # in each checkpoint folder, one per process


def _lordo(optimizer) -> LoRDO | None:
    # accelerate's AcceleratedOptimizer wraps it, DeepSpeed's optimizer wraps that
    while not isinstance(optimizer, LoRDO) and getattr(optimizer, "optimizer", optimizer) is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, LoRDO) else None


def _sharded() -> bool:
    """Whether accelerate runs FSDP or DeepSpeed (from its config, not only TrainingArguments)."""
    from accelerate.state import AcceleratorState, DistributedType, is_initialized

    return is_initialized() and AcceleratorState().distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _local(optimizer) -> LoRDO | None:
    """The LoRDO optimizer when its workers take local steps (several processes, no DDP all-reduce)."""
    opt = _lordo(optimizer)
    return opt if opt is not None and opt.world_size > 1 and not opt.all_reduce_gradients else None


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class LoRDOCallback(TrainerCallback):
    """See the module docstring. ``metrics`` holds the communication figures of the last log."""

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self._finder = None

    # -- training begins: local gradients, each rank's state back --------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if _lordo(optimizer) is not None and (args.fsdp or args.deepspeed or _sharded()):
            raise ValueError("optim='lordo' runs on DDP (accelerate's MULTI_GPU / multi-CPU); FSDP shards the "
                             "parameters it averages and DeepSpeed replaces the optimizer: unset fsdp / deepspeed")
        opt = _local(optimizer)
        if opt is None:
            return
        if args.fp16:
            # GradScaler skips optimizer.step() on each rank's own inf check: with local gradients the
            # ranks would stop counting steps together and their collectives would no longer pair up.
            raise ValueError("optim='lordo' on several processes does not support fp16 mixed precision (its "
                             "GradScaler skips steps rank by rank); use bf16=True or fp32")
        self._watch_for_ddp(opt)
        if args.save_strategy == "steps" and args.save_steps and args.save_steps >= 1 \
                and int(args.save_steps) % opt.sync_every:
            warnings.warn(f"LoRDO: save_steps={args.save_steps} is not a multiple of sync_every={opt.sync_every}: a "
                          f"checkpoint's model.safetensors then holds rank 0's own parameters (every rank's are "
                          f"in its lordo_rank<r>.pt, which resuming uses)", stacklevel=2)
        every = args.eval_steps
        if args.eval_strategy == "steps" and every and every >= 1 and int(every) % opt.sync_every:
            warnings.warn(f"LoRDO: eval_steps={every} is not a multiple of sync_every={opt.sync_every}: evaluations "
                          f"between synchronisations see each rank's own parameters", stacklevel=2)
        if state.global_step > 0:
            self._load_rank_state(args, state, model, opt)

    def _watch_for_ddp(self, opt: LoRDO) -> None:
        """The Trainer hands callbacks the unwrapped model; its DDP wrapper shows itself at the
        first forward, before any backward: a global forward pre-hook catches it there."""
        first = next(p for g in opt.param_groups for p in g["params"])

        def find(module, args):
            if isinstance(module, torch.nn.parallel.DistributedDataParallel) and \
                    any(p is first for p in module.module.parameters()):
                disable_gradient_sync(module)
                self._stop_watching()

        self._finder = torch.nn.modules.module.register_module_forward_pre_hook(find)

    def _stop_watching(self) -> None:
        if self._finder is not None:
            self._finder.remove()
            self._finder = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._finder is not None:  # one step, and no DDP forward seen
            warnings.warn("LoRDO: no DistributedDataParallel forward was seen in the first step; if the model is "
                          "wrapped some other way its gradients may still be all-reduced every step", stacklevel=2)
        self._stop_watching()

    def _load_rank_state(self, args, state, model, opt: LoRDO) -> None:
        folder = _checkpoint_folder(args, state.global_step)
        path = os.path.join(folder, RANK_STATE.format(rank=_rank())) if folder else None
        if path is None or not os.path.exists(path):
            raise FileNotFoundError(
                f"LoRDO: resuming at step {state.global_step} with {opt.world_size} processes needs each rank's "
                f"state ({RANK_STATE.format(rank=_rank())}) in the checkpoint; none found in "
                f"{folder or args.output_dir}. Resume from a checkpoint saved by a LoRDO run with as many processes "
                f"(a checkpoint outside output_dir: name it in TrainingArguments(resume_from_checkpoint=...)).")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["world_size"] != opt.world_size or saved["global_step"] != state.global_step:
            raise ValueError(f"LoRDO: {path} was saved at step {saved['global_step']} by {saved['world_size']} "
                             f"processes; this run resumes at step {state.global_step} with {opt.world_size}")
        if not _same_run(saved["optimizer"], opt.state_dict()):
            raise ValueError(f"LoRDO: {path} is not from the checkpoint the Trainer resumed from (its anchors or "
                             f"counters differ from that checkpoint's optimizer.pt); name the checkpoint in "
                             f"TrainingArguments(resume_from_checkpoint=...)")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved["params"]:
                    p.copy_(saved["params"][name])
        opt.load_state_dict(saved["optimizer"])

    # -- checkpoints: every rank writes its own state -------------------------------------------

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = _local(optimizer)
        if opt is None:
            return  # one process, or DDP's identical ranks: the Trainer's checkpoint holds everything
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save({
            "world_size": opt.world_size,
            "global_step": state.global_step,
            # between synchronisations each rank's parameters are its own
            "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": opt.state_dict(),
        }, os.path.join(folder, RANK_STATE.format(rank=_rank())))
        # ranks run up to sync_every steps apart: none may rotate this checkpoint away before all wrote
        torch.distributed.barrier()

    # -- logs: what was sent, and what DDP would have sent --------------------------------------

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = _lordo(optimizer)
        if opt is None or logs is None or "loss" not in logs:
            return
        steps = state.global_step
        ddp = opt.ddp_bytes_per_step() * steps if opt.world_size > 1 else 0
        sent = opt.bytes_communicated + (ddp if opt.all_reduce_gradients else 0)
        self.metrics = {"comm_bytes": sent, "comm_bytes_per_step": sent / max(steps, 1),
                        "ddp_comm_bytes": ddp, "ddp_comm_bytes_per_step": ddp / max(steps, 1), "syncs": opt.syncs}
        logs.update(self.metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.metrics)  # the Trainer appended a copy of logs just before

    # -- the end: one last average ---------------------------------------------------------------

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self._stop_watching()
        opt = _local(optimizer)
        if args.load_best_model_at_end and state.best_model_checkpoint:
            return  # every rank now holds the best checkpoint's weights: an outer step would move them
        if opt is not None and opt.local_steps:
            opt.synchronize()


def _same_run(saved: dict, loaded: dict) -> bool:
    """Whether a rank's saved optimizer state belongs with the one the Trainer loaded (rank 0's):
    the anchors are the same on every rank (set at the last synchronisation), and so are the counters."""
    if saved["lordo"]["syncs"] != loaded["lordo"]["syncs"] or \
            saved["lordo"]["local_steps"] != loaded["lordo"]["local_steps"]:
        return False
    return all(torch.equal(s["anchor"].cpu(), loaded["state"][i]["anchor"].cpu())
               for i, s in saved["state"].items() if "anchor" in s and "anchor" in loaded["state"].get(i, {}))


def _checkpoint_folder(args, step: int) -> str | None:
    """The checkpoint the Trainer resumed from: ``args.resume_from_checkpoint`` when it names one
    of this step, else ``output_dir/checkpoint-<step>``."""
    named = args.resume_from_checkpoint
    if isinstance(named, str) and os.path.isdir(named) and named.rstrip("/").endswith(f"checkpoint-{step}"):
        return named
    folder = os.path.join(args.output_dir, f"checkpoint-{step}")
    return folder if os.path.isdir(folder) else None
