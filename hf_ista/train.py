"""Recipe runner: ``accelerate launch -m hf_ista.train recipes/<name>.yaml``.

A recipe is one flat YAML file: the model and data keys of :class:`RecipeArguments`, any
``TrainingArguments`` key, and an ``hf_ista:`` block::

    hf_ista:
      baselines:                 # the same recipe again with these keys changed, for comparison
        - {optim: adamw_torch, learning_rate: 0.003}
      adapter:                   # train a PEFT adapter instead of the whole model (ADAPTERS)
        {type: matryoshka_lora, r: 16, target_modules: [q_proj, v_proj]}
      callbacks:                 # Trainer callbacks, each {name: kwargs} (CALLBACKS)
        - {aurac: {ranks: [1, 2, 4, 8, 16]}}
        - {iobs_pruning: {sparsity: 0.5, method: iobs}}
      train_format:              # train the linear weights through a compressed format (STE),
        {format: int4, targets: all-linear}   # hf_ista.scaling.apply_format; saved baked in

Every run trains the plain ``transformers.Trainer``. The main process then prints a table (eval
loss, optimizer state bytes per parameter) and writes ``loss_curve.png`` and a model card
(``README.md``) into ``output_dir``; each baseline trains into ``output_dir/baseline-<optim>``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import hf_ista
from hf_ista.data import MODEL_SIZES, load_corpus, tiny_llama
from hf_ista.integrations.transformers import OPTIMIZERS, optimizer_kwargs, parse_optim_args
from hf_ista.model_card import write_model_card


# The hf_ista block's names -> "module:Class", imported only when a recipe names them; the recipe
# gives the keyword arguments.
CALLBACKS = {
    "aurac": "hf_ista.callbacks:AURACCallback",
    "iobs_pruning": "hf_ista.callbacks.iobs:IOBSPruningCallback",
    "solution_probes": "hf_ista.callbacks.probes:SolutionProbesCallback",
    "scaling_law": "hf_ista.callbacks.scaling_law:ScalingLawCallback",
}
ADAPTERS = {"matryoshka_lora": "hf_ista.peft.matryoshka_lora:MatryoshkaLoraConfig"}
BLOCK_KEYS = ("adapter", "baselines", "callbacks", "train_format")


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def callback_specs(entries, path="hf_ista block") -> list[tuple[str, dict]]:
    """``[{name: kwargs} | name | (name, kwargs), ...]`` checked into ``[(name, kwargs), ...]``."""
    if not isinstance(entries, list):
        raise ValueError(f"{path}: hf_ista.callbacks must be a list of {{name: kwargs}}, got {entries!r}")
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {entry: {}}
        elif isinstance(entry, tuple) and len(entry) == 2:  # already checked
            entry = {entry[0]: entry[1]}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"{path}: each hf_ista.callbacks entry must be one {{name: kwargs}}, got {entry!r}")
        (name, kwargs), = entry.items()
        if name not in CALLBACKS:
            raise ValueError(f"{path}: unknown callback {name!r}; accepted: {sorted(CALLBACKS)}")
        if not isinstance(kwargs or {}, dict):
            raise ValueError(f"{path}: the kwargs of callback {name!r} must be a mapping, got {kwargs!r}")
        specs.append((name, dict(kwargs or {})))
    return specs


def build_callbacks(entries) -> list:
    """Callback instances for the entries of a recipe's ``callbacks:`` list (see :func:`callback_specs`)."""
    return [_load(CALLBACKS[name])(**kwargs) for name, kwargs in callback_specs(entries or [])]


def build_adapter_config(spec):
    """``{type: name, **config}`` -> a PEFT config, the type looked up in ``ADAPTERS`` (None: no adapter)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") not in ADAPTERS:
        raise ValueError(f"hf_ista.adapter must be a mapping with type one of {sorted(ADAPTERS)}, got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    return _load(ADAPTERS[spec["type"]])(**kwargs)


@dataclass
class RecipeArguments:
    """Model and data keys of a recipe (everything else is a TrainingArguments key)."""

    model_size: str = field(default="tiny", metadata={"help": f"tiny Llama size: {sorted(MODEL_SIZES)}"})
    corpus: str = field(default="stdlib", metadata={"help": "'stdlib' or a standard-library package name"})
    block_size: int = field(default=128, metadata={"help": "tokens (bytes) per training sequence"})
    max_bytes: int = field(default=2_000_000, metadata={"help": "bytes of the corpus to use"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of blocks held out for eval"})
    init_from: str | None = field(default=None, metadata={"help": "a saved model dir to start from"})


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; a recipe means the number."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_recipe(path: str | Path, overrides: dict | None = None):
    """Parse a recipe into ``(RecipeArguments, TrainingArguments, hf_ista block)``."""
    from transformers import HfArgumentParser, TrainingArguments

    raw = yaml.load(Path(path).read_text(), Loader=_RecipeLoader) or {}
    raw.update(overrides or {})
    # Without an accelerator, accelerate only sets up gloo DDP for processes it was told are on
    # the CPU; otherwise `accelerate launch --multi_gpu` silently trains each rank alone.
    raw.setdefault("use_cpu", not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    block = raw.pop("hf_ista", None) or {}
    unknown = set(block) - set(BLOCK_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys in the hf_ista block: {sorted(unknown)}; accepted: {list(BLOCK_KEYS)}")
    build_adapter_config(block.get("adapter"))  # fail now, with our message, not after loading the data
    if block.get("train_format") is not None:
        block["train_format"] = train_format_spec(block["train_format"], path)
    if block.get("callbacks") is not None:
        block["callbacks"] = callback_specs(block["callbacks"], path)
        build_callbacks(block["callbacks"])  # a bad kwarg fails now, not after training
    parser = HfArgumentParser((RecipeArguments, TrainingArguments))
    recipe, training_args = parser.parse_dict(raw, allow_extra_keys=False)
    optim = getattr(training_args.optim, "value", training_args.optim)
    if optim in OPTIMIZERS:  # fail now, with our message, not at the first step
        parse_optim_args(optim, training_args.optim_args)
    return recipe, training_args, block


def train_format_spec(spec, path="hf_ista block") -> dict:
    """``int4`` or ``{format: int4, targets: ..., rbbm: ...}`` checked into apply_format's kwargs."""
    from hf_ista.scaling import parse_format

    spec = {"format": spec} if isinstance(spec, str) else dict(spec or {})
    unknown = set(spec) - {"format", "targets", "rbbm"}
    if "format" not in spec or unknown:
        raise ValueError(f"{path}: train_format must be a format string or {{format, targets, rbbm}}, got {spec!r}")
    parse_format(spec["format"])
    return spec


def build_model(recipe: RecipeArguments, seed: int = 0):
    if recipe.init_from:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(recipe.init_from)
    return tiny_llama(recipe.model_size, seed=seed, max_position_embeddings=recipe.block_size)


def run(recipe: RecipeArguments, training_args, block: dict | None = None) -> dict:
    """Train once (with the adapter and callbacks of the hf_ista ``block``, if any); return the figures
    the table and the model card need."""
    from transformers import Trainer, set_seed

    block = block or {}
    set_seed(training_args.seed)
    data = load_corpus(recipe.corpus, recipe.block_size, recipe.max_bytes, recipe.eval_fraction,
                       seed=training_args.seed)
    model = build_model(recipe, training_args.seed)
    adapter = build_adapter_config(block.get("adapter"))
    if adapter is not None:
        from peft import get_peft_model

        model = get_peft_model(model, adapter)
    train_format = block.get("train_format")
    if train_format is not None:
        from hf_ista.scaling import apply_format

        spec = train_format_spec(train_format)
        apply_format(model, spec["format"], targets=spec.get("targets", "all-linear"), rbbm=spec.get("rbbm"))
    specs = callback_specs(block.get("callbacks") or [])
    callbacks = build_callbacks(specs)
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["eval"],
                      callbacks=callbacks)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    if train_format is not None:  # save a plain model whose weights are the compressed ones
        from hf_ista.scaling import remove_format

        remove_format(model)
    trainer.save_model()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_bytes = hf_ista.state_bytes(trainer.optimizer)
    optim = training_args.optim.value if hasattr(training_args.optim, "value") else str(training_args.optim)
    return {
        "optim": optim,
        "label": optim,
        "optim_args": training_args.optim_args or "",
        "hyperparameters": resolved_hyperparameters(optim, training_args),
        "learning_rate": training_args.learning_rate,
        "eval_loss": metrics["eval_loss"],
        "state_bytes": n_bytes,
        "params": n_params,
        "state_bytes_per_param": n_bytes / n_params,
        "train_seconds": seconds,
        "steps": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "output_dir": training_args.output_dir,
        "is_main": trainer.is_world_process_zero(),
        "world_size": training_args.world_size,
        # what this process passed to gradient / pseudo-gradient collectives, and what DDP would have
        "comm_bytes": bytes_communicated(trainer.optimizer, trainer.state.global_step, training_args.world_size),
        "ddp_comm_bytes": ddp_bytes(trainer.optimizer, trainer.state.global_step, training_args.world_size),
        "adapter": block.get("adapter"),
        "rank_metrics": rank_metrics(metrics),
        "aurac": metrics.get("eval_aurac"),
        "callback_specs": specs,
        # what the callbacks measured (e.g. eval loss before / after pruning), by callback name
        "callbacks": {name: getattr(cb, "metrics", {}) for (name, _), cb in zip(specs, callbacks)},
        # model-card sections of callbacks that changed the saved model (the pruning table)
        "card_sections": [cb.model_card_section() for cb in callbacks if hasattr(cb, "model_card_section")],
    }


def ddp_bytes(optimizer, steps: int, world_size: int) -> int:
    """What DDP passes to its gradient all-reduce in ``steps`` optimizer steps: every trainable
    parameter's gradient, in its dtype, once a step (none with one process)."""
    from hf_ista.optim.lordo import ddp_bytes_per_step

    return ddp_bytes_per_step(getattr(optimizer, "optimizer", optimizer)) * steps if world_size > 1 else 0


def bytes_communicated(optimizer, steps: int, world_size: int) -> int:
    """Bytes this process passed to the training collectives: LoRDO counts its own; any other
    optimizer ran under DDP's per-step all-reduce."""
    from hf_ista.optim import LoRDO

    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, LoRDO):
        return inner.bytes_communicated + (ddp_bytes(optimizer, steps, world_size) if inner.all_reduce_gradients else 0)
    return ddp_bytes(optimizer, steps, world_size)


def rank_metrics(metrics: dict) -> dict[int, dict[str, float]]:
    """``{rank: {name: value}}`` from the ``eval_rank{r}_{name}`` keys an AURAC callback adds."""
    table: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        found = re.fullmatch(r"eval_rank(\d+)_(.+)", key)
        if found:
            table.setdefault(int(found.group(1)), {})[found.group(2)] = value
    return dict(sorted(table.items()))


def format_rank_table(result: dict) -> str:
    """Rank -> eval metrics of one run, and its AURAC."""
    table = result["rank_metrics"]
    names = sorted({name for row in table.values() for name in row})
    rows = [["rank", *[f"eval {n}" for n in names]]]
    rows += [[str(r), *[f"{table[r][n]:.4f}" if n in table[r] else "" for n in names]] for r in table]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\nAURAC: {result['aurac']:.4f}"


def resolved_hyperparameters(optim: str, training_args) -> dict:
    """Every hyperparameter the optimizer ran with: defaults overridden by ``optim_args``."""
    if optim not in OPTIMIZERS:
        values = {"betas": (training_args.adam_beta1, training_args.adam_beta2), "eps": training_args.adam_epsilon}
    else:
        values = {k: h.default for k, h in OPTIMIZERS[optim].hypers.items() if h.default is not None}
        values.update(optimizer_kwargs(optim, training_args))
        del values["lr"]  # reported on its own
        if OPTIMIZERS[optim].low_rank:
            values["optim_target_modules"] = training_args.optim_target_modules or "all-linear"
    return {**values, "weight_decay": training_args.weight_decay}


def format_table(results: list[dict]) -> str:
    sent = any(r.get("world_size", 1) > 1 for r in results)  # bytes sent: only where there were peers
    rows = [("optimizer", "lr", "eval loss", "state B/param", "train s") + (("MB sent/rank",) if sent else ())]
    rows += [(r["label"], f"{r['learning_rate']:g}", f"{r['eval_loss']:.4f}", f"{r['state_bytes_per_param']:.3f}",
              f"{r['train_seconds']:.0f}") + ((f"{r['comm_bytes'] / 1e6:.2f}",) if sent else ()) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_loss_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        train = [(h["step"], h["loss"]) for h in r["log_history"] if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in r["log_history"] if "eval_loss" in h]
        if train:
            line, = ax.plot(*zip(*train), label=f"{r['label']} train")
            if evals:
                ax.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{r['label']} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        raise SystemExit("usage: accelerate launch -m hf_ista.train RECIPE.yaml")
    recipe_path = argv[0]
    recipe, training_args, block = load_recipe(recipe_path)
    results = [run(recipe, training_args, block)]
    baselines = block.get("baselines", [])
    names = [f"baseline-{b.get('optim', 'baseline')}" for b in baselines]
    for i, overrides in enumerate(baselines):
        name = names[i] if names.count(names[i]) == 1 else f"{names[i]}-{i}"  # a sweep of one optim
        out = str(Path(training_args.output_dir) / name)
        # A baseline starts fresh unless it says otherwise: the main run's checkpoint is not its own.
        fresh = {"resume_from_checkpoint": None, "output_dir": out, "hf_ista": None}
        overrides = dict(overrides)
        label = overrides.pop("label", None)  # the name of its row in the tables
        _, baseline_args, _ = load_recipe(recipe_path, {**fresh, **overrides, "output_dir": out})
        result = run(recipe, baseline_args, {k: block.get(k) for k in ("adapter", "callbacks", "train_format")})
        results.append({**result, "label": label or result["label"]})

    if results[0]["is_main"]:
        out_dir = Path(training_args.output_dir)
        print("\n" + format_table(results) + "\n", flush=True)
        if results[0]["rank_metrics"]:
            print(format_rank_table(results[0]) + "\n", flush=True)
        for name, metrics in results[0]["callbacks"].items():
            if metrics:
                print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + "\n", flush=True)
        plot_loss_curves(results, out_dir / "loss_curve.png")
        card = write_model_card(out_dir / "README.md", recipe_path, dataclasses.asdict(recipe), results)
        if results[0]["card_sections"]:
            (out_dir / "README.md").write_text("\n\n".join([card.rstrip("\n"), *results[0]["card_sections"]]))
        summary = [{k: v for k, v in r.items() if k not in ("log_history", "card_sections")} for r in results]
        (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
