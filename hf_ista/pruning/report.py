"""What :func:`hf_ista.pruning.prune` returns: per layer, the sparsity reached and the relative
reconstruction error ``‖WX − ŴX‖² / ‖WX‖²`` on the inputs the layer saw; and the total time."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float  # share of exact zeros in the weight after pruning
    error: float  # ‖WX − ŴX‖² / ‖WX‖² (undamped H from the layer's calibration inputs)
    seconds: float
    iteration_errors: list[float] = field(default_factory=list)  # I-OBS: relative error after each iteration


@dataclass
class PruningReport:
    method: str
    pattern: str
    iterations: int
    num_samples: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_error(self) -> float:
        """The relative errors summed over layers."""
        return sum(layer.error for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Share of zeros over all pruned weights."""
        numel = sum(a * b for a, b in (layer.shape for layer in self.layers))
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in self.layers)
        return zeros / numel if numel else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "total_error": self.total_error, "sparsity": self.sparsity}

    def rows(self) -> list[list[str]]:
        return [[layer.name, f"{layer.shape[0]}x{layer.shape[1]}", f"{layer.sparsity:.4f}", f"{layer.error:.5f}",
                 f"{layer.seconds:.2f}"] for layer in self.layers]

    HEADER = ["layer", "shape", "sparsity", "rel. error", "seconds"]

    def table(self) -> str:
        """A plain-text table, one line per layer, and a total line."""
        rows = [self.HEADER] + self.rows()
        rows.append(["total", "", f"{self.sparsity:.4f}", f"{self.total_error:.5f}", f"{self.seconds:.2f}"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)
