"""The Triton kernels compile for a real GPU (sm_90 cubin, no GPU needed), with the numerics the
torch twins assume: IEEE division and square root, no fused multiply-add, no atomics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def facts():
    """One compile run for every kernel family (the script takes ~20 s)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "assets" / "compile_kernels.py"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("this triton wheel ships no ptxas")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _exact(family: dict) -> None:
    assert all(f["cubin_bytes"] > 1000 for f in family.values())
    ops = {op for f in family.values() for op in f["ops"]}
    assert not any(op.startswith(("fma", "atom")) or ".approx" in op for op in ops), ops


def test_microadam_kernels_compile_for_sm90(facts):
    family = facts["microadam"]
    assert len(family) == 5
    assert set(family) == set(facts["defined"]["microadam"])
    _exact(family)
    assert "div.rn.f32" in family["_dequant_add_kernel"]["ops"]
    assert {"div.rn.f32", "sqrt.rn.f32"} <= set(family["_window_update_kernel"]["ops"])


def test_lowrank_kernels_compile_for_sm90(facts):
    family = facts["lowrank"]
    # every Triton kernel of the module is compiled (the quantiser and its inverse for both widths)
    assert {key.split("[")[0] for key in family} == set(facts["defined"]["lowrank"])
    assert len(family) == 6
    _exact(family)
    assert {"div.rn.f32", "sqrt.rn.f32"} <= set(family["_subspace_adam_kernel"]["ops"])
    for bits in ("8bit", "4bit"):
        assert "div.rn.f32" in family[f"_quantize_kernel[{bits}]"]["ops"]


def test_dash_kernels_compile_for_sm90(facts):
    family = facts["dash"]
    assert set(family) == set(facts["defined"]["dash"]) == {"_symmetric_ema_kernel", "_graft_moments_kernel"}
    assert all(f["cubin_bytes"] > 1000 for f in family.values())
    _exact({"graft": family["_graft_moments_kernel"]})
    assert {"div.rn.f32", "sqrt.rn.f32"} <= set(family["_graft_moments_kernel"]["ops"])
    # The EMA's tiles are a fp32 matmul (IEEE products, fma accumulation, as cuBLAS's fp32 GEMM);
    # still no atomics and no approximate division.
    ops = set(family["_symmetric_ema_kernel"]["ops"])
    assert not any(op.startswith("atom") or ".approx" in op for op in ops), ops


def test_matryoshka_lora_kernels_compile_for_sm90(facts):
    family = facts["matryoshka_lora"]
    assert {key.split("[")[0] for key in family} == set(facts["defined"]["matryoshka_lora"])
    assert len(family) == 6 and all(f["cubin_bytes"] > 1000 for f in family.values())
    for key, f in family.items():
        tensor_core = any(op.startswith(("mma", "wgmma")) for op in f["ops"])
        # bf16 tiles go to the tensor cores; fp32 stays IEEE fp32 (FMA), never TF32, like the torch twin
        assert tensor_core == key.endswith("[bf16]"), (key, f["ops"])
        assert not any(op.startswith("atom") for op in f["ops"])


def test_pruning_kernels_compile_for_sm90(facts):
    family = facts["pruning"]
    assert {key.split("[")[0] for key in family} == set(facts["defined"]["pruning"])
    assert len(family) == 5
    _exact(family)
    for key in ("_select_rows_kernel[saliency]", "_select_nm_kernel[2:4]", "_obs_sweep_kernel[unstructured]",
                "_obs_sweep_kernel[2:4]"):
        assert "div.rn.f32" in family[key]["ops"], key


def test_efcp_kernels_compile_for_sm90(facts):
    family = facts["efcp"]
    assert set(family) == set(facts["defined"]["efcp"]) == {"_compress_kernel", "_row_dots_kernel",
                                                            "_combine_rows_kernel"}
    # no atomics (deterministic Gᵀ·w), no fma, no approximate division
    _exact(family)


def test_scaling_kernels_compile_for_sm90(facts):
    family = facts["scaling"]
    assert set(family) == set(facts["defined"]["scaling"]) == {"_fake_quant_kernel", "_topk_mask_kernel"}
    _exact(family)
    assert "div.rn.f32" in family["_fake_quant_kernel"]["ops"]  # u = x / s, idx / half: IEEE division
