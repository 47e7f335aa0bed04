"""Run a recipe under `accelerate launch`; each rank saves what it ended with for the test."""
import sys
from pathlib import Path

import torch
from transformers import Trainer

import hf_ista
from hf_ista.data import load_corpus
from hf_ista.train import build_model, load_recipe

recipe_path, out_dir = sys.argv[1], Path(sys.argv[2])
recipe, args, _ = load_recipe(recipe_path, {"output_dir": str(out_dir)})
data = load_corpus(recipe.corpus, recipe.block_size, recipe.max_bytes, seed=args.seed)
model = build_model(recipe)
initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
trainer = Trainer(model=model, args=args, train_dataset=data["train"])
trainer.train()
torch.save({
    "rank": args.process_index,
    "world_size": args.world_size,
    "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
    "optimizer": type(trainer.optimizer.optimizer).__name__,
    "state_bytes": hf_ista.state_bytes(trainer.optimizer),
    "initial": initial,
    "final": torch.cat([p.detach().flatten() for p in model.parameters()]),
}, out_dir / f"rank{args.process_index}.pt")
