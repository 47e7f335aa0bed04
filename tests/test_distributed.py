"""Two DDP processes (gloo on the CPU) through `accelerate launch` end with identical parameters."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"


@pytest.mark.slow
def test_two_ranks_end_identical(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(ASSETS / "ddp_train.py"), str(ASSETS / "short_microadam.yaml"), str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert all(r["optimizer"] == "MicroAdam" for r in ranks)
    assert ranks[0]["state_bytes"] == ranks[1]["state_bytes"] > 0
    assert torch.equal(ranks[0]["initial"], ranks[1]["initial"])
    moved = (ranks[0]["final"] - ranks[0]["initial"]).abs().max().item()
    assert moved > 1e-3  # training happened
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
