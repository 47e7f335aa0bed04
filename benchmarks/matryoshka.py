"""AURAC of MatryoshkaLoRA's three modes — ``matryoshka`` (fixed diagonal P), ``lora`` (plain LoRA)
and ``dylora`` (one sampled rank per step) — after the same training budget on the recipe task
(``recipes/matryoshka_lora/quickstart.yaml``: a rank-16 adapter on every linear layer of a tiny
Llama, fine-tuned on the ``email`` package), each adapter trained once and evaluated at every rank
of ``--ranks`` by the AURAC callback.

The base is pretrained here first, as ``recipes/quickstart.yaml`` would (AdamW, the top-level
stdlib modules, ``--pretrain-steps``), so the adapters fine-tune a model that already knows Python.
Every mode starts from that base with the same seed, data order, steps and learning rate.

Each trained adapter is then served at every rank by both rules of ``set_rank`` (``truncate``, the
default: the trained forward cut to rank r'; ``rescale``: the rank-r' member alone on its own scale
m(r'), ALGORITHMS.md's rule), on the whole eval split.

Prints a table (eval loss per served rank, AURAC on the log2 and linear rank axes, seconds) and
writes JSON (default ``benchmarks/results/matryoshka-cpu.json``).

    PYTHONPATH=. python benchmarks/matryoshka.py
    PYTHONPATH=. python benchmarks/matryoshka.py --finetune-steps 300 --lr 3e-3
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

import hf_ista
from hf_ista import train
from hf_ista.callbacks import aurac

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "matryoshka_lora" / "quickstart.yaml"
BASE_RECIPE = ROOT / "recipes" / "quickstart.yaml"
DEFAULT_OUT = Path(__file__).parent / "results" / "matryoshka-cpu.json"
QUIET = {"disable_tqdm": True, "report_to": "none", "save_strategy": "no", "dataloader_num_workers": 0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--modes", default="matryoshka,lora,dylora")
    p.add_argument("--ranks", default="1,2,4,8,16", help="ranks served at evaluation (the last is r)")
    p.add_argument("--rank-scaling", default="sqrt", choices=("none", "rank", "sqrt"))
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--pretrain-batch-size", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2, help="adapter learning rate (every mode)")
    p.add_argument("--evals", type=int, default=3, help="evaluations during fine-tuning")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-dir", type=Path, default=None,
                   help="reuse (or keep) the pretrained base here instead of a temporary directory")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def pretrain(args, out_dir: Path) -> dict:
    recipe, targs, _ = train.load_recipe(BASE_RECIPE, {
        **QUIET, "output_dir": str(out_dir), "optim": "adamw_torch", "optim_args": None,
        "learning_rate": args.pretrain_lr, "max_steps": args.pretrain_steps,
        "per_device_train_batch_size": args.pretrain_batch_size, "eval_strategy": "no", "logging_steps": 50,
        "seed": args.seed})
    return train.run(recipe, targs)


def eval_split(recipe, targs):
    return hf_ista.data.load_corpus(recipe.corpus, recipe.block_size, recipe.max_bytes, recipe.eval_fraction,
                                    seed=targs.seed)["eval"]


@torch.no_grad()
def mean_loss(model, eval_set, batch_size: int) -> float:
    """Per-batch mean loss weighted by batch size, as the Trainer and the AURAC callback average."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(eval_set), batch_size):
        batch = eval_set[start:start + batch_size]
        ids = torch.tensor(batch["input_ids"])
        total += float(model(input_ids=ids, labels=torch.tensor(batch["labels"])).loss) * len(ids)
        count += len(ids)
    return total / count


def served_losses(base_dir: Path, adapter_dir: Path, eval_set, ranks: list[int], batch_size: int) -> dict:
    """``{rule: [loss at each rank]}`` of the saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    out = {}
    for rule in ("truncate", "rescale"):
        out[rule] = []
        for r in ranks:
            model.set_rank(r, rule=rule)
            out[rule].append(mean_loss(model, eval_set, batch_size))
    return out


def finetune(args, mode: str, base_dir: Path, out_dir: Path, ranks: list[int]):
    overrides = {**QUIET, "output_dir": str(out_dir), "init_from": str(base_dir), "max_steps": args.finetune_steps,
                 "per_device_train_batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed,
                 "eval_steps": max(1, args.finetune_steps // args.evals), "logging_steps": 10}
    recipe, targs, block = train.load_recipe(RECIPE, overrides)
    block = {**block, "adapter": {**block["adapter"], "mode": mode, "r": ranks[-1], "rank_scaling": args.rank_scaling},
             "callbacks": [{"aurac": {"ranks": ranks, "axis": "log2"}}]}
    return recipe, targs, train.run(recipe, targs, block)


def format_table(rows: list[dict], ranks: list[int], base: float) -> str:
    header = ["mode", "serve rule", *[f"r={r}" for r in ranks], "AURAC log2", "AURAC lin", "train s"]
    lines = [header, ["base (no adapter)", "", *[f"{base:.4f}"] * len(ranks), f"{base:.4f}", f"{base:.4f}", ""]]
    for row in rows:
        for rule, served in row["served"].items():
            lines.append([row["mode"], rule, *[f"{served['rank_loss'][str(r)]:.4f}" for r in ranks],
                          f"{served['aurac_log2']:.4f}", f"{served['aurac_linear']:.4f}",
                          f"{row['train_seconds']:.0f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("hf_ista").setLevel(logging.ERROR)
    ranks = [int(r) for r in args.ranks.split(",")]
    modes = args.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_dir = args.base_dir or tmp / "base"
        start = time.perf_counter()
        if (base_dir / "config.json").is_file():
            print(f"reusing the pretrained base in {base_dir}", flush=True)
        else:
            pre = pretrain(args, base_dir)
            print(f"pretrained base: {pre['steps']} steps, {time.perf_counter() - start:.0f} s", flush=True)
        pretrain_s = time.perf_counter() - start
        base = eval_set = None
        for mode in modes:
            recipe, targs, result = finetune(args, mode, base_dir, tmp / mode, ranks)
            if base is None:
                from transformers import AutoModelForCausalLM

                eval_set = eval_split(recipe, targs)
                base = mean_loss(AutoModelForCausalLM.from_pretrained(base_dir), eval_set,
                                 targs.per_device_eval_batch_size)
            served = served_losses(base_dir, tmp / mode, eval_set, ranks, targs.per_device_eval_batch_size)
            callback_losses = [result["rank_metrics"][r]["loss"] for r in ranks]  # truncate, during training
            rows.append({
                "mode": mode,
                "served": {rule: {"rank_loss": {str(r): v for r, v in zip(ranks, losses)},
                                  "aurac_log2": aurac(ranks, losses, "log2"),
                                  "aurac_linear": aurac(ranks, losses, "linear")}
                           for rule, losses in served.items()},
                "callback_rank_loss": {str(r): v for r, v in zip(ranks, callback_losses)},
                "callback_aurac_log2": result["aurac"],
                "eval_loss_training_forward": result["eval_loss"], "train_seconds": result["train_seconds"],
                "steps": result["steps"], "trainable_params": result["params"],
                "aurac_per_eval": [{"step": h["step"], "eval_aurac": h["eval_aurac"]}
                                   for h in result["log_history"] if "eval_aurac" in h],
            })
            print(f"{mode}: AURAC(log2) truncate {rows[-1]['served']['truncate']['aurac_log2']:.4f}, rescale "
                  f"{rows[-1]['served']['rescale']['aurac_log2']:.4f} (callback {result['aurac']:.4f})", flush=True)
    table = format_table(rows, ranks, base)
    print("\n" + table + "\n", flush=True)
    report = {
        "benchmark": "matryoshka", "recipe": str(RECIPE.relative_to(ROOT)), "ranks": ranks,
        "rank_scaling": args.rank_scaling, "pretrain_steps": args.pretrain_steps, "pretrain_seconds": pretrain_s,
        "finetune_steps": args.finetune_steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "base_eval_loss": base, "rows": rows, "table": table, "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
