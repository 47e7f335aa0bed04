"""Side by side: the ``solution_probes.json`` of several runs as a table and plots."""
from __future__ import annotations

import json
from pathlib import Path

FILENAME = "solution_probes.json"


def load_result(path) -> dict:
    """The probe result in ``path`` (a ``solution_probes.json`` or an output dir holding one)."""
    path = Path(path)
    file = path / FILENAME if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no {FILENAME} found (run SolutionProbesCallback with this output dir)")
    return json.loads(file.read_text())


def run_label(path) -> str:
    path = Path(path)
    return (path.parent if path.is_file() else path).name or str(path)


def comparison_table(results: dict[str, dict]) -> str:
    """One row per summary figure, one column per run (labels are the keys of ``results``)."""
    keys = list(dict.fromkeys(k for r in results.values() for k in r["summary"]))
    labels = list(results)
    width = max(len(k) for k in keys) if keys else 10
    columns = [max(12, len(label)) for label in labels]
    lines = [f"{'figure':<{width}}  " + "  ".join(f"{label:>{c}}" for label, c in zip(labels, columns))]
    lines.append("-" * len(lines[0]))
    for key in keys:
        cells = []
        for label, c in zip(labels, columns):
            value = results[label]["summary"].get(key)
            cells.append(f"{value:>{c}.5g}" if isinstance(value, (int, float)) else f"{'-':>{c}}")
        lines.append(f"{key:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_comparison(results: dict[str, dict], path) -> Path:
    """One PNG, three panels: outlier-feature share per block, stable rank per linear layer, and the
    loss increase of each compression, one line / bar group per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (outliers, spectra, compress) = plt.subplots(1, 3, figsize=(16, 4.5))
    names = ("int8_loss_increase", "int4_loss_increase", "prune50_loss_increase")
    width = 0.8 / max(1, len(results))
    for i, (label, result) in enumerate(results.items()):
        if result.get("activations"):
            values = [v["outlier_fraction"] for v in result["activations"].values()]
            outliers.plot(range(len(values)), values, marker="o", label=label)
        if result.get("spectra"):
            values = [v["stable_rank"] for v in result["spectra"].values()]
            spectra.plot(range(len(values)), values, marker=".", label=label)
        if result.get("compressibility"):
            values = [result["compressibility"].get(n, float("nan")) for n in names]
            compress.bar([j + i * width for j in range(len(names))], values, width, label=label)
    outliers.set(title="outlier features (> 6σ) per block", xlabel="block", ylabel="share of features")
    spectra.set(title="stable rank per linear layer", xlabel="layer (model order)", ylabel="‖W‖_F² / ‖W‖₂²")
    compress.set(title="eval loss increase after compression", ylabel="Δ loss",
                 xticks=[j + width * (len(results) - 1) / 2 for j in range(len(names))],
                 xticklabels=["INT8 RTN", "INT4 RTN", "50 % magnitude"])
    for ax in (outliers, spectra, compress):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
