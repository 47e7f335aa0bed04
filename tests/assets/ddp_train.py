"""Run recipes under `accelerate launch`; each rank saves what it ended with for the test.

Usage: ``ddp_train.py RECIPE [RECIPE ...] OUT_DIR``. The recipes train one after the other in the
same processes (one launch, one process group); recipe ``name.yaml`` trains into ``OUT_DIR/name``
and each rank writes ``OUT_DIR/name.rank<r>.pt``.
"""
import sys
from pathlib import Path

import torch
from transformers import Trainer

import hf_ista
from hf_ista.data import load_corpus
from hf_ista.train import build_model, load_recipe

*recipe_paths, out_dir = sys.argv[1:]
out_dir = Path(out_dir)
for recipe_path in recipe_paths:
    name = Path(recipe_path).stem
    recipe, args, _ = load_recipe(recipe_path, {"output_dir": str(out_dir / name)})
    data = load_corpus(recipe.corpus, recipe.block_size, recipe.max_bytes, seed=args.seed)
    model = build_model(recipe)
    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer = Trainer(model=model, args=args, train_dataset=data["train"])
    trainer.train()
    inner = trainer.optimizer.optimizer
    torch.save({
        "rank": args.process_index,
        "world_size": args.world_size,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "optimizer": type(inner).__name__,
        "state_bytes": hf_ista.state_bytes(trainer.optimizer),
        "ranks": [g.get("rank") for g in inner.param_groups],
        "state": inner.state_dict()["state"],
        "initial": initial,
        "final": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }, out_dir / f"{name}.rank{args.process_index}.pt")
