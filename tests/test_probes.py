"""Solution probes: each measurement against a closed form or a planted answer, the callback in a real
Trainer, and ``hf-ista compare``."""
import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_ista import cli
from hf_ista.callbacks import SolutionProbesCallback
from hf_ista.data import load_corpus, tiny_llama
from hf_ista.probes import (activation_stats, matrix_spectrum, probe_activations, probe_compressibility,
                            quantize_rtn, run_probes, top_hessian_eigenvalue)
from hf_ista.probes.activations import RunningStats
from hf_ista.probes.compressibility import magnitude_prune

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib", block_size=32, max_bytes=60_000, eval_fraction=0.1, seed=0)


# ---------------------------------------------------------------- activations

def test_kurtosis_of_known_distributions():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(1_000_000, 1, generator=g, dtype=torch.float64)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1_000_000, 1)).double()
    # standard errors: sqrt(24/n) = 0.005 (Gaussian), about sqrt(2500/n) = 0.05 (Laplace)
    assert activation_stats(gaussian)["kurtosis"] == pytest.approx(3.0, abs=0.03)
    assert activation_stats(laplace + 5.0)["kurtosis"] == pytest.approx(6.0, abs=0.3)  # shift-invariant


def test_max_over_rms_closed_form():
    x = torch.tensor([[3.0, -4.0], [0.0, 0.0]])  # RMS sqrt(25/4) = 2.5
    assert activation_stats(x)["max_over_rms"] == pytest.approx(4.0 / 2.5, rel=1e-12)


def planted(tokens=4096, features=64, outliers=(3, 17, 40, 41), value=50.0):
    x = torch.randn(tokens, features, generator=torch.Generator().manual_seed(1))
    for j in outliers:
        x[j * 7:j * 7 + 10, j] = value  # ten tokens per outlier feature
    return x


def test_outlier_fraction_equals_planted_fraction():
    assert activation_stats(planted())["outlier_fraction"] == 4 / 64
    assert activation_stats(planted(outliers=()))["outlier_fraction"] == 0.0


def test_streamed_statistics_equal_one_pass_and_hooks_see_block_outputs():
    x = planted()
    whole = activation_stats(x)
    streamed = RunningStats()
    for chunk in x.split(1000):
        streamed.update(chunk)
    assert streamed.result() == pytest.approx(whole, rel=1e-9)

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Identity(), nn.Identity()])

        def forward(self, hidden):
            return self.layers[1](self.layers[0](hidden))

    batches = [{"hidden": chunk.view(8, -1, 64)} for chunk in x.split(1024)]
    result = probe_activations(Blocks(), batches)
    assert set(result) == {"layers.0", "layers.1"}
    assert result["layers.0"] == pytest.approx(whole, rel=1e-9)


# ---------------------------------------------------------------- spectra

def test_stable_and_effective_rank_of_known_singular_values():
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=torch.float64))
    weight = u @ torch.diag(s) @ v.T
    p = [x / 11.5 for x in (5.0, 3.0, 2.0, 1.0, 0.5)]
    result = matrix_spectrum(weight)
    assert result["stable_rank"] == pytest.approx((25 + 9 + 4 + 1 + 0.25) / 25, rel=1e-9)
    assert result["effective_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-9)
    assert matrix_spectrum(torch.eye(6))["effective_rank"] == pytest.approx(6.0, rel=1e-9)


# ---------------------------------------------------------------- sharpness

def test_top_hessian_eigenvalue_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([10.0, 4.0, 3.0, 2.0] + [1.0] * 8 + [-1.0] * 8, dtype=torch.float64)
    a = (q @ torch.diag(eigenvalues) @ q.T).float()
    b = torch.randn(20, generator=g)
    first, second = torch.zeros(12, requires_grad=True), torch.ones(8, requires_grad=True)  # two tensors

    def loss():
        x = torch.cat([first, second])
        return 0.5 * x @ a @ x + b @ x

    result = top_hessian_eigenvalue(loss, [first, second], iterations=100, tol=1e-7)
    assert result["top_eigenvalue"] == pytest.approx(10.0, rel=1e-3)
    assert result["iterations"] < 100


def test_top_hessian_eigenvalue_when_a_negative_one_is_larger():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([-12.0, 5.0, 2.0] + [0.5] * 7 + [-0.5] * 6, dtype=torch.float64)
    a = (q @ torch.diag(eigenvalues) @ q.T).float()
    x = torch.zeros(16, requires_grad=True)
    result = top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iterations=200, tol=1e-8)
    assert result["largest_magnitude_eigenvalue"] == pytest.approx(-12.0, rel=1e-3)
    assert result["top_eigenvalue"] == pytest.approx(5.0, rel=1e-3)


# ---------------------------------------------------------------- compressibility

def test_quantize_and_prune_closed_forms():
    w = torch.tensor([[1.0, 0.6, -0.26, 0.01], [0.0, -2.0, 1.2, 0.1]])
    # 4 bits: qmax 7, scales 1/7 and 2/7: w / scale = [7, 4.2, -1.82, 0.07], [0, -7, 4.2, 0.35]
    expected = torch.tensor([[7, 4, -2, 0], [0, -7, 4, 0]]) * torch.tensor([[1 / 7], [2 / 7]])
    assert torch.allclose(quantize_rtn(w, 4), expected, atol=1e-7)
    assert torch.equal(magnitude_prune(w) == 0, torch.tensor([[False, False, True, True], [True, False, False, True]]))


def test_compressibility_restores_model_and_int4_hurts_more(corpus):
    model = tiny_llama("nano", max_position_embeddings=32)
    rows = torch.tensor(corpus["train"]["input_ids"][:16 * 100]).view(100, 16, 32)  # 100 steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for batch in rows:
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    eval_rows = torch.tensor(corpus["eval"]["input_ids"][:64])
    batches = [{"input_ids": r, "labels": r} for r in eval_rows.split(16)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = probe_compressibility(model, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # measured here: INT8 +0.0002, INT4 +0.0048
    assert result["int4_loss_increase"] >= result["int8_loss_increase"]
    assert result["prune50_loss_increase"] > 0
    # the INT8 loss, recomputed on an independently quantised copy
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                scale = module.weight.abs().amax(1, keepdim=True) / 127
                module.weight.copy_((module.weight / scale).round().clamp(-127, 127) * scale)
        expected = sum(float(reference(**b).loss) for b in batches) / len(batches)
    assert result["int8_loss"] == pytest.approx(expected, rel=1e-6)


def test_recipe_name_builds_the_callback():
    from hf_ista import train

    (callback,) = train.build_callbacks([{"solution_probes": {"num_batches": 3, "when": "train_end"}}])
    assert isinstance(callback, SolutionProbesCallback)
    assert (callback.num_batches, callback.when) == (3, "train_end")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="probes="):
        SolutionProbesCallback(probes=["activations", "curvature"])
    with pytest.raises(ValueError, match="num_batches="):
        SolutionProbesCallback(num_batches=0)
    with pytest.raises(ValueError, match="when="):
        SolutionProbesCallback(when="save")
    with pytest.raises(ValueError, match="num_batches="):
        run_probes(nn.Linear(2, 2), [], num_batches=0)


# ---------------------------------------------------------------- the callback and the CLI

def test_callback_logs_summary_and_writes_json(tmp_path, corpus):
    eval_set = corpus["eval"].select(range(16))  # exactly two eval batches of 8
    args = TrainingArguments(str(tmp_path), max_steps=6, eval_strategy="steps", eval_steps=3, learning_rate=1e-2,
                             per_device_train_batch_size=8, per_device_eval_batch_size=8, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    probes = SolutionProbesCallback(num_batches=2, power_iterations=3, sharpness_batches=1)
    trainer = Trainer(model=tiny_llama("nano", max_position_embeddings=32), args=args, train_dataset=corpus["train"],
                      eval_dataset=eval_set, callbacks=[probes])
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    logged = [h for h in trainer.state.log_history if "probes/loss" in h]
    assert [h["step"] for h in logged] == [3, 6] == [h["step"] for h in evals]
    for probe_row, eval_row in zip(logged, evals):  # the probes' loss is the Trainer's eval loss
        assert probe_row["probes/loss"] == pytest.approx(eval_row["eval_loss"], rel=1e-5)
        for key in ("activation_kurtosis_mean", "outlier_fraction_mean", "stable_rank_mean", "int8_loss_increase",
                    "int4_loss_increase", "prune50_loss_increase", "hessian_top_eigenvalue"):
            assert math.isfinite(probe_row[f"probes/{key}"])
        assert "probes/activations/model.layers.1/kurtosis" in probe_row
    written = json.loads((tmp_path / "solution_probes.json").read_text())
    assert written["step"] == 6 and [h["step"] for h in written["history"]] == [3, 6]
    assert written["summary"]["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert set(written["activations"]) == {"model.layers.0", "model.layers.1"}
    assert len(written["spectra"]) == 2 * 7  # q k v o gate up down per block
    assert "## Solution probes" in probes.model_card_section()


def fake_result(outliers, stable, int4):
    return {"summary": {"outlier_fraction_mean": outliers, "stable_rank_mean": stable, "int4_loss_increase": int4},
            "activations": {"model.layers.0": {"kurtosis": 3.0, "max_over_rms": 4.0, "outlier_fraction": outliers}},
            "spectra": {"model.layers.0.q_proj": {"stable_rank": stable, "effective_rank": 9.0}},
            "compressibility": {"loss": 2.0, "int8_loss_increase": 0.001, "int4_loss_increase": int4,
                                "prune50_loss_increase": 0.3}}


def test_compare_prints_both_runs_and_writes_png(tmp_path, capsys):
    for name, values in (("run_a", (0.125, 7.25, 0.0421)), ("run_b", (0.0625, 3.5, 0.0173))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "solution_probes.json").write_text(json.dumps(fake_result(*values)))
    plot = tmp_path / "cmp.png"
    cli.main(["compare", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--plot", str(plot)])
    out = capsys.readouterr().out
    header, _, *rows = out.splitlines()
    assert header.split()[1:] == ["run_a", "run_b"]
    table = {row.split()[0]: row.split()[1:] for row in rows[:3]}
    assert table["outlier_fraction_mean"] == ["0.125", "0.0625"]
    assert table["stable_rank_mean"] == ["7.25", "3.5"]
    assert table["int4_loss_increase"] == ["0.0421", "0.0173"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
