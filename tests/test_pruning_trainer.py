"""Pruning through the stack: IOBSPruningCallback in a real Trainer, the recipe's `callbacks:` block,
and `hf-ista prune`."""
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_ista import cli, train
from hf_ista.callbacks import IOBSPruningCallback
from hf_ista.data import load_corpus, tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")

RECIPE = Path(__file__).parents[1] / "recipes" / "iobs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib", block_size=64, max_bytes=80_000, eval_fraction=0.1, seed=0)


def _targets(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


class KeepDense(TrainerCallback):
    """Runs before the pruning callback: a copy of the trained, still dense model."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = copy.deepcopy(model)


def test_callback_prunes_logs_and_saves(tmp_path, corpus):
    args = TrainingArguments(str(tmp_path / "out"), max_steps=30, learning_rate=1e-2, per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, report_to="none", use_cpu=True, disable_tqdm=True,
                             save_strategy="no", seed=0)
    dense = KeepDense()
    pruning = IOBSPruningCallback(sparsity=0.5, method="iobs", iterations=2, num_samples=32,
                                  eval_dataset=corpus["eval"], eval_after=True)
    trainer = Trainer(model=tiny_llama("nano", max_position_embeddings=64), args=args, train_dataset=corpus["train"],
                      eval_dataset=corpus["eval"], callbacks=[dense, pruning])
    trainer.train()
    metrics = pruning.metrics
    # before / after measured by the callback are the Trainer's own eval losses of the two models
    after = trainer.evaluate()["eval_loss"]
    before = Trainer(model=dense.model, args=args, eval_dataset=corpus["eval"]).evaluate()["eval_loss"]
    assert metrics["pruning_eval_loss_before"] == pytest.approx(before, rel=1e-5)
    assert metrics["pruning_eval_loss_after"] == pytest.approx(after, rel=1e-5)
    assert metrics["pruning_eval_loss_after"] > metrics["pruning_eval_loss_before"]
    assert metrics["pruning_perplexity_after"] == pytest.approx(torch.tensor(after).exp().item(), rel=1e-5)
    logged = [h for h in trainer.state.log_history if "pruning_eval_loss_after" in h]
    assert len(logged) == 1 and logged[0]["pruning_eval_loss_before"] == metrics["pruning_eval_loss_before"]

    saved = tmp_path / "out" / "pruned"
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    x = torch.tensor(corpus["eval"]["input_ids"][:4])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, trainer.model.eval()(input_ids=x).logits,
                                   rtol=0, atol=1e-6)
    for name, layer in _targets(reloaded).items():
        assert ((layer.weight == 0).sum(1) == layer.in_features // 2).all(), name
    card = (saved / "README.md").read_text()
    assert "## Pruning" in card and f"{metrics['pruning_eval_loss_after']:.4f}" in card
    for name in _targets(reloaded):
        assert f"| {name} |" in card


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        IOBSPruningCallback(method="sparsegpt")
    with pytest.raises(ValueError, match="pattern"):
        IOBSPruningCallback(pattern="2-4")
    with pytest.raises(ValueError, match="blocksize"):
        IOBSPruningCallback(blocksize=64)


def test_recipe_parses_and_a_shrunk_copy_trains_and_prunes(tmp_path):
    _, training_args, block = train.load_recipe(RECIPE)
    assert training_args.max_steps == 300
    assert block["callbacks"] == [("iobs_pruning", {"sparsity": 0.5, "method": "iobs", "pattern": "unstructured",
                                                    "iterations": 3, "num_samples": 128})]
    raw = yaml.safe_load(RECIPE.read_text())
    raw.update(model_size="nano", block_size=64, max_bytes=60_000, max_steps=12, eval_steps=6, logging_steps=6,
               output_dir=str(tmp_path / "run"), per_device_train_batch_size=8)
    raw["hf_ista"]["callbacks"][0]["iobs_pruning"].update(num_samples=16, iterations=2)
    shrunk = tmp_path / "shrunk.yaml"
    shrunk.write_text(yaml.safe_dump(raw))
    results = train.main([str(shrunk)])
    measured = results[0]["callbacks"]["iobs_pruning"]
    assert measured["pruning_sparsity"] == 0.5
    assert measured["pruning_eval_loss_after"] > measured["pruning_eval_loss_before"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())[0]["callbacks"]["iobs_pruning"] == measured
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "pruned")
    zeros = [float((m.weight == 0).float().mean()) for m in _targets(pruned).values()]
    assert zeros == [0.5] * 14
    card = (tmp_path / "run" / "README.md").read_text()  # the runner's card: the saved model is pruned
    assert "## Pruning" in card and "| model.layers.1.mlp.down_proj |" in card
    assert results[0]["eval_loss"] == pytest.approx(measured["pruning_eval_loss_after"], rel=1e-5)

    raw["hf_ista"]["callbacks"] = [{"no_such_callback": {}}]
    shrunk.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="no_such_callback"):
        train.load_recipe(shrunk)


def test_cli_prune(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama("nano", max_position_embeddings=64).save_pretrained(model_dir)
    text = tmp_path / "calibration.txt"
    text.write_bytes(Path(json.__file__).read_bytes())
    cli.main(["prune", str(model_dir), "--sparsity", "0.5", "--method", "obs", "--pattern", "2:4",
              "--calibration", str(text), "--num-samples", "8", "--seq-len", "32"])
    captured = capsys.readouterr()
    assert "obs pruning" in captured.err and "14/14" in captured.err  # the progress bar over layers
    out = tmp_path / "model-pruned"
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["num_samples"] == 8 and len(report["layers"]) == 14
    pruned = AutoModelForCausalLM.from_pretrained(out)
    for name, layer in _targets(pruned).items():
        assert ((layer.weight != 0).view(layer.out_features, -1, 4).sum(-1) <= 2).all(), name
    assert "model.layers.1.mlp.down_proj" in captured.out  # the printed table
