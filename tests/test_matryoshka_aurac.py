"""AURAC: the function on curves with known areas, and the callback in a real Trainer run."""
import math

import numpy as np
import pytest
import torch
from peft import get_peft_model
from PIL import Image
from transformers import Trainer, TrainingArguments

from hf_ista import MatryoshkaLoraConfig
from hf_ista.callbacks import AURACCallback, aurac
from hf_ista.data import load_corpus, tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def test_aurac_constant_linear_and_hand_trapezoids():
    ranks = [1, 2, 4, 8]
    for axis in ("log2", "linear"):
        assert aurac(ranks, [3.0] * 4, axis) == pytest.approx(3.0)
        assert aurac([4], [0.7], axis) == 0.7  # one rank: its value
    # linear in rank on the linear axis: the mean of the end points
    assert aurac(ranks, [2 * r + 1 for r in ranks], "linear") == pytest.approx((3 + 17) / 2)
    # linear in log2(rank) on the log2 axis: the mean of the end points
    assert aurac(ranks, [math.log2(r) for r in ranks], "log2") == pytest.approx(1.5)
    # by hand, values 4, 2, 1, 1 at ranks 1, 2, 4, 8:
    # linear: (1*(4+2)/2 + 2*(2+1)/2 + 4*(1+1)/2) / 7 = (3 + 3 + 4) / 7
    assert aurac(ranks, [4, 2, 1, 1], "linear") == pytest.approx(10 / 7)
    # log2 (x = 0, 1, 2, 3): ((4+2)/2 + (2+1)/2 + (1+1)/2) / 3 = 5.5 / 3
    assert aurac(ranks, [4, 2, 1, 1], "log2") == pytest.approx(5.5 / 3)


def test_aurac_bad_input():
    for args, match in [(([1, 2], [1.0]), "equal length"), (([2, 1], [1, 1]), "strictly increasing"),
                        (([0, 1], [1, 1]), "strictly increasing"), (([1, 2], [1, 1], "log"), "axis='log'")]:
        with pytest.raises(ValueError, match=match):
            aurac(*args)
    with pytest.raises(ValueError, match="needs compute_metrics"):
        AURACCallback([1, 2], metric="accuracy")


def _accuracy(pred):
    """Next-byte accuracy (the model shifts labels by one)."""
    guess = pred.predictions[:, :-1].argmax(-1)
    return {"accuracy": float(np.mean(guess == pred.label_ids[:, 1:]))}


def test_callback_logs_every_rank_and_aurac_and_restores_the_rank(tmp_path):
    data = load_corpus("json", block_size=32, max_bytes=12_000, eval_fraction=0.03, seed=0)
    eval_set = data["eval"].select(range(8))
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama("nano", seed=0, max_position_embeddings=32),
                           MatryoshkaLoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ranks = [1, 2, 4, 8]
    callback = AURACCallback(ranks, axis="log2", compute_metrics=_accuracy)
    args = TrainingArguments(
        str(tmp_path), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=5e-2, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        metric_for_best_model="aurac", greater_is_better=False, load_best_model_at_end=True,
        logging_steps=2, report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=eval_set,
                      callbacks=[callback])
    trainer.train()

    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        losses = [h[f"eval_rank{r}_loss"] for r in ranks]
        assert h["eval_aurac"] == pytest.approx(aurac(ranks, losses, "log2"))
        assert all(0 <= h[f"eval_rank{r}_accuracy"] <= 1 for r in ranks)
        # serving r (serve_rule 'truncate') is the training forward the Trainer's own eval_loss ran;
        # the lower ranks are other models
        assert h["eval_rank8_loss"] == pytest.approx(h["eval_loss"], rel=1e-6)
        assert all(abs(h["eval_loss"] - v) > 1e-4 for v in losses[:3])
    # metric_for_best_model="aurac" picked the lowest AURAC
    assert trainer.state.best_metric == pytest.approx(min(h["eval_aurac"] for h in evals))

    # the model is back at its training rank, and the per-rank losses match a loop written here
    assert model.get_rank() is None
    metrics = trainer.evaluate()
    assert model.get_rank() is None
    model.eval()
    for r in (1, 8):
        model.set_rank(r)
        with torch.no_grad():
            batches = [eval_set[i:i + 4] for i in (0, 4)]
            want = np.mean([float(model(input_ids=torch.tensor(b["input_ids"]),
                                        labels=torch.tensor(b["labels"])).loss) for b in batches])
        assert metrics[f"eval_rank{r}_loss"] == pytest.approx(want, rel=1e-6)
    model.set_rank(None)
    with torch.no_grad():
        at_training_rank = np.mean([float(model(input_ids=torch.tensor(b["input_ids"]),
                                                labels=torch.tensor(b["labels"])).loss) for b in batches])
    assert metrics["eval_loss"] == pytest.approx(at_training_rank, rel=1e-6)

    width, height = Image.open(tmp_path / "rank_metric.png").size
    assert width > 300 and height > 200
    assert [h["step"] for h in callback.history] == [2, 4]  # the evaluate() after training replaced step 4
