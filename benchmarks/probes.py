"""Solution probes of the same tiny Llama trained by different optimizers.

Each optimizer trains the quickstart model (``tiny_llama("tiny")`` on the embedded stdlib corpus)
for the same steps, batch, seed and cosine schedule through the plain ``Trainer`` with
``TrainingArguments(optim=NAME)``; ``SolutionProbesCallback(when="train_end")`` then measures the
activations (kurtosis, max|x|/RMS, outlier features), weight spectra, compressibility (INT8 / INT4
RTN, 50 % magnitude pruning) and sharpness (top Hessian eigenvalue) on the eval blocks. Prints the
``hf-ista compare`` table, writes JSON (and the comparison plot) to ``benchmarks/results/``.

    PYTHONPATH=. python benchmarks/probes.py --steps 150
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import hf_ista  # noqa: E402,F401  (registers the optim names)
from hf_ista.callbacks import SolutionProbesCallback  # noqa: E402
from hf_ista.data import MODEL_SIZES, load_corpus, tiny_llama  # noqa: E402
from hf_ista.integrations.transformers import OPTIMIZERS as OURS  # noqa: E402
from hf_ista.probes.compare import comparison_table, plot_comparison  # noqa: E402

# name -> (learning rate, optim_args)
OPTIMIZERS = {
    "adamw_torch": (1e-3, None),
    "microadam": (1e-2, "m=10,density=0.01"),
    "dash": (3e-3, None),
    "ldadam": (1e-2, "rank=16,rho=0.908"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--optims", default=",".join(OPTIMIZERS), help=f"comma list of {list(OPTIMIZERS)}")
    p.add_argument("--eval-blocks", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--num-batches", type=int, default=8, help="eval batches fed to the probes")
    p.add_argument("--power-iterations", type=int, default=20, help="Hessian-vector products (sharpness)")
    p.add_argument("--sharpness-batches", type=int, default=1, help="eval batches of the sharpness loss")
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/probes-cpu.json")
    args = p.parse_args(argv)
    args.optim_list = [n.strip() for n in args.optims.split(",") if n.strip()]
    unknown = [n for n in args.optim_list if n not in OPTIMIZERS]
    if unknown:
        p.error(f"--optims: unknown {unknown}; known: {list(OPTIMIZERS)}")
    return args


def train_and_probe(name: str, args, data, workdir: Path) -> dict:
    lr, optim_args = OPTIMIZERS[name]
    low_rank = name in OURS and OURS[name].low_rank
    training = TrainingArguments(
        output_dir=str(workdir / name), optim=name, optim_args=optim_args,
        optim_target_modules="all-linear" if low_rank else None, learning_rate=lr, weight_decay=0.0,
        max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, lr_scheduler_type="cosine",
        warmup_steps=round(0.1 * args.steps), seed=args.seed, data_seed=args.seed, use_cpu=True,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    probes = SolutionProbesCallback(num_batches=args.num_batches, power_iterations=args.power_iterations,
                                    sharpness_batches=args.sharpness_batches, when="train_end",
                                    eval_dataset=data["eval"])
    model = tiny_llama(args.size, seed=args.seed, max_position_embeddings=args.block_size)
    trainer = Trainer(model=model, args=training, train_dataset=data["train"], eval_dataset=data["eval"],
                      callbacks=[probes])
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()  # the probes run in on_train_end
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"]
    return {"optim": name, "lr": lr, "optim_args": optim_args, "train_and_probe_s": seconds,
            "eval_loss": eval_loss, "probes": probes.result}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    data = load_corpus("stdlib", block_size=args.block_size, max_bytes=args.max_bytes, seed=args.seed)
    if args.eval_blocks:
        data["eval"] = data["eval"].select(range(min(args.eval_blocks, len(data["eval"]))))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.optim_list:
            print(f"training {name} ...", file=sys.stderr, flush=True)
            rows.append(train_and_probe(name, args, data, Path(tmp)))
    results = {row["optim"]: row["probes"] for row in rows}
    for row in rows:
        row["probes"]["summary"] = {"eval_loss_trainer": row["eval_loss"], **row["probes"]["summary"]}
    print(comparison_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_comparison(results, out.with_suffix(".png"))
    out.write_text(json.dumps({
        "benchmark": "probes",
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "hf_ista": hf_ista.__version__,
                        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "args": {k: v for k, v in vars(args).items() if k != "optim_list"},
        "rows": rows}, indent=2))
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main()
