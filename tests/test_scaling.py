"""Compressed-format scaling laws: GMSE against published / closed-form values, capacity, the
product rule, and recovery of a known law by fit_law."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from hf_ista.scaling import (VQ, Dense, FamilyConstants, Fp4, Int, ScalingLaw, Sparse, SparseInt, capacity, fit_law,
                             parse_format, product_capacity)
from hf_ista.scaling.formats import gaussian_sample

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("bits,published", [(1, 0.363), (2, 0.119), (3, 0.0374), (4, 0.0115)])
def test_int_gmse_matches_published(bits, published):
    assert Int(bits).gmse() == pytest.approx(published, rel=0.03)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_int_grid_is_optimal_uniform_grid(bits):
    """Independent check: brute-force the clip a of linspace(−a, a, 2^b) by Monte Carlo on N(0, 1)."""
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(1_000_000))
    n = 2 ** bits

    def mse(a):
        step = 2 * a / (n - 1)
        q = -a + step * torch.round((x.clamp(-a, a) + a) / step)
        return float(((q - x) ** 2).mean())

    best = min(mse(a) for a in np.linspace(0.5, 3.5, 151))
    assert Int(bits).gmse() == pytest.approx(best, rel=0.02)
    # compress on a large Gaussian tensor (row-RMS scale) matches the closed form
    xs = gaussian_sample()
    assert float(((Int(bits).compress(xs) - xs) ** 2).mean()) == pytest.approx(Int(bits).gmse(), rel=0.01)


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_sparse_gmse_is_gaussian_tail_integral(density):
    t = stats.norm.isf(density / 2)
    expected, _ = integrate.quad(lambda x: x * x * stats.norm.pdf(x), -t, t)
    assert Sparse(density).gmse() == pytest.approx(expected, rel=1e-6)
    xs = gaussian_sample()
    mc = float(((Sparse(density).compress(xs) - xs) ** 2).mean())
    assert mc == pytest.approx(expected, rel=0.01)


def test_capacity_ordering_and_published_values():
    rho = {b: capacity(Int(b)) for b in (1, 2, 3, 4, 8)}
    assert rho[1] < rho[2] < rho[4] < rho[8] < 1
    # paper: rho ~ 0.18, 0.44, 0.67, 0.82 for INT1..4 with F 0.41, C 1.39
    for b, published in zip((1, 2, 3, 4), (0.18, 0.44, 0.67, 0.82)):
        assert rho[b] == pytest.approx(published, abs=0.01)
    assert capacity(Dense()) == 1.0
    # refitted constants: the formula by hand
    law = ScalingLaw(families={"int": FamilyConstants(F=0.6, C=2.0, Lc=0.9)})
    g = Int(3).gmse()
    assert capacity(Int(3), law) == pytest.approx(0.9 * math.tanh(0.6 * math.log(g) / math.log(0.25)) ** 2.0)


def test_product_rule_computed_consistently():
    fmt = SparseInt(0.5, 4)
    out = product_capacity(fmt)
    g = fmt.gmse()
    assert out["direct"] == pytest.approx(math.tanh(0.41 * math.log(g) / math.log(0.25)) ** 1.39)
    assert out["product"] == pytest.approx(capacity(Sparse(0.5)) * capacity(Int(4)))
    assert out["ratio"] == pytest.approx(out["direct"] / out["product"])
    # sparse-then-quantised is worse than either part alone
    assert g > Sparse(0.5).gmse() and g > Int(4).gmse()
    print(f"rho(sparse0.5+int4) direct {out['direct']:.4f} vs product {out['product']:.4f} (ratio {out['ratio']:.3f})")


def test_format_reconstructions_are_representable():
    x = torch.randn(64, 128, dtype=torch.float64)
    for bits in (2, 4):
        q = Int(bits).compress(x)
        assert max(len(torch.unique(row)) for row in q) <= 2 ** bits
        q = Int(bits, group_size=32).compress(x)
        assert max(len(torch.unique(g)) for g in q.reshape(-1, 32)) <= 2 ** bits
    s = Sparse(0.25).compress(x)
    assert int((s != 0).sum()) == 64 * 32 and torch.equal(s[s != 0], x[s != 0])
    nm = Sparse(pattern="2:4").compress(x)
    assert torch.all((nm.reshape(-1, 4) != 0).sum(-1) == 2)
    si = SparseInt(0.5, 2).compress(x)
    assert int((si != 0).sum(-1).max()) <= 64 and max(len(torch.unique(r[r != 0])) for r in si) <= 4
    f = Fp4().compress(x)
    assert max(len(torch.unique(r)) for r in f) <= 15
    v = VQ(2, 2).compress(x)
    assert VQ(2, 2).gmse() < 0.119  # 2-D VQ at 2 bits/coordinate beats the scalar INT2 grid
    assert float(((v - x) ** 2).mean()) < 0.15
    assert parse_format("sparse0.5+int4") == SparseInt(0.5, 4) and parse_format("int4g32") == Int(4, 32)
    assert parse_format(Int(3).to_dict()) == Int(3)


TRUE = ScalingLaw(A=60.0, alpha=0.25, B=300.0, beta=0.3, E=1.5,
                  families={"int": FamilyConstants(F=0.5, C=1.8), "sparse": FamilyConstants(F=0.35, C=1.2)})
FORMATS = [Dense(), Int(1), Int(2), Int(3), Int(4), Sparse(0.25), Sparse(0.5), Sparse(0.75)]


def _records(Ns, Ds, rng, noise=0.01):
    return [{"N": N, "D": D, "format": f.to_dict(), "gmse": f.gmse(), "true": TRUE.predict(N, D, f),
             "loss": TRUE.predict(N, D, f) * (1 + noise * rng.standard_normal())}
            for N in Ns for D in Ds for f in FORMATS]


def test_fit_recovers_known_law():
    rng = np.random.default_rng(0)
    train = _records(np.geomspace(1e6, 1e8, 5), (1e7, 1e8, 1e9, 1e10), rng)
    held = _records((2e6, 5e7), (3e8, 3e9), rng)
    result = fit_law(train, n_bootstrap=100, seed=0, confidence=0.99)  # 9 intervals: 99 % each
    truth = {"A": TRUE.A, "alpha": TRUE.alpha, "B": TRUE.B, "beta": TRUE.beta, "E": TRUE.E,
             "int.F": 0.5, "int.C": 1.8, "sparse.F": 0.35, "sparse.C": 1.2}
    print(result.table())
    for name, value in truth.items():
        lo, hi = result.intervals[name]
        assert lo <= value <= hi, (name, value, lo, hi)
    for r in held:
        assert result.predict(r["N"], r["D"], r["format"]) == pytest.approx(r["true"], rel=0.01)
    assert result.dense_equivalent(1e7, Int(2)) == pytest.approx(1e7 * capacity(Int(2), result.law))


def test_cli_fit_prints_table_and_writes_plot(tmp_path, capsys):
    from hf_ista import cli
    from hf_ista.callbacks.scaling_law import append_record

    rng = np.random.default_rng(1)
    store = tmp_path / "runs.jsonl"
    for r in _records(np.geomspace(1e6, 1e8, 4), (1e8, 1e9, 1e10), rng, noise=0.0):
        append_record(store, r)
    cli.main(["scaling", "fit", str(store), "--bootstrap", "5", "--predict", "1e7,1e9,int2",
              "--json", str(tmp_path / "fit.json")])
    out = capsys.readouterr().out
    expected = TRUE.predict(1e7, 1e9, Int(2))
    line = next(l for l in out.splitlines() if l.startswith("predict"))
    assert float(line.split("loss ")[1].split(",")[0]) == pytest.approx(expected, rel=1e-3)  # noise-free data
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    import json
    assert json.loads((tmp_path / "fit.json").read_text())["params"]["alpha"] == pytest.approx(0.25, rel=0.01)
