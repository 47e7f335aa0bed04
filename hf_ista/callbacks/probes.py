"""``SolutionProbesCallback``: run :func:`hf_ista.probes.run_probes` on the eval data at each
evaluation (or once at the end of training), log the figures, write ``solution_probes.json``."""
from __future__ import annotations

import json
import logging
import os

from transformers import TrainerCallback

from hf_ista.probes import PROBES, check_probes, run_probes

logger = logging.getLogger(__name__)

WHEN = ("evaluate", "train_end")
FILENAME = "solution_probes.json"


class SolutionProbesCallback(TrainerCallback):
    """``probes``: any of :data:`hf_ista.probes.PROBES`; ``num_batches`` eval batches feed them,
    ``power_iterations`` Hessian-vector products (of the first ``sharpness_batches`` batches) bound
    the sharpness probe. ``when="evaluate"`` runs after every evaluation, ``"train_end"`` once at the
    end (on ``eval_dataset`` if given, else the Trainer's eval dataloader). The summary and per-layer
    figures are appended to ``state.log_history`` as ``probes/...`` keys (callbacks cannot reach the
    Trainer's loggers); ``<output_dir>/solution_probes.json`` holds the latest full result and the
    summary of every run so far. The latest result stays on ``self.result``."""

    def __init__(self, probes=PROBES, num_batches: int = 8, power_iterations: int = 20,
                 sharpness_batches: int | None = 2, when: str = "evaluate", eval_dataset=None,
                 output_dir: str | None = None):
        self.probes = check_probes(probes)
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches={num_batches!r} is invalid: expected an integer >= 1")
        if not isinstance(power_iterations, int) or power_iterations < 1:
            raise ValueError(f"power_iterations={power_iterations!r} is invalid: expected an integer >= 1")
        if when not in WHEN:
            raise ValueError(f"when={when!r} is invalid: expected one of {WHEN}")
        self.num_batches = num_batches
        self.power_iterations = power_iterations
        self.sharpness_batches = sharpness_batches
        self.when = when
        self.eval_dataset = eval_dataset
        self.output_dir = output_dir
        self.result: dict | None = None
        self.history: list[dict] = []
        self.metrics: dict = {}

    def _loader(self, args, eval_dataloader):
        if self.eval_dataset is None:
            return eval_dataloader
        from torch.utils.data import DataLoader
        from transformers import default_data_collator

        return DataLoader(self.eval_dataset, batch_size=args.per_device_eval_batch_size,
                          collate_fn=default_data_collator)

    def _run(self, args, state, model, eval_dataloader):
        loader = self._loader(args, eval_dataloader)
        if loader is None:
            raise ValueError("SolutionProbesCallback: no eval data: pass eval_dataset= or give the Trainer one")
        result = run_probes(model, loader, self.probes, self.num_batches, self.power_iterations,
                            self.sharpness_batches, progress=not args.disable_tqdm)
        result["step"] = state.global_step
        self.result = result
        self.history.append({"step": state.global_step, **result["summary"]})
        self.metrics = {f"probes/{k}": v for k, v in result["summary"].items()}
        per_layer = {f"probes/{probe}/{layer}/{key}": value
                     for probe in ("activations", "spectra") for layer, figures in result.get(probe, {}).items()
                     for key, value in figures.items() if isinstance(value, float)}
        state.log_history.append({**self.metrics, **per_layer, "step": state.global_step})
        logger.info("solution probes at step %d: %s", state.global_step, result["summary"])
        if state.is_world_process_zero:
            out = self.output_dir or args.output_dir
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, FILENAME), "w") as f:
                json.dump({**result, "history": self.history}, f, indent=2)

    def model_card_section(self) -> str:
        """The "## Solution probes" section; empty before the first run."""
        from hf_ista.model_card import probes_section

        return probes_section(self.result) if self.result is not None else ""

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if self.when == "evaluate":
            self._run(args, state, model, eval_dataloader)
        return control

    def on_train_end(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if self.when == "train_end":
            self._run(args, state, model, eval_dataloader)
        return control
