"""`optim="ldadam"` and `optim="dct_adamw"` through the Trainer: the param groups that
`optim_target_modules` chooses, the `optim_args` checks, checkpoint resume, gradient accumulation,
a short training run and the exact size of the optimizer state."""
import math
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_ista
from hf_ista.data import tiny_llama
from hf_ista.integrations import transformers as hf_integration
from hf_ista.kernels import lowrank as K
from hf_ista.optim import DCTAdamW, LDAdam
from hf_ista.optim._lowrank import QUANT_BLOCK
from hf_ista.optim._lowrank import oriented
from trainer_helpers import assert_resumed_equal, corpus, training_args  # noqa: F401  (corpus: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

DCT_ARGS = "rank=16,error_feedback=4bit,rotate_moments=true,update_proj_gap=5,fft=off"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _groups_by_name(model, optimizer):
    """``{parameter name: its group}`` (each parameter in exactly one group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = group
    assert set(out) == set(names.values())
    return out


def _expected_target(name, modules):
    """Whether parameter ``name`` of the nano Llama is the weight of one of ``modules``."""
    return name.endswith(".weight") and name.split(".")[-2] in modules


# --------------------------------------------------------------------------------------------
# 1. The optimizer the Trainer builds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optim, optim_args, cls, extra", [
    ("ldadam", "rank=16,rho=0.908", LDAdam, {"rho": 0.908}),
    ("dct_adamw", DCT_ARGS, DCTAdamW,
     {"error_feedback": "4bit", "rotate_moments": True, "update_proj_gap": 5, "fft": "off"}),
])
def test_trainer_builds_low_rank_groups(tmp_path, optim, optim_args, cls, extra):
    args = training_args(tmp_path, optim=optim, optim_args=optim_args, optim_target_modules="all-linear",
                 learning_rate=2e-3, weight_decay=0.1)
    model = tiny_llama("nano")
    trainer = Trainer(model=model, args=args)
    opt = trainer.create_optimizer()
    assert type(opt) is cls
    assert args.to_dict()["optim"] == optim
    by_name = _groups_by_name(model, opt)
    for name, group in by_name.items():
        for key, value in extra.items():
            assert group[key] == value, (name, key)
        assert group["lr"] == 2e-3 and group["betas"] == (0.9, 0.999)
        if _expected_target(name, LINEAR + ("lm_head",)):  # all-linear: lm_head is an nn.Linear too
            assert group["rank"] == 16 and group["weight_decay"] == 0.1, name
        elif name.endswith("norm.weight"):
            assert group["rank"] is None and group["weight_decay"] == 0.0, name
        else:
            assert name == "model.embed_tokens.weight"
            assert group["rank"] is None and group["weight_decay"] == 0.1
    assert sum(g["rank"] == 16 for g in opt.param_groups) == 1
    assert len(opt.param_groups) == 3

    # One step. Inside the optimizer, a targeted matrix whose shorter side is not above the rank
    # (k/v_proj are 16 x 32) is AdamW: a full-rank "subspace" would only cost more.
    model(input_ids=torch.arange(16)[None], labels=torch.arange(16)[None]).loss.backward()
    opt.step()
    low_rank = 0
    for name, p in model.named_parameters():
        state = opt.state[p]
        n, N = oriented(p).shape if p.ndim == 2 else (0, 0)
        if by_name[name]["rank"] is None or n <= 16:
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, name
            continue
        low_rank += 1
        assert state["exp_avg"].shape == (16, N), name
        if cls is LDAdam:
            assert state["basis"].shape == (n, 16)
        else:
            assert state["indices"].shape == (16,)
    assert low_rank == 11  # q, o, gate, up, down of 2 layers (hidden 32) and lm_head (256 x 32)
    assert {g["rank"] for g in opt.param_groups} == {16, None}


@pytest.mark.parametrize("optim", ["ldadam", "dct_adamw"])
@pytest.mark.parametrize("targets, modules", [
    (["q_proj", "v_proj"], ("q_proj", "v_proj")),
    (["self_attn"], ("q_proj", "k_proj", "v_proj", "o_proj")),  # a list entry matches as a substring
    (r".*\.mlp\.(gate|up)_proj", ("gate_proj", "up_proj")),
    (None, LINEAR + ("lm_head",)),  # unset: every nn.Linear (where GaLore would refuse)
    ("all_linear", LINEAR + ("lm_head",)),
])
def test_target_modules_choose_the_rank_group(tmp_path, optim, targets, modules):
    args = training_args(tmp_path, optim=optim, optim_args="rank=4", optim_target_modules=targets, weight_decay=0.1)
    model = tiny_llama("nano")
    opt = Trainer(model=model, args=args).create_optimizer()
    by_name = _groups_by_name(model, opt)
    chosen = {n for n, g in by_name.items() if g["rank"] is not None}
    assert chosen == {n for n in by_name if _expected_target(n, modules)}
    assert all(by_name[n]["rank"] == 4 for n in chosen)
    # Non-targets are AdamW, with the Trainer's weight-decay rule.
    for name, group in by_name.items():
        if name not in chosen:
            assert group["rank"] is None
            assert group["weight_decay"] == (0.0 if "norm" in name else 0.1), name


@pytest.mark.parametrize("targets", ["nothing_here", ["embed_tokens"], ["no_such_proj"]])
def test_target_matching_no_linear_is_refused(tmp_path, targets):
    args = training_args(tmp_path, optim="ldadam", optim_target_modules=targets)
    with pytest.raises(ValueError, match="matches no trainable nn.Linear weight"):
        Trainer(model=tiny_llama("nano"), args=args).create_optimizer()


@pytest.mark.parametrize("optim, optim_args, words", [
    ("ldadam", "rank=0", ["rank='0'", ">= 1"]),
    ("ldadam", "rho=1.0", ["rho='1.0'", "[0, 1)"]),
    ("ldadam", "update_proj_gap=3", ["unknown key 'update_proj_gap'", "'ldadam'", "rho"]),
    ("dct_adamw", "rank=0", ["rank='0'", ">= 1"]),
    ("dct_adamw", "error_feedback=2bit", ["error_feedback='2bit'", "none, fp32, 8bit, 4bit"]),
    ("dct_adamw", "rotate_moments=maybe", ["rotate_moments='maybe'", "true or false"]),
    ("dct_adamw", "fft=fast", ["fft='fast'", "auto, on, off"]),
    ("dct_adamw", "rho=0.5", ["unknown key 'rho'", "'dct_adamw'", "update_proj_gap"]),
])
def test_bad_optim_args_name_the_key(tmp_path, optim, optim_args, words):
    args = training_args(tmp_path, optim=optim, optim_args=optim_args)
    with pytest.raises(ValueError) as err:
        Trainer(model=tiny_llama("nano"), args=args).create_optimizer()
    for word in words:
        assert word in str(err.value)


def test_command_line(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    # HfArgumentParser reads optim_target_modules as one string (a regex, fully matched against the
    # module's dotted name), never a list, so the command line takes a regex.
    (cli,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--optim", "ldadam", "--optim_args", "rank=8,rho=0.5",
        "--optim_target_modules", r".*\.(q|v)_proj", "--use_cpu", "true", "--report_to", "none"])
    assert cli.optim == OptimizerNames("ldadam") and cli.to_dict()["optim"] == "ldadam"
    assert cli.optim_target_modules == r".*\.(q|v)_proj"
    kwargs = hf_integration.optimizer_kwargs("ldadam", cli)
    assert (kwargs["rank"], kwargs["rho"]) == (8, 0.5)
    model = tiny_llama("nano")
    opt = Trainer(model=model, args=cli).create_optimizer()
    assert type(opt) is LDAdam
    chosen = {n for n, g in _groups_by_name(model, opt).items() if g["rank"] == 8}
    assert chosen == {f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}

    # A bare module name from the command line is a regex that matches no full name: refused loudly.
    (bare,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "ldadam", "--optim_target_modules", "q_proj"])
    assert bare.optim_target_modules == "q_proj"
    with pytest.raises(ValueError, match="optim_target_modules='q_proj' matches no trainable nn.Linear"):
        Trainer(model=tiny_llama("nano"), args=bare).create_optimizer()

    (dct,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "dct_adamw", "--optim_args", DCT_ARGS])
    assert dct.optim == OptimizerNames("dct_adamw") and dct.optim_target_modules is None
    assert hf_integration.optimizer_kwargs("dct_adamw", dct)["error_feedback"] == "4bit"


# --------------------------------------------------------------------------------------------
# 2. Checkpoint resume
# --------------------------------------------------------------------------------------------


def _train(tmp_path, corpus, out_name, optim, optim_args, resume=None, max_steps=8, **kw):
    args = training_args(tmp_path, output_dir=str(tmp_path / out_name), optim=optim, learning_rate=1e-2,
                 optim_args=optim_args, max_steps=max_steps, logging_steps=1,
                 save_strategy="steps", save_steps=4, lr_scheduler_type="linear", **kw)
    trainer = Trainer(model=tiny_llama("nano"), args=args, train_dataset=corpus["train"])
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return trainer, losses


@pytest.mark.parametrize("optim, optim_args, saved_keys", [
    ("ldadam", "rank=4,rho=0.908", {"basis", "exp_avg", "exp_avg_sq", "error"}),
    # update_proj_gap=3: the basis is chosen at steps 1, 3, 6; the checkpoint is at step 4, so
    # steps 4 and 5 of the resumed run must use the indices chosen at step 3 and saved.
    ("dct_adamw", "rank=4,error_feedback=8bit,rotate_moments=true,update_proj_gap=3,fft=off",
     {"indices", "exp_avg", "exp_avg_sq", "error_codes", "error_scales"}),
    ("dct_adamw", "rank=4,error_feedback=4bit,rotate_moments=true,update_proj_gap=3,fft=on",
     {"indices", "exp_avg", "exp_avg_sq", "error_codes", "error_scales"}),
])
def test_resume_from_checkpoint_gives_identical_losses(tmp_path, corpus, optim, optim_args, saved_keys):
    full, full_losses = _train(tmp_path, corpus, "full", optim, optim_args)
    checkpoint = Path(full.args.output_dir) / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    key_sets = {frozenset(k for k, v in s.items() if torch.is_tensor(v)) for s in saved["state"].values()}
    assert key_sets == {frozenset(saved_keys), frozenset({"exp_avg", "exp_avg_sq"})}
    dtypes = {v.dtype for s in saved["state"].values() for v in s.values() if torch.is_tensor(v)}
    if optim == "dct_adamw":
        assert dtypes == {torch.int64, torch.float32, torch.uint8}
    resumed, resumed_losses = _train(tmp_path, corpus, "full", optim, optim_args, resume=str(checkpoint))
    # log_history of steps 1-4 comes back from the checkpoint; steps 5-8 were trained again.
    assert sorted(resumed_losses) == sorted(full_losses) == list(range(1, 9))
    assert [resumed_losses[s] for s in range(5, 9)] == [full_losses[s] for s in range(5, 9)]
    assert len(set(full_losses.values())) > 4  # the losses do move, so equality is not vacuous
    assert_resumed_equal(full, resumed, steps=8)


# --------------------------------------------------------------------------------------------
# 3. LDAdam's error under gradient accumulation
# --------------------------------------------------------------------------------------------


def test_ldadam_error_survives_gradient_accumulation(tmp_path, corpus):
    common = dict(optim="ldadam", optim_args="rank=4", learning_rate=1e-2, max_steps=6, logging_steps=1,
                  save_strategy="no")
    runs = {}
    for ga, batch in ((2, 4), (1, 8)):
        args = training_args(tmp_path, output_dir=str(tmp_path / f"ga{ga}"), gradient_accumulation_steps=ga,
                     per_device_train_batch_size=batch, **common)
        trainer = Trainer(model=tiny_llama("nano"), args=args, train_dataset=corpus["train"])
        trainer.train()
        runs[ga] = trainer

    opt, model = runs[2].optimizer, runs[2].model
    errors = {n: opt.state[p]["error"] for n, p in model.named_parameters() if "error" in opt.state[p]}
    assert len(errors) == 15  # 14 projections + lm_head
    for name, error in errors.items():
        assert torch.isfinite(error).all() and error.abs().max() > 0, name
        assert opt.state[dict(model.named_parameters())[name]]["step"] == 6
    # p.grad is the Trainer's (zeroed after each step), the error stays in the optimizer.
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())

    # The model takes `num_items_in_batch`, so with accumulation each micro-batch's loss is its token
    # sum over the tokens of the whole batch of 8: the accumulated gradient is the batch-of-8 mean
    # gradient, equal up to float rounding (summation order). Same data in the same order (the
    # sampler's permutation does not depend on the batch size). Not bit-identical: Adam-like updates
    # normalise the gradient and LDAdam's SVD / QR carry the rounding on (measured: losses within
    # 1e-6, parameters within 5e-7 after 6 steps), hence the tolerances.
    losses = {ga: [h["loss"] for h in t.state.log_history if "loss" in h] for ga, t in runs.items()}
    assert len(losses[1]) == len(losses[2]) == 6
    assert losses[2] == pytest.approx(losses[1], abs=1e-5, rel=0)
    assert losses[1][-1] < losses[1][0] - 0.2
    for (name, a), b in zip(runs[1].model.named_parameters(), runs[2].model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)
    # ... and so is the error (it would be a micro-batch's, or twice too large, if accumulation touched it).
    errors_ga1 = {n: runs[1].optimizer.state[p]["error"] for n, p in runs[1].model.named_parameters()
                  if "error" in runs[1].optimizer.state[p]}
    assert errors_ga1.keys() == errors.keys()
    for name, error in errors.items():
        torch.testing.assert_close(error, errors_ga1[name], atol=1e-4, rtol=1e-3, msg=name)


# --------------------------------------------------------------------------------------------
# 4. Training lowers the eval loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optim, optim_args", [
    ("ldadam", "rank=8"),
    ("dct_adamw", "rank=8,error_feedback=4bit,update_proj_gap=5,rotate_moments=true"),
])
def test_short_training_lowers_eval_loss(tmp_path, corpus, optim, optim_args):
    args = training_args(tmp_path, optim=optim, optim_args=optim_args, learning_rate=1e-2, max_steps=30,
                 per_device_train_batch_size=8, per_device_eval_batch_size=32, save_strategy="no",
                 logging_steps=10, warmup_steps=3)
    trainer = Trainer(model=tiny_llama("nano"), args=args, train_dataset=corpus["train"],
                      eval_dataset=corpus["eval"])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert before == pytest.approx(math.log(256), abs=0.1)  # the fresh model is near uniform over bytes
    # Measured: 5.567 -> 4.02 (ldadam), 4.23 (dct_adamw); AdamW at the same settings reaches 3.26.
    assert after < before - 1.0 and after < 4.5, (before, after)


# --------------------------------------------------------------------------------------------
# 5. The exact size of the state
# --------------------------------------------------------------------------------------------


def _expected_state_bytes(model, optim, rank, error_feedback="none"):
    total, low_rank_total, low_rank_params = 0, 0, 0
    for name, p in model.named_parameters():
        if not _expected_target(name, LINEAR + ("lm_head",)):
            total += 2 * 4 * p.numel()  # AdamW: two fp32 moments (the step is a Python int)
            continue
        n, N = oriented(p).shape
        r = min(rank, n)
        nbytes = 2 * 4 * r * N  # fp32 moments in the subspace
        if optim == "ldadam":
            nbytes += 4 * n * r + 4 * n * N  # fp32 basis, the error in the parameter's dtype
        else:
            nbytes += 8 * r  # int64 indices
            if error_feedback == "fp32":
                nbytes += 4 * n * N
            elif error_feedback != "none":
                bits = 8 if error_feedback == "8bit" else 4
                nbytes += K.code_bytes(n * N, bits, QUANT_BLOCK) + 2 * 4 * K.n_blocks(n * N, QUANT_BLOCK)
        total += nbytes
        low_rank_total += nbytes
        low_rank_params += p.numel()
    return total, low_rank_total, low_rank_params


@pytest.mark.parametrize("optim, optim_args", [
    ("ldadam", "rank=4"),
    ("dct_adamw", "rank=4"),  # the default error feedback: 4bit
    ("dct_adamw", "rank=4,error_feedback=none"),
    ("dct_adamw", "rank=4,error_feedback=8bit"),
    ("dct_adamw", "rank=4,error_feedback=fp32"),
])
def test_state_bytes_exact(tmp_path, corpus, optim, optim_args):
    args = training_args(tmp_path, optim=optim, optim_args=optim_args, learning_rate=1e-3, max_steps=2, save_strategy="no")
    model = tiny_llama("nano")
    trainer = Trainer(model=model, args=args, train_dataset=corpus["train"])
    trainer.train()
    error_feedback = dict(kv.split("=") for kv in optim_args.split(",")).get("error_feedback", "4bit")
    total, low_rank_total, low_rank_params = _expected_state_bytes(model, optim, 4, error_feedback)
    assert hf_ista.state_bytes(trainer.optimizer) == total  # through accelerate's wrapper
    assert hf_ista.state_bytes(trainer.optimizer.optimizer) == total
    per_param = low_rank_total / low_rank_params
    if optim == "dct_adamw" and error_feedback in ("none", "4bit"):
        assert per_param < 8 / 4  # under a quarter of AdamW's 8 bytes per parameter
    if optim == "ldadam":
        assert per_param < 8  # the fp32 error alone is 4 bytes per parameter
    adamw = 8 * sum(p.numel() for p in model.parameters())
    assert total < adamw
