"""`optim="microadam"` through every door transformers offers: TrainingArguments, the Trainer,
HfArgumentParser (command line and YAML), to_dict, training_args.bin, and checkpoint resume."""
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version
import torch
import transformers
from transformers import trainer_optimizer
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_ista
from hf_ista.data import load_corpus, tiny_llama
from hf_ista.integrations import transformers as hf_integration
from hf_ista.optim import MicroAdam


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True,
                per_device_train_batch_size=4, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def test_names_registered_once():
    hf_ista.integrations.register()
    hf_integration.register()  # a second registration must not add a second member
    values = [m.value for m in OptimizerNames]
    assert values.count("microadam") == 1
    assert OptimizerNames("microadam").value == "microadam"
    assert trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames("microadam")] is hf_integration._handler


def test_trainer_builds_microadam_with_typed_args(tmp_path):
    args = _args(tmp_path, optim="microadam", learning_rate=2e-3, weight_decay=0.1,
                 optim_args="m=5,density=0.02,quant_block_size=32,betas=0.8:0.99,values_dtype=fp32")
    trainer = Trainer(model=tiny_llama("nano"), args=args)
    opt = trainer.create_optimizer()
    assert isinstance(opt, MicroAdam)
    for group in opt.param_groups:
        assert (group["m"], group["density"], group["quant_block_size"]) == (5, 0.02, 32)
        assert group["betas"] == (0.8, 0.99) and group["lr"] == 2e-3 and group["values_dtype"] == "fp32"
    # The Trainer's decay / no-decay split reaches the optimizer: norms get no weight decay.
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.1]
    assert args.to_dict()["optim"] == "microadam"


def test_command_line_and_yaml(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (cli,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "microadam", "--optim_args", "m=4,density=0.05"])
    assert cli.optim == OptimizerNames("microadam") and cli.to_dict()["optim"] == "microadam"
    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path}\noptim: microadam\noptim_args: m=4,density=0.05\n")
    (from_yaml,) = parser.parse_yaml_file(str(yaml_file))
    assert from_yaml.optim == cli.optim and from_yaml.optim_args == "m=4,density=0.05"
    assert hf_integration.optimizer_kwargs("microadam", from_yaml)["m"] == 4


def test_training_args_bin_loads_after_import(tmp_path):
    path = tmp_path / "training_args.bin"
    torch.save(_args(tmp_path, optim="microadam", optim_args="m=3"), path)
    code = (f"import hf_ista, torch; a = torch.load({str(path)!r}, weights_only=False); "
            "print(a.optim.value, a.optim_args)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "microadam m=3"


@pytest.mark.parametrize("optim_args, words", [
    ("rank=3", ["unknown key 'rank'", "density"]),
    ("m=ten", ["m='ten'", "int"]),
    ("m=0", ["m='0'", ">= 1"]),
    ("density=1.5", ["density='1.5'", "(0, 1]"]),
    ("quant_block_size=7", ["quant_block_size='7'", "even"]),
    ("values_dtype=int8", ["values_dtype='int8'", "bf16"]),
    ("betas=0.9", ["betas='0.9'", "b1:b2"]),
    ("m", ["'m' is not key=value"]),
])
def test_bad_optim_args_name_the_key(optim_args, words):
    with pytest.raises(ValueError) as err:
        hf_integration.parse_optim_args("microadam", optim_args)
    for word in words:
        assert word in str(err.value)


def test_unknown_transformers_version_is_refused():
    with pytest.raises(ImportError, match=r"transformers >= 5\.20, < 6\.0; found 4\.40\.0"):
        hf_integration._check_version("4.40.0")
    assert hf_integration._check_version(transformers.__version__) == Version(transformers.__version__)


def _train(tmp_path, out_name, resume=None, max_steps=8):
    data = load_corpus("json", block_size=64, max_bytes=40_000)
    args = _args(tmp_path, output_dir=str(tmp_path / out_name), optim="microadam", learning_rate=1e-2,
                 optim_args="m=3,density=0.05", max_steps=max_steps, logging_steps=1,
                 save_strategy="steps", save_steps=4, lr_scheduler_type="linear")
    trainer = Trainer(model=tiny_llama("nano"), args=args, train_dataset=data["train"])
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return trainer, losses


def test_resume_from_checkpoint_gives_identical_losses(tmp_path):
    full, full_losses = _train(tmp_path, "full")
    checkpoint = Path(full.args.output_dir) / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {v.dtype for s in saved["state"].values() for v in s.values() if torch.is_tensor(v)} == {
        torch.int16, torch.bfloat16, torch.uint8}
    resumed, resumed_losses = _train(tmp_path, "full", resume=str(checkpoint))
    # log_history of steps 1-4 comes back from the checkpoint; steps 5-8 were trained again.
    assert sorted(resumed_losses) == sorted(full_losses) == list(range(1, 9))
    assert [resumed_losses[s] for s in range(5, 9)] == [full_losses[s] for s in range(5, 9)]
    assert len(set(full_losses.values())) > 4  # the losses do move, so equality is not vacuous
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
