"""The recipe runner behind the README's main job: table, loss curve, model card."""
import json

import pytest
import torch
import yaml
from PIL import Image

from hf_ista import train

SHORT = {
    "model_size": "nano", "corpus": "json", "block_size": 64, "max_bytes": 40_000,
    "optim": "microadam", "optim_args": "m=4,density=0.05", "learning_rate": 0.01,
    "max_steps": 6, "per_device_train_batch_size": 4, "logging_steps": 2, "eval_strategy": "steps",
    "eval_steps": 3, "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0,
}


def test_recipe_with_baseline_writes_table_plot_and_card(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**SHORT, "output_dir": str(tmp_path / "out"),
                                      "hf_ista": {"baselines": [{"optim": "adamw_torch", "learning_rate": 0.003}]}}))
    results = train.main([str(recipe)])
    assert [r["optim"] for r in results] == ["microadam", "adamw_torch"]
    assert [r["steps"] for r in results] == [6, 6]
    assert results[1]["learning_rate"] == 0.003 and results[1]["output_dir"].endswith("baseline-adamw_torch")
    # AdamW keeps two fp32 moments (+ a 4-byte step per tensor); MicroAdam about a byte at density 5 %.
    assert 8.0 <= results[1]["state_bytes_per_param"] < 8.1
    assert results[0]["state_bytes_per_param"] < 2.0

    table = capsys.readouterr().out
    for r in results:
        assert f"{r['eval_loss']:.4f}" in table and f"{r['state_bytes_per_param']:.3f}" in table

    out = tmp_path / "out"
    width, height = Image.open(out / "loss_curve.png").size
    assert width > 300 and height > 200
    card = (out / "README.md").read_text()
    assert "**`microadam`**" in card and "| m | `4` |" in card and "| density | `0.05` |" in card
    assert f"{results[0]['state_bytes']:,} bytes" in card
    assert "accelerate launch --config_file recipes/accelerate/cpu.yaml -m hf_ista.train" in card  # one process
    assert "## Communication" not in card and "MB sent" not in table
    assert json.loads((out / "results.json").read_text())[1]["optim"] == "adamw_torch"


def test_recipe_errors_name_the_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**SHORT, "output_dir": str(tmp_path), "hf_ista": {"callback": []}}))
    with pytest.raises(ValueError, match="unknown keys in the hf_ista block: \\['callback'\\]"):
        train.load_recipe(recipe)
    recipe.write_text(yaml.safe_dump({**SHORT, "output_dir": str(tmp_path), "model_sise": "nano"}))
    with pytest.raises(ValueError, match="model_sise"):
        train.load_recipe(recipe)


def test_recipe_numbers_and_checks(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = yaml.safe_dump({**SHORT, "output_dir": str(tmp_path)}).replace("learning_rate: 0.01", "learning_rate: 3e-4")
    recipe.write_text(text)
    _, args, _ = train.load_recipe(recipe)
    assert args.learning_rate == 3e-4  # YAML 1.1 alone would give the string '3e-4'
    recipe.write_text(text.replace("m=4,density=0.05", "m=4,density=2"))
    with pytest.raises(ValueError, match="density='2' is out of range"):
        train.load_recipe(recipe)


def test_recipe_seed_sets_the_initial_weights():
    recipe = train.RecipeArguments(model_size="nano", block_size=64)
    w0, w0_again, w1 = (next(train.build_model(recipe, s).parameters()) for s in (0, 0, 1))
    assert torch.equal(w0, w0_again) and not torch.equal(w0, w1)


def test_adapter_recipe_prints_and_cards_the_rank_metric_table(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    block = {"adapter": {"type": "matryoshka_lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
             "callbacks": [{"aurac": {"ranks": [1, 2, 4], "axis": "linear"}}]}
    recipe.write_text(yaml.safe_dump({**SHORT, "optim": "adamw_torch", "optim_args": "", "max_steps": 2,
                                      "output_dir": str(tmp_path / "out"), "hf_ista": block}))
    result = train.main([str(recipe)])[0]
    printed = capsys.readouterr().out
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Rank–metric table" in card and "linear rank axis" in card
    for r in (1, 2, 4):
        value = f"{result['rank_metrics'][r]['loss']:.4f}"
        assert f"| {r} | {value} |" in card and value in printed
    assert f"**{result['aurac']:.4f}**" in card and f"AURAC: {result['aurac']:.4f}" in printed
    assert (tmp_path / "out" / "rank_metric.png").exists()


def test_hf_ista_block_errors_name_the_entry(tmp_path):
    recipe = tmp_path / "bad.yaml"
    for block, match in [({"callbacks": [{"auracc": {}}]}, "unknown callback 'auracc'; accepted: \\['aurac'"),
                         ({"callbacks": {"aurac": {}}}, "must be a list"),
                         ({"adapter": {"type": "lora"}}, "type one of \\['matryoshka_lora'\\]"),
                         ({"adapter": {"type": "matryoshka_lora", "r": 0}}, "r=0 is invalid")]:
        recipe.write_text(yaml.safe_dump({**SHORT, "output_dir": str(tmp_path), "hf_ista": block}))
        with pytest.raises(ValueError, match=match):
            train.load_recipe(recipe)
