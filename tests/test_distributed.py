"""Two DDP processes (gloo on the CPU) through `accelerate launch` end with identical parameters
and identical optimizer state, for every optimizer (one launch trains the recipes in turn)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
RECIPES = {"short_microadam": "MicroAdam", "short_ldadam": "LDAdam", "short_dct_adamw": "DCTAdamW",
           "short_dash": "DASH", "short_sparse_mfac": "SparseMFAC"}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One ``accelerate launch`` of 2 processes that trains every recipe of ``RECIPES``; each
    rank's results per recipe."""
    out = tmp_path_factory.mktemp("ddp")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(ASSETS / "ddp_train.py"), *(str(ASSETS / f"{name}.yaml") for name in RECIPES), str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    # Results of the recipes that finished are checked even when a later one failed.
    results = {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in range(2)]
               for name in RECIPES if all((out / f"{name}.rank{r}.pt").exists() for r in range(2))}
    return run, results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_two_ranks_end_identical(ddp_runs, name):
    run, results = ddp_runs
    assert name in results, f"exit code {run.returncode}:\n{run.stderr[-4000:]}"
    ranks = results[name]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert all(r["optimizer"] == RECIPES[name] for r in ranks)
    assert ranks[0]["state_bytes"] == ranks[1]["state_bytes"] > 0
    assert torch.equal(ranks[0]["initial"], ranks[1]["initial"])
    moved = (ranks[0]["final"] - ranks[0]["initial"]).abs().max().item()
    assert moved > 1e-3  # training happened
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
    # The optimizer state too (LDAdam's basis and error, DCT-AdamW's indices and 4-bit error, DASH's
    # stacked L, R and their roots ...).
    assert ranks[0]["ranks"] == ranks[1]["ranks"]
    if name in ("short_ldadam", "short_dct_adamw"):
        assert set(ranks[0]["ranks"]) == {4, None}
        low_rank_key = {"short_ldadam": "error", "short_dct_adamw": "error_codes"}[name]
        n_low_rank = {"short_ldadam": 15, "short_dct_adamw": 8}[name]  # all-linear / attention only
        assert sum(low_rank_key in s for s in ranks[0]["state"].values()) == n_low_rank
    if name == "short_sparse_mfac":  # one global window: the Gram lives in the first parameter's state only
        assert sum("gram" in s for s in ranks[0]["state"].values()) == 1
        assert all(s["indices"].dtype == torch.int32 for s in ranks[0]["state"].values())
    if name == "short_dash":  # every matrix stacked (embedding, 14 projections, lm_head); norms on AdamW
        assert sum("L_root" in s for s in ranks[0]["state"].values()) == 16
    states = [r["state"] for r in ranks]
    assert states[0].keys() == states[1].keys() and len(states[0]) > 0
    for pid in states[0]:
        assert states[0][pid].keys() == states[1][pid].keys()
        for key, value in states[0][pid].items():
            other = states[1][pid][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (pid, key)


@pytest.mark.slow
def test_launch_succeeded(ddp_runs):
    run, results = ddp_runs
    assert run.returncode == 0, run.stderr[-4000:]
    assert set(results) == set(RECIPES)
