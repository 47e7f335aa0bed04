"""MicroAdam converges like AdamW when fine-tuning: regime (a) of ``benchmarks/convergence.py``.

A nano-sized Llama is trained with AdamW on the top-level standard-library modules, saved, and fine-tuned
on the ``email`` package with ``adamw_torch`` and with ``microadam`` (m=10, density=0.01), each at
the best learning rate of the benchmark's sweep, through the plain transformers ``Trainer``.

No from-scratch test: from scratch, at any budget a test can afford, MicroAdam at 1 % density trails
AdamW by a wide margin with no threshold to hold it to (the benchmark reports it: +18.7 % at 150
steps of the quickstart setup), and "MicroAdam trains at all through the Trainer" is already
asserted here by its margin over the base model.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# Regime (a) at the smallest size, "nano" (35k parameters, still k << d for every weight matrix: the
# 256x32 embedding keeps 82 of 8192 entries per step), so the base model can be trained well inside
# the test: the benchmark's default "tiny" base needs 600 steps (~3 min here) before fine-tuning is
# adaptation rather than the rest of its pretraining. Pinned here; the sweep below used exactly it.
CONFIG = [
    "--size", "nano", "--block-size", "128", "--max-bytes", "2000000", "--eval-blocks", "256", "--seed", "0",
    "--pretrain-source", "stdlib", "--pretrain-steps", "1000", "--pretrain-batch-size", "16", "--pretrain-lr", "1e-2",
    "--finetune-source", "email", "--finetune-steps", "100", "--finetune-batch-size", "8", "--warmup-ratio", "0.1",
]
# Best lrs of this configuration's sweep, benchmarks/results/convergence-cpu-nano-finetune.json
# (written by `PYTHONPATH=. python benchmarks/convergence.py --regimes finetune <CONFIG flags>
# --finetune-adamw-lrs 1e-3,3e-3,1e-2,3e-2 --finetune-microadam-lrs 1e-3,3e-3,1e-2,3e-2
# --out benchmarks/results/convergence-cpu-nano-finetune.json`), key "finetune" -> "best":
#   adamw_torch  1e-3 1.5973 | 3e-3 1.5325 | 1e-2 1.5049 (best) | 3e-2 1.5762
#   microadam    1e-3 1.6622 | 3e-3 1.6082 | 1e-2 1.5888 (best) | 3e-2 1.7205
#   pretrained model 1.7497; MicroAdam relative gap +5.58 % (the "tiny" default run,
#   benchmarks/results/convergence-cpu.json, gives +4.92 % at lr 3e-3 / 3e-3).
ADAMW_LR = 1e-2
MICROADAM_LR = 1e-2
MICROADAM_ARGS = "m=10,density=0.01"

MAX_RELATIVE_GAP = 0.10  # MicroAdam's eval loss at most 10 % above AdamW's
# "Improved by a real margin": the mean per-block improvement over the pretrained model on the
# fine-tuning eval split is at least MIN_IMPROVEMENT nats/byte (~3 % of the base loss) and at
# least MIN_Z paired standard errors (over the eval blocks), so it is neither tiny nor noise.
MIN_IMPROVEMENT = 0.05  # the sweep's best rows improve by 0.245 (AdamW) and 0.161 (MicroAdam)
MIN_Z = 5.0
# The relative gap in loss is diluted by the loss neither optimizer can remove: a MicroAdam with its
# error feedback switched off (error buffer zeroed every step) still ends only +9.63 % above AdamW
# here. The share of AdamW's improvement that MicroAdam recovers separates them: 0.66 as built
# (0.61-0.68 over seeds 0-2 and 800-1200 pretraining steps, 0.75 for the "tiny" default), 0.41
# without error feedback.
MIN_IMPROVEMENT_RATIO = 0.5


def load_benchmark():
    name = "_hf_ista_convergence_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "convergence.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores, 2 threads per process oversubscribe them (measured
    up to 10x slower per step on this tiny model)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def block_losses(model, dataset, batch_size: int = 64) -> torch.Tensor:
    """Mean next-byte cross-entropy of each eval block (the Trainer's eval loss is their mean)."""
    model.eval()
    ids = torch.tensor(dataset["input_ids"])
    out = []
    for i in range(0, len(ids), batch_size):
        x = ids[i:i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        out.append(loss.view(len(x), -1).mean(1))
    return torch.cat(out)


def improvement(base: torch.Tensor, tuned: torch.Tensor) -> tuple[float, float]:
    """Mean per-block improvement and its paired standard error."""
    diff = (base - tuned).double()
    return diff.mean().item(), (diff.std() / math.sqrt(len(diff))).item()


@pytest.mark.slow
def test_finetune_microadam_within_10_percent_of_adamw(tmp_path, one_thread):
    from transformers import LlamaForCausalLM

    from hf_ista.data import source_files

    bench = load_benchmark()
    args = bench.parse_args(CONFIG + ["--out", str(tmp_path / "unused.json")])
    start = time.perf_counter()
    pre_data = bench.corpus(args.pretrain_source, args.block_size, args.max_bytes, args.eval_blocks, args.seed)
    ft_data = bench.corpus(args.finetune_source, args.block_size, args.max_bytes, args.eval_blocks, args.seed)
    # Fine-tuning data is different modules' sources, not a resplit of the pretraining data.
    assert not set(source_files(args.pretrain_source)) & set(source_files(args.finetune_source))

    base = tmp_path / "base"
    bench.pretrain(base, args, pre_data, with_eval=False)
    base_losses = block_losses(LlamaForCausalLM.from_pretrained(base), ft_data["eval"])

    rows, gains = {}, {}
    for optim, optim_args, lr in (("adamw_torch", None, ADAMW_LR), ("microadam", MICROADAM_ARGS, MICROADAM_LR)):
        model = LlamaForCausalLM.from_pretrained(base)
        row = bench.train_and_eval(model, ft_data, tmp_path / optim, optim, optim_args, lr, args.finetune_steps,
                                   args.finetune_batch_size, args.seed, args.warmup_ratio)
        assert row["status"] == "ok", row
        losses = block_losses(model, ft_data["eval"])
        # Our per-block measure is the Trainer's eval loss, split by block.
        assert losses.mean().item() == pytest.approx(row["eval_loss"], abs=1e-4)
        rows[optim], gains[optim] = row, improvement(base_losses, losses)

    adamw, micro = rows["adamw_torch"]["eval_loss"], rows["microadam"]["eval_loss"]
    gap = (micro - adamw) / adamw
    print(f"\npretrained {base_losses.mean():.4f} | adamw_torch lr {ADAMW_LR:g}: {adamw:.4f} (improved by "
          f"{gains['adamw_torch'][0]:.4f} +- {gains['adamw_torch'][1]:.4f}) | microadam lr {MICROADAM_LR:g}: "
          f"{micro:.4f} (improved by {gains['microadam'][0]:.4f} +- {gains['microadam'][1]:.4f}) | "
          f"relative gap {gap:+.2%}, improvement ratio {gains['microadam'][0] / gains['adamw_torch'][0]:.2f} | "
          f"{time.perf_counter() - start:.0f} s")

    for optim, (gain, se) in gains.items():
        assert gain >= MIN_IMPROVEMENT, f"{optim} improved the base model's eval loss by only {gain:.4f} nats"
        assert gain >= MIN_Z * se, f"{optim}: improvement {gain:.4f} is within {MIN_Z} standard errors ({se:.4f})"
    assert micro <= (1 + MAX_RELATIVE_GAP) * adamw, (
        f"microadam eval loss {micro:.4f} is {gap:.2%} above adamw_torch's {adamw:.4f} "
        f"(allowed {MAX_RELATIVE_GAP:.0%})")
    ratio = gains["microadam"][0] / gains["adamw_torch"][0]
    assert ratio >= MIN_IMPROVEMENT_RATIO, (
        f"microadam recovered only {ratio:.2f} of adamw_torch's improvement over the pretrained model "
        f"(expected >= {MIN_IMPROVEMENT_RATIO})")
