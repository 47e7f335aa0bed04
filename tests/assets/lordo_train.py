"""Train a LoRDO recipe under `accelerate launch`, record what each rank saw, then resume.

Usage: ``lordo_train.py RECIPE OUT_DIR``. Run 1 trains ``max_steps`` steps into ``OUT_DIR/run``
(checkpoints every ``save_steps``); run 2 resumes from the first checkpoint into the same folder;
run 3 is low-rank DDP (``all_reduce_gradients=true``: DDP's gradient all-reduce kept); run 4 trains
bf16 parameters (pseudo-gradients all-reduced in bf16).
Each rank writes ``OUT_DIR/rank<r>.pt``: after every step its flat parameters, the bases and its
own losses, the optimizer's byte counter and the bytes this test saw passed to the collectives.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

import hf_ista
from hf_ista.data import load_corpus
from hf_ista.train import build_model, load_recipe

recipe_path, out_dir = sys.argv[1:]
out_dir = Path(out_dir)
seen = {"bytes": 0, "calls": 0}


def counted(collective):
    """``collective`` that also adds the bytes of its tensor to ``seen`` when LoRDO calls it."""
    def call(tensor, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") == "hf_ista.optim.lordo":
            seen["bytes"] += tensor.numel() * tensor.element_size()
            seen["calls"] += 1
        return collective(tensor, *args, **kwargs)
    return call


dist.all_reduce, dist.broadcast = counted(dist.all_reduce), counted(dist.broadcast)


class Record(TrainerCallback):
    def __init__(self):
        self.steps, self.losses = [], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = optimizer.optimizer
        self.steps.append({
            "step": state.global_step,
            "local_steps": opt.local_steps,
            "params": torch.cat([p.detach().flatten().clone() for p in model.parameters()]),
            "bases": [opt.state[p]["basis"].clone() for g in opt.param_groups for p in g["params"]
                      if "basis" in opt.state[p]],
            "bytes_communicated": opt.bytes_communicated,
            "bytes_seen": seen["bytes"],
        })


def train(resume=None, overrides=None, dtype=None):
    seen.update(bytes=0, calls=0)  # each run counts its own collectives
    recipe, args, _ = load_recipe(recipe_path, {"output_dir": str(out_dir / "run"), **(overrides or {})})
    data = load_corpus(recipe.corpus, recipe.block_size, recipe.max_bytes, seed=args.seed)
    model = build_model(recipe)
    if dtype is not None:
        model.to(dtype)
    record = Record()
    # each rank's own training losses, one per micro-batch (the Trainer logs their mean over ranks)
    model.register_forward_hook(lambda m, a, out: record.losses.append(out.loss.item()) if m.training else None)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], callbacks=[record])
    trainer.train(resume_from_checkpoint=resume)
    opt = trainer.optimizer.optimizer
    ddp = trainer.model_wrapped
    return {
        "steps": record.steps, "losses": record.losses, "log_history": trainer.state.log_history,
        "ddp": type(ddp).__name__, "local_gradients": getattr(ddp, "_hf_ista_local_gradients", False),
        "ddp_bytes_per_step": opt.ddp_bytes_per_step(), "sync_every": opt.sync_every,
        "low_rank_shapes": [(min(p.shape), g["rank"]) for g in opt.param_groups for p in g["params"]
                            if opt.is_low_rank(p, g)],
        "final": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "save_steps": args.save_steps, "max_steps": args.max_steps,
    }


first = train()
resumed = train(resume=str(out_dir / "run" / f"checkpoint-{first['save_steps']}"))
recipe, args, _ = load_recipe(recipe_path)
ddp = train(overrides={"output_dir": str(out_dir / "ddp"), "save_strategy": "no",
                       "optim_args": args.optim_args + ",all_reduce_gradients=true"})
bf16 = train(overrides={"output_dir": str(out_dir / "bf16"), "save_strategy": "no"}, dtype=torch.bfloat16)
torch.save({"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
            "first": first, "resumed": resumed, "ddp": ddp, "bf16": bf16}, out_dir / f"rank{dist.get_rank()}.pt")
