"""LDAdam: against a dense implementation of the equations written here, the error buffer's life
(zero_grad, gradient accumulation), the AdamW fallback, checkpoints, bad input, dtypes."""
import io
import math

import pytest
import torch

from hf_ista.kernels import get_backend, set_backend, triton_available
from hf_ista.optim import LDAdam, MicroAdam

pytestmark = pytest.mark.usefixtures("single_thread")

LOW_RANK_KEYS = {"step", "basis", "exp_avg", "exp_avg_sq", "error"}
ADAMW_KEYS = {"step", "exp_avg", "exp_avg_sq"}

# ---------------------------------------------------------------------------------------------
# an independent dense implementation of the LDAdam equations
# ---------------------------------------------------------------------------------------------


class DenseLDAdam:
    """LDAdam on one matrix, written from the equations (t is 1-based).

    The matrix is handled in its oriented view ``A`` (``n x N``, ``n <= N``): the matrix itself
    when rows <= cols (left projection), else its transpose (right projection). The view is kept
    as its own tensor here; ``weight()`` gives the matrix back.
    """

    def __init__(self, weight, rank, lr, betas, eps, weight_decay, rho):
        self.tall = weight.shape[0] > weight.shape[1]
        self.w = (weight.T if self.tall else weight).detach().clone().float()
        self.r, self.lr, self.betas, self.eps, self.wd, self.rho = rank, lr, betas, eps, weight_decay, rho
        n, N = self.w.shape
        self.t = 0
        self.P = None
        self.m = torch.zeros(rank, N)
        self.v = torch.zeros(rank, N)
        self.e = torch.zeros(n, N)

    def weight(self):
        return self.w.T if self.tall else self.w

    def step(self, grad):
        b1, b2 = self.betas
        self.t += 1
        t = self.t
        g = (grad.T if self.tall else grad).float()
        a = g + self.e
        if t == 1:
            P = torch.linalg.svd(a, full_matrices=False).U[:, : self.r]
        else:
            b = self.rho * self.P @ self.m / (1 - b1 ** (t - 1)) + (1 - self.rho) * a
            # (b b^T) P, the equation as written (the library computes b (b^T P): mathematically
            # equal, rounding differs by ~1e-7 and the QR gives the same columns, signs included)
            P = torch.linalg.qr((b @ b.T) @ self.P).Q
        ghat = P.T @ a
        e = a - P @ ghat
        if t > 1:
            C = P.T @ self.P
            mt = C @ self.m
            e = e + b1 / (1 - b1) * (self.P @ self.m - P @ mt)
            bc1, bc2 = 1 - b1 ** (t - 1), 1 - b2 ** (t - 1)
            self.v = ((C * C) @ (self.v / bc2 - self.m**2 / bc1**2) + mt**2 / bc1**2).abs() * bc2
            self.m = mt
        self.e, self.P = e, P
        self.m = b1 * self.m + (1 - b1) * ghat
        self.v = b2 * self.v + (1 - b2) * ghat**2
        m_hat = self.m / (1 - b1**t)
        v_hat = self.v / (1 - b2**t)
        self.w = self.w * (1 - self.lr * self.wd) - self.lr * P @ (m_hat / (v_hat.sqrt() + self.eps))


def _grad(shape, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    scale = 1.0 + 0.5 * math.sin(step)  # the scale changes so moments and error feedback matter
    return torch.randn(shape, generator=g) * scale


def _param(shape, seed=0, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype))


HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rho=0.908)


@pytest.mark.parametrize("shape,rank", [((12, 20), 4), ((24, 10), 3), ((8, 8), 7)], ids=["wide", "tall", "square"])
def test_matches_dense_reference(shape, rank):
    p = _param(shape)
    start = p.detach().clone()
    opt = LDAdam([dict(params=[p], rank=rank)], **HP)
    ref = DenseLDAdam(p, rank, **HP)
    for step in range(1, 13):
        g = _grad(shape, step)
        p.grad = g.clone()
        opt.step()
        ref.step(g)
        diff = (p.detach() - ref.weight()).abs().max().item()
        assert diff <= 1e-5, f"step {step}: max |param - reference| = {diff}"
        state = opt.state[p]
        err = state["error"].T if ref.tall else state["error"]
        torch.testing.assert_close(err, ref.e, rtol=1e-6, atol=1e-5)  # |e| reaches ~10
    # the comparison has teeth: the parameters moved far beyond the tolerance
    assert (p.detach() - start).abs().max() > 0.05
    state = opt.state[p]
    n, N = min(shape), max(shape)
    assert state["step"] == 12
    assert state["basis"].shape == (n, rank)  # tall: right projection, a basis of the columns' space
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (rank, N)
    assert state["error"].shape == shape
    torch.testing.assert_close(state["basis"].T @ state["basis"], torch.eye(rank), rtol=0, atol=1e-5)
    assert state["error"].abs().max() > 1e-2  # the error feedback is doing something


def test_rank_at_least_the_shorter_side_is_adamw():
    """A "low-rank" step at full rank would cost more than AdamW and add nothing: AdamW it is."""
    p, q = _param((8, 8)), _param((6, 20))
    opt = LDAdam([dict(params=[p, q], rank=6)], **HP)
    p.grad, q.grad = _grad((8, 8), 1), _grad((6, 20), 1)
    opt.step()
    assert set(opt.state[q]) == {"step", "exp_avg", "exp_avg_sq"} and opt.state[q]["exp_avg"].shape == (6, 20)
    assert opt.state[p]["basis"].shape == (8, 6)


def test_first_step_is_svd_sign_step():
    """t = 1: P = top-r left singular vectors of g, m̂ / sqrt(v̂) = sign(P^T g), e = g - P P^T g."""
    p = _param((6, 9), seed=3)
    before = p.detach().clone()
    g = _grad((6, 9), 1, seed=4)
    opt = LDAdam([dict(params=[p], rank=2)], lr=0.1, weight_decay=0.0)
    p.grad = g.clone()
    opt.step()
    U = torch.linalg.svd(g, full_matrices=False).U[:, :2]
    expected = before - 0.1 * U @ torch.sign(U.T @ g)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["error"], g - U @ (U.T @ g), rtol=0, atol=1e-6)
    assert torch.equal(p.grad, g)  # the optimizer leaves p.grad alone


# ---------------------------------------------------------------------------------------------
# the error buffer is state: zero_grad and gradient accumulation cannot touch it
# ---------------------------------------------------------------------------------------------


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = _param((6, 10), seed=5)
        self.b = _param((6,), seed=6)


def _opt(model):
    return LDAdam([dict(params=[model.w], rank=2), dict(params=[model.b])], **HP)


@pytest.mark.parametrize("how", ["model", "optimizer"])
def test_error_survives_zero_grad(how):
    """The Trainer zeroes gradients between steps (to None): the error is not in p.grad, so a run
    that does equals one whose gradients are overwritten instead."""
    runs = []
    for zero in (True, False):
        model = _Model()
        opt = _opt(model)
        for step in range(1, 5):
            if zero and step > 1:
                err = opt.state[model.w]["error"].clone()
                assert err.abs().max() > 1e-2  # there is something to lose
                if how == "model":
                    model.zero_grad()
                else:
                    opt.zero_grad(set_to_none=True)
                assert model.w.grad is None
                assert torch.equal(opt.state[model.w]["error"], err)  # zero_grad left it alone
            model.w.grad = _grad((6, 10), step)
            model.b.grad = _grad((6,), step)
            opt.step()
        runs.append(model)
    assert torch.equal(runs[0].w, runs[1].w) and torch.equal(runs[0].b, runs[1].b)


def test_gradient_accumulation():
    """Two backward passes (gradients summed in p.grad) step exactly like one with the sum: the
    error is not kept in p.grad, so it is neither doubled nor lost."""
    c = [[_grad((6, 10), 10 * s + k, seed=7) for k in range(2)] for s in range(1, 5)]
    runs = []
    for accumulate in (True, False):
        model = _Model()
        opt = _opt(model)
        for s in range(4):
            opt.zero_grad(set_to_none=True)
            if accumulate:
                (model.w * c[s][0]).sum().backward()
                (model.w * c[s][1]).sum().backward()
            else:
                model.w.grad = c[s][0] + c[s][1]
            torch.testing.assert_close(model.w.grad, c[s][0] + c[s][1], rtol=0, atol=0)
            opt.step()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert torch.equal(m1.w, m2.w)
    assert torch.equal(o1.state[m1.w]["error"], o2.state[m2.w]["error"])
    assert o1.state[m1.w]["error"].abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# plain AdamW for 1-D params, groups without rank, embedding-sized matrices
# ---------------------------------------------------------------------------------------------


def test_full_rank_params_are_adamw():
    shapes = [(7,), (6, 5), (32000, 2), (4, 9)]
    ours = [_param(s, seed=i) for i, s in enumerate(shapes)]
    theirs = [_param(s, seed=i) for i, s in enumerate(shapes)]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    # a rank group: the 1-D param and the (32000, 2) matrix are full-rank anyway; (6, 5) in a group
    # without rank; (4, 9) is low-rank (the control: it must not follow AdamW)
    opt = LDAdam([dict(params=[ours[0], ours[2], ours[3]], rank=2), dict(params=[ours[1]])], **kw)
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
        assert opt.state[ours[i]]["exp_avg"].shape == ours[i].shape
    assert set(opt.state[ours[3]]) == LOW_RANK_KEYS
    assert (ours[3].detach() - theirs[3].detach()).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def _stepped(steps, dtype=torch.bfloat16):
    params = [_param((10, 16), seed=1), _param((18, 8), seed=2, dtype=dtype), _param((5,), seed=3)]
    opt = LDAdam([dict(params=params[:2], rank=3), dict(params=params[2:])], **HP)
    _run(params, opt, range(1, steps + 1))
    return params, opt


def _run(params, opt, steps):
    for step in steps:
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, step, seed=10 + i).to(p.dtype)
        opt.step()


def test_state_dict_round_trip():
    params, opt = _stepped(5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = LDAdam([dict(params=params2[:2], rank=1), dict(params=params2[2:])], lr=1.0)
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["rank"] == 3
    assert opt2.param_groups[0]["rho"] == 0.908
    for p, p2 in zip(params, params2):
        s, s2 = opt.state[p], opt2.state[p2]
        assert set(s2) == set(s)
        assert s2["step"] == s["step"] == 5
        for key, value in s.items():
            if torch.is_tensor(value):
                assert s2[key].dtype == value.dtype, key
                assert torch.equal(s2[key], value), key
                assert s2[key].data_ptr() != value.data_ptr()
    assert opt2.state[params2[1]]["error"].dtype == torch.float32  # fp32 whatever the parameter's dtype
    assert opt2.state[params2[1]]["basis"].dtype == torch.float32  # not cast to the param's bf16
    _run(params, opt, range(6, 10))
    _run(params2, opt2, range(6, 10))
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)

    # and both equal an uninterrupted run
    params3, _ = _stepped(9)
    for p, p3 in zip(params, params3):
        assert torch.equal(p, p3)


def test_loading_a_foreign_checkpoint_raises():
    micro_params = [_param((4, 5))]
    micro = MicroAdam(micro_params)
    micro_params[0].grad = torch.ones(4, 5)
    micro.step()
    opt = LDAdam([dict(params=[_param((4, 5))], rank=2)])
    with pytest.raises(ValueError, match="not written by LDAdam"):
        opt.load_state_dict(micro.state_dict())
    # an AdamW checkpoint has AdamW-shaped state but no LDAdam hyperparameters
    adam_params = [_param((4, 5))]
    adamw = torch.optim.AdamW(adam_params)
    adam_params[0].grad = torch.ones(4, 5)
    adamw.step()
    with pytest.raises(ValueError, match="not written by LDAdam"):
        opt.load_state_dict(adamw.state_dict())
    assert not opt.state  # nothing was loaded


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(rank=0), "rank"),
    (dict(rank=1.5), "rank"),
    (dict(rank=True), "rank"),
    (dict(rho=1.0), "rho"),
    (dict(rho=-0.1), "rho"),
    (dict(lr=0), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        LDAdam([_param((3, 4))], **kwargs)


def test_integer_param_is_rejected():
    with pytest.raises(ValueError, match=r"\bparams=.*int64"):
        LDAdam([torch.zeros(3, 4, dtype=torch.int64)], rank=2)


def test_nan_gradient_skips_the_step():
    params, opt = _stepped(3, dtype=torch.float32)
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


def _descend(dtype, shape, steps=30):
    gen = torch.Generator().manual_seed(8)
    # a dominant rank-3 part (a clear spectral gap: the top-3 subspace of the first gradient does
    # not turn under bf16 / fp16 rounding) plus a full-rank rest
    target = 2 * torch.randn(shape[0], 3, generator=gen) @ torch.randn(3, shape[1], generator=gen) / 3
    target += 0.3 * torch.randn(shape, generator=gen)
    p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    opt = LDAdam([dict(params=[p], rank=3)], lr=0.05, weight_decay=0.0)
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
            first = p.detach().float().clone()  # the first step from 0
    return p, opt, losses, first


@pytest.mark.parametrize("shape", [(12, 16), (16, 12)], ids=["wide", "tall"])
def test_param_dtypes_descend_quadratic(shape):
    runs = {dtype: _descend(dtype, shape) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    first32 = runs[torch.float32][3]
    for dtype, (p, opt, losses, first) in runs.items():
        assert p.dtype == dtype
        assert losses[-1] < losses[15] < 0.8 * losses[0] and losses[-1] < 0.6 * losses[0], (dtype, losses)
        assert abs(losses[-1] - runs[torch.float32][2][-1]) < 0.02 * losses[-1]  # the same path as fp32
        # the same direction as fp32 (only rounding of the gradient and the update differs)
        cos = torch.nn.functional.cosine_similarity(first.view(-1), first32.view(-1), dim=0)
        assert cos > 0.99, (dtype, cos)
        state = opt.state[p]
        for key in ("basis", "exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32, key
        assert state["error"].dtype == torch.float32  # documented: error_feedback="fp32"
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


# ---------------------------------------------------------------------------------------------
# backend switch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def restore_backend():
    saved = get_backend()
    yield
    set_backend(saved)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_backend_matches_torch(restore_backend):
    runs = []
    for backend in ("torch", "triton"):
        set_backend(backend)
        params = [_param((9, 14), seed=1), _param((6,), seed=2)]
        opt = LDAdam([dict(params=params[:1], rank=2), dict(params=params[1:])], **HP)
        _run(params, opt, range(1, 4))
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# error_feedback: none / 8bit / 4bit


def test_without_error_feedback_is_the_reference_with_the_error_dropped():
    shape, rank = (12, 20), 4
    p = _param(shape)
    opt = LDAdam([dict(params=[p], rank=rank)], error_feedback="none", **HP)
    ref = DenseLDAdam(p, rank, **HP)
    for step in range(1, 11):
        g = _grad(shape, step)
        p.grad = g.clone()
        opt.step()
        ref.step(g)
        ref.e.zero_()  # no error kept
        assert (p.detach() - ref.weight()).abs().max().item() <= 1e-5, step
    assert set(opt.state[p]) == {"step", "basis", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["wide", "tall"])
def test_quantised_error_is_the_fp32_error_within_half_a_step(bits, shape):
    """Same gradients, fp32 vs quantised error: after each step, the quantised state decodes to the
    error the fp32 optimizer would store from the same inputs, within half a quantisation step."""
    from hf_ista.kernels import lowrank as K
    from hf_ista.optim._lowrank import QUANT_BLOCK, oriented

    p = _param(shape)
    opt = LDAdam([dict(params=[p], rank=4)], error_feedback=f"{bits}bit", **HP)
    for step in range(1, 6):
        exact_p = torch.nn.Parameter(p.detach().clone())
        exact = LDAdam([dict(params=[exact_p], rank=4)], error_feedback="fp32", **HP)
        if step > 1:  # the fp32 twin starts from the quantised optimizer's state, error decoded
            state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()
                     if k not in ("error_codes", "error_scales")}
            decoded = K.dequantize_add(torch.zeros(oriented(p).shape), opt.state[p]["error_codes"],
                                       opt.state[p]["error_scales"], bits, QUANT_BLOCK, out=torch.empty(oriented(p).shape))
            state["error"] = (decoded.T if shape[0] > shape[1] else decoded).contiguous()
            exact.state[exact_p] = state
        g = _grad(shape, step)
        p.grad, exact_p.grad = g.clone(), g.clone()
        opt.step()
        exact.step()
        decoded = K.dequantize_add(torch.zeros(oriented(p).shape), opt.state[p]["error_codes"],
                                   opt.state[p]["error_scales"], bits, QUANT_BLOCK, out=torch.empty(oriented(p).shape))
        half_step = opt.state[p]["error_scales"][:, 1].repeat_interleave(QUANT_BLOCK)[: p.numel()].view(decoded.shape) / 2
        diff = (decoded - oriented(exact.state[exact_p]["error"])).abs()
        assert (diff <= half_step + 1e-5).all(), step
        assert torch.allclose(p, exact_p, atol=1e-6)  # the step itself does not depend on the storage
    assert opt.state[p]["error_codes"].dtype == torch.uint8
    assert opt.state[p]["error_codes"].numel() == K.code_bytes(p.numel(), bits, QUANT_BLOCK)
