"""Compressed-format scaling law on a tiny grid: model widths × token budgets × formats, each run
trained from scratch through the plain ``Trainer`` (``apply_format`` + ``ScalingLawCallback``), then
``fit_law`` on the store; the fitted constants are printed next to the paper's.

Byte-level Llamas (2 layers, widths ``--widths``, intermediate 2×width) on the embedded corpus,
AdamW, constant lr after a short warm-up, ``--steps`` budgets (D = steps × batch × block tokens).
A grid this small (N ~ 10⁴–10⁵, a few hundred steps) is far from the paper's regime: the fit checks
the pipeline end to end, its constants are not expected to match the paper's.

    PYTHONPATH=. python benchmarks/scaling.py              # CPU, 1 thread: see the README for the time
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import optimizers as common  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_ista.callbacks import ScalingLawCallback  # noqa: E402
from hf_ista.callbacks.scaling_law import load_runs  # noqa: E402
from hf_ista.data import load_corpus, tiny_llama  # noqa: E402
from hf_ista.scaling import apply_format, capacity, fit_law, parse_format, plot_fit  # noqa: E402
from hf_ista.scaling.law import PAPER  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--steps", default="200,600", help="token budgets as training steps")
    p.add_argument("--formats", default="dense,int4,int2,sparse0.5")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-blocks", type=int, default=128)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--fix", default="sparse.C=1.39", help="comma-separated pins for the fit ('' for none): "
                   "one sparse member cannot fix both F and C")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device-name", default="auto")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = common.device_label(args.device_name)
    widths = [int(w) for w in args.widths.split(",")]
    budgets = [int(s) for s in args.steps.split(",")]
    formats = [parse_format(f) for f in args.formats.split(",")]
    data = load_corpus("stdlib", block_size=args.block_size, max_bytes=1_000_000, eval_fraction=0.05, seed=0)
    eval_set = data["eval"].select(range(min(args.eval_blocks, len(data["eval"]))))
    results = Path(__file__).parent / "results"
    out = Path(args.out or results / f"scaling-{common.slug(device)}.json")
    store = out.with_suffix(".jsonl")
    store.unlink(missing_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            for steps in budgets:
                for fmt in formats:
                    model = tiny_llama("nano", seed=args.seed, hidden_size=width, intermediate_size=2 * width,
                                       max_position_embeddings=args.block_size)
                    apply_format(model, fmt)
                    targs = TrainingArguments(
                        str(Path(tmp) / "run"), max_steps=steps, learning_rate=args.lr, warmup_steps=10,
                        lr_scheduler_type="constant_with_warmup", per_device_train_batch_size=args.batch_size,
                        per_device_eval_batch_size=64, eval_strategy="steps", eval_steps=steps, report_to="none",
                        use_cpu=True, disable_tqdm=True, save_strategy="no", seed=args.seed, logging_steps=steps)
                    t0 = time.time()
                    Trainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=eval_set,
                            callbacks=[ScalingLawCallback(str(store), run=f"w{width}-s{steps}-{fmt.label}")]).train()
                    rec = load_runs(store)[-1]
                    print(f"width {width:>3}  steps {steps:>4}  {fmt.label:<10} N {rec['N']:>7}  D {rec['D']:>7}  "
                          f"loss {rec['loss']:.4f}  ({time.time() - t0:.1f} s)", flush=True)
    train_time = time.time() - start
    records = load_runs(store)
    fixed = {k: float(v) for k, v in (item.split("=") for item in args.fix.split(",") if item)}
    result = fit_law(records, fixed=fixed, n_bootstrap=args.bootstrap, seed=args.seed)

    grid_head = ["width", "N", "steps", "D"] + [f.label for f in formats]
    lines = []
    for width in widths:
        for steps in budgets:
            row = [r for r in records if r["run"].startswith(f"w{width}-s{steps}-")]
            lines.append([str(width), str(row[0]["N"]), str(steps), str(row[0]["D"])]
                         + [f"{next(r['loss'] for r in row if r['format_label'] == f.label):.4f}" for f in formats])
    print("\neval loss per run")
    print(common.format_table(grid_head, lines))
    print()
    print(result.table())
    print()
    cap = [[f.label, f"{f.gmse():.4g}", f"{capacity(f, result.law):.4f}", f"{capacity(f):.4f}"] for f in formats]
    print(common.format_table(["format", "GMSE", "rho (fit)", "rho (paper consts)"], cap))
    plot = out.with_suffix(".png")
    plot_fit(result, records, plot)
    total = time.time() - start
    print(f"\n{len(records)} runs trained in {train_time:.0f} s, total {total:.0f} s ({device}, "
          f"{args.threads} thread); plot {plot}; store {store}")
    out.write_text(json.dumps({"environment": common.environment(device), "args": vars(args), "records": records,
                               "fit": result.to_dict(), "paper": PAPER, "train_seconds": train_time,
                               "total_seconds": total, "plot": str(plot)}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
