"""ScalingLawCallback: one JSON line per finished training run, the data ``hf_ista.scaling.fit_law``
(and ``hf-ista scaling fit``) fits the compressed-format scaling law to.

At ``on_train_end`` (main process only) it appends to ``store``:
``N`` (non-embedding parameters: every parameter but those of ``nn.Embedding`` modules and of the
output embedding, a latent weight counted once), ``D`` (tokens seen: ``state.num_input_tokens_seen``
when the Trainer counts them, else steps × global batch × sequence length of the first training
batch), ``format`` (its spec), ``gmse``, ``loss`` (the last ``eval_loss`` of the log history: let the
Trainer evaluate at the end, e.g. ``eval_strategy="steps"`` with ``eval_steps`` = ``max_steps``),
``seed``, ``config_hash`` (sha256 of the training arguments, model config and format) and ``run``.

The store stays readable after a crash: each record is one ``write`` of a full line followed by
flush + fsync, a torn tail left by an earlier crash is cut off before appending, and
:func:`load_runs` skips a torn last line.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional

from torch import nn
from transformers import TrainerCallback

from ..scaling.formats import Dense, parse_format


def non_embedding_params(model: nn.Module) -> int:
    skip = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, nn.Embedding) or module is out_emb:
            skip.update(id(p) for p in module.parameters())
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def append_record(store, record: dict) -> None:
    path = Path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(max(0, size - 1))
            if f.read(1) != b"\n":  # a torn line from a crash: cut back to the last full line
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def load_runs(store) -> list[dict]:
    """The records of a store; a torn (unterminated or undecodable) last line is skipped with a
    warning, an undecodable line elsewhere is an error."""
    lines = Path(store).read_bytes().split(b"\n")
    torn_tail = lines[-1] != b""
    lines = lines[:-1] if not torn_tail else lines
    records = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        last = i == len(lines) - 1
        if last and torn_tail:
            warnings.warn(f"{store}: skipped a torn last line ({len(raw)} bytes)")
            continue
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as err:
            if last:
                warnings.warn(f"{store}: skipped an undecodable last line")
                continue
            raise ValueError(f"{store}: line {i + 1} is not JSON ({err})") from None
    return records


class ScalingLawCallback(TrainerCallback):
    """Appends one run record to ``store`` at the end of training (see the module docstring).

    Args:
        store: the JSON-lines file.
        format: the format the model trains in (a Format or spec string, e.g. ``"int4"``); default:
            the one ``hf_ista.scaling.apply_format`` recorded on the model, else dense.
        run: a free-form name kept in the record.
    """

    def __init__(self, store: str = "runs.jsonl", format=None, run: Optional[str] = None):
        self.store, self.run = store, run
        self.format = parse_format(format) if format is not None else None
        self.record: Optional[dict] = None

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            return
        fmt = self.format or getattr(model, "hf_ista_format", None) or Dense()
        tokens = int(state.num_input_tokens_seen or 0)
        if not tokens:
            seq = None
            if train_dataloader is not None:
                batch = next(iter(train_dataloader))
                seq = batch["input_ids"].shape[-1]
            if seq is None:
                raise ValueError("ScalingLawCallback: cannot count tokens (no train_dataloader); "
                                 "set include_num_input_tokens_seen=True")
            tokens = state.global_step * args.train_batch_size * args.gradient_accumulation_steps \
                * args.world_size * seq
        evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
        if not evals:
            raise ValueError("ScalingLawCallback: no eval_loss in the log history; evaluate at the end of training")
        config = getattr(model, "config", None)
        blob = json.dumps({"args": args.to_dict(), "model": config.to_dict() if config is not None else None,
                           "format": fmt.to_dict()}, sort_keys=True, default=str)
        self.record = {
            "N": non_embedding_params(model), "D": tokens, "format": fmt.to_dict(), "format_label": fmt.label,
            "gmse": fmt.gmse(), "loss": float(evals[-1]), "seed": args.seed, "steps": state.global_step,
            "config_hash": hashlib.sha256(blob.encode()).hexdigest()[:16], "run": self.run,
        }
        if state.is_world_process_zero:
            append_record(self.store, self.record)
