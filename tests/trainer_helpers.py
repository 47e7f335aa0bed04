"""What the optimizers' Trainer tests share: their TrainingArguments, a small corpus, and the check
that a run resumed from a checkpoint ends exactly where the uninterrupted run did."""
import pytest
import torch
from transformers import TrainingArguments

from hf_ista.data import load_corpus


def training_args(tmp_path, **kw) -> TrainingArguments:
    """CPU, no reporting, batch 4, seeded; ``kw`` adds or overrides any field."""
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True,
                per_device_train_batch_size=4, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib", block_size=64, max_bytes=60_000, eval_fraction=0.1, seed=0)


def assert_resumed_equal(full, resumed, steps: int) -> None:
    """Two Trainers end with bitwise equal parameters and optimizer states (tensors of the same
    dtype, every step counter at ``steps``)."""
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    for p_full, p_resumed in zip(full.model.parameters(), resumed.model.parameters()):
        s_full, s_resumed = full.optimizer.state[p_full], resumed.optimizer.state[p_resumed]
        assert s_full.keys() == s_resumed.keys()
        for key in s_full:
            if torch.is_tensor(s_full[key]):
                assert s_full[key].dtype == s_resumed[key].dtype and torch.equal(s_full[key], s_resumed[key]), key
            else:
                assert s_full[key] == s_resumed[key] == steps, key
