"""AURAC — the area under the rank–metric curve of a MatryoshkaLoRA adapter — as a plain function
and as a Trainer callback that measures it at every evaluation.

The callback evaluates the eval set once per listed rank (``set_rank``), then restores the rank the
model trained at. Each value is added to the evaluation's metrics as ``eval_rank{r}_loss`` (and
``eval_rank{r}_{name}`` for every ``compute_metrics`` value), plus ``eval_aurac`` (AURAC of
``metric``). Added to the metrics dict that ``Trainer.evaluate`` returns, they reach best-model
selection (``metric_for_best_model="aurac"``; AURAC of a loss is better when lower, so set
``greater_is_better=False``) and the evaluation's entry of ``state.log_history``. Inside
``evaluate()`` the metrics were already sent to the loggers (``report_to``) before callbacks run,
and a callback has no handle on the Trainer to log again: external loggers see them only from the
log history (the model card and ``hf_ista.train`` read it from there).

The passes run the model on ``eval_dataloader`` directly (calling ``trainer.evaluate()`` from
``on_evaluate`` would recurse); losses are averaged as the Trainer does (per-batch mean loss weighted
by batch size), summed over processes when ``torch.distributed`` runs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import EvalPrediction

from ..peft.matryoshka_lora.layer import matryoshka_layers, serving_rank

AXES = ("log2", "linear")


def aurac(ranks: Sequence[int], values: Sequence[float], axis: str = "log2") -> float:
    """Normalised area under the rank–metric curve: the trapezoid rule over ``ranks`` (``axis``
    ``"linear"``) or over ``log2(rank)`` (``"log2"``), divided by the axis span, so a constant curve
    gives its value. One rank gives its value."""
    if axis not in AXES:
        raise ValueError(f"axis={axis!r} is invalid: expected one of {AXES}")
    ranks, values = list(ranks), [float(v) for v in values]
    if not ranks or len(ranks) != len(values):
        raise ValueError(f"ranks and values must be non-empty and of equal length, got {len(ranks)} and {len(values)}")
    if any(r <= 0 for r in ranks) or any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise ValueError(f"ranks={ranks!r} is invalid: expected strictly increasing positive ranks")
    if len(ranks) == 1:
        return values[0]
    xs = [math.log2(r) for r in ranks] if axis == "log2" else [float(r) for r in ranks]
    area = sum((x1 - x0) * (v0 + v1) / 2 for x0, x1, v0, v1 in zip(xs, xs[1:], values, values[1:]))
    return area / (xs[-1] - xs[0])


class AURACCallback(TrainerCallback):
    """At each evaluation: the eval set at every rank of ``ranks``, ``eval_rank{r}_*`` and ``eval_aurac``,
    a rank–metric plot ``rank_metric.png`` in ``output_dir``; the model left at its training rank.

    Args:
        ranks: the ranks to evaluate, strictly increasing, each at most the adapter's ``r``.
        axis: ``log2`` (default) or ``linear``: the rank axis AURAC integrates over.
        metric: the curve AURAC integrates: ``loss`` (default) or a key of ``compute_metrics``' result.
        compute_metrics: as the Trainer's (``EvalPrediction`` -> dict); pass the same function to
            get its metrics per rank (a callback cannot reach the Trainer's).
    """

    def __init__(self, ranks: Sequence[int], axis: str = "log2", metric: str = "loss",
                 compute_metrics: Optional[Callable[[EvalPrediction], dict]] = None,
                 plot_name: str = "rank_metric.png"):
        ranks = list(ranks)
        aurac(ranks, [0.0] * len(ranks), axis)  # checks ranks and axis now, not at the first evaluation
        if any(not isinstance(r, int) or isinstance(r, bool) for r in ranks):
            raise ValueError(f"ranks={ranks!r} is invalid: expected integers")
        if metric != "loss" and compute_metrics is None:
            raise ValueError(f"metric={metric!r} needs compute_metrics (only 'loss' is measured without it)")
        self.ranks, self.axis, self.metric = ranks, axis, metric
        self.compute_metrics, self.plot_name = compute_metrics, plot_name
        self.history: list[dict] = []  # one {"step", "prefix", "values": {rank: {name: value}}} per evaluation

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, metrics=None, **kwargs):
        if model is None or eval_dataloader is None or metrics is None:
            return
        if not matryoshka_layers(model):
            raise ValueError("AURACCallback: the model has no MatryoshkaLoRA adapter (use MatryoshkaLoraConfig)")
        prefix = _metric_prefix(metrics)
        values = {}
        was_training = model.training
        model.eval()
        try:
            for rank in self.ranks:
                with serving_rank(model, rank):  # restores the training rank even on error
                    values[rank] = self._evaluate(model, eval_dataloader)
        finally:
            model.train(was_training)
        added = {f"{prefix}_rank{r}_{name}": v for r, named in values.items() for name, v in named.items()}
        curve = [values[r][self.metric] for r in self.ranks]
        added[f"{prefix}_aurac"] = aurac(self.ranks, curve, self.axis)
        metrics.update(added)
        _add_to_log_history(state, prefix, added)
        entry = {"step": state.global_step, "prefix": prefix, "values": values}
        if self.history and (self.history[-1]["step"], self.history[-1]["prefix"]) == (entry["step"], prefix):
            self.history[-1] = entry  # evaluate() again at the same step (e.g. after train()): one curve
        else:
            self.history.append(entry)
        if state.is_world_process_zero:
            self.plot(Path(args.output_dir) / self.plot_name)

    @torch.no_grad()
    def _evaluate(self, model, dataloader) -> dict[str, float]:
        loss_sum, count, preds, labels = 0.0, 0, [], []
        device = next(model.parameters()).device
        for batch in dataloader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = model(**batch)
            size = len(next(v for v in batch.values() if torch.is_tensor(v)))
            loss_sum += float(out.loss) * size
            count += size
            if self.compute_metrics is not None:
                preds.append(out.logits.float().cpu().numpy())
                labels.append(batch["labels"].cpu().numpy())
        totals = torch.tensor([loss_sum, count], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = totals.to(device)
            torch.distributed.all_reduce(totals)
            if self.compute_metrics is not None:
                gathered = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, (preds, labels))
                preds = [p for part in gathered for p in part[0]]
                labels = [y for part in gathered for y in part[1]]
        result = {"loss": float(totals[0] / totals[1])}
        if self.compute_metrics is not None:
            extra = self.compute_metrics(EvalPrediction(predictions=np.concatenate(preds),
                                                        label_ids=np.concatenate(labels)))
            result.update({k: float(v) for k, v in extra.items()})
        if self.metric not in result:
            raise ValueError(f"AURACCallback(metric={self.metric!r}): compute_metrics returned {sorted(result)}")
        return result

    def plot(self, path: Path) -> None:
        """The rank–metric curve of every evaluation so far (later evaluations darker)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        cmap = plt.get_cmap("viridis")
        for i, entry in enumerate(self.history):
            curve = [entry["values"][r][self.metric] for r in self.ranks]
            shade = cmap(0.15 + 0.7 * (i + 1) / len(self.history))
            ax.plot(self.ranks, curve, "o-", color=shade, label=f"step {entry['step']}")
        if self.axis == "log2":
            ax.set_xscale("log", base=2)
        ax.set_xticks(self.ranks, [str(r) for r in self.ranks])
        ax.set_xlabel("rank served")
        ax.set_ylabel(f"eval {self.metric}")
        last = self.history[-1]
        ax.set_title(f"Rank–{self.metric} curve (AURAC {self.axis}, last: "
                     f"{aurac(self.ranks, [last['values'][r][self.metric] for r in self.ranks], self.axis):.4f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _metric_prefix(metrics: dict) -> str:
    """``eval`` (or ``eval_<dataset>``): every evaluation's metrics carry ``<prefix>_runtime``."""
    for key in metrics:
        if key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return "eval"


def _add_to_log_history(state, prefix: str, added: dict) -> None:
    """Put the keys into the log entry ``evaluate()`` just wrote for this evaluation."""
    for entry in reversed(state.log_history):
        if entry.get("step") == state.global_step and f"{prefix}_loss" in entry:
            entry.update(added)
            return
    state.log_history.append({**added, "step": state.global_step})
