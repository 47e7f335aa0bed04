"""DCT-AdamW and the DCT basis: the basis and Makhoul's FFT route, the top-r selection on gradients
of known low rank, a dense implementation of the equations written here, the options (error
feedback, moment rotation, projection gap, fft), the AdamW fallback, checkpoints, bad input."""
import io
import math

import pytest
import torch

from hf_ista.kernels import get_backend, set_backend, triton_available
from hf_ista.kernels import lowrank as K
from hf_ista.linalg import dct, dct_matrix
from hf_ista.optim import DCTAdamW, LDAdam
from hf_ista.optim import dct_adamw as dct_adamw_module

pytestmark = pytest.mark.usefixtures("single_thread")

ADAMW_KEYS = {"step", "exp_avg", "exp_avg_sq"}
BASE_KEYS = {"step", "indices", "exp_avg", "exp_avg_sq"}
EF_MODES = ["none", "fp32", "8bit", "4bit"]
QB = 64  # the quantisation block of the error


def _basis(n: int) -> torch.Tensor:
    """Orthonormal DCT-II basis vectors as columns, from the formula, float64 then fp32:
    ``Q[j, k] = c_k cos(pi k (2j + 1) / (2n))``, ``c_0 = sqrt(1/n)``, ``c_k = sqrt(2/n)``."""
    j = torch.arange(n, dtype=torch.float64)[:, None]
    k = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.where(k == 0, math.sqrt(1 / n), math.sqrt(2 / n))
    return (c * torch.cos(math.pi * k * (2 * j + 1) / (2 * n))).float()


def _grad(shape, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(shape, generator=g) * (1.0 + 0.5 * math.sin(step))


def _param(shape, seed=0, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype))


def _oriented(x):
    return x if x.shape[0] <= x.shape[1] else x.T


# ---------------------------------------------------------------------------------------------
# the basis and the FFT route
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100])
def test_dct_matrix_is_orthogonal_dct2(n):
    q = dct_matrix(n)
    assert q.shape == (n, n) and q.dtype == torch.float32
    torch.testing.assert_close(q.T @ q, torch.eye(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(q @ q.T, torch.eye(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(q, _basis(n), rtol=0, atol=1e-6)
    assert dct_matrix(n) is q  # built once per size and shared
    if n > 1:  # column 0 is the constant vector, column 1 decreasing (a half cosine)
        torch.testing.assert_close(q[:, 0], torch.full((n,), n**-0.5), rtol=0, atol=1e-6)
        assert torch.all(q[1:, 1] < q[:-1, 1])


@pytest.mark.parametrize("n", [0, -3, 2.0])
def test_dct_matrix_bad_size(n):
    with pytest.raises(ValueError, match=r"\bn="):
        dct_matrix(n)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 64, 100, 127])
@pytest.mark.parametrize("cols", [1, 5])
def test_dct_fft_equals_matmul(n, cols):
    a = torch.randn(n, cols, generator=torch.Generator().manual_seed(n * 10 + cols))
    expected = dct_matrix(n).T @ a
    got = dct(a)
    assert got.shape == (n, cols) and got.dtype == torch.float32
    assert torch.linalg.norm(got - expected) <= 1e-4 * torch.linalg.norm(expected)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # a transposed (non-contiguous) input is the same matrix
    torch.testing.assert_close(dct(a.T.contiguous().T), got, rtol=0, atol=0)


def _run(shape, steps, seed=3, **kw):
    p = _param(shape, seed=seed)
    opt = DCTAdamW([dict(params=[p], rank=3)], lr=1e-2, weight_decay=0.1, **kw)
    history = []
    for step in range(1, steps + 1):
        p.grad = _grad(shape, step, seed=seed + 1)
        opt.step()
        history.append((p.detach().clone(), opt.state[p]["indices"].clone()))
    return history


@pytest.mark.parametrize("shape", [(10, 16), (21, 9)], ids=["wide", "tall"])
def test_fft_on_off_same_steps(shape):
    on = _run(shape, 4, fft="on", error_feedback="fp32")
    off = _run(shape, 4, fft="off", error_feedback="fp32")
    for (p_on, i_on), (p_off, i_off) in zip(on, off):
        assert torch.equal(i_on, i_off)
        torch.testing.assert_close(p_on, p_off, rtol=0, atol=1e-6)


def test_fft_auto_takes_the_fft_route_from_the_threshold(monkeypatch):
    calls = []

    def spy(a):
        calls.append(a.shape[0])
        return dct(a)

    monkeypatch.setattr(dct_adamw_module, "dct", spy)
    monkeypatch.setitem(dct_adamw_module.FFT_MIN_SIZE, "cpu", 8)
    small, big = _param((5, 12), seed=1), _param((8, 12), seed=2)
    opt = DCTAdamW([dict(params=[small, big], rank=2)], fft="auto")
    small.grad, big.grad = torch.randn(5, 12), torch.randn(8, 12)
    opt.step()
    assert calls == [8]
    opt_off = DCTAdamW([dict(params=[big], rank=2)], fft="off")
    opt_off.step()
    assert calls == [8]


# ---------------------------------------------------------------------------------------------
# the top-r selection on a gradient of known low rank
# ---------------------------------------------------------------------------------------------


def _low_rank_gradient(n, N, chosen, seed, noise=1e-3):
    """``G = sum_k Q[:, k] w_k^T + noise`` over the chosen DCT vectors: its energy lies on them."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(len(chosen), N, generator=gen)
    return dct_matrix(n)[:, chosen] @ W + noise * torch.randn(n, N, generator=gen)


@pytest.mark.parametrize("shape,chosen", [((16, 40), [2, 5, 11, 13]), ((48, 20), [0, 7, 8, 19])],
                         ids=["wide", "tall"])
def test_top_r_keeps_the_svd_energy(shape, chosen):
    n, N = min(shape), max(shape)
    r = len(chosen)
    G = _low_rank_gradient(n, N, chosen, seed=5)  # oriented view
    S = dct_matrix(n).T @ G
    idx = S.abs().sum(1).topk(r).indices.sort().values
    assert idx.tolist() == chosen  # the l1 row scores recover the DCT vectors, by construction
    kept = S[idx].square().sum()
    optimal = torch.linalg.svdvals(G)[:r].square().sum()  # the best any rank-r subspace keeps
    assert kept >= 0.9 * optimal
    assert kept <= optimal * (1 + 1e-5)
    # not vacuous: r other DCT vectors keep almost nothing
    others = [k for k in range(n) if k not in chosen][:r]
    assert S[others].square().sum() < 0.01 * optimal

    # the optimizer picks the same vectors at its first step
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = DCTAdamW([dict(params=[p], rank=r)], error_feedback="fp32")
    p.grad = G if shape[0] <= shape[1] else G.T.contiguous()
    opt.step()
    assert opt.state[p]["indices"].tolist() == chosen
    # and its error feedback holds only (part of) the noise, of norm ~1e-3 sqrt(n N)
    assert torch.linalg.norm(opt.state[p]["error"]) < 2e-3 * math.sqrt(n * N)


# ---------------------------------------------------------------------------------------------
# an independent dense implementation of the DCT-AdamW equations
# ---------------------------------------------------------------------------------------------


def _quant_round_trip(x, bits, block=QB):
    """Per block of ``block`` consecutive entries (row-major, the last block short): low = min,
    step = (max - min) / levels, code = floor((x - low) / step + 0.5); step 0 decodes to low."""
    levels = (1 << bits) - 1
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block):
        seg = flat[start: start + block]
        lo = seg.min()
        step = (seg.max() - lo) / levels
        if step > 0:
            out[start: start + block] = lo + ((seg - lo) / step + 0.5).floor().clamp(0, levels) * step
        else:
            out[start: start + block] = lo
    return out.view_as(x)


class DenseDCTAdamW:
    def __init__(self, weight, rank, lr, betas, eps, weight_decay, gap, ef, rotate):
        self.tall = weight.shape[0] > weight.shape[1]
        self.w = _oriented(weight.detach()).clone().float()
        n, N = self.w.shape
        self.Q = _basis(n)
        self.r, self.lr, self.betas, self.eps, self.wd = rank, lr, betas, eps, weight_decay
        self.gap, self.ef, self.rotate = gap, ef, rotate
        self.t = 0
        self.idx = None
        self.m = torch.zeros(rank, N)
        self.v = torch.zeros(rank, N)
        self.e = torch.zeros(n, N)

    def weight(self):
        return self.w.T if self.tall else self.w

    def step(self, grad):
        b1, b2 = self.betas
        self.t += 1
        t = self.t
        a = _oriented(grad).float() + self.e
        if t == 1 or t % self.gap == 0:
            S = self.Q.T @ a
            new = S.abs().sum(1).topk(self.r).indices.sort().values
            if self.rotate and t > 1:
                R = self.Q[:, new].T @ self.Q[:, self.idx]
                assert torch.allclose(R, R.round(), atol=1e-5)  # a selection matrix
                R = R.round()  # without the ~1e-7 rounding noise (v must stay >= 0)
                self.m, self.v = R @ self.m, R @ self.v
            self.idx = new
            ghat = S[self.idx]
        else:
            ghat = self.Q[:, self.idx].T @ a
        B = self.Q[:, self.idx]
        if self.ef == "fp32":
            self.e = a - B @ ghat
        elif self.ef in ("8bit", "4bit"):
            self.e = _quant_round_trip(a - B @ ghat, 8 if self.ef == "8bit" else 4)
        self.m = b1 * self.m + (1 - b1) * ghat
        self.v = b2 * self.v + (1 - b2) * ghat**2
        u = (self.m / (1 - b1**t)) / ((self.v / (1 - b2**t)).sqrt() + self.eps)
        self.w = self.w * (1 - self.lr * self.wd) - self.lr * B @ u


HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("rotate,gap", [(False, 1), (True, 1), (True, 3)], ids=["plain", "rotate", "rotate-gap3"])
@pytest.mark.parametrize("ef", EF_MODES)
@pytest.mark.parametrize("shape,rank", [((10, 16), 3), ((20, 12), 4)], ids=["wide", "tall"])
def test_matches_dense_reference(shape, rank, ef, rotate, gap):
    p = _param(shape)
    start = p.detach().clone()
    opt = DCTAdamW([dict(params=[p], rank=rank)], update_proj_gap=gap, error_feedback=ef,
                   rotate_moments=rotate, fft="off", **HP)
    ref = DenseDCTAdamW(p, rank, gap=gap, ef=ef, rotate=rotate, **HP)
    seen = set()
    for step in range(1, 11):
        g = _grad(shape, step)
        p.grad = g.clone()
        opt.step()
        ref.step(g)
        assert torch.equal(p.grad, g)  # p.grad is left as given
        assert opt.state[p]["indices"].tolist() == ref.idx.tolist(), f"step {step}"
        seen.add(tuple(ref.idx.tolist()))
        diff = (p.detach() - ref.weight()).abs().max().item()
        assert diff <= 1e-5, f"step {step}: max |param - reference| = {diff}"
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.m, rtol=0, atol=1e-5)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.v, rtol=0, atol=1e-5)
    assert len(seen) > 1  # the subspace moved: rotation and error feedback were exercised
    assert (p.detach() - start).abs().max() > 0.02  # 2000x the tolerance


# ---------------------------------------------------------------------------------------------
# options: error feedback, rotation, projection gap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(10, 13), (13, 10)], ids=["wide", "tall"])
@pytest.mark.parametrize("ef", EF_MODES)
def test_error_feedback_state(ef, shape):
    p = _param(shape)
    opt = DCTAdamW([dict(params=[p], rank=4)], error_feedback=ef)
    p.grad = _grad(shape, 1)
    opt.step()
    state = opt.state[p]
    n, N = 10, 13
    extra = {"none": set(), "fp32": {"error"}, "8bit": {"error_codes", "error_scales"},
             "4bit": {"error_codes", "error_scales"}}[ef]
    assert set(state) == BASE_KEYS | extra
    assert state["step"] == 1
    assert state["indices"].dtype == torch.int64 and state["indices"].shape == (4,)
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (4, N)
    blocks = math.ceil(n * N / QB)  # 130 entries: 3 blocks, the last one short
    if ef == "fp32":
        assert state["error"].dtype == torch.float32 and state["error"].shape == (n, N)  # oriented view
    elif ef != "none":
        bits = 8 if ef == "8bit" else 4
        assert state["error_codes"].dtype == torch.uint8
        assert state["error_codes"].shape == (blocks * QB * bits // 8,)
        assert state["error_scales"].dtype == torch.float32 and state["error_scales"].shape == (blocks, 2)


@pytest.mark.parametrize("shape", [(10, 13), (13, 10)], ids=["wide", "tall"])
def test_fp32_error_by_hand(shape):
    """e = a - Q[:, idx] ĝ with ĝ = (Q^T a)[idx] at a refresh, Q[:, idx]^T a in between."""
    p = _param(shape)
    before = p.detach().clone()
    lr, r = 0.1, 4
    opt = DCTAdamW([dict(params=[p], rank=r)], lr=lr, weight_decay=0.01, update_proj_gap=5, error_feedback="fp32")
    Q = _basis(10)
    g1, g2 = _oriented(_grad(shape, 1)), _oriented(_grad(shape, 2))
    p.grad = _grad(shape, 1)
    opt.step()
    S = Q.T @ g1
    idx = S.abs().sum(1).topk(r).indices.sort().values
    ghat = S[idx]
    e1 = g1 - Q[:, idx] @ ghat
    assert opt.state[p]["indices"].tolist() == idx.tolist()
    torch.testing.assert_close(opt.state[p]["error"], e1, rtol=0, atol=1e-6)
    torch.testing.assert_close(Q[:, idx].T @ opt.state[p]["error"], torch.zeros(r, 13), rtol=0, atol=1e-5)
    # first step: p (1 - lr wd) - lr Q[:, idx] sign(ĝ)
    expected = _oriented(before) * (1 - lr * 0.01) - lr * Q[:, idx] @ torch.sign(ghat)
    torch.testing.assert_close(_oriented(p.detach()), expected, rtol=0, atol=1e-6)

    p.grad = _grad(shape, 2)
    opt.step()  # step 2: no refresh (gap 5), ĝ = Q[:, idx]^T (g2 + e1)
    a2 = g2 + e1
    e2 = a2 - Q[:, idx] @ (Q[:, idx].T @ a2)
    assert opt.state[p]["indices"].tolist() == idx.tolist()
    torch.testing.assert_close(opt.state[p]["error"], e2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ef", ["8bit", "4bit"])
def test_quantised_error_within_half_a_step(ef):
    shape = (12, 21)
    p = _param(shape)
    opt = DCTAdamW([dict(params=[p], rank=3)], error_feedback=ef)
    g = _grad(shape, 1)
    p.grad = g.clone()
    opt.step()
    state = opt.state[p]
    Q = _basis(12)
    idx = state["indices"]
    exact = (g - Q[:, idx] @ (Q[:, idx].T @ g)).reshape(-1)
    decoded = K.dequantize_add(torch.zeros_like(exact), state["error_codes"], state["error_scales"],
                               8 if ef == "8bit" else 4, QB, torch.empty_like(exact))
    step = state["error_scales"][:, 1].repeat_interleave(QB)[: exact.numel()]
    err = (decoded - exact).abs()
    assert torch.all(err <= step / 2 + 1e-5)
    assert err.max() > 0.1 * step.max()  # it is quantised, not exact


def _dominant(n, N, comps, seed):
    """A gradient whose DCT coefficients are W on ``comps`` (weights decreasing) and 0 elsewhere."""
    W = torch.randn(len(comps), N, generator=torch.Generator().manual_seed(seed)).abs() + 1.0
    return dct_matrix(n)[:, comps] @ W


@pytest.mark.parametrize("rotate", [True, False])
def test_rotate_moments_follow_their_basis_vectors(rotate):
    n, N, r = 12, 20, 3
    b1, b2 = 0.9, 0.99
    p = torch.nn.Parameter(torch.zeros(n, N))
    opt = DCTAdamW([dict(params=[p], rank=r)], betas=(b1, b2), update_proj_gap=1, rotate_moments=rotate)
    Q = dct_matrix(n)
    g1, g2 = _dominant(n, N, [1, 3, 5], seed=1), _dominant(n, N, [3, 5, 9], seed=2)
    p.grad = g1
    opt.step()
    state = opt.state[p]
    assert state["indices"].tolist() == [1, 3, 5]
    m1, v1 = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    torch.testing.assert_close(m1, (1 - b1) * (Q.T @ g1)[[1, 3, 5]], rtol=0, atol=1e-6)

    p.grad = g2
    opt.step()
    assert state["indices"].tolist() == [3, 5, 9]
    ghat2 = (Q.T @ g2)[[3, 5, 9]]
    if rotate:  # vectors 3 and 5 move from slots 1, 2 to slots 0, 1; vector 9 starts at 0
        m_prev = torch.stack((m1[1], m1[2], torch.zeros(N)))
        v_prev = torch.stack((v1[1], v1[2], torch.zeros(N)))
    else:  # the rows stay in their slots, whatever vector the slot now holds
        m_prev, v_prev = m1, v1
    torch.testing.assert_close(state["exp_avg"], b1 * m_prev + (1 - b1) * ghat2, rtol=0, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], b2 * v_prev + (1 - b2) * ghat2**2, rtol=0, atol=1e-6)
    if rotate:
        torch.testing.assert_close(state["exp_avg_sq"][2], (1 - b2) * ghat2[2] ** 2, rtol=1e-6, atol=0)


def test_update_proj_gap_keeps_indices_between_refreshes():
    """gap 3: the basis vectors are chosen at step 1 and at every multiple of 3, kept in between
    (the authors' schedule); in between, the projection is Q[:, idx]^T g on the old vectors."""
    n, N, r, b1 = 12, 20, 3, 0.9
    p = torch.nn.Parameter(torch.zeros(n, N))
    opt = DCTAdamW([dict(params=[p], rank=r)], betas=(b1, 0.999), update_proj_gap=3, error_feedback="none",
                   rotate_moments=False)

    def comps(t):  # a different dominant set at every step
        return sorted({t % 12, (t + 4) % 12, (t + 8) % 12})

    refresh = {1: 1, 2: 1, 3: 3, 4: 3, 5: 3, 6: 6, 7: 6}
    for t in range(1, 8):
        m_before = opt.state[p]["exp_avg"].clone() if t > 1 else None
        p.grad = _dominant(n, N, comps(t), seed=t)
        opt.step()
        state = opt.state[p]
        assert state["indices"].tolist() == comps(refresh[t]), t
        if refresh[t] != t:  # the gradient has nothing on the kept vectors: m only decays
            torch.testing.assert_close(state["exp_avg"], b1 * m_before, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# plain AdamW for 1-D params, groups without rank, embedding-sized matrices
# ---------------------------------------------------------------------------------------------


def test_full_rank_params_are_adamw():
    shapes = [(7,), (6, 5), (32000, 2), (4, 9)]
    ours = [_param(s, seed=i) for i, s in enumerate(shapes)]
    theirs = [_param(s, seed=i) for i, s in enumerate(shapes)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = DCTAdamW([dict(params=[ours[0], ours[2], ours[3]], rank=2, error_feedback="4bit"),
                    dict(params=[ours[1]])], **kw)
    adamw = torch.optim.AdamW(theirs, **kw)
    start = [p.detach().clone() for p in ours]
    for step in range(1, 11):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            g = _grad(p.shape, step, seed=i + 2)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
    for i in range(3):
        torch.testing.assert_close(ours[i].detach(), theirs[i].detach(), rtol=0, atol=1e-6)
        assert (ours[i].detach() - start[i]).abs().max() > 0.05
        assert set(opt.state[ours[i]]) == ADAMW_KEYS
    assert set(opt.state[ours[3]]) == BASE_KEYS | {"error_codes", "error_scales"}  # the control
    assert (ours[3].detach() - theirs[3].detach()).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def _make(ef, lr=1e-2, rank=3, dtype=torch.bfloat16):
    params = [_param((10, 16), seed=1), _param((20, 12), seed=2, dtype=dtype), _param((5,), seed=3)]
    opt = DCTAdamW([dict(params=params[:2], rank=rank), dict(params=params[2:])], lr=lr, weight_decay=0.1,
                   update_proj_gap=2, error_feedback=ef, rotate_moments=True)
    return params, opt


def _steps(params, opt, steps):
    for step in steps:
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, step, seed=10 + i).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("ef", EF_MODES)
def test_state_dict_round_trip(ef):
    params, opt = _make(ef)
    _steps(params, opt, range(1, 6))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = DCTAdamW([dict(params=params2[:2], rank=1), dict(params=params2[2:])], lr=1.0)
    opt2.load_state_dict(loaded)
    group = opt2.param_groups[0]
    assert (group["lr"], group["rank"], group["error_feedback"], group["update_proj_gap"]) == (1e-2, 3, ef, 2)
    for p, p2 in zip(params, params2):
        s, s2 = opt.state[p], opt2.state[p2]
        assert set(s2) == set(s) and s2["step"] == s["step"] == 5
        for key, value in s.items():
            if torch.is_tensor(value):
                assert s2[key].dtype == value.dtype, key
                assert torch.equal(s2[key], value), key
                assert s2[key].data_ptr() != value.data_ptr()
    bf16_state = opt2.state[params2[1]]  # torch would cast these to the parameter's bf16
    assert bf16_state["indices"].dtype == torch.int64
    assert bf16_state["exp_avg"].dtype == torch.float32
    if ef == "fp32":
        assert bf16_state["error"].dtype == torch.float32
    elif ef != "none":
        assert bf16_state["error_codes"].dtype == torch.uint8
        assert bf16_state["error_scales"].dtype == torch.float32
    _steps(params, opt, range(6, 10))
    _steps(params2, opt2, range(6, 10))
    # and both equal an uninterrupted run
    params3, opt3 = _make(ef)
    _steps(params3, opt3, range(1, 10))
    for p, p2, p3 in zip(params, params2, params3):
        assert torch.equal(p, p2) and torch.equal(p, p3)


def test_loading_a_foreign_checkpoint_raises():
    opt = DCTAdamW([dict(params=[_param((4, 5))], rank=2)])
    adam_params = [_param((4, 5))]
    adamw = torch.optim.AdamW(adam_params)
    adam_params[0].grad = torch.ones(4, 5)
    adamw.step()
    with pytest.raises(ValueError, match="not written by DCTAdamW"):
        opt.load_state_dict(adamw.state_dict())
    ld_params = [_param((4, 5))]
    ldadam = LDAdam([dict(params=ld_params, rank=2)])
    ld_params[0].grad = torch.ones(4, 5)
    ldadam.step()
    with pytest.raises(ValueError, match="not written by DCTAdamW"):
        opt.load_state_dict(ldadam.state_dict())
    assert not opt.state


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(rank=0), "rank"),
    (dict(rank=1.5), "rank"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(update_proj_gap=1.5), "update_proj_gap"),
    (dict(error_feedback="2bit"), "error_feedback"),
    (dict(fft="maybe"), "fft"),
    (dict(rotate_moments="yes"), "rotate_moments"),
    (dict(eps=-1.0), "eps"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        DCTAdamW([_param((3, 4))], **kwargs)


def test_integer_param_is_rejected():
    with pytest.raises(ValueError, match=r"\bparams=.*int32"):
        DCTAdamW([torch.zeros(3, 4, dtype=torch.int32)], rank=2)


@pytest.mark.parametrize("ef", ["fp32", "4bit"])
def test_nan_gradient_skips_the_step(ef):
    params, opt = _make(ef, dtype=torch.float32)
    _steps(params, opt, range(1, 4))
    poisoned, healthy = params[0], params[2]
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[poisoned].items()}
    p_before, h_before = poisoned.detach().clone(), healthy.detach().clone()
    for i, p in enumerate(params):
        p.grad = _grad(p.shape, 4, seed=10 + i)
    poisoned.grad[2, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        opt.step()
    assert torch.equal(poisoned.detach(), p_before)
    for k, v in before.items():
        assert torch.equal(opt.state[poisoned][k], v) if torch.is_tensor(v) else opt.state[poisoned][k] == v, k
    assert opt.state[healthy]["step"] == 4 and not torch.equal(healthy.detach(), h_before)


# ---------------------------------------------------------------------------------------------
# parameter dtypes
# ---------------------------------------------------------------------------------------------


def _descend(dtype, shape, ef, steps=30):
    gen = torch.Generator().manual_seed(8)
    # a dominant rank-3 part (a clear spectral gap: the top-3 subspace of the first gradient does
    # not turn under bf16 / fp16 rounding) plus a full-rank rest
    target = 2 * torch.randn(shape[0], 3, generator=gen) @ torch.randn(3, shape[1], generator=gen) / 3
    target += 0.3 * torch.randn(shape, generator=gen)
    p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    opt = DCTAdamW([dict(params=[p], rank=3)], lr=0.05, error_feedback=ef)
    losses, first = [], None
    for _ in range(steps):
        loss = 0.5 * (p.float() - target).square().sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        if first is None:
            grad0 = p.grad.float().clone()
        opt.step()
        if first is None:
            assert (p.detach().float() * grad0).sum() < 0  # from 0: a descent direction
            first = p.detach().float().clone()
    return p, opt, losses, first


@pytest.mark.parametrize("ef", ["fp32", "4bit"])
@pytest.mark.parametrize("shape", [(12, 16), (16, 12)], ids=["wide", "tall"])
def test_param_dtypes_descend_quadratic(shape, ef):
    runs = {dtype: _descend(dtype, shape, ef) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    first32 = runs[torch.float32][3]
    for dtype, (p, opt, losses, first) in runs.items():
        assert p.dtype == dtype
        # 3 DCT vectors of 12 per step, not the SVD's: a steady, slower descent than LDAdam's
        assert losses[-1] < losses[15] < 0.95 * losses[0] and losses[-1] < 0.9 * losses[0], (dtype, losses)
        assert abs(losses[-1] - runs[torch.float32][2][-1]) < 0.02 * losses[-1]  # the same path as fp32
        cos = torch.nn.functional.cosine_similarity(first.view(-1), first32.view(-1), dim=0)
        assert cos > 0.99, (dtype, cos)
        state = opt.state[p]
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.float32, key
                assert torch.isfinite(value).all(), key


# ---------------------------------------------------------------------------------------------
# backend switch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def restore_backend():
    saved = get_backend()
    yield
    set_backend(saved)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("ef", ["8bit", "4bit"])
def test_triton_backend_matches_torch(restore_backend, ef):
    runs = []
    for backend in ("torch", "triton"):
        set_backend(backend)
        params, opt = _make(ef, dtype=torch.float32)  # the interpreter gets bf16 arithmetic wrong
        _steps(params, opt, range(1, 4))
        runs.append((params, opt))
    (pt, ot), (pk, ok) = runs
    for p, q in zip(pt, pk):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-6)
    for p, q in zip(pt[:2], pk[:2]):
        assert torch.equal(ot.state[p]["indices"], ok.state[q]["indices"])
        assert torch.equal(ot.state[p]["error_codes"], ok.state[q]["error_codes"])
