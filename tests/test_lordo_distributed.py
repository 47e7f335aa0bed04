"""LoRDO on two gloo processes through `accelerate launch` and the plain Trainer: no per-step
all-reduce, bitwise agreement right after every synchronisation, the byte counter, and a
resume mid-interval (with gradient accumulation) that reproduces every rank's losses; and the
low-rank DDP mode it is measured against (the quickstart comparison is test_lordo_convergence.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lordo")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           str(ASSETS / "lordo_train.py"), str(ASSETS / "short_lordo.yaml"), str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


pytestmark = pytest.mark.slow


def test_two_ranks_ran_with_local_gradients(ranks):
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    for r in ranks:  # the Trainer wrapped the model in DDP, and DDP was told to send nothing
        assert r["first"]["ddp"] == "DistributedDataParallel" and r["first"]["local_gradients"]
    # the two ranks saw different batches
    assert ranks[0]["first"]["losses"] != ranks[1]["first"]["losses"]


def test_parameters_differ_between_syncs_and_agree_bitwise_after(ranks):
    a, b = (r["first"] for r in ranks)
    K = a["sync_every"]
    assert [s["step"] for s in a["steps"]] == list(range(1, a["max_steps"] + 1))
    for sa, sb in zip(a["steps"], b["steps"]):
        synced = sa["step"] % K == 0
        assert sa["local_steps"] == sb["local_steps"] == sa["step"] % K
        if synced:
            assert torch.equal(sa["params"], sb["params"]), sa["step"]
        else:  # had DDP all-reduced the gradients, the ranks would still agree here
            assert (sa["params"] - sb["params"]).abs().max() > 1e-4, sa["step"]
    assert torch.equal(a["final"], b["final"])


def test_the_projection_is_shared(ranks):
    a, b = (r["first"] for r in ranks)
    n_low_rank = len(a["low_rank_shapes"])
    assert n_low_rank == 15  # every nn.Linear of the nano Llama (7 per layer, 2 layers, and lm_head)
    for sa, sb in zip(a["steps"], b["steps"]):
        assert len(sa["bases"]) == n_low_rank
        assert all(torch.equal(x, y) for x, y in zip(sa["bases"], sb["bases"])), sa["step"]
    # and it changed at the synchronisations
    assert not torch.equal(a["steps"][0]["bases"][0], a["steps"][-1]["bases"][0])


def test_counter_is_the_bytes_passed_to_collectives_and_a_Kth_of_ddp(ranks):
    for r in ranks:
        run = r["first"]
        K, ddp = run["sync_every"], run["ddp_bytes_per_step"]
        metadata = sum(n * rank * 4 for n, rank in run["low_rank_shapes"])  # one fp32 basis each
        counted = [s["bytes_communicated"] for s in run["steps"]]
        assert counted == [s["bytes_seen"] for s in run["steps"]]
        assert counted[0] == metadata  # the first bases, broadcast by rank 0
        for i, step in enumerate(run["steps"]):
            sent = counted[i] - (counted[i - 1] if i else 0)
            expected = (ddp + metadata if step["step"] % K == 0 else 0) + (metadata if i == 0 else 0)
            assert sent == expected, step["step"]
        # one interval of K local steps against K steps of DDP's gradient all-reduce
        interval = counted[2 * K - 1] - counted[K - 1]
        assert interval / (K * ddp) == pytest.approx(1 / K * (1 + metadata / ddp))
        assert metadata / ddp < 0.05
        # and the Trainer's logs carry both figures
        logged = [h for h in run["log_history"] if "comm_bytes" in h]
        assert logged[-1]["comm_bytes"] == counted[-1]
        assert logged[-1]["ddp_comm_bytes"] == ddp * run["max_steps"]


def test_resume_mid_interval_gives_identical_losses_on_both_ranks(ranks):
    for r in ranks:
        first, resumed = r["first"], r["resumed"]
        assert first["save_steps"] % first["sync_every"]  # the checkpoint is mid-interval
        n = len(resumed["losses"])
        # (max_steps - save_steps) steps of gradient_accumulation_steps micro-batches each
        assert n == (first["max_steps"] - first["save_steps"]) * 2
        assert resumed["losses"] == first["losses"][-n:]
        assert torch.equal(resumed["final"], first["final"])
        for sa, sb in zip(first["steps"][first["save_steps"]:], resumed["steps"]):
            assert sa["step"] == sb["step"] and torch.equal(sa["params"], sb["params"])
            assert sa["bytes_communicated"] == sb["bytes_communicated"]


def test_low_rank_ddp_mode_keeps_ranks_identical_and_sends_only_bases(ranks):
    a, b = (r["ddp"] for r in ranks)
    assert a["ddp"] == "DistributedDataParallel" and not a["local_gradients"]
    metadata = sum(n * rank * 4 for n, rank in a["low_rank_shapes"])
    for sa, sb in zip(a["steps"], b["steps"]):
        assert torch.equal(sa["params"], sb["params"]), sa["step"]  # DDP averaged every gradient
        assert all(torch.equal(x, y) for x, y in zip(sa["bases"], sb["bases"]))
        syncs = sa["step"] // a["sync_every"]
        assert sa["bytes_communicated"] == sa["bytes_seen"] == metadata * (1 + syncs)  # no pseudo-gradients
    logged = [h for h in a["log_history"] if "comm_bytes" in h][-1]
    assert logged["comm_bytes"] == a["ddp_bytes_per_step"] * a["max_steps"] + a["steps"][-1]["bytes_communicated"]
    # the same data and start as the LoRDO run, a different trajectory
    assert not torch.equal(a["final"], ranks[0]["first"]["final"])


def test_bf16_parameters_average_in_bf16(ranks):
    a, b = (r["bf16"] for r in ranks)
    K = a["sync_every"]
    assert a["final"].dtype == torch.bfloat16 and a["ddp_bytes_per_step"] * 2 == ranks[0]["first"]["ddp_bytes_per_step"]
    for sa, sb in zip(a["steps"], b["steps"]):
        assert torch.equal(sa["params"], sb["params"]) == (sa["step"] % K == 0), sa["step"]
    metadata = sum(n * rank * 4 for n, rank in a["low_rank_shapes"])  # the bases stay fp32
    counted = [s["bytes_communicated"] for s in a["steps"]]
    assert counted[2 * K - 1] - counted[K - 1] == a["ddp_bytes_per_step"] + metadata  # Δ in bf16: DDP's bytes
    assert torch.isfinite(a["final"].float()).all() and not torch.equal(a["final"], a["steps"][0]["params"])
