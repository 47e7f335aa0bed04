"""Every shipped recipe parses, and each method's quickstart runs (shrunk to a few nano steps)."""
from pathlib import Path

import pytest

from hf_ista import train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
SHRINK = {"model_size": "nano", "corpus": "json", "block_size": 64, "max_bytes": 40_000, "max_steps": 4,
          "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16, "eval_steps": 2,
          "logging_steps": 1, "disable_tqdm": True,
          # four steps must move the loss: no warm-up, and one lr for every method
          "warmup_steps": 0, "learning_rate": 1e-2}

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_method_recipes_exist():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"quickstart.yaml", "ldadam/quickstart.yaml", "dct_adamw/quickstart.yaml", "dash/quickstart.yaml",
            "iobs/quickstart.yaml", "sparse_mfac/quickstart.yaml", "lordo/quickstart.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_parses_with_checked_optim_args(path):
    recipe, args, block = train.load_recipe(path)
    assert recipe.model_size in ("nano", "tiny", "small") and args.max_steps > 0
    for baseline in block.get("baselines", []):
        overrides = {k: v for k, v in baseline.items() if k != "label"}  # label: the name of its table row
        train.load_recipe(path, {**overrides, "hf_ista": None})


@pytest.mark.parametrize("method, hypers", [
    ("ldadam", {"rank": 16, "optim_target_modules": "all-linear"}),
    ("dct_adamw", {"rank": 16, "optim_target_modules": "all-linear"}),
    ("dash", {"inv_root": "ndb", "precond_freq": 10, "block_size": 1024, "eps": 1e-6}),
    ("sparse_mfac", {"m": 32, "density": 0.01, "damp": 1e-6}),
    ("lordo", {"rank": 16, "sync_every": 16, "omega": 0.5, "clip": 1.0, "error_feedback": "none",
               "optim_target_modules": "all-linear"}),
])
def test_method_quickstart_trains(method, hypers, tmp_path):
    recipe, args, _ = train.load_recipe(ROOT / "recipes" / method / "quickstart.yaml",
                                        {**SHRINK, "output_dir": str(tmp_path)})
    result = train.run(recipe, args)
    assert result["optim"] == method and result["steps"] == 4
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]  # lr and the method's step move the loss down
    assert {k: result["hyperparameters"][k] for k in hypers} == hypers


def test_matryoshka_lora_quickstart_parses_and_trains(tmp_path):
    path = ROOT / "recipes" / "matryoshka_lora" / "quickstart.yaml"
    recipe, args, block = train.load_recipe(path)
    assert block["adapter"]["type"] == "matryoshka_lora" and block["adapter"]["r"] == 16
    assert train.build_callbacks(block["callbacks"])[0].ranks == [1, 2, 4, 8, 16]
    # shrunk: a fresh nano base (no out/quickstart needed), a rank-4 adapter, 4 steps
    small = {**block, "adapter": {**block["adapter"], "r": 4}, "callbacks": [{"aurac": {"ranks": [1, 2, 4]}}]}
    recipe, args, _ = train.load_recipe(path, {**SHRINK, "init_from": None, "output_dir": str(tmp_path)})
    result = train.run(recipe, args, small)
    assert result["steps"] == 4 and sorted(result["rank_metrics"]) == [1, 2, 4]
    losses = [result["rank_metrics"][r]["loss"] for r in (1, 2, 4)]
    assert result["aurac"] == pytest.approx(((losses[0] + losses[1]) / 2 + (losses[1] + losses[2]) / 2) / 2)
    # only the adapter trains: r * (in + out) per adapted layer; nano: hidden 32, MLP 64, kv width 16
    per_layer = sum(4 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert result["params"] == 2 * per_layer
