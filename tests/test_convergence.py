"""MicroAdam, LDAdam and DCT-AdamW converge like AdamW when fine-tuning: regime (a) of
``benchmarks/convergence.py``.

A nano-sized Llama is trained with AdamW on the top-level standard-library modules, saved, and fine-tuned
on the ``email`` package with ``adamw_torch``, ``microadam`` (m=10, density=0.01), ``ldadam`` and
``dct_adamw`` (rank 8), each at the best learning rate of the benchmark's sweep, through the plain
transformers ``Trainer``. The base model and AdamW's run are shared by the tests (module fixture).

No from-scratch test: from scratch, at any budget a test can afford, MicroAdam at 1 % density trails
AdamW by a wide margin with no threshold to hold it to (the benchmark reports it: +18.7 % at 150
steps of the quickstart setup), and "MicroAdam trains at all through the Trainer" is already
asserted here by its margin over the base model. The low-rank optimizers match or beat AdamW there
(benchmarks/results/convergence-cpu-scratch-lowrank.json), but 150 steps from scratch on one seed
are too chaotic to pin a threshold on.
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
# Low-rank optimizers at rank 8: nano's k/v projections are 16x32, so rank 16 would be their full rank
# (they would fall back to AdamW) and half of every other matrix. Best lrs of this configuration's sweep,
# benchmarks/results/convergence-cpu-nano-finetune-lowrank.json (the command is in benchmarks/README.md);
# eval loss, and at the best lr the gap to AdamW's best and the share of its improvement recovered:
#   adamw_torch                    1e-3 1.5973 | 3e-3 1.5325 | 1e-2 1.5049 (best) | 3e-2 1.5762
#   ldadam rank=8,rho=0.908        1e-3 1.6242 | 3e-3 1.5587 | 1e-2 1.5298 (best, +1.65 %, 0.90) | 3e-2 1.6004
#     with betas=0.908:0.99        1e-3 1.6268 | 3e-3 1.5624 | 1e-2 1.5319 (best, +1.79 %, 0.89) | 3e-2 1.6056
#   dct_adamw rank=8,error_feedback=4bit,rotate_moments=true (its defaults)
#                                  3e-3 1.6019 | 1e-2 1.5402 | 3e-2 1.5359 (best, +2.06 %, 0.87) | 1e-1 1.7272
#     error_feedback=none,rotate_moments=false
#                                  1e-3 1.6859 | 3e-3 1.6424 | 1e-2 1.6013 (best, +6.41 %, 0.61) | 3e-2 1.6032
#   galore_adamw rank=8,update_proj_gap=200,scale=0.25 (transformers' GaLore, the peer; not tested here)
#                                  3e-3 1.6415 | 1e-2 1.5909 | 3e-2 1.5652 (best, +4.01 %, 0.75) | 1e-1 1.6056
# DCT-AdamW's options (benchmarks/results/convergence-cpu-nano-finetune-dct-options.json, lrs 3e-3..1e-1,
# best lr each): neither error feedback nor rotation +6.41 %; update_proj_gap 10 / 50 alone +5.08 % /
# +4.16 %; rotated moments alone +4.68 %; error feedback alone +4.18 % (fp32) / +4.05 % (4bit); both
# +2.08 % (fp32) / +2.17 % (8bit) / +2.06 % (4bit); both with update_proj_gap 10 +3.21 % (fp32) / +3.56 %
# (4bit), 50 +3.48 % (fp32). The same seed's runs move by ~0.003 with rounding alone (the 4bit row was
# 1.5330 before the DCT basis columns were computed in closed form), so 4bit = 8bit = fp32 here.
LOW_RANK = [
    ("ldadam", "rank=8,rho=0.908", 1e-2),
    ("dct_adamw", "rank=8,error_feedback=4bit,rotate_moments=true", 3e-2),
]

MAX_RELATIVE_GAP = 0.10  # each optimizer's eval loss at most 10 % above AdamW's
# "Improved by a real margin": the mean per-block improvement over the pretrained model on the
# fine-tuning eval split is at least MIN_IMPROVEMENT nats/byte (~3 % of the base loss) and at
# least MIN_Z paired standard errors (over the eval blocks), so it is neither tiny nor noise.
MIN_IMPROVEMENT = 0.05  # the sweeps' best rows improve by 0.245 (AdamW), 0.161 (MicroAdam), 0.220 (LDAdam),
#                         0.214 (DCT-AdamW)
MIN_Z = 5.0
# The relative gap in loss is diluted by the loss neither optimizer can remove: a MicroAdam with its
# error feedback switched off (error buffer zeroed every step) still ends only +9.63 % above AdamW
# here. The share of AdamW's improvement that MicroAdam recovers separates them: 0.66 as built
# (0.61-0.68 over seeds 0-2 and 800-1200 pretraining steps, 0.75 for the "tiny" default), 0.41
# without error feedback. Held to the low-rank optimizers too (0.90 LDAdam, 0.87 DCT-AdamW; 0.61 for
# DCT-AdamW with neither error feedback nor moment rotation).
MIN_IMPROVEMENT_RATIO = 0.5


def load_benchmark():
    name = "_hf_ista_convergence_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "convergence.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def finetune(tmp_path_factory, one_thread):
    """The base model (pretrained once, ~40 s) and AdamW's fine-tuning run, shared by the tests;
    returns ``run(optim, optim_args, lr) -> (row, (improvement, its standard error))``."""
    from transformers import LlamaForCausalLM

    from hf_ista.data import source_files

    tmp_path = tmp_path_factory.mktemp("convergence")
    bench = load_benchmark()
    args = bench.parse_args(CONFIG + ["--out", str(tmp_path / "unused.json")])
    pre_data = bench.corpus(args.pretrain_source, args.block_size, args.max_bytes, args.eval_blocks, args.seed)
    ft_data = bench.corpus(args.finetune_source, args.block_size, args.max_bytes, args.eval_blocks, args.seed)
    # Fine-tuning data is different modules' sources, not a resplit of the pretraining data.
    assert not set(source_files(args.pretrain_source)) & set(source_files(args.finetune_source))

    base = tmp_path / "base"
    bench.pretrain(base, args, pre_data, with_eval=False)
    base_losses = block_losses(LlamaForCausalLM.from_pretrained(base), ft_data["eval"])

    def run(optim: str, optim_args: str | None, lr: float):
        model = LlamaForCausalLM.from_pretrained(base)
        row = bench.train_and_eval(model, ft_data, tmp_path / optim, optim, optim_args, lr, args.finetune_steps,
                                   args.finetune_batch_size, args.seed, args.warmup_ratio)
        assert row["status"] == "ok", row
        losses = block_losses(model, ft_data["eval"])
        # Our per-block measure is the Trainer's eval loss, split by block.
        assert losses.mean().item() == pytest.approx(row["eval_loss"], abs=1e-4)
        return row, improvement(base_losses, losses)

    run.base_loss = base_losses.mean().item()
    run.adamw = run("adamw_torch", None, ADAMW_LR)
    return run


def check_against_adamw(finetune, optim: str, optim_args: str | None, lr: float) -> None:
    """Fine-tune with ``optim`` and assert: a real improvement over the base model (for it and for
    AdamW), an eval loss within ``MAX_RELATIVE_GAP`` of AdamW's, and at least
    ``MIN_IMPROVEMENT_RATIO`` of AdamW's improvement recovered."""
    start = time.perf_counter()
    (adamw_row, adamw_gain), (row, gain) = finetune.adamw, finetune(optim, optim_args, lr)
    adamw, loss = adamw_row["eval_loss"], row["eval_loss"]
    gap, ratio = (loss - adamw) / adamw, gain[0] / adamw_gain[0]
    print(f"\npretrained {finetune.base_loss:.4f} | adamw_torch lr {ADAMW_LR:g}: {adamw:.4f} (improved by "
          f"{adamw_gain[0]:.4f} +- {adamw_gain[1]:.4f}) | {optim} ({optim_args}) lr {lr:g}: {loss:.4f} (improved "
          f"by {gain[0]:.4f} +- {gain[1]:.4f}) | relative gap {gap:+.2%}, improvement ratio {ratio:.2f} | "
          f"{time.perf_counter() - start:.0f} s")

    for name, (g, se) in (("adamw_torch", adamw_gain), (optim, gain)):
        assert g >= MIN_IMPROVEMENT, f"{name} improved the base model's eval loss by only {g:.4f} nats"
        assert g >= MIN_Z * se, f"{name}: improvement {g:.4f} is within {MIN_Z} standard errors ({se:.4f})"
    assert loss <= (1 + MAX_RELATIVE_GAP) * adamw, (
        f"{optim} eval loss {loss:.4f} is {gap:.2%} above adamw_torch's {adamw:.4f} (allowed {MAX_RELATIVE_GAP:.0%})")
    assert ratio >= MIN_IMPROVEMENT_RATIO, (
        f"{optim} recovered only {ratio:.2f} of adamw_torch's improvement over the pretrained model "
        f"(expected >= {MIN_IMPROVEMENT_RATIO})")


@pytest.mark.slow
def test_finetune_microadam_within_10_percent_of_adamw(finetune):
    check_against_adamw(finetune, "microadam", MICROADAM_ARGS, MICROADAM_LR)


@pytest.mark.slow
@pytest.mark.parametrize("optim, optim_args, lr", LOW_RANK, ids=[x[0] for x in LOW_RANK])
def test_finetune_low_rank_within_10_percent_of_adamw(finetune, optim, optim_args, lr):
    check_against_adamw(finetune, optim, optim_args, lr)
