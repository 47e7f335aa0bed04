"""Training through a format (apply_format) and ScalingLawCallback in a real Trainer."""
import json

import pytest
import torch
from torch import nn

from hf_ista.data import tiny_llama
from hf_ista.scaling import Int, Sparse, SparseInt, apply_format, remove_format

pytestmark = pytest.mark.usefixtures("single_thread")


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def test_int4_forward_weights_on_grid_and_trust_region_gradients():
    model = tiny_llama("nano")
    changed = apply_format(model, Int(4))
    assert len(changed) == 2 * 7  # q k v o gate up down per layer, lm_head excluded
    lin = _linears(model)["model.layers.0.mlp.up_proj"]
    latent = lin.parametrizations.weight.original
    w = lin.weight
    assert max(len(torch.unique(row)) for row in w) <= 16
    # the grid is linspace(-a, a, 16), a = clip * RMS(row): reconstruct it independently
    a = Int(4).clip * latent.pow(2).mean(-1, keepdim=True).sqrt()
    grid = torch.linspace(-1, 1, 16).view(1, -1) * a
    expected = grid.gather(1, (latent.unsqueeze(-1) - grid.unsqueeze(1)).abs().argmin(-1))
    assert torch.allclose(w, expected, atol=1e-6)
    # gradient reaches the latent weights, zeroed outside the clip range
    x = torch.randn(5, lin.in_features)
    g_out = torch.randn(5, lin.out_features)
    (lin(x) * g_out).sum().backward()
    dense_grad = g_out.T @ x  # d/dW of sum(g_out * (x W^T))
    inside = latent.abs() <= a
    assert (~inside).any() and inside.any()
    assert torch.allclose(latent.grad, dense_grad * inside, atol=1e-5)
    remove_format(model)
    assert torch.equal(_linears(model)["model.layers.0.mlp.up_proj"].weight.detach(), w.detach())


def test_sparse_exact_density_mask_recomputed_and_rbbm():
    model = tiny_llama("nano")
    apply_format(model, Sparse(0.5), targets=["up_proj"])
    lin = _linears(model)["model.layers.0.mlp.up_proj"]
    latent = lin.parametrizations.weight.original
    assert int((lin.weight != 0).sum()) == latent.numel() // 2
    assert torch.all((lin.weight != 0).sum(-1) == lin.in_features // 2)
    x = torch.randn(3, lin.in_features)
    lin(x).sum().backward()
    assert torch.allclose(latent.grad, torch.ones(3, lin.out_features).T @ x)  # plain STE: dense gradient
    with torch.no_grad():  # mask follows the latent weights at the next forward
        latent[0] = torch.arange(lin.in_features, dtype=latent.dtype)
    assert torch.equal(lin.weight[0] != 0, torch.arange(lin.in_features) >= lin.in_features // 2)

    model = tiny_llama("nano")
    apply_format(model, Sparse(0.5), targets=["up_proj"], rbbm=0.1)
    lin = _linears(model)["model.layers.0.mlp.up_proj"]
    latent = lin.parametrizations.weight.original
    lin(x).sum().backward()
    t_p = latent.pow(2).mean().sqrt() * 0.2533471  # Phi^-1(0.6)
    allowed = (lin.weight != 0) | (latent.abs() < t_p)
    assert torch.allclose(latent.grad, (torch.ones(3, lin.out_features).T @ x) * allowed)
    assert (~allowed).sum() > 0


def test_sparse_int_forward_weights():
    model = tiny_llama("nano")
    apply_format(model, SparseInt(0.5, 2), targets=r"mlp\.down_proj")
    w = _linears(model)["model.layers.1.mlp.down_proj"].weight
    assert torch.all((w != 0).sum(-1) <= w.shape[1] // 2)
    assert max(len(torch.unique(r[r != 0])) for r in w) <= 4


def test_callback_writes_one_record_per_run_and_torn_store_loads(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_ista.callbacks import ScalingLawCallback
    from hf_ista.callbacks.scaling_law import append_record, load_runs
    from hf_ista.data import load_corpus

    corpus = load_corpus("stdlib", block_size=32, max_bytes=40_000, eval_fraction=0.1, seed=0)
    store = tmp_path / "runs.jsonl"
    for fmt in ("dense", "int4"):
        model = tiny_llama("nano", max_position_embeddings=32)
        if fmt != "dense":
            apply_format(model, fmt)
        args = TrainingArguments(str(tmp_path / fmt), max_steps=6, learning_rate=1e-2, per_device_train_batch_size=4,
                                 per_device_eval_batch_size=16, eval_strategy="steps", eval_steps=6, report_to="none",
                                 use_cpu=True, disable_tqdm=True, save_strategy="no", seed=3)
        trainer = Trainer(model=model, args=args, train_dataset=corpus["train"], eval_dataset=corpus["eval"],
                          callbacks=[ScalingLawCallback(store=str(store), run=fmt)])
        trainer.train()
        final = trainer.evaluate()["eval_loss"]
    records = load_runs(store)
    assert [r["run"] for r in records] == ["dense", "int4"]
    nano = tiny_llama("nano")
    expected_n = sum(p.numel() for n, p in nano.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    assert all(r["N"] == expected_n for r in records)
    assert all(r["D"] == 6 * 4 * 32 for r in records)  # steps x batch x sequence length
    assert records[0]["gmse"] == 0.0 and records[1]["gmse"] == pytest.approx(0.01154, rel=1e-3)
    assert records[1]["format"] == {"name": "Int", "bits": 4, "group_size": None}
    assert records[1]["loss"] == pytest.approx(final, rel=1e-5)  # the Trainer's own final eval loss
    assert records[0]["seed"] == 3 and records[0]["config_hash"] != records[1]["config_hash"]

    # a crash mid-write leaves a torn last line: it is skipped, and the next append cuts it off
    with open(store, "ab") as f:
        f.write(b'{"N": 12, "D": 3')
    with pytest.warns(UserWarning, match="torn"):
        assert len(load_runs(store)) == 2
    append_record(store, {"N": 1, "D": 2, "loss": 3.0, "format": "dense"})
    assert [r["N"] for r in load_runs(store)] == [expected_n, expected_n, 1]
    store.write_text("{bad\n" + store.read_text())  # a corrupt line that is not the last one is an error
    with pytest.raises(ValueError, match="line 1"):
        load_runs(store)


def test_recipe_callbacks_table_builds_scaling_law(tmp_path):
    from hf_ista.callbacks import ScalingLawCallback
    from hf_ista.train import build_callbacks

    (cb,) = build_callbacks([{"scaling_law": {"store": str(tmp_path / "r.jsonl"), "format": "int2"}}])
    assert isinstance(cb, ScalingLawCallback) and cb.format == Int(2)


def test_recipe_trains_through_the_format_and_records_the_run(tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM

    from hf_ista import train
    from hf_ista.callbacks.scaling_law import load_runs

    raw = yaml.safe_load(open(train.Path(__file__).parents[1] / "recipes" / "scaling" / "int4.yaml"))
    store = tmp_path / "runs.jsonl"
    raw.update(model_size="nano", corpus="json", block_size=32, max_bytes=40_000, max_steps=4, eval_steps=4,
               per_device_train_batch_size=4, logging_steps=2, output_dir=str(tmp_path / "out"), disable_tqdm=True)
    raw["hf_ista"]["callbacks"] = [{"scaling_law": {"store": str(store)}}]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = train.main([str(recipe)])[0]
    (record,) = load_runs(store)
    assert record["format"] == Int(4).to_dict() and record["D"] == 4 * 4 * 32
    assert record["loss"] == pytest.approx(result["eval_loss"], rel=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a plain model, INT4 weights baked in
    w = saved.model.layers[0].mlp.up_proj.weight
    assert max(len(torch.unique(row)) for row in w) <= 16
    with pytest.raises(ValueError, match="train_format"):
        train.train_format_spec({"fmt": "int4"})
