"""The embedded corpus and the tiny model configs: everything a recipe, test or benchmark needs
without the Hugging Face hub.

The corpus is source code that ships with Python itself (the standard library), tokenised as
bytes (vocabulary 256), cut into fixed-length blocks and split into train / eval with a fixed seed.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

VOCAB_SIZE = 256  # byte-level tokens


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(source: str) -> list[Path]:
    """Python files of one part of the standard library, in a fixed order.

    ``source`` is ``"stdlib"`` (the top-level modules) or a standard-library package name
    (``"email"``, ``"json"``, ``"asyncio"`` ...: its files, recursively, tests excluded).
    """
    root = stdlib_dir()
    if source == "stdlib":
        files = sorted(root.glob("*.py"))
    else:
        package = root / source
        if not package.is_dir():
            raise ValueError(f"source={source!r}: no such standard-library package under {root}")
        files = sorted(p for p in package.rglob("*.py") if "test" not in p.relative_to(package).parts[0])
    if not files:
        raise ValueError(f"source={source!r}: no Python files found under {root}")
    return files


def read_corpus(source: str = "stdlib", max_bytes: int | None = None) -> bytes:
    """The concatenated bytes of ``source`` (files joined by a blank line), cut at ``max_bytes``."""
    chunks, total = [], 0
    for path in source_files(source):
        data = path.read_bytes() + b"\n\n"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def load_corpus(source: str = "stdlib", block_size: int = 128, max_bytes: int | None = 2_000_000,
                eval_fraction: float = 0.05, seed: int = 0) -> datasets.DatasetDict:
    """Byte-level causal-LM blocks of ``source`` as a ``DatasetDict`` with ``train`` and ``eval``.

    Each row has ``input_ids`` and ``labels`` (the same list: the model shifts them).
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size!r} is invalid: expected an integer >= 2")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction!r} is invalid: expected a number in (0, 1)")
    data = read_corpus(source, max_bytes)
    n_blocks = len(data) // block_size
    if n_blocks < 2:
        raise ValueError(f"source={source!r} yields {n_blocks} block(s) of {block_size} bytes; need 2")
    blocks = np.frombuffer(data, dtype=np.uint8, count=n_blocks * block_size).reshape(n_blocks, block_size)
    blocks = blocks[np.random.default_rng(seed).permutation(n_blocks)].astype(np.int64)
    n_eval = max(1, int(n_blocks * eval_fraction))

    def as_dataset(rows: np.ndarray) -> datasets.Dataset:
        # Arrow fixed-size lists straight from numpy: ~50x faster than from_dict of Python lists.
        column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), block_size)
        return datasets.Dataset(pa.table({"input_ids": column, "labels": column}))

    return datasets.DatasetDict(train=as_dataset(blocks[n_eval:]), eval=as_dataset(blocks[:n_eval]))


MODEL_SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads)
    "nano": (32, 64, 2, 2, 1),
    "tiny": (128, 352, 4, 4, 2),
    "small": (256, 704, 6, 8, 4),
}


def tiny_llama_config(size: str = "tiny", max_position_embeddings: int = 1024):
    """A ``LlamaConfig`` for the byte vocabulary, built locally (no hub)."""
    from transformers import LlamaConfig

    if size not in MODEL_SIZES:
        raise ValueError(f"size={size!r} is invalid: expected one of {sorted(MODEL_SIZES)}")
    hidden, intermediate, layers, heads, kv_heads = MODEL_SIZES[size]
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def tiny_llama(size: str = "tiny", seed: int = 0, **config_overrides):
    """A freshly initialised tiny ``LlamaForCausalLM`` (deterministic for a given seed)."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(size)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
