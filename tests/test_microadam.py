"""MicroAdam: against a dense reference written here, against AdamW, checkpoints, bad input."""
import io
import math
from collections import deque

import pytest
import torch

from hf_ista.kernels import get_backend, set_backend, triton_available
from hf_ista.optim import MicroAdam


pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------
# an independent dense implementation of the MicroAdam equations
# ---------------------------------------------------------------------------------------------


class DenseMicroAdam:
    """MicroAdam written out on dense fp32 vectors, one parameter at a time.

    Chunking: n_chunks = ceil(d / 32768), chunk = ceil(d / n_chunks),
    k_chunk = min(chunk, max(1, ceil(density * chunk))); top-k of |a| inside each chunk.
    Error: 4-bit codes per block of ``qb`` consecutive entries (zero-padded at the end), block
    min / max rounded to bf16, code = floor((x - lo) * 15 / (hi - lo) + 0.5) clamped to 0..15.
    Moments: rebuilt from the last ``m`` sparse gradients with weights beta**age.
    """

    def __init__(self, params, lr, m, density, qb, betas, eps, weight_decay):
        self.params = params  # list of fp32 tensors, updated in place
        self.hp = dict(lr=lr, m=m, density=density, qb=qb, betas=betas, eps=eps, wd=weight_decay)
        self.t = 0
        self.error = [torch.zeros(p.numel()) for p in params]  # dequantised error, dense
        self.window = [deque(maxlen=m) for _ in params]  # (step, flat indices, values)

    def _topk_per_chunk(self, a):
        d = a.numel()
        n_chunks = math.ceil(d / 32768)
        chunk = math.ceil(d / n_chunks)
        k_chunk = min(chunk, max(1, math.ceil(self.hp["density"] * chunk)))
        picked = []
        for j in range(n_chunks):
            seg = a[j * chunk: min((j + 1) * chunk, d)]
            idx = torch.topk(seg.abs(), min(k_chunk, seg.numel())).indices
            picked.append(idx + j * chunk)
        return torch.cat(picked)

    def _quantise(self, x):
        qb = self.hp["qb"]
        d = x.numel()
        padded = torch.zeros(math.ceil(d / qb) * qb)
        padded[:d] = x
        blocks = padded.view(-1, qb)
        lo = blocks.min(1).values.to(torch.bfloat16).float()[:, None]
        hi = blocks.max(1).values.to(torch.bfloat16).float()[:, None]
        raw = torch.floor((blocks - lo) * 15 / (hi - lo) + 0.5).clamp(0, 15)
        codes = torch.where(hi > lo, raw, 0.0)  # max == min: every entry decodes to min
        return (lo + codes * (hi - lo) / 15).view(-1)[:d]

    def step(self, grads):
        self.t += 1
        t = self.t
        lr, m, eps, wd = self.hp["lr"], self.hp["m"], self.hp["eps"], self.hp["wd"]
        b1, b2 = self.hp["betas"]
        for i, (p, g) in enumerate(zip(self.params, grads)):
            a = g.reshape(-1).float() + self.error[i]
            idx = self._topk_per_chunk(a)
            self.window[i].append((t, idx, a[idx].clone()))
            a[idx] = 0
            self.error[i] = self._quantise(a)
            m1 = torch.zeros(p.numel())
            m2 = torch.zeros(p.numel())
            for s, ix, v in self.window[i]:
                m1.index_add_(0, ix, b1 ** (t - s) * v)
                m2.index_add_(0, ix, b2 ** (t - s) * v * v)
            m_hat = (1 - b1) / (1 - b1**t) * m1
            v_hat = (1 - b2) / (1 - b2**t) * m2
            flat = p.view(-1)
            flat.mul_(1 - lr * wd)
            flat.sub_(lr * m_hat / (v_hat.sqrt() + eps))


SHAPES = [(40, 30), (3, 5, 70), (10,), (200, 170)]  # (10,) is smaller than one quant block; 34000 = 2 chunks


def _params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    # the scale changes over time so the error feedback and the window weights matter
    scale = 1.0 + 0.5 * math.sin(step)
    return [torch.randn(p.shape, generator=g) * scale for p in params]


def test_matches_dense_reference():
    hp = dict(lr=1e-2, m=4, density=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    params = _params()
    ref_params = [p.detach().clone() for p in params]
    opt = MicroAdam(params, quant_block_size=64, values_dtype="fp32", **hp)
    ref = DenseMicroAdam(ref_params, qb=64, **hp)
    start = [p.detach().clone() for p in params]
    for step in range(1, 21):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        worst = max((p.detach() - r).abs().max().item() for p, r in zip(params, ref_params))
        assert worst <= 1e-5, f"step {step}: max |param - reference| = {worst}"
    # the comparison is not vacuous: parameters moved well beyond the tolerance
    assert min((p.detach() - s).abs().max().item() for p, s in zip(params, start)) > 1e-2


def test_matches_dense_reference_two_groups():
    """Each group's own density / lr / quant block size / m is used."""
    p1, p2 = _params([(33, 21), (7,)], seed=3)
    q1, q2 = p1.detach().clone(), p2.detach().clone()
    g1 = dict(lr=3e-3, m=3, density=0.1, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
    g2 = dict(lr=1e-2, m=6, density=0.5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    opt = MicroAdam([dict(params=[p1], quant_block_size=100, **g1), dict(params=[p2], quant_block_size=4, **g2)],
                    values_dtype="fp32")
    r1, r2 = DenseMicroAdam([q1], qb=100, **g1), DenseMicroAdam([q2], qb=4, **g2)
    for step in range(1, 21):
        ga, gb = _grads([p1, p2], step, seed=2)
        p1.grad, p2.grad = ga.clone(), gb.clone()
        opt.step()
        r1.step([ga])
        r2.step([gb])
    torch.testing.assert_close(p1.detach(), q1, rtol=0, atol=1e-5)
    torch.testing.assert_close(p2.detach(), q2, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# density 1, m >= T: AdamW
# ---------------------------------------------------------------------------------------------


def _run_vs_adamw(values_dtype, steps=20, lr=1e-2):
    shapes = [(16, 12), (5,), (3, 4, 50)]
    ours, theirs = _params(shapes, seed=4), _params(shapes, seed=4)
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt = MicroAdam(ours, m=steps, density=1.0, values_dtype=values_dtype, **kw)
    adamw = torch.optim.AdamW(theirs, **kw)
    start = [p.detach().clone() for p in ours]
    for step in range(1, steps + 1):
        grads = _grads(ours, step, seed=5)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
    return ours, theirs, start


def test_density_one_is_adamw_fp32():
    ours, theirs, start = _run_vs_adamw("fp32")
    for p, q, s in zip(ours, theirs, start):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-5)
        assert (p.detach() - s).abs().max() > 0.05  # 20 steps of ~lr each: the check has teeth


def _update_bound(steps, beta1, beta2):
    """max over t <= steps of sup |m̂ / sqrt(v̂)| over all gradients. Cauchy-Schwarz on the window:
    |m̂| = c1 |sum_a b1^a g_a| <= c1 sqrt(sum_a b1^2a / b2^a) sqrt(sum_a b2^a g_a^2)
         = c1 / sqrt(c2) * sqrt(sum_a (b1^2 / b2)^a) * sqrt(v̂),   a = 0 .. t-1."""
    best = 0.0
    for t in range(1, steps + 1):
        c1 = (1 - beta1) / (1 - beta1**t)
        c2 = (1 - beta2) / (1 - beta2**t)
        best = max(best, c1 / math.sqrt(c2) * math.sqrt(sum((beta1**2 / beta2) ** a for a in range(t))))
    return best


def test_density_one_is_adamw_bf16_values():
    """bf16 window values are each gradient rounded to 8 significant bits (relative error
    <= 2**-9). Then sqrt(v̂) is off by a relative <= 2**-9 and m̂ by <= 2**-9 * c1 sum_a w_a |g_a|,
    so the update m̂ / sqrt(v̂) is off by <= 2**-8 * B (1 + O(2**-9)), B the Cauchy-Schwarz bound
    of the update's size (~1.2 here). The gradients are given, not computed from the
    parameters, and weight decay only contracts a difference, so after T steps the parameters
    are within T * lr * 2**-8 * B of AdamW's (the window is rebuilt from stored values each step:
    nothing compounds). The runs must differ (the tolerance is needed) and the parameters must
    move at least 10x the tolerance (it does not swallow the dynamics).
    """
    steps, lr = 20, 1e-2
    ours, theirs, start = _run_vs_adamw("bf16", steps=steps, lr=lr)
    tol = steps * lr * 2**-8 * _update_bound(steps, 0.9, 0.999) * 1.01
    max_diff = max((p - q).abs().max().item() for p, q in zip(ours, theirs))
    moved = min((p.detach() - s).abs().max().item() for p, s in zip(ours, start))
    assert 0 < max_diff <= tol, (max_diff, tol)
    assert moved > 10 * tol, (moved, tol)


# ---------------------------------------------------------------------------------------------
# parameter dtypes and state layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_param_dtypes_descend_quadratic(dtype):
    g = torch.Generator().manual_seed(7)
    target = torch.randn(30, 40, generator=g)
    p = torch.nn.Parameter(torch.zeros(30, 40, dtype=dtype))
    opt = MicroAdam([p], lr=0.05, m=5, density=0.1)

    def loss_of(x):
        return 0.5 * (x.float() - target).square().sum()

    losses = []
    for step in range(30):
        loss = loss_of(p)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        before, grad = p.detach().clone(), p.grad.detach().float().clone()
        opt.step()
        if step == 0:
            # first step: the selected entries move by -lr * sign(grad), the rest stay
            delta = (p.detach() - before).float()
            moved = delta != 0
            assert moved.sum() == 120  # 10 % of 1200 entries
            assert torch.all(torch.sign(delta[moved]) == -torch.sign(grad[moved]))
            # |m̂| / sqrt(v̂) = |g| / (|g| + eps) = 1 on the first step: a step of exactly lr (up to
            # the rounding of 0 - 0.05 to the parameter's dtype)
            torch.testing.assert_close(delta[moved].abs(), torch.full_like(delta[moved], 0.05), rtol=1e-3, atol=0)
    assert p.dtype == dtype
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b <= a * 1.001 for a, b in zip(losses, losses[1:])), losses

    state = opt.state[p]
    assert state["step"] == 30
    assert state["indices"].dtype == torch.int16 and state["indices"].device == p.device
    assert state["values"].dtype == torch.bfloat16 and state["values"].device == p.device
    assert state["error"].dtype == torch.uint8 and state["error"].device == p.device
    assert state["error_minmax"].dtype == torch.bfloat16 and state["error_minmax"].device == p.device
    assert state["indices"].shape == (5, 1, 120)
    assert state["error"].numel() == math.ceil(1200 / 64) * 32


@pytest.mark.parametrize("values_dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                   ("fp32", torch.float32)])
def test_values_dtype(values_dtype, expected):
    p = torch.nn.Parameter(torch.randn(50))
    opt = MicroAdam([p], values_dtype=values_dtype)
    p.grad = torch.randn(50)
    opt.step()
    assert opt.state[p]["values"].dtype == expected


def test_non_contiguous_param():
    """A transposed view as a parameter steps exactly like its contiguous copy."""
    base = torch.randn(30, 20)
    p_nc = torch.nn.Parameter(base.t())  # non-contiguous
    p_c = torch.nn.Parameter(base.t().contiguous())
    assert not p_nc.is_contiguous()
    opts = [MicroAdam([p], lr=1e-2, m=3, density=0.2, values_dtype="fp32") for p in (p_nc, p_c)]
    for step in range(5):
        g = torch.randn(20, 30, generator=torch.Generator().manual_seed(step))
        for p, opt in zip((p_nc, p_c), opts):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(p_nc.detach(), p_c.detach())


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def _stepped(seed=0, steps=7, **kw):
    params = _params([(20, 30), (9,)], seed=seed)
    opt = MicroAdam(params, lr=1e-2, m=4, density=0.1, weight_decay=0.01, **kw)
    for step in range(1, steps + 1):
        for p, g in zip(params, _grads(params, step, seed=8)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("values_dtype", ["bf16", "fp32"])
def test_state_dict_round_trip(values_dtype):
    params, opt = _stepped(values_dtype=values_dtype)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = MicroAdam(params2, lr=1.0)  # hyperparameters come from the checkpoint
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["values_dtype"] == values_dtype
    for p, p2 in zip(params, params2):
        s, s2 = opt.state[p], opt2.state[p2]
        assert set(s2) == set(s) == set(MicroAdam.state_keys)
        assert s2["step"] == s["step"] == 7
        for key in ("indices", "values", "error", "error_minmax"):
            assert s2[key].dtype == s[key].dtype, key
            assert s2[key].device == p2.device
            assert torch.equal(s2[key], s[key]), key
            assert s2[key].data_ptr() != s[key].data_ptr()
    for step in range(8, 13):
        grads = _grads(params, step, seed=8)
        for p, p2, g in zip(params, params2, grads):
            p.grad, p2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for p, p2 in zip(params, params2):
        assert torch.equal(p, p2)


@pytest.fixture
def accelerator():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    yield accelerate.Accelerator(cpu=True)
    # accelerate keeps process-wide singletons: leave none behind for other tests
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_prepare_keeps_state_dtypes(accelerator):
    params, opt = _stepped()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params}
    wrapped = accelerator.prepare(opt)
    inner = wrapped.optimizer
    for p in params:
        state = inner.state[p]
        assert state["indices"].dtype == torch.int16
        assert state["values"].dtype == torch.bfloat16
        assert state["error"].dtype == torch.uint8
        assert state["error_minmax"].dtype == torch.bfloat16
        for k, v in before[id(p)].items():
            assert torch.equal(state[k], v), k
    # and it still steps
    for p in params:
        p.grad = torch.ones_like(p)
    wrapped.step()
    assert all(inner.state[p]["step"] == 8 for p in params)


def test_loading_adamw_state_dict_raises():
    params = _params([(4, 5)])
    adamw = torch.optim.AdamW(params)
    params[0].grad = torch.ones(4, 5)
    adamw.step()
    opt = MicroAdam(_params([(4, 5)]))
    with pytest.raises(ValueError, match="MicroAdam"):
        opt.load_state_dict(adamw.state_dict())
    # an AdamW that never stepped has no state, only foreign param_groups
    fresh = torch.optim.AdamW(_params([(4, 5)]))
    with pytest.raises(ValueError, match="MicroAdam"):
        opt.load_state_dict(fresh.state_dict())


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_gradient_skips_that_param(bad):
    params, opt = _stepped(steps=3)
    poisoned, healthy = params
    state_before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[poisoned].items()}
    p_before, h_before = poisoned.detach().clone(), healthy.detach().clone()
    grads = _grads(params, 4, seed=8)
    grads[0][3, 4] = bad
    poisoned.grad, healthy.grad = grads
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        opt.step()
    assert torch.equal(poisoned.detach(), p_before)
    for k, v in state_before.items():
        if torch.is_tensor(v):
            assert torch.equal(opt.state[poisoned][k], v), k
        else:
            assert opt.state[poisoned][k] == v, k
    assert not torch.equal(healthy.detach(), h_before)
    assert opt.state[healthy]["step"] == 4
    # a later finite step goes on normally
    poisoned.grad = torch.randn_like(poisoned)
    opt.step()
    assert opt.state[poisoned]["step"] == 4


@pytest.mark.parametrize("kwargs,name", [
    (dict(m=0), "m"),
    (dict(density=0), "density"),
    (dict(density=1.5), "density"),
    (dict(lr=0), "lr"),
    (dict(lr=-1), "lr"),
    (dict(quant_block_size=63), "quant_block_size"),
    (dict(values_dtype="int8"), "values_dtype"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        MicroAdam(_params([(3, 3)]), **kwargs)


def test_add_param_group_is_checked():
    opt = MicroAdam(_params([(3, 3)]))
    with pytest.raises(ValueError, match=r"\bdensity="):
        opt.add_param_group(dict(params=_params([(2,)]), density=2.0))
    assert len(opt.param_groups) == 1  # the rejected group is not kept
    opt.add_param_group(dict(params=_params([(2,)]), density=0.5))
    assert opt.param_groups[1]["density"] == 0.5 and opt.param_groups[1]["m"] == 10


def test_empty_param_is_skipped():
    empty, p = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.ones(3))
    opt = MicroAdam([empty, p], lr=0.1, density=1.0)
    empty.grad, p.grad = torch.zeros(0), torch.ones(3)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))  # first step: -lr * sign(grad)
    assert not opt.state[empty]


# ---------------------------------------------------------------------------------------------
# sparsity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,density", [((40, 50), 0.03), ((7,), 0.5), ((170, 200), 0.01)])
def test_one_step_changes_exactly_the_selected_entries(shape, density):
    p = _params([shape], seed=11)[0]
    before = p.detach().clone()
    opt = MicroAdam([p], lr=1e-3, m=3, density=density, weight_decay=0.0, values_dtype="fp32")
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    opt.step()
    d = p.numel()
    n_chunks = math.ceil(d / 32768)
    chunk = math.ceil(d / n_chunks)
    k_chunk = min(chunk, max(1, math.ceil(density * chunk)))
    changed = (p.detach() != before).view(-1)
    assert changed.sum().item() == n_chunks * k_chunk
    # and they are the ones in the ring row just written
    idx = opt.state[p]["indices"][0].long() + torch.arange(n_chunks)[:, None] * chunk
    assert torch.equal(changed.nonzero().view(-1), idx.view(-1).sort().values)


# ---------------------------------------------------------------------------------------------
# backend switch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def restore_backend():
    saved = get_backend()
    yield
    set_backend(saved)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("values_dtype", ["fp32", "fp16"])  # the interpreter cannot cast to bf16
def test_triton_backend_matches_torch(restore_backend, values_dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(37, 29), (5,)]
    runs = {}
    for backend in ("torch", "triton"):
        set_backend(backend)
        params = [torch.nn.Parameter(p.detach().to(device)) for p in _params(shapes, seed=13)]
        opt = MicroAdam(params, lr=1e-2, m=3, density=0.05, quant_block_size=64, weight_decay=0.1,
                        values_dtype=values_dtype)
        for step in range(1, 3):
            for p, g in zip(params, _grads(params, step, seed=14)):
                p.grad = g.to(device)
            opt.step()
        runs[backend] = (params, opt)
    for p, q in zip(runs["torch"][0], runs["triton"][0]):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=1e-6)
        s, t = runs["torch"][1].state[p], runs["triton"][1].state[q]
        assert torch.equal(s["indices"], t["indices"])
        assert torch.equal(s["error_minmax"].view(torch.int16), t["error_minmax"].view(torch.int16))
    assert get_backend() == "triton"  # the fixture restores it after the test


@pytest.mark.gpu
def test_cuda_param_matches_cpu():
    """On CUDA (Triton kernels, bf16 window values) the state lives on the parameter's device
    and a few steps match the torch twins on CPU."""
    runs = []
    for device in ("cuda", "cpu"):
        params = [torch.nn.Parameter(p.detach().to(device)) for p in _params([(300, 200), (17,)], seed=15)]
        opt = MicroAdam(params, lr=1e-2, m=3, density=0.05, weight_decay=0.1)
        for step in range(1, 4):
            for p, g in zip(params, _grads(params, step, seed=16)):
                p.grad = g.to(device)
            opt.step()
        runs.append((params, opt))
    (cuda_params, cuda_opt), (cpu_params, _) = runs
    for p, q in zip(cuda_params, cpu_params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=0, atol=1e-5)
        state = cuda_opt.state[p]
        for key, dtype in (("indices", torch.int16), ("values", torch.bfloat16), ("error", torch.uint8),
                           ("error_minmax", torch.bfloat16)):
            assert state[key].device == p.device and state[key].dtype == dtype, key


def test_sparse_gradient_is_a_clear_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MicroAdam(emb.parameters(), lr=1e-3)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"does not support sparse gradients \(parameter of shape \(10, 4\)\)"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state
