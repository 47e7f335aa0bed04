"""`optim="dash"` through the Trainer: typed optim_args, the command line, checkpoint resume in the
middle of a root interval, and a short run that lowers the eval loss."""
import math
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_ista
from hf_ista.data import tiny_llama
from hf_ista.integrations import transformers as hf_integration
from hf_ista.optim import DASH
from trainer_helpers import assert_resumed_equal, corpus, training_args  # noqa: F401  (corpus: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_trainer_builds_dash_with_typedtraining_args(tmp_path):
    args = training_args(tmp_path, optim="dash", learning_rate=2e-3, weight_decay=0.1,
                 optim_args="block_size=16,inv_root=cheby,precond_freq=5,scaling=fro,grafting=adam,"
                            "beta_lr=0.9,beta_g=0.8,beta_graft=0.99,eps=1e-3,graft_eps=1e-7,newton_steps=12,"
                            "cheby_degree=30,start_step=3,one_dim=shampoo")
    opt = Trainer(model=tiny_llama("nano"), args=args).create_optimizer()
    assert isinstance(opt, DASH)
    expected = dict(block_size=16, inv_root="cheby", precond_freq=5, scaling="fro", grafting="adam", beta_lr=0.9,
                    beta_g=0.8, beta_graft=0.99, eps=1e-3, graft_eps=1e-7, newton_steps=12, cheby_degree=30,
                    start_step=3, one_dim="shampoo", lr=2e-3)
    for group in opt.param_groups:
        assert {k: group[k] for k in expected} == expected
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.1]  # norms: no decay
    assert args.to_dict()["optim"] == "dash"


def test_defaults_are_the_documented_ones(tmp_path):
    opt = Trainer(model=tiny_llama("nano"), args=training_args(tmp_path, optim="dash")).create_optimizer()
    group = opt.param_groups[0]
    assert (group["block_size"], group["inv_root"], group["precond_freq"], group["scaling"], group["eps"]) == (
        1024, "ndb", 10, "power", 1e-6)


@pytest.mark.parametrize("optim_args, words", [
    ("inv_root=svd", ["inv_root='svd'", "ndb, cn, cheby, evd"]),
    ("block_size=1", ["block_size='1'", ">= 2"]),
    ("scaling=max", ["scaling='max'", "power, fro"]),
    ("rank=4", ["unknown key 'rank'", "inv_root"]),
    ("eps=0", ["eps='0'", "> 0"]),
])
def test_bad_optim_args_name_the_key(optim_args, words):
    with pytest.raises(ValueError) as err:
        hf_integration.parse_optim_args("dash", optim_args)
    for word in words:
        assert word in str(err.value)


def test_command_line(tmp_path):
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "dash", "--optim_args", "inv_root=evd,block_size=32"])
    assert args.optim == OptimizerNames("dash")
    assert hf_integration.optimizer_kwargs("dash", args) == {"lr": args.learning_rate, "inv_root": "evd",
                                                             "block_size": 32}


def _train(tmp_path, corpus, out_name, resume=None):
    args = training_args(tmp_path, output_dir=str(tmp_path / out_name), optim="dash", learning_rate=3e-3,
                 optim_args="block_size=16,precond_freq=3", max_steps=8, logging_steps=1,
                 save_strategy="steps", save_steps=4, lr_scheduler_type="linear")
    trainer = Trainer(model=tiny_llama("nano"), args=args, train_dataset=corpus["train"])
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return trainer, losses


def test_resume_from_checkpoint_gives_identical_losses(tmp_path, corpus):
    # Roots at steps 1, 4, 7: the checkpoint at step 4 holds the roots steps 5 and 6 must reuse.
    full, full_losses = _train(tmp_path, corpus, "full")
    checkpoint = Path(full.args.output_dir) / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    key_sets = {frozenset(k for k, v in s.items() if torch.is_tensor(v)) for s in saved["state"].values()}
    assert key_sets == {frozenset({"L", "R", "L_root", "R_root", "momentum", "graft"}),
                        frozenset({"exp_avg", "exp_avg_sq"})}
    resumed, resumed_losses = _train(tmp_path, corpus, "full", resume=str(checkpoint))
    assert sorted(resumed_losses) == sorted(full_losses) == list(range(1, 9))
    assert [resumed_losses[s] for s in range(5, 9)] == [full_losses[s] for s in range(5, 9)]
    assert len(set(full_losses.values())) > 4  # the losses do move, so equality is not vacuous
    assert_resumed_equal(full, resumed, steps=8)


def test_short_training_lowers_eval_loss(tmp_path, corpus):
    args = training_args(tmp_path, optim="dash", optim_args="block_size=64", learning_rate=3e-3, max_steps=30,
                 per_device_train_batch_size=8, per_device_eval_batch_size=32, save_strategy="no",
                 logging_steps=10, warmup_steps=3)
    trainer = Trainer(model=tiny_llama("nano"), args=args, train_dataset=corpus["train"], eval_dataset=corpus["eval"])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert before == pytest.approx(math.log(256), abs=0.1)
    assert after < before - 1.0 and after < 4.5, (before, after)


def test_state_bytes_through_the_trainer(tmp_path, corpus):
    model = tiny_llama("nano")
    trainer = Trainer(model=model, args=training_args(tmp_path, optim="dash", optim_args="block_size=16", max_steps=1,
                                              save_strategy="no"), train_dataset=corpus["train"])
    trainer.train()
    expected = 0
    for p in model.parameters():
        if p.ndim == 1:
            expected += 8 * p.numel()
        else:
            blocks = math.ceil(p.shape[0] / 16) * math.ceil(p.shape[1] / 16)
            expected += 4 * blocks * 6 * 16 * 16  # L, R, roots, momentum, graft: 16x16 fp32 each
    assert hf_ista.state_bytes(trainer.optimizer) == expected
