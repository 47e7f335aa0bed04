"""Optimizers side by side through the plain transformers ``Trainer``.

Every optimizer trains the same tiny Llama (``hf_ista.data.tiny_llama``) on the same embedded
corpus (``hf_ista.data.load_corpus``) for the same number of steps, with the same seed and
``TrainingArguments(optim=NAME)``, in one process, one after the other. Per optimizer we report

* optimizer state bytes per trainable parameter (``hf_ista.state_bytes``),
* mean ``optimizer.step()`` time (first ``--warmup-steps`` steps skipped), quoted as a ratio
  to ``adamw_torch`` measured in the same run,
* eval loss after the last step.

An optimizer that cannot run here (not installed, no CUDA, fails to construct or step) is kept as
a row with its error text. Prints a plain-text table and writes JSON.

    PYTHONPATH=. python benchmarks/optimizers.py --steps 200
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

# Keep the output a table: no tokenizer/hub chatter, no torch.compile cache warnings.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
for _noisy in ("torchao", "torch.utils._pytree"):  # torchao's missing-CUDA-library notes on CPU
    logging.getLogger(_noisy).setLevel(logging.ERROR)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import hf_ista  # noqa: E402,F401  (registers optim="microadam")
from hf_ista import state_bytes  # noqa: E402
from hf_ista.data import MODEL_SIZES, load_corpus, tiny_llama  # noqa: E402

BASELINE = "adamw_torch"
# name -> (optim_args, what it needs)
OPTIMIZERS: dict[str, tuple[str | None, str]] = {
    "adamw_torch": (None, "torch"),
    "adamw_torch_fused": (None, "cuda"),
    "adamw_bnb_8bit": (None, "bitsandbytes"),
    "adamw_torch_4bit": (None, "torchao"),
    "adamw_torch_8bit": (None, "torchao"),
    "microadam": ("m=10,density=0.01", "hf_ista"),
    "ldadam": ("rank=16,rho=0.908", "hf_ista"),
    "dct_adamw": ("rank=16", "hf_ista"),
    "galore_adamw": ("rank=16,update_proj_gap=200,scale=0.25", "galore_torch"),
}
# Low-rank optimizers treat these modules' weights in low rank (GaLore requires the argument).
LOW_RANK = {"ldadam", "dct_adamw", "galore_adamw"}
TARGET_MODULES = "all-linear"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES), help="tiny Llama size")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per optimizer")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128, help="tokens (bytes) per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate for every optimizer")
    p.add_argument("--lr-per-optim", default="",
                   help="per-optimizer learning rates overriding --lr, e.g. 'microadam=2e-3,adamw_torch=1e-3'")
    p.add_argument("--optims", default="",
                   help=f"comma list restricting the optimizers (default: all of {', '.join(OPTIMIZERS)}); "
                        f"{BASELINE} is always run as the baseline of the ratios")
    p.add_argument("--warmup-steps", type=int, default=5, help="first optimizer steps left out of the timing")
    p.add_argument("--lr-warmup-steps", type=int, default=None,
                   help="linear lr warm-up steps of the (linear) schedule; default steps // 10")
    p.add_argument("--eval-blocks", type=int, default=256, help="eval set size in blocks (0 = all)")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="corpus bytes read")
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/optimizers-<device>.json)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error(f"--steps={args.steps} must be larger than --warmup-steps={args.warmup_steps}")
    names = [n.strip() for n in args.optims.split(",") if n.strip()] or list(OPTIMIZERS)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        p.error(f"--optims: unknown {unknown}; known: {list(OPTIMIZERS)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    args.optim_list = names
    args.lr_map = {}
    for item in filter(None, (s.strip() for s in args.lr_per_optim.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in OPTIMIZERS:
            p.error(f"--lr-per-optim: {item!r} is not NAME=LR with NAME one of {list(OPTIMIZERS)}")
        args.lr_map[name] = float(value)
    return args


# ---------------------------------------------------------------- environment

def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--device-name``, the same in every benchmark."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default 1 without CUDA (with torch's intra-op threads, other "
                        "processes on a small shared CPU inflate step times many-fold), else torch's default; "
                        "0 = torch's default")
    p.add_argument("--device-name", default="auto", help="device label for the JSON and file name")


def set_threads(args) -> None:
    """Apply ``args.threads`` (filled in when None: 1 without CUDA, else 0 = torch's default)."""
    if args.threads is None:
        args.threads = 0 if torch.cuda.is_available() else 1
    if args.threads:
        torch.set_num_threads(args.threads)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_label(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {cpu_model()} x{os.cpu_count()}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    return {
        "device": device,
        "cuda": torch.cuda.is_available(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": package_version("accelerate"),
        "bitsandbytes": package_version("bitsandbytes"),
        "torchao": package_version("torchao"),
        "hf_ista": hf_ista.__version__,
    }


# ---------------------------------------------------------------- one run

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def round_robin_times(rows, total: int, warmup: int) -> list[list[float]]:
    """Time ``step()`` of every ``(prepare(i), step())`` pair of ``rows`` for ``total`` steps,
    the rows taking their step ``i`` in turn (round robin) so that a busy machine slows them alike;
    ``prepare(i)`` (setting the gradients) is not timed, nor are the first ``warmup`` steps."""
    times = [[] for _ in rows]
    for i in range(total):
        for (prepare, step), out in zip(rows, times):
            prepare(i)
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                out.append(time.perf_counter() - start)
    return times


class TimedTrainer(Trainer):
    """A plain Trainer whose optimizer's ``step`` is wrapped with a timer."""

    step_times: list[float]

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not getattr(optimizer.step, "_timed", False):
            inner = optimizer.step
            self.step_times = []

            @functools.wraps(inner)
            def timed_step(*a, **kw):
                sync()
                start = time.perf_counter()
                out = inner(*a, **kw)
                sync()
                self.step_times.append(time.perf_counter() - start)
                return out

            timed_step._timed = True
            optimizer.step = timed_step
        return optimizer


def state_dtypes(optimizer) -> dict[str, int]:
    """Bytes of optimizer state by dtype (tensor subclasses opened up), to see what is really stored."""
    inner = getattr(optimizer, "optimizer", optimizer)
    out: dict[str, int] = {}

    def walk(obj):
        if torch.is_tensor(obj):
            if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
                for n in obj.__tensor_flatten__()[0]:
                    walk(getattr(obj, n))
                return
            key = str(obj.dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(list(inner.state.values()))
    return out


def unavailable(name: str) -> str | None:
    need = OPTIMIZERS[name][1]
    if need == "cuda" and not torch.cuda.is_available():
        return "needs CUDA (torch.cuda.is_available() is False)"
    if need in ("bitsandbytes", "torchao") and package_version(need) is None:
        return f"{need} is not installed"
    if need == "galore_torch" and package_version("galore-torch") is None:
        return "galore-torch is not installed (pip install galore-torch)"
    return None


def run_one(name: str, args, data, workdir: Path) -> dict:
    optim_args = OPTIMIZERS[name][0]
    lr = args.lr_map.get(name, args.lr)
    row = {"optim": name, "optim_args": optim_args, "lr": lr, "status": "ok"}
    reason = unavailable(name)
    if reason:
        row.update(status="skipped", error=reason)
        return row
    start = time.perf_counter()
    model = trainer = None
    try:
        model = tiny_llama(args.size, seed=args.seed, max_position_embeddings=max(1024, args.block_size))
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row["trainable_params"] = n_params
        training_args = TrainingArguments(
            output_dir=str(workdir / name),
            optim=name,
            optim_args=optim_args,
            optim_target_modules=TARGET_MODULES if name in LOW_RANK else None,
            learning_rate=lr,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            lr_scheduler_type="linear",
            warmup_steps=args.steps // 10 if args.lr_warmup_steps is None else args.lr_warmup_steps,
            seed=args.seed,
            data_seed=args.seed,
            use_cpu=not torch.cuda.is_available(),
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = TimedTrainer(model=model, args=training_args,
                               train_dataset=data["train"], eval_dataset=data["eval"])
        trainer.remove_callback(PrinterCallback)
        train_out = trainer.train()
        row["train_wall_s"] = time.perf_counter() - start
        times = trainer.step_times[args.warmup_steps:]
        if not times:
            raise RuntimeError(f"only {len(trainer.step_times)} optimizer steps were timed")
        row["first_step_s"] = trainer.step_times[0]
        row["timed_steps"] = len(times)
        row["step_mean_s"] = statistics.fmean(times)
        row["step_median_s"] = statistics.median(times)
        row["state_bytes"] = state_bytes(trainer.optimizer)
        row["state_bytes_per_param"] = row["state_bytes"] / n_params
        row["state_bytes_by_dtype"] = state_dtypes(trainer.optimizer)
        row["optimizer_class"] = f"{type(getattr(trainer.optimizer, 'optimizer', trainer.optimizer)).__module__}." \
                                 f"{type(getattr(trainer.optimizer, 'optimizer', trainer.optimizer)).__name__}"
        row["train_loss"] = train_out.training_loss
        row["eval_loss"] = trainer.evaluate()["eval_loss"]
        if not math.isfinite(row["eval_loss"]):
            row["status"] = "diverged"
    except Exception as err:  # a row that could not run keeps its error text
        row.update(status="error", error=f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=-6))
    finally:
        row.setdefault("train_wall_s", time.perf_counter() - start)
        del trainer, model  # free the model and optimizer state before the next optimizer
    return row


# ---------------------------------------------------------------- table

def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ["optimizer", "lr", "state B/param", "step/adamw mean", "step/adamw median", "eval loss", "status"]
    lines = []
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        lines.append([
            r["optim"] + (f" ({r['optim_args']})" if r.get("optim_args") else ""),
            fmt(r.get("lr"), "g"),
            fmt(r.get("state_bytes_per_param"), ".3f"),
            fmt(r.get("step_ratio"), ".2f") + ("x" if r.get("step_ratio") is not None else ""),
            fmt(r.get("step_ratio_median"), ".2f") + ("x" if r.get("step_ratio_median") is not None else ""),
            fmt(r.get("eval_loss"), ".4f"),
            status if len(status) <= 100 else status[:97] + "...",
        ])
    return format_table(head, lines)


def format_table(head: list[str], lines: list[list[str]]) -> str:
    """Plain-text columns under a header and a rule."""
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    set_threads(args)
    device = device_label(args.device_name)
    out = Path(args.out or Path(__file__).parent / "results" / f"optimizers-{slug(device)}.json")
    # Same blocks for every optimizer.
    data = load_corpus("stdlib", block_size=args.block_size, max_bytes=args.max_bytes, seed=args.seed)
    if args.eval_blocks and len(data["eval"]) > args.eval_blocks:
        data["eval"] = data["eval"].select(range(args.eval_blocks))
    print(f"device: {device} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"model: tiny_llama({args.size!r}) | steps {args.steps} x batch {args.batch_size} x block "
          f"{args.block_size} | train blocks {len(data['train'])}, eval blocks {len(data['eval'])} | seed {args.seed} "
          f"| torch threads {torch.get_num_threads()}")
    rows = []
    load_before = os.getloadavg()
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_ista_bench_") as workdir:
        for name in args.optim_list:
            print(f"  running {name} ...", flush=True)
            # Silence third-party prints (torchao's missing-CUDA-library notes) during the run.
            with contextlib.redirect_stdout(io.StringIO()):
                row = run_one(name, args, data, Path(workdir))
            rows.append(row)
            if row["status"] != "ok":
                print(f"    {row['status']}: {row.get('error')}", flush=True)
    base = next((r for r in rows if r["optim"] == BASELINE and r.get("step_mean_s")), None)
    for r in rows:
        r["step_ratio"] = r["step_mean_s"] / base["step_mean_s"] if base and r.get("step_mean_s") else None
        r["step_ratio_median"] = (r["step_median_s"] / base["step_median_s"]
                                  if base and r.get("step_median_s") else None)
    print()
    print(table(rows))
    print(f"\nstep/adamw: optimizer.step() time over steps {args.warmup_steps + 1}..{args.steps} (mean, and median "
          f"which resists other load on the machine), as a ratio to {BASELINE} in this run"
          + (f" ({BASELINE}: mean {base['step_mean_s'] * 1e3:.2f} ms, median {base['step_median_s'] * 1e3:.2f} ms)"
             if base else ""))
    result = {
        "benchmark": "optimizers",
        "environment": environment(device),
        "args": {k: v for k, v in vars(args).items() if k not in ("optim_list", "lr_map")}
        | {"optims_run": args.optim_list, "lr_per_optim": args.lr_map},
        "baseline": BASELINE,
        "total_wall_s": time.perf_counter() - total,
        # Other processes on the machine skew the timings; the load average says how busy it was.
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if base else 1


if __name__ == "__main__":
    sys.exit(main())
