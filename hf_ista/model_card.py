"""Model cards: a README.md for an output dir, filled from a template in ``model_cards/``."""
from __future__ import annotations

import string
import sys
from pathlib import Path


def template_dir() -> Path:
    """``model_cards/`` of the source tree (editable install), else the copy installed as data."""
    here = Path(__file__).resolve().parents[1] / "model_cards"
    return here if here.is_dir() else Path(sys.prefix) / "share" / "hf_ista" / "model_cards"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_model_card(path: Path, recipe_path: str, recipe: dict, results: list[dict],
                     template: str = "training.md") -> str:
    """Fill ``template`` for the first run of ``results`` (the others are its baselines)."""
    import torch
    import transformers

    import hf_ista

    main = results[0]
    hypers = markdown_table(["hyperparameter", "value"], [[k, f"`{v}`"] for k, v in main["hyperparameters"].items()])
    table = markdown_table(
        ["optimizer", "learning rate", "eval loss", "state bytes / param"],
        [[f"`{r['optim']}`", f"{r['learning_rate']:g}", f"{r['eval_loss']:.4f}", f"{r['state_bytes_per_param']:.3f}"]
         for r in results],
    )
    text = string.Template((template_dir() / template).read_text()).substitute(
        title=f"Tiny Llama trained with {main['optim']}",
        optim=main["optim"], optim_args=main["optim_args"], params=f"{main['params']:,}",
        model_size=recipe.get("model_size"), recipe=recipe_path, steps=main["steps"],
        world_size=main["world_size"], corpus=recipe.get("corpus"), block_size=recipe.get("block_size"),
        learning_rate=f"{main['learning_rate']:g}", hyperparameters=hypers,
        state_bytes=f"{main['state_bytes']:,}", state_bytes_per_param=f"{main['state_bytes_per_param']:.3f}",
        results_table=table, hf_ista_version=hf_ista.__version__,
        transformers_version=transformers.__version__, torch_version=torch.__version__,
    )
    if main.get("rank_metrics"):
        text += rank_metric_section(main)
    Path(path).write_text(text)
    return text


def rank_metric_section(result: dict, template: str = "rank_metric.md") -> str:
    """The rank -> eval metrics table of a run whose AURAC callback measured every rank."""
    table = result["rank_metrics"]
    names = sorted({name for row in table.values() for name in row})
    rows = [[f"{r}", *[f"{table[r][n]:.4f}" if n in table[r] else "" for n in names]] for r in table]
    aurac_spec = next((spec["aurac"] for spec in result.get("callbacks") or [] if "aurac" in spec), None) or {}
    adapter = ", ".join(f"{k}={v}" for k, v in (result.get("adapter") or {}).items())
    return string.Template((template_dir() / template).read_text()).substitute(
        adapter=adapter, rank_table=markdown_table(["rank", *[f"eval {n}" for n in names]], rows),
        axis=aurac_spec.get("axis", "log2"), aurac="n/a" if result.get("aurac") is None else f"{result['aurac']:.4f}",
    )
