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
        [[f"`{r['label']}`", f"{r['learning_rate']:g}", f"{r['eval_loss']:.4f}", f"{r['state_bytes_per_param']:.3f}"]
         for r in results],
    )
    text = string.Template((template_dir() / template).read_text()).substitute(
        title=f"Tiny Llama trained with {main['optim']}",
        optim=main["optim"], optim_args=main["optim_args"], params=f"{main['params']:,}",
        model_size=recipe.get("model_size"), recipe=recipe_path, steps=main["steps"],
        world_size=main["world_size"], corpus=recipe.get("corpus"), block_size=recipe.get("block_size"),
        learning_rate=f"{main['learning_rate']:g}", hyperparameters=hypers,
        state_bytes=f"{main['state_bytes']:,}", state_bytes_per_param=f"{main['state_bytes_per_param']:.3f}",
        results_table=table, hf_ista_version=hf_ista.__version__, launch_flags=launch_flags(main["world_size"]),
        transformers_version=transformers.__version__, torch_version=torch.__version__,
    )
    if main.get("rank_metrics"):
        text += rank_metric_section(main)
    if main.get("world_size", 1) > 1:
        text += communication_section(results)
    Path(path).write_text(text)
    return text


def launch_flags(world_size: int) -> str:
    """``accelerate launch`` flags that start as many processes as the run had."""
    if world_size <= 1:
        return "--config_file recipes/accelerate/cpu.yaml"
    return f"--config_file recipes/accelerate/multi_gpu.yaml --num_processes {world_size}"


def rank_metric_section(result: dict, template: str = "rank_metric.md") -> str:
    """The rank -> eval metrics table of a run whose AURAC callback measured every rank."""
    table = result["rank_metrics"]
    names = sorted({name for row in table.values() for name in row})
    rows = [[f"{r}", *[f"{table[r][n]:.4f}" if n in table[r] else "" for n in names]] for r in table]
    aurac_spec = next((kwargs for name, kwargs in result.get("callback_specs") or [] if name == "aurac"), {})
    adapter = ", ".join(f"{k}={v}" for k, v in (result.get("adapter") or {}).items())
    return string.Template((template_dir() / template).read_text()).substitute(
        adapter=adapter, rank_table=markdown_table(["rank", *[f"eval {n}" for n in names]], rows),
        axis=aurac_spec.get("axis", "log2"), aurac="n/a" if result.get("aurac") is None else f"{result['aurac']:.4f}",
    )


def communication_section(results: list[dict], template: str = "communication.md") -> str:
    """Bytes each process passed to the training collectives, next to DDP's for the same steps."""
    rows = [[f"`{r['label']}`", f"{r['steps']}", f"{r['comm_bytes']:,}", f"{r['ddp_comm_bytes']:,}",
             f"{r['comm_bytes'] / r['ddp_comm_bytes']:.4f}" if r["ddp_comm_bytes"] else "n/a"] for r in results]
    table = markdown_table(["optimizer", "steps", "bytes sent / process", "DDP's bytes, same steps", "ratio"], rows)
    return string.Template((template_dir() / template).read_text()).substitute(
        world_size=results[0]["world_size"], comm_table=table)


def pruning_section(report, metrics: dict) -> str:
    """A "## Pruning" model-card section: the settings, eval before/after and the per-layer table."""
    lines = ["## Pruning", "",
             f"Pruned after training with `hf_ista.pruning.prune`: method `{report.method}`, pattern "
             f"`{report.pattern}`, {report.iterations} iteration(s), {report.num_samples} calibration samples, "
             f"{report.seconds:.1f} s. Weights pruned to exact zeros (no mask buffers): overall sparsity "
             f"{report.sparsity:.4f}, relative reconstruction error ‖WX − ŴX‖²/‖WX‖² summed over layers "
             f"{report.total_error:.5f}.", ""]
    if "pruning_eval_loss_before" in metrics:
        lines += [markdown_table(["", "eval loss", "perplexity"], [
            ["before pruning", f"{metrics['pruning_eval_loss_before']:.4f}", f"{metrics['pruning_perplexity_before']:.3f}"],
            ["after pruning", f"{metrics['pruning_eval_loss_after']:.4f}", f"{metrics['pruning_perplexity_after']:.3f}"],
        ]), ""]
    lines += [markdown_table(report.HEADER, report.rows()), ""]
    return "\n".join(lines)


def write_pruning_card(path: Path, report, metrics: dict) -> str:
    """Append the pruning section to the card at ``path`` (created if missing)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Pruned model\n"
    text = text.rstrip("\n") + "\n\n" + pruning_section(report, metrics)
    path.write_text(text)
    return text


def probes_section(result: dict) -> str:
    """A "## Solution probes" model-card section: the summary figures and the per-layer activations."""
    settings = result.get("settings", {})
    lines = ["## Solution probes", "",
             f"Measured by `hf_ista.callbacks.SolutionProbesCallback` at step {result.get('step', '?')} on "
             f"{settings.get('num_batches', '?')} eval batches (probes: {', '.join(settings.get('probes', []))}).", "",
             markdown_table(["figure", "value"], [[k, f"{v:.6g}"] for k, v in result["summary"].items()]), ""]
    if result.get("activations"):
        lines += [markdown_table(["layer", "kurtosis", "max abs / RMS", "outlier features (6σ)"],
                                 [[name, f"{v['kurtosis']:.3f}", f"{v['max_over_rms']:.2f}", f"{v['outlier_fraction']:.4f}"]
                                  for name, v in result["activations"].items()]), ""]
    return "\n".join(lines)
