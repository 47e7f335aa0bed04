"""EFCP (SparseMFAC, SparseGGT) against independent expectations written here: the explicit dense
F̂ and ``torch.linalg.solve``, GGT's formula through an explicit SVD of the window, the Gram
recomputed from the window, error feedback's conservation of mass, the memory bound; and the
optimizer contract (lossless checkpoints, NaN skip, argument errors)."""
import io
import math
import warnings

import pytest
import torch

import hf_ista
from hf_ista.optim import MicroAdam, SparseGGT, SparseMFAC

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = [(7, 9), (40,), (3, 5, 4)]


def _grads(step: int, shapes=SHAPES, scale=0.1):
    gen = torch.Generator().manual_seed(1000 + step)
    return [scale * torch.randn(s, generator=gen) for s in shapes]


def _params(shapes=SHAPES, dtype=torch.float32):
    return [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone().to(p.dtype)
    opt.step()


class Reference:
    """Error feedback with a plain per-parameter ``torch.topk`` (every test parameter is one
    chunk) and the window as a dense ``m × d`` float64 matrix in ring order."""

    def __init__(self, shapes, m, density):
        self.errors = [torch.zeros(math.prod(s), dtype=torch.float64) for s in shapes]
        self.density, self.m, self.t = density, m, 0
        self.window = torch.zeros(m, sum(math.prod(s) for s in shapes), dtype=torch.float64)

    def push(self, grads) -> torch.Tensor:
        cs = []
        for i, g in enumerate(grads):
            acc = self.errors[i] + g.reshape(-1).double()
            k = min(acc.numel(), max(1, math.ceil(self.density * acc.numel())))
            keep = acc.abs().topk(k).indices
            c = torch.zeros_like(acc)
            c[keep] = acc[keep]
            self.errors[i] = acc - c
            cs.append(c)
        c = torch.cat(cs)
        self.window[self.t % self.m] = c
        self.t += 1
        return c


def _direction(before, params, lr):
    return torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params)]).double() / lr


@pytest.mark.parametrize("density", [1.0, 0.05])
def test_mfac_direction_is_the_explicit_dense_solve(density):
    m, damp = 4, 0.1
    params = _params()
    opt = SparseMFAC(params, lr=1.0, m=m, density=density, damp=damp)
    ref = Reference(SHAPES, m, density)
    d = ref.window.shape[1]
    for t in range(7):  # the ring wraps
        before = [p.detach().clone() for p in params]
        _step(opt, params, _grads(t))
        c = ref.push(_grads(t))
        F = damp * torch.eye(d, dtype=torch.float64) + ref.window.T @ ref.window / m
        expected = torch.linalg.solve(F, c)
        got = _direction(before, params, 1.0)
        assert (got - expected).norm() / expected.norm() < 1e-4, t
    if density < 1:
        assert (ref.window != 0).sum(1).max() < d / 4  # the window really is sparse


@pytest.mark.parametrize("density", [1.0, 0.05])
def test_ggt_direction_is_the_formula_through_an_explicit_svd(density):
    m, eps = 4, 0.05
    params = _params()
    opt = SparseGGT(params, lr=1.0, m=m, density=density, eps=eps)
    ref = Reference(SHAPES, m, density)
    for t in range(7):
        before = [p.detach().clone() for p in params]
        _step(opt, params, _grads(t))
        c = ref.push(_grads(t))
        rows = ref.window[: min(t + 1, m)]
        U, S, _ = torch.linalg.svd(rows.T, full_matrices=False)  # d × r, the window's left vectors
        expected = U @ ((1 / (S + eps) - 1 / eps) * (U.T @ c)) + c / eps
        got = _direction(before, params, 1.0)
        assert (got - expected).norm() / expected.norm() < 1e-4, t


@pytest.mark.parametrize("cls", [SparseMFAC, SparseGGT])
def test_gram_is_the_recomputed_window_gram_after_wrapping(cls):
    m = 3
    shapes = [(50, 20), (40000,)]  # the second parameter spans two chunks
    params = _params(shapes)
    opt = cls(params, lr=1e-3, m=m, density=0.02)
    for t in range(8):
        _step(opt, params, _grads(t, shapes))
    rows = []
    for p in params:
        state = opt.state[p]
        dense = torch.zeros(m, state["error"].numel(), dtype=torch.float64)
        dense.scatter_(1, state["indices"].view(m, -1).long(), state["values"].view(m, -1).double())
        rows.append(dense)
    G = torch.cat(rows, dim=1)
    assert torch.count_nonzero(G, dim=1).tolist() == [20 + 2 * 400] * m  # 2 % of each chunk
    gram = opt.state[params[0]]["gram"]
    assert "gram" not in opt.state[params[1]]
    torch.testing.assert_close(gram.double(), G @ G.T, rtol=1e-5, atol=1e-6)


def test_error_feedback_conserves_mass():
    shapes = [(30, 30), (70000,)]  # 70000: three chunks, indices past 32767 (the authors' int16 overflow)
    m, steps = 4, 9
    params = _params(shapes)
    opt = SparseMFAC(params, lr=1e-3, m=m, density=0.03)
    applied = [torch.zeros(math.prod(s), dtype=torch.float64) for s in shapes]
    raw = [torch.zeros(math.prod(s), dtype=torch.float64) for s in shapes]
    for t in range(steps):
        grads = _grads(t, shapes, scale=1.0)
        _step(opt, params, grads)
        for i, (p, g) in enumerate(zip(params, grads)):
            state = opt.state[p]
            row = t % m
            c = torch.zeros(state["error"].numel(), dtype=torch.float64)
            c[state["indices"][row].reshape(-1).long()] = state["values"][row].reshape(-1).double()
            applied[i] += c[: g.numel()]
            raw[i] += g.reshape(-1).double()
    big = opt.state[params[1]]
    assert big["indices"].dtype == torch.int32 and big["indices"].max() > 32767
    for i, p in enumerate(params):
        error = opt.state[p]["error"][: raw[i].numel()].double()
        assert error.abs().sum() > 0
        torch.testing.assert_close(applied[i] + error, raw[i], rtol=0, atol=1e-5)


def test_momentum_accumulates_the_preconditioned_directions():
    lr, mu = 0.5, 0.6
    plain_params, mom_params = _params(), _params()
    plain = SparseMFAC(plain_params, lr=lr, m=3, density=0.1, damp=0.1)
    heavy = SparseMFAC(mom_params, lr=lr, m=3, density=0.1, damp=0.1, momentum=mu)
    buf = None
    for t in range(5):
        before_plain = [p.detach().clone() for p in plain_params]
        before_heavy = [p.detach().clone() for p in mom_params]
        _step(plain, plain_params, _grads(t))
        _step(heavy, mom_params, _grads(t))
        u = _direction(before_plain, plain_params, lr)
        buf = u if buf is None else mu * buf + u
        torch.testing.assert_close(_direction(before_heavy, mom_params, lr), buf, rtol=1e-5, atol=1e-6)


def test_window_memory_at_m1024_density_1pct_is_under_a_thirtieth_of_dense():
    d = 200_000
    p = torch.zeros(d, requires_grad=True)
    opt = SparseMFAC([p], lr=1e-3, m=1024, density=0.01)
    p.grad = torch.randn(d, generator=torch.Generator().manual_seed(0))
    opt.step()
    dense_window = 4 * 1024 * d
    assert opt.window_bytes() <= dense_window / 30
    # int32 indices + fp32 values of 1 % per chunk (7 chunks of 28572), the Gram, the fp32 error
    k = 7 * math.ceil(0.01 * 28572)
    assert opt.window_bytes() == 1024 * k * 8
    assert hf_ista.state_bytes(opt) == 1024 * k * 8 + 4 * 1024 * 1024 + 4 * 7 * 28572


def test_density_one_stores_the_dense_window():
    p = torch.zeros(1000, requires_grad=True)
    opt = SparseMFAC([p], lr=1e-3, m=8, density=1.0)
    p.grad = torch.randn(1000)
    opt.step()
    state = opt.state[p]
    assert state["indices"].numel() == 0 and state["error"].numel() == 0
    assert opt.window_bytes() == 4 * 8 * 1000
    torch.testing.assert_close(state["values"][0].reshape(-1), p.grad)


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        _step(opt, params, _grads(t))


@pytest.mark.parametrize("cls, kw", [(SparseMFAC, {"momentum": 0.9}), (SparseGGT, {}),
                                     (SparseMFAC, {"density": 1.0})])
def test_checkpoint_round_trip_is_bit_exact(cls, kw):
    params = _params(dtype=torch.bfloat16)
    opt = cls(params, lr=1e-2, m=3, **{"density": 0.1, **kw})
    _run(opt, params, 4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params2 = [p.detach().clone().requires_grad_(True) for p in params]
    opt2 = cls(params2, lr=1e-2, m=3, **{"density": 0.1, **kw})
    opt2.load_state_dict(saved)
    for p, q in zip(params, params2):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            if torch.is_tensor(value):
                assert other.dtype == value.dtype and torch.equal(other, value), key
            else:
                assert other == value, key
    assert opt2.state[params2[0]]["indices"].dtype == torch.int32  # not cast to the bf16 of the parameter
    _run(opt, params, 3, start=4)
    _run(opt2, params2, 3, start=4)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_refuses_a_checkpoint_of_another_optimizer():
    params = _params()
    micro = MicroAdam(params, lr=1e-3)
    _run(micro, params, 1)
    opt = SparseMFAC(params, lr=1e-3)
    with pytest.raises(ValueError, match="not written by SparseMFAC"):
        opt.load_state_dict(micro.state_dict())


@pytest.mark.parametrize("cls", [SparseMFAC, SparseGGT])
def test_nan_gradient_skips_the_step_and_leaves_state_untouched(cls):
    params, ref_params = _params(), _params()
    opt, ref = cls(params, lr=1e-2, m=3, density=0.1), cls(ref_params, lr=1e-2, m=3, density=0.1)
    _run(opt, params, 2)
    _run(ref, ref_params, 2)
    snapshot = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                for i, p in enumerate(params)}
    before = [p.detach().clone() for p in params]
    bad = _grads(99)
    bad[1][3] = float("nan")  # one parameter's gradient is poisoned: the global step is skipped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(opt, params, bad)
    assert any("NaN or inf" in str(w.message) for w in caught)
    for i, p in enumerate(params):
        assert torch.equal(p, before[i])
        for k, v in snapshot[i].items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v, k
    _run(opt, params, 2, start=2)
    _run(ref, ref_params, 2, start=2)
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls, kw, word", [
    (SparseMFAC, {"m": 0}, "m=0"), (SparseMFAC, {"density": 0.0}, "density=0.0"),
    (SparseMFAC, {"density": 1.5}, "density=1.5"), (SparseMFAC, {"damp": 0.0}, "damp=0.0"),
    (SparseMFAC, {"momentum": 1.0}, "momentum=1.0"), (SparseMFAC, {"lr": -1.0}, "lr=-1.0"),
    (SparseMFAC, {"weight_decay": -0.1}, "weight_decay=-0.1"), (SparseGGT, {"eps": 0.0}, "eps=0.0"),
    (SparseGGT, {"rcond": 1.0}, "rcond=1.0"), (SparseGGT, {"m": 2.5}, "m=2.5"),
])
def test_bad_hyperparameters_name_the_key(cls, kw, word):
    with pytest.raises(ValueError, match=word.replace(".", r"\.")):
        cls(_params(), **kw)


def test_the_window_is_global_so_m_must_agree_across_groups():
    a, b = _params()[:2]
    with pytest.raises(ValueError, match="m=8 is invalid.*same value in every param group"):
        SparseMFAC([{"params": [a]}, {"params": [b], "m": 8}], m=4)
    # lr, weight decay, momentum and density may differ per group
    opt = SparseMFAC([{"params": [a], "density": 0.5}, {"params": [b], "lr": 0.1, "momentum": 0.9}], m=4)
    _step(opt, [a, b], _grads(0)[:2])
    assert set(opt.state[a]) == {"indices", "values", "error", "gram", "step"}
    assert set(opt.state[b]) == {"indices", "values", "error", "momentum"}
    assert opt.state[a]["indices"].shape == (4, 1, 32) and opt.state[b]["indices"].shape == (4, 1, 1)


def test_a_parameter_without_gradient_is_not_moved_and_no_gradient_is_no_step():
    params = _params()
    opt = SparseMFAC(params, lr=1e-2, m=3, density=0.1)
    opt.step()  # no gradient anywhere: nothing happens
    assert all(not opt.state[p] for p in params)
    grads = _grads(0)
    params[0].grad, params[2].grad = grads[0], grads[2]
    opt.step()
    assert torch.equal(params[1], torch.zeros(SHAPES[1])) and params[0].abs().sum() > 0
    assert opt.state[params[0]]["step"] == 1
    assert torch.count_nonzero(opt.state[params[1]]["values"]) == 0  # a zero gradient in the window
