"""Convergence of MicroAdam, the low-rank optimizers and GaLore against AdamW through the plain ``Trainer``.

Two regimes, each optimizer at its best learning rate from a small sweep, equal steps, one seed:

(a) fine-tuning: a tiny Llama is trained with AdamW on one part of the embedded corpus
    (``--pretrain-source``, default the top-level standard-library modules), saved with
    ``save_pretrained``, then fine-tuned from that checkpoint on a different part
    (``--finetune-source``, default the ``email`` package) with every optimizer of ``--optimizers``.
    Reported: every swept lr's eval loss on the fine-tuning eval split, each optimizer's best, the
    pretrained model's eval loss on that split, each optimizer's relative gap
    ``(best - best_adamw) / best_adamw`` and the share of AdamW's improvement over the pretrained
    model it recovers.
(b) from scratch: the quickstart setup (``recipes/quickstart.yaml``: tiny model, stdlib corpus,
    block 128, cosine schedule) for fewer steps, every optimizer swept the same way; the gaps are
    reported, no threshold.

``--optimizers`` is a comma list of labels: a ``TrainingArguments(optim=...)`` name, optionally with a
``/tag`` to run one optimizer with several ``optim_args`` (``ldadam,ldadam/paper-betas``).
``adamw_torch``, the baseline, is always run. Per label (falling back to its optimizer's name):
``--optim-args LABEL=ARGS`` (repeatable; ARGS is the ``optim_args`` string) and
``--finetune-lrs LABEL=LR,LR,...`` / ``--scratch-lrs LABEL=LR,...`` (repeatable). The older flags
``--microadam-args`` and ``--{finetune,scratch}-{adamw,microadam}-lrs`` still set those two. Low-rank
optimizers (ours and transformers' ``galore_*`` / ``apollo_*``) get ``optim_target_modules="all-linear"``.

Prints a table per regime and writes JSON (default ``benchmarks/results/convergence-cpu.json``).

    PYTHONPATH=. python benchmarks/convergence.py
    PYTHONPATH=. python benchmarks/convergence.py --regimes finetune --finetune-adamw-lrs 1e-3,3e-3
    PYTHONPATH=. python benchmarks/convergence.py --optimizers adamw_torch,ldadam,dct_adamw,galore_adamw \\
        --optim-args dct_adamw=rank=8 --finetune-lrs dct_adamw=3e-3,1e-2

``--threads`` defaults to 1: on a 2-core machine shared with other processes, two intra-op
threads per process oversubscribe the cores and were measured up to 6x slower per step.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

import hf_ista  # noqa: F401  (registers optim="microadam", "ldadam", "dct_adamw")
from hf_ista.data import MODEL_SIZES, load_corpus, tiny_llama
from hf_ista.integrations.transformers import OPTIMIZERS, parse_optim_args

ADAMW = "adamw_torch"
MICROADAM = "microadam"
DEFAULT_OUT = Path(__file__).parent / "results" / "convergence-cpu.json"
# optim_args of an optimizer unless --optim-args sets them (MicroAdam's: --microadam-args)
DEFAULT_OPTIM_ARGS = {
    "ldadam": "rank=16,rho=0.908",
    "dct_adamw": "rank=16",  # its defaults: 4-bit error feedback, rotated moments, update_proj_gap=1
    "galore_adamw": "rank=16,update_proj_gap=200,scale=0.25",
}
# lr sweep of an optimizer without --finetune-lrs / --scratch-lrs (AdamW's and MicroAdam's have flags)
DEFAULT_LRS = {"finetune": [1e-3, 3e-3, 1e-2, 3e-2], "scratch": [1e-3, 3e-3, 1e-2]}


def float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected one or more learning rates > 0")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--regimes", default="finetune,scratch", help="comma list of: finetune, scratch")
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES), help="tiny Llama size (both regimes)")
    p.add_argument("--block-size", type=int, default=128, help="tokens (bytes) per sequence (both regimes)")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="corpus bytes read per source")
    p.add_argument("--eval-blocks", type=int, default=256, help="eval blocks kept per split (0 = all)")
    p.add_argument("--optimizers", default=f"{ADAMW},{MICROADAM}",
                   help="comma list of labels: an optim name, optionally /tag for a variant (adamw_torch always runs)")
    p.add_argument("--optim-args", action="append", default=[], metavar="LABEL=ARGS",
                   help=f"optim_args of a label (repeatable); defaults: {DEFAULT_OPTIM_ARGS}")
    p.add_argument("--microadam-args", default="m=10,density=0.01", help="optim_args of the MicroAdam rows")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear lr warm-up share of each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave torch's default)")
    g = p.add_argument_group("(a) fine-tuning")
    g.add_argument("--pretrain-source", default="stdlib", help="corpus part the base model is trained on")
    g.add_argument("--pretrain-steps", type=int, default=600,
                   help="long enough that fine-tuning adapts a trained model rather than finishing its training")
    g.add_argument("--pretrain-batch-size", type=int, default=16)
    g.add_argument("--pretrain-lr", type=float, default=3e-3, help="AdamW lr of the base model (quickstart's)")
    g.add_argument("--finetune-source", default="email", help="corpus part the base model is fine-tuned on")
    g.add_argument("--finetune-steps", type=int, default=100)
    g.add_argument("--finetune-batch-size", type=int, default=8)
    g.add_argument("--finetune-adamw-lrs", type=float_list, default=[3e-4, 1e-3, 3e-3, 1e-2], help="AdamW lr sweep")
    g.add_argument("--finetune-microadam-lrs", type=float_list, default=[3e-4, 1e-3, 3e-3, 1e-2],
                   help="MicroAdam lr sweep")
    g.add_argument("--finetune-lrs", action="append", default=[], metavar="LABEL=LR,...",
                   help=f"lr sweep of a label (repeatable); default {DEFAULT_LRS['finetune']}")
    g = p.add_argument_group("(b) from scratch")
    g.add_argument("--scratch-source", default="stdlib")
    g.add_argument("--scratch-steps", type=int, default=150, help="quickstart uses 300")
    g.add_argument("--scratch-batch-size", type=int, default=16)
    g.add_argument("--scratch-adamw-lrs", type=float_list, default=[3e-4, 1e-3, 3e-3], help="AdamW lr sweep")
    g.add_argument("--scratch-microadam-lrs", type=float_list, default=[3e-3, 1e-2, 3e-2], help="MicroAdam lr sweep")
    g.add_argument("--scratch-lrs", action="append", default=[], metavar="LABEL=LR,...",
                   help=f"lr sweep of a label (repeatable); default {DEFAULT_LRS['scratch']}")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path")
    args = p.parse_args(argv)
    args.regime_list = [r.strip() for r in args.regimes.split(",") if r.strip()]
    bad = [r for r in args.regime_list if r not in ("finetune", "scratch")]
    if bad or not args.regime_list:
        p.error(f"--regimes: unknown {bad}; expected a comma list of finetune, scratch")
    if args.finetune_source == args.pretrain_source:
        p.error("--finetune-source must differ from --pretrain-source")
    for name in ("pretrain_steps", "finetune_steps", "scratch_steps", "pretrain_batch_size",
                 "finetune_batch_size", "scratch_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.plan = sweep_plan(args)
    except (ValueError, argparse.ArgumentTypeError) as err:
        p.error(str(err))
    return args


def base_optim(label: str) -> str:
    return label.split("/", 1)[0]


def label_map(items: list[str], flag: str, parse=str) -> dict:
    """``["LABEL=VALUE", ...]`` as a dict (VALUE parsed by ``parse``)."""
    out = {}
    for item in items:
        label, sep, value = item.partition("=")
        if not sep or not label.strip():
            raise ValueError(f"{flag}: {item!r} is not LABEL=VALUE")
        out[label.strip()] = parse(value)
    return out


def sweep_plan(args) -> dict[str, dict]:
    """Per regime, ``[(label, optim, optim_args, lrs), ...]`` in ``--optimizers`` order, AdamW first."""
    from transformers.training_args import OptimizerNames

    labels = [x.strip() for x in args.optimizers.split(",") if x.strip()]
    labels = [ADAMW] + [x for x in dict.fromkeys(labels) if x != ADAMW]
    optim_args = {MICROADAM: args.microadam_args} | DEFAULT_OPTIM_ARGS | label_map(args.optim_args, "--optim-args")
    lrs = {"finetune": {ADAMW: args.finetune_adamw_lrs, MICROADAM: args.finetune_microadam_lrs}
           | label_map(args.finetune_lrs, "--finetune-lrs", float_list),
           "scratch": {ADAMW: args.scratch_adamw_lrs, MICROADAM: args.scratch_microadam_lrs}
           | label_map(args.scratch_lrs, "--scratch-lrs", float_list)}
    known = set(labels) | {base_optim(x) for x in labels}
    for flag, given in (("--optim-args", args.optim_args), ("--finetune-lrs", args.finetune_lrs),
                        ("--scratch-lrs", args.scratch_lrs)):
        unused = [x.partition("=")[0] for x in given if x.partition("=")[0].strip() not in known]
        if unused:
            raise ValueError(f"{flag}: {unused} not in --optimizers {labels}")
    plan = {regime: [] for regime in lrs}
    for label in labels:
        optim = base_optim(label)
        if optim not in OptimizerNames._value2member_map_:
            raise ValueError(f"--optimizers: {optim!r} is not a TrainingArguments optim name")
        oa = optim_args.get(label, optim_args.get(optim)) or None
        if optim in OPTIMIZERS:
            parse_optim_args(optim, oa)  # fail now, not after pretraining
        for regime, table_ in lrs.items():
            plan[regime].append((label, optim, oa, table_.get(label, table_.get(optim, DEFAULT_LRS[regime]))))
    return plan


# ---------------------------------------------------------------- building blocks

def corpus(source: str, block_size: int, max_bytes: int, eval_blocks: int, seed: int):
    """Train / eval blocks of ``source``; the eval split cut to ``eval_blocks`` (0 = all)."""
    data = load_corpus(source, block_size=block_size, max_bytes=max_bytes, seed=seed)
    if eval_blocks and len(data["eval"]) > eval_blocks:
        data["eval"] = data["eval"].select(range(eval_blocks))
    return data


def target_modules(optim: str) -> str | None:
    """``"all-linear"`` for a low-rank optimizer (GaLore requires ``optim_target_modules``; ours
    default to it), else ``None``."""
    low_rank = optim in OPTIMIZERS and OPTIMIZERS[optim].low_rank
    return "all-linear" if low_rank or optim.startswith(("galore_", "apollo_")) else None


def training_args(workdir: Path, optim: str, optim_args: str | None, lr: float, steps: int, batch_size: int,
                  seed: int, warmup_ratio: float = 0.1) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(workdir),
        optim=optim,
        optim_args=optim_args,
        optim_target_modules=target_modules(optim),
        learning_rate=lr,
        weight_decay=0.0,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        lr_scheduler_type="cosine",
        warmup_steps=int(round(warmup_ratio * steps)),
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def quiet_trainer(model, args: TrainingArguments, data) -> Trainer:
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"])
    trainer.remove_callback(PrinterCallback)
    return trainer


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def evaluate(model, data, workdir: Path, seed: int = 0) -> float:
    """Eval loss of ``model`` on ``data['eval']`` (no training)."""
    args = training_args(workdir, ADAMW, None, 1e-3, 1, 1, seed)
    return quiet_trainer(model, args, data).evaluate()["eval_loss"]


def train_and_eval(model, data, workdir: Path, optim: str, optim_args: str | None, lr: float, steps: int,
                   batch_size: int, seed: int, warmup_ratio: float = 0.1, with_eval: bool = True) -> dict:
    """Train ``model`` in place with the plain Trainer; return a row with the final eval loss
    (``None`` with status ``"diverged"`` if it is not finite; not computed if ``with_eval`` is false)."""
    row = {"optim": optim, "optim_args": optim_args, "lr": lr, "steps": steps, "batch_size": batch_size}
    args = training_args(workdir, optim, optim_args, lr, steps, batch_size, seed, warmup_ratio)
    trainer = quiet_trainer(model, args, data)
    start = time.perf_counter()
    try:
        out = trainer.train()
        row["train_s"] = time.perf_counter() - start
        row["train_loss"] = finite_or_none(out.training_loss)
        if with_eval:
            row["eval_loss"] = finite_or_none(trainer.evaluate()["eval_loss"])
            row["status"] = "ok" if row["eval_loss"] is not None else "diverged"
        else:
            row["status"] = "ok" if row["train_loss"] is not None else "diverged"
    except Exception as err:  # keep the sweep going; the row records why it has no loss
        row.update(status="error", error=f"{type(err).__name__}: {err}", eval_loss=None,
                   train_s=time.perf_counter() - start)
    return row


def pretrain(path: Path, args, data=None, with_eval: bool = True) -> dict:
    """Train the fine-tuning base model with AdamW on ``args.pretrain_source`` and save it to ``path``
    (``save_pretrained``). ``with_eval=False`` skips the eval on the pretraining split."""
    data = data or corpus(args.pretrain_source, args.block_size, args.max_bytes, args.eval_blocks, args.seed)
    model = tiny_llama(args.size, seed=args.seed, max_position_embeddings=args.block_size)
    row = train_and_eval(model, data, path.parent / "pretrain-run", ADAMW, None, args.pretrain_lr,
                         args.pretrain_steps, args.pretrain_batch_size, args.seed, args.warmup_ratio, with_eval)
    if row["status"] != "ok":
        raise RuntimeError(f"pretraining failed: {row}")
    model.save_pretrained(path)
    return row


def finetune(base: Path, data, workdir: Path, optim: str, optim_args: str | None, lr: float, args) -> dict:
    model = LlamaForCausalLM.from_pretrained(base)
    return train_and_eval(model, data, workdir, optim, optim_args, lr, args.finetune_steps,
                          args.finetune_batch_size, args.seed, args.warmup_ratio)


def best_row(rows: list[dict], label: str) -> dict | None:
    ok = [r for r in rows if r["label"] == label and r.get("eval_loss") is not None]
    return min(ok, key=lambda r: r["eval_loss"]) if ok else None


def summarize(rows: list[dict], base_loss: float | None = None) -> dict:
    """Best row per label, its relative gap to AdamW's best and, given the pretrained model's loss,
    the share of AdamW's improvement over it that the label recovers."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    best = {label: best_row(rows, label) for label in labels}
    adamw = best.get(ADAMW)
    summary = {"best": best, "relative_gap": {}}
    if base_loss is not None:
        summary["improvement_ratio"] = {}
    for label, b in best.items():
        if label == ADAMW or not (adamw and b):
            continue
        summary["relative_gap"][label] = (b["eval_loss"] - adamw["eval_loss"]) / adamw["eval_loss"]
        if base_loss is not None and base_loss > adamw["eval_loss"]:
            summary["improvement_ratio"][label] = (base_loss - b["eval_loss"]) / (base_loss - adamw["eval_loss"])
    for label, b in best.items():
        lrs = sorted(r["lr"] for r in rows if r["label"] == label)
        if b and len(lrs) > 1 and b["lr"] in (lrs[0], lrs[-1]):
            summary.setdefault("warnings", []).append(
                f"{label}: best lr {b['lr']:g} is at the edge of the sweep {lrs}; widen it")
    return summary


# ---------------------------------------------------------------- table

def columns(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    return out + ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]


def table(rows: list[dict], summary: dict) -> str:
    best_ids = {id(b) for b in summary["best"].values() if b}
    lines = []
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else r["status"]
        train = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        lines.append([r["label"], r.get("optim_args") or "", f"{r['lr']:g}", loss, train,
                      f"{r.get('train_s', 0):.0f}", "*" if id(r) in best_ids else ""])
    out = columns(["optimizer", "optim_args", "lr", "eval loss", "train loss", "train s", "best"], lines)
    ratios = summary.get("improvement_ratio")
    head = ["best of", "lr", "eval loss", f"gap to {ADAMW}"] + (["share of AdamW's improvement"] if ratios is not None
                                                                 else [])
    lines = []
    for label, b in summary["best"].items():
        if b is None:
            lines.append([label, "-", "no finite eval loss", "-"] + (["-"] if ratios is not None else []))
            continue
        gap = summary["relative_gap"].get(label)
        line = [label, f"{b['lr']:g}", f"{b['eval_loss']:.4f}", f"{gap:+.2%}" if gap is not None else "-"]
        if ratios is not None:
            line.append(f"{ratios[label]:.2f}" if label in ratios else "-")
        lines.append(line)
    out += [""] + columns(head, lines)
    out += [f"warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join(out)


# ---------------------------------------------------------------- regimes

def sweep(run_one, plan: list[tuple]) -> list[dict]:
    """Run ``run_one(optim, optim_args, lr)`` for every lr of every ``(label, optim, optim_args, lrs)``."""
    rows = []
    for label, optim, optim_args, lrs in plan:
        for lr in lrs:
            print(f"  {label} lr {lr:g} ...", end=" ", flush=True)
            row = {"label": label} | run_one(optim, optim_args, lr)
            print(f"{row['eval_loss']:.4f}" if row.get("eval_loss") is not None else row["status"],
                  f"({row.get('train_s', 0):.0f} s)", flush=True)
            rows.append(row)
    return rows


def regime_finetune(args, workdir: Path) -> dict:
    print(f"\n(a) fine-tuning: tiny_llama({args.size!r}) trained with {ADAMW} on {args.pretrain_source!r} "
          f"({args.pretrain_steps} steps x batch {args.pretrain_batch_size}, lr {args.pretrain_lr:g}), then "
          f"{args.finetune_steps} steps x batch {args.finetune_batch_size} on {args.finetune_source!r}", flush=True)
    base = workdir / "base"
    pre_data = corpus(args.pretrain_source, args.block_size, args.max_bytes, args.eval_blocks, args.seed)
    ft_data = corpus(args.finetune_source, args.block_size, args.max_bytes, args.eval_blocks, args.seed)
    print("  pretraining ...", end=" ", flush=True)
    pre = pretrain(base, args, pre_data)
    base_ft_loss = evaluate(LlamaForCausalLM.from_pretrained(base), ft_data, workdir / "eval-base", args.seed)
    print(f"eval loss {pre['eval_loss']:.4f} on {args.pretrain_source!r}, {base_ft_loss:.4f} on "
          f"{args.finetune_source!r} ({pre['train_s']:.0f} s)", flush=True)
    n = iter(range(10**6))
    rows = sweep(lambda optim, oa, lr: finetune(base, ft_data, workdir / f"ft-{next(n)}", optim, oa, lr, args),
                 args.plan["finetune"])
    summary = summarize(rows, base_ft_loss)
    print("\n(a) fine-tuning: eval loss on the fine-tuning eval split "
          f"({args.finetune_source!r}, {len(ft_data['eval'])} blocks; pretrained model: {base_ft_loss:.4f})")
    print(table(rows, summary))
    return {
        "pretrain": pre | {"source": args.pretrain_source, "eval_blocks": len(pre_data["eval"])},
        "finetune_source": args.finetune_source,
        "finetune_train_blocks": len(ft_data["train"]),
        "finetune_eval_blocks": len(ft_data["eval"]),
        "pretrained_eval_loss_on_finetune_split": base_ft_loss,
        "rows": rows,
        **summary,
    }


def regime_scratch(args, workdir: Path) -> dict:
    print(f"\n(b) from scratch: tiny_llama({args.size!r}) on {args.scratch_source!r}, block {args.block_size}, "
          f"{args.scratch_steps} steps x batch {args.scratch_batch_size}", flush=True)
    data = corpus(args.scratch_source, args.block_size, args.max_bytes, args.eval_blocks, args.seed)
    n = iter(range(10**6))

    def run_one(optim, optim_args, lr):
        model = tiny_llama(args.size, seed=args.seed, max_position_embeddings=args.block_size)
        return train_and_eval(model, data, workdir / f"scratch-{next(n)}", optim, optim_args, lr,
                              args.scratch_steps, args.scratch_batch_size, args.seed, args.warmup_ratio)

    rows = sweep(run_one, args.plan["scratch"])
    summary = summarize(rows)
    print(f"\n(b) from scratch: eval loss on {args.scratch_source!r} ({len(data['eval'])} blocks)")
    print(table(rows, summary))
    return {"source": args.scratch_source, "train_blocks": len(data["train"]), "eval_blocks": len(data["eval"]),
            "rows": rows, **summary}


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "hf_ista": hf_ista.__version__}


def quiet_environment() -> None:
    """Keep the output a table (done in ``main`` only, so importing this module changes nothing)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_environment()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {"benchmark": "convergence", "environment": environment(),
              "args": {k: v for k, v in vars(args).items() if k not in ("regime_list", "plan")}}
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | threads {torch.get_num_threads()} "
          f"| seed {args.seed} | optim_args: " + "; ".join(f"{label} {oa!r}" for label, _, oa, _ in
                                                           args.plan["finetune"] if oa))
    with tempfile.TemporaryDirectory(prefix="hf_ista_conv_") as tmp:
        # Third-party prints during training would break the tables.
        for regime in args.regime_list:
            run = regime_finetune if regime == "finetune" else regime_scratch
            sink = io.StringIO()
            with contextlib.redirect_stderr(sink):
                result[regime] = run(args, Path(tmp) / regime)
    result["total_wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ntotal {result['total_wall_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
