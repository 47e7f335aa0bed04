"""``IOBSPruningCallback``: prune the trained model at the end of a Trainer run, evaluate before and
after, log both, save the pruned model with a model card section."""
from __future__ import annotations

import inspect
import logging
import math
import os

import torch
from transformers import TrainerCallback

from hf_ista.pruning import METHODS, parse_pattern, prune

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_loss(model, dataloader) -> float:
    """Mean loss per sample over ``dataloader`` (what ``Trainer.evaluate`` reports as ``eval_loss``
    for batches of equal-length sequences)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in dataloader:
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            size = batch["labels"].shape[0]
            total += float(model(**batch).loss) * size
            count += size
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("eval data is empty: expected at least one batch with labels")
    return total / count


class IOBSPruningCallback(TrainerCallback):
    """At ``on_train_end``: ``prune(model, ...)`` with these settings (``**prune_kwargs`` go to
    :func:`hf_ista.pruning.prune`; ``sparsity`` None is 0.5, or what an N:M pattern implies), calibrated on ``calibration_dataset`` (default: the training
    dataloader). With ``eval_after``, eval loss and perplexity before and after pruning are computed on
    ``eval_dataset`` (default: the Trainer's eval dataloader, if an evaluation built one) and appended to
    ``state.log_history`` (callbacks cannot reach the Trainer's loggers). With ``save``, the pruned
    model goes to ``output_dir`` (default ``<args.output_dir>/pruned``) with a README.md that has the
    per-layer table. The report and the figures stay on ``self.report`` / ``self.metrics``."""

    def __init__(self, sparsity=None, method: str = "iobs", pattern: str = "unstructured", iterations: int = 3,
                 num_samples: int = 128, calibration_dataset=None, eval_dataset=None, eval_after: bool = True,
                 save: bool = True, output_dir: str | None = None, **prune_kwargs):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is invalid: expected one of {METHODS}")
        parse_pattern(pattern)
        accepted = set(inspect.signature(prune).parameters) - {"model", "calibration"}
        unknown = set(prune_kwargs) - accepted
        if unknown:
            raise ValueError(f"IOBSPruningCallback: unknown arguments {sorted(unknown)}; prune() accepts {sorted(accepted)}")
        self.prune_kwargs = dict(sparsity=sparsity, method=method, pattern=pattern, iterations=iterations,
                                 num_samples=num_samples, **prune_kwargs)
        self.calibration_dataset = calibration_dataset
        self.eval_dataset = eval_dataset
        self.eval_after = eval_after
        self.save = save
        self.output_dir = output_dir
        self.report = None
        self.metrics: dict = {}

    def _eval_loader(self, args, eval_dataloader):
        if self.eval_dataset is None:
            return eval_dataloader
        from torch.utils.data import DataLoader
        from transformers import default_data_collator

        return DataLoader(self.eval_dataset, batch_size=args.per_device_eval_batch_size,
                          collate_fn=default_data_collator)

    def model_card_section(self) -> str:
        """The "## Pruning" section (settings, eval before / after, per-layer table); empty before pruning."""
        from hf_ista.model_card import pruning_section

        return pruning_section(self.report, self.metrics) if self.report is not None else ""

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None, **kwargs):
        calibration = self.calibration_dataset if self.calibration_dataset is not None else train_dataloader
        if calibration is None:
            raise ValueError("IOBSPruningCallback: no calibration data: pass calibration_dataset=")
        evaluation = self._eval_loader(args, eval_dataloader) if self.eval_after else None
        if self.eval_after and evaluation is None:
            logger.warning("IOBSPruningCallback: no eval data (pass eval_dataset=): skipping the before/after eval")
        before = evaluate_loss(model, evaluation) if evaluation is not None else None
        self.report = prune(model, calibration=calibration, **self.prune_kwargs)
        after = evaluate_loss(model, evaluation) if evaluation is not None else None
        self.metrics = {"pruning_sparsity": self.report.sparsity, "pruning_reconstruction_error": self.report.total_error,
                        "pruning_seconds": self.report.seconds}
        if before is not None:
            self.metrics.update(pruning_eval_loss_before=before, pruning_perplexity_before=math.exp(before),
                                pruning_eval_loss_after=after, pruning_perplexity_after=math.exp(after))
        state.log_history.append({**self.metrics, "step": state.global_step})
        logger.info("pruned with %s: %s\n%s", self.prune_kwargs["method"], self.metrics, self.report.table())
        if self.save and state.is_world_process_zero:
            from hf_ista.model_card import write_pruning_card

            out = self.output_dir or os.path.join(args.output_dir, "pruned")
            model.save_pretrained(out)
            write_pruning_card(os.path.join(out, "README.md"), self.report, self.metrics)
        return control
