"""Fitting the compressed-format scaling law to run records.

    L(N, D, R) = A·(N·ρ(R))^(−α) + B·D^(−β) + E,   ρ(R) = Lc·tanh(F·log_{1/4} GMSE(R))^C

Parameters A = e^a, B = e^b, E = e^e, α, β and, per format family present in the records (dense
excluded), F and C (Lc fixed at 1 unless ``fit_lc``). Residuals are log L_pred − log L_obs,
minimised by ``scipy.optimize.least_squares(loss="huber")`` from a grid of starts (the best kept);
confidence intervals are percentiles of refits on bootstrap resamples of the records.

A record is a mapping with ``N`` (non-embedding parameters), ``D`` (training tokens), ``loss`` and
``format`` (a spec dict or string) and optionally ``gmse`` (else computed from the format).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .capacity import PUBLISHED, FamilyConstants, ScalingLaw, capacity
from .formats import parse_format

GLOBAL = ("a", "alpha", "b", "beta", "e")
PAPER = {"alpha": 0.13, "beta": 0.33, "E": 1.3, "F": 0.41, "C": 1.39, "Lc": 1.0}


def _prepare(records):
    N = np.array([float(r["N"]) for r in records])
    D = np.array([float(r["D"]) for r in records])
    loss = np.array([float(r["loss"]) for r in records])
    fmts = [parse_format(r["format"]) for r in records]
    gmse = np.array([float(r["gmse"]) if r.get("gmse") is not None else f.gmse() for r, f in zip(records, fmts)])
    fams = [f.family for f in fmts]
    return N, D, loss, gmse, fams


@dataclass
class FitResult:
    law: ScalingLaw
    names: list
    params: dict                     # name -> fitted value (A, alpha, B, beta, E, <family>.F, ...)
    intervals: dict = field(default_factory=dict)   # name -> (lo, hi), bootstrap percentiles
    n_records: int = 0
    n_bootstrap: int = 0
    cost: float = math.nan
    rmse_log: float = math.nan

    def predict(self, N, D, fmt="dense") -> float:
        return self.law.predict(N, D, fmt)

    def dense_equivalent(self, N, fmt) -> float:
        return self.law.dense_equivalent(N, fmt)

    def table(self) -> str:
        lines = [f"scaling-law fit: {self.n_records} runs, {self.n_bootstrap} bootstrap refits, "
                 f"RMSE(log L) {self.rmse_log:.4f}",
                 f"{'parameter':<14} {'fitted':>10} {'95% CI':>23} {'paper':>8}"]
        for name in self.names:
            lo, hi = self.intervals.get(name, (math.nan, math.nan))
            paper = PAPER.get(name.split(".")[-1])
            lines.append(f"{name:<14} {self.params[name]:>10.4g} {f'[{lo:.4g}, {hi:.4g}]':>23} "
                         f"{'' if paper is None else f'{paper:g}':>8}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"params": self.params, "intervals": {k: list(v) for k, v in self.intervals.items()},
                "n_records": self.n_records, "n_bootstrap": self.n_bootstrap, "rmse_log": self.rmse_log}


class _Model:
    def __init__(self, families, fit_lc, fixed):
        self.families, self.fit_lc, self.fixed = families, fit_lc, dict(fixed or {})
        names = list(GLOBAL)
        for fam in families:
            names += [f"{fam}.F", f"{fam}.C"] + ([f"{fam}.Lc"] if fit_lc else [])
        self.all_names = names
        self.free = [n for n in names if self._key(n) not in self.fixed]

    @staticmethod
    def _key(name):  # log-parameters are fixed by their natural value: a <- A
        return {"a": "A", "b": "B", "e": "E"}.get(name, name)

    def full(self, theta) -> dict:
        values = dict(zip(self.free, theta))
        for n in self.all_names:
            if n not in values:
                v = self.fixed[self._key(n)]
                values[n] = math.log(v) if n in ("a", "b", "e") else v
        return values

    def log_pred(self, theta, N, D, gmse, fams):
        p = self.full(theta)
        rho = np.ones_like(N)
        lg = -np.log(np.clip(gmse, 1e-300, None)) / math.log(4.0)
        for fam in self.families:
            sel = np.array([f == fam for f in fams])
            if not sel.any():
                continue
            lc = p.get(f"{fam}.Lc", 1.0)
            t = np.tanh(np.clip(p[f"{fam}.F"] * lg[sel], 1e-12, None))
            rho[sel] = lc * t ** p[f"{fam}.C"]
        pred = np.exp(p["a"]) * (N * rho) ** (-p["alpha"]) + np.exp(p["b"]) * D ** (-p["beta"]) + np.exp(p["e"])
        return np.log(pred)

    def bounds(self):
        table = {"a": (-10, 30), "alpha": (1e-3, 3), "b": (-10, 40), "beta": (1e-3, 3), "e": (-10, 5),
                 "F": (1e-3, 10), "C": (1e-2, 20), "Lc": (1e-3, 1.0)}
        lo = [table[n.split(".")[-1]][0] for n in self.free]
        hi = [table[n.split(".")[-1]][1] for n in self.free]
        return lo, hi

    def starts(self, loss):
        grid = {"a": (2.0, 6.0), "alpha": (0.15, 0.5), "b": (2.0, 6.0), "beta": (0.15, 0.5),
                "e": (math.log(max(loss.min() * 0.5, 1e-3)), math.log(max(loss.min() * 0.9, 1e-3))),
                "F": (0.41,), "C": (1.39,), "Lc": (1.0,)}
        choices = [grid[n.split(".")[-1]] for n in self.free]
        return [np.array(c, dtype=float) for c in itertools.product(*choices)]

    def law(self, p) -> ScalingLaw:
        fams = {f: FamilyConstants(F=p[f"{f}.F"], C=p[f"{f}.C"], Lc=p.get(f"{f}.Lc", 1.0)) for f in self.families}
        return ScalingLaw(A=math.exp(p["a"]), alpha=p["alpha"], B=math.exp(p["b"]), beta=p["beta"],
                          E=math.exp(p["e"]), families=fams, default=PUBLISHED.default)


def _natural(p: dict) -> dict:
    out = {}
    for k, v in p.items():
        out[{"a": "A", "b": "B", "e": "E"}.get(k, k)] = math.exp(v) if k in ("a", "b", "e") else v
    return out


def fit_law(records: Sequence[dict], fit_lc: bool = False, fixed: Optional[dict] = None, n_bootstrap: int = 100,
            seed: int = 0, huber_scale: float = 0.01, confidence: float = 0.95) -> FitResult:
    """Fit the law to ``records``; ``fixed`` pins parameters by name (``alpha``, ``E``, ``int.C`` ...)."""
    from scipy.optimize import least_squares

    records = list(records)
    N, D, loss, gmse, fams = _prepare(records)
    families = sorted({f for f in fams if f != "dense"})
    model = _Model(families, fit_lc, fixed)
    lo, hi = model.bounds()

    def solve(idx, starts):
        y = np.log(loss[idx])
        args = (N[idx], D[idx], gmse[idx], [fams[i] for i in idx])
        best = None
        for x0 in starts:
            x0 = np.clip(x0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
            try:
                res = least_squares(lambda th: model.log_pred(th, *args) - y, x0, bounds=(lo, hi), loss="huber",
                                    f_scale=huber_scale, max_nfev=2000)
            except (ValueError, FloatingPointError):
                continue
            if best is None or res.cost < best.cost:
                best = res
        return best

    all_idx = np.arange(len(records))
    best = solve(all_idx, model.starts(loss))
    if best is None:
        raise RuntimeError("fit_law: no start converged")
    p = model.full(best.x)
    resid = model.log_pred(best.x, N, D, gmse, fams) - np.log(loss)
    natural = _natural(p)
    names = [{"a": "A", "b": "B", "e": "E"}.get(n, n) for n in model.all_names]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(records), len(records))
        res = solve(idx, [best.x])
        if res is not None:
            samples.append(_natural(model.full(res.x)))
    intervals = {}
    if samples:
        q = (1 - confidence) / 2 * 100
        for n in names:
            vals = np.array([s[n] for s in samples])
            intervals[n] = (float(np.percentile(vals, q)), float(np.percentile(vals, 100 - q)))
    return FitResult(law=model.law(p), names=names, params={n: float(natural[n]) for n in names},
                     intervals=intervals, n_records=len(records), n_bootstrap=len(samples), cost=float(best.cost),
                     rmse_log=float(np.sqrt(np.mean(resid ** 2))))


def plot_fit(result: FitResult, records: Sequence[dict], path) -> None:
    """Two panels: loss vs N per format (points, fitted curves at each run's D), ρ vs GMSE per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N, D, loss, gmse, fams = _prepare(records)
    labels = [parse_format(r["format"]).label for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {}
    for (lab, d) in sorted({(l, float(x)) for l, x in zip(labels, D)}):
        sel = [i for i in range(len(records)) if labels[i] == lab and D[i] == d]
        c = colours.setdefault(lab, f"C{len(colours) % 10}")
        fmt = records[sel[0]]["format"]
        ax1.scatter(N[sel], loss[sel], color=c, s=18, marker="o" if d == D.max() else "^")
        grid = np.geomspace(N.min() * 0.8, N.max() * 1.25, 50)
        ax1.plot(grid, [result.predict(n, d, fmt) for n in grid], color=c, lw=1,
                 ls="-" if d == D.max() else "--", label=f"{lab}, D={d:.3g}")
    ax1.set_xscale("log")
    ax1.set_xlabel("N (non-embedding parameters)")
    ax1.set_ylabel("eval loss")
    ax1.legend(fontsize=6)
    g = np.geomspace(1e-4, 0.9, 100)
    for fam in sorted(set(fams) - {"dense"}):
        k = result.law.constants(fam)
        ax2.plot(g, [k.Lc * math.tanh(max(k.F * math.log(x) / math.log(0.25), 1e-12)) ** k.C for x in g],
                 label=f"{fam} (fit)")
        pts = sorted({(float(x), l) for x, f, l in zip(gmse, fams, labels) if f == fam})
        ax2.scatter([x for x, _ in pts], [capacity(l, result.law) for _, l in pts], s=18)
    k = PUBLISHED.default
    ax2.plot(g, [k.Lc * math.tanh(k.F * math.log(x) / math.log(0.25)) ** k.C for x in g], "k:", label="paper")
    ax2.set_xscale("log")
    ax2.set_xlabel("GMSE")
    ax2.set_ylabel("capacity ρ")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_fit(result: FitResult, path) -> None:
    with open(path, "w") as f:
        json.dump(result.to_dict(), f, indent=2)
