"""DASH: inverse roots against float64 eigendecompositions, block stacking, the optimizer against a
plain per-block Shampoo written here, kernels against their twins, checkpoints, bad input."""
import math
import warnings

import pytest
import torch

from hf_ista.kernels import dash as K
from hf_ista.kernels.backend import set_backend, get_backend
from hf_ista.linalg import inv_root
from hf_ista.linalg.inv_root import _newton_db, chebyshev_coefficients, spectral_scale
from hf_ista.optim import DASH, state_bytes
from hf_ista.optim._blocks import from_blocks, to_blocks

pytestmark = pytest.mark.usefixtures("single_thread")

CONDITIONS = (1e1, 1e2, 1e4, 1e6)


def spd(batch, n, cond, seed=0):
    """SPD matrices with eigenvalues log-spaced from 1 down to 1/cond, random eigenvectors (float64)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))
    values = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    return (q * values) @ q.mT


def reference_root(X, p, eps, scale):
    """``(X + eps s I)^(-1/p)`` in float64 by eigendecomposition."""
    values, vectors = torch.linalg.eigh(X.double())
    return (vectors * (values.clamp_min(0)[:, None, :] + eps * scale.double()) ** (-1 / p)) @ vectors.mT


def relative_error(out, ref):
    return (torch.linalg.matrix_norm(out.double() - ref) / torch.linalg.matrix_norm(ref)).max().item()


# --------------------------------------------------------------------------------------------
# 1. Inverse roots
# --------------------------------------------------------------------------------------------

# Relative Frobenius error of X^(-1/p) (fp32 arithmetic) at each condition number, eps = 1e-7 (below
# the smallest eigenvalue: the root itself is tested, not the damping). Measured worst cases over
# p in {2, 4} and both scalings, with about 3x headroom: EVD is limited by fp32 eigh (its eigenvalues
# carry an absolute error near 1e-7 of the top one); the Newton iterations at 20 steps converge to
# fp32 accuracy up to cond 1e4 and stall near 2e-3 at 1e6, as ALGORITHMS.md measured for Newton-DB.
TOLERANCE = {
    "evd": {1e1: 5e-6, 1e2: 1e-5, 1e4: 3e-3, 1e6: 0.3},
    "cn": {1e1: 5e-6, 1e2: 1e-5, 1e4: 3e-4, 1e6: 1e-2},
    "ndb": {1e1: 5e-6, 1e2: 1e-5, 1e4: 3e-4, 1e6: 1.5e-2},
}


@pytest.mark.parametrize("method", ["evd", "cn", "ndb"])
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("scaling", ["fro", "power"])
def test_inverse_roots_match_eigh(method, p, scaling):
    eps = 1e-7
    for cond in CONDITIONS:
        X = spd(6, 48, cond).float()
        out = inv_root(X, p, method, eps=eps, scaling=scaling, steps=20)
        scale = spectral_scale(X, scaling)
        assert relative_error(out, reference_root(X, p, eps, scale)) < TOLERANCE[method][cond], cond


def test_newton_iterations_need_more_steps_when_ill_conditioned():
    """Ten steps are enough at cond 1e2 and not at 1e4 (ALGORITHMS.md: 32 % error there)."""
    for method in ("cn", "ndb"):
        well, ill = spd(4, 48, 1e2).float(), spd(4, 48, 1e4).float()
        ref = lambda X: reference_root(X, 4, 1e-7, spectral_scale(X, "fro"))  # noqa: E731
        assert relative_error(inv_root(well, 4, method, eps=1e-7, scaling="fro", steps=10), ref(well)) < 2e-5
        assert relative_error(inv_root(ill, 4, method, eps=1e-7, scaling="fro", steps=10), ref(ill)) > 1e-2


# Measured worst over both scalings and all conditions: 4.3e-4, 1.8e-5, 1.7e-3 (power scaling is
# the worse: its interval is twice as wide, so the damping is half as large on it).
@pytest.mark.parametrize("eps, degree, tolerance", [(1e-2, 40, 1.5e-3), (1e-2, 60, 6e-5), (1e-3, 100, 6e-3)])
def test_chebyshev_matches_eigh_at_its_damping(eps, degree, tolerance):
    """A polynomial of y -> (y + eps)^(-1/4) on [0, 1] is accurate where eps keeps the function
    smooth, whatever the conditioning of X; a higher degree buys a smaller damping."""
    for cond in CONDITIONS:
        for scaling in ("fro", "power"):
            X = spd(6, 48, cond).float()
            out = inv_root(X, 4, "cheby", eps=eps, scaling=scaling, degree=degree)
            scale = spectral_scale(X, scaling)
            assert relative_error(out, reference_root(X, 4, eps, scale)) < tolerance, (cond, scaling)


def test_chebyshev_coefficients_reproduce_the_function():
    import numpy as np

    coef = chebyshev_coefficients(4.0, 40, 1e-2)
    y = np.linspace(0, 1, 101)
    approx = np.polynomial.chebyshev.chebval(2 * y - 1, coef)
    assert np.max(np.abs(approx / (y + 1e-2) ** -0.25 - 1)) < 1e-4


def test_newton_db_y_times_z_is_identity():
    A = spd(4, 32, 1e2).float()
    A = A / spectral_scale(A, "fro")
    Y, Z = _newton_db(A, 20)
    eye = torch.eye(32).expand(4, -1, -1)
    torch.testing.assert_close(Y @ Z, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Y @ Y, A, atol=1e-5, rtol=0)  # Y is the square root


def test_power_scaling_is_tight_and_fro_is_a_bound():
    X = spd(8, 64, 1e3).float() * 7.0
    top = torch.linalg.eigvalsh(X.double())[:, -1]
    fro = spectral_scale(X, "fro").flatten().double()
    power = spectral_scale(X, "power", 1.0).flatten().double()
    assert (fro >= top).all() and (fro > 2 * top).all()  # log-spaced spectrum: Frobenius is loose
    # A Rayleigh quotient never exceeds λ_max; ten steps get within 10 % here (the top eigenvalues are
    # close together: 1, 0.9, 0.8 ... of λ_max, a slow case for power iteration; measured 0.904 worst).
    assert (power <= top * (1 + 1e-6)).all() and (power > 0.85 * top).all()


def test_zero_matrix_gives_zero_not_nan():
    for method in ("evd", "cn", "ndb", "cheby"):
        out = inv_root(torch.zeros(3, 8, 8), 4, method, eps=1e-2)
        assert torch.isfinite(out).all(), method


@pytest.mark.parametrize("kwargs, words", [
    (dict(method="svd"), ["method='svd'", "evd"]),
    (dict(method="ndb", p=3), ["p=3", "2 or 4"]),
    (dict(method="cn", p=2.5), ["p=2.5", "integer"]),
    (dict(eps=0.0), ["eps=0.0", "> 0"]),
    (dict(scaling="max"), ["scaling='max'", "fro"]),
])
def test_inv_root_bad_input(kwargs, words):
    with pytest.raises(ValueError) as err:
        inv_root(spd(1, 4, 10).float(), **kwargs)
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------------------------
# 2. Blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols, br, bc", [(6, 9, 3, 3), (7, 10, 3, 4), (5, 5, 5, 5), (1, 11, 1, 4)])
def test_blocks_round_trip(rows, cols, br, bc):
    matrix = torch.randn(rows, cols)
    blocks = to_blocks(matrix, br, bc)
    down, across = math.ceil(rows / br), math.ceil(cols / bc)
    assert blocks.shape == (down * across, br, bc)
    padded = torch.zeros(down * br, across * bc)
    padded[:rows, :cols] = matrix
    for i in range(down):  # block (i, j) is that tile of the zero-padded matrix
        for j in range(across):
            assert torch.equal(blocks[i * across + j], padded[i * br:(i + 1) * br, j * bc:(j + 1) * bc])
    assert torch.equal(from_blocks(blocks, rows, cols), matrix)
    out = torch.full_like(blocks, float("nan"))
    assert torch.equal(to_blocks(matrix, br, bc, out=out), blocks)


# --------------------------------------------------------------------------------------------
# 3. The optimizer against a plain per-block Shampoo
# --------------------------------------------------------------------------------------------


def plain_shampoo(params, grads_per_step, groups, block_size, eps, graft_eps, betas, freq, start):
    """Per parameter, per block, in float64, with explicit loops: Shampoo with Adam grafting
    (``scaling="fro"``, EVD roots), vectors on AdamW. Returns the parameters after all steps."""
    beta_lr, beta_g, beta_graft = betas
    params = [p.detach().double().clone() for p in params]
    state = [None] * len(params)
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            lr, wd = groups[i]
            g = g.double()
            if p.ndim == 1:  # AdamW
                s = state[i] or {"m": torch.zeros_like(p), "v": torch.zeros_like(p)}
                state[i] = s
                s["m"] = beta_g * s["m"] + (1 - beta_g) * g
                s["v"] = beta_graft * s["v"] + (1 - beta_graft) * g * g
                direction = (s["m"] / (1 - beta_g ** t)) / ((s["v"] / (1 - beta_graft ** t)).sqrt() + graft_eps)
                p.mul_(1 - lr * wd).sub_(lr * direction)
                continue
            rows, cols = p.shape
            br, bc = min(block_size, rows), min(block_size, cols)
            down, across = math.ceil(rows / br), math.ceil(cols / bc)
            padded = torch.zeros(down * br, across * bc, dtype=torch.float64)
            padded[:rows, :cols] = g
            if state[i] is None:
                state[i] = [[{"L": torch.zeros(br, br, dtype=torch.float64), "R": torch.zeros(bc, bc, dtype=torch.float64),
                              "M": torch.zeros(br, bc, dtype=torch.float64), "A": torch.zeros(br, bc, dtype=torch.float64)}
                             for _ in range(across)] for _ in range(down)]
            update = torch.zeros_like(padded)
            for a in range(down):
                for b in range(across):
                    s = state[i][a][b]
                    G = padded[a * br:(a + 1) * br, b * bc:(b + 1) * bc]
                    s["L"] = beta_lr * s["L"] + (1 - beta_lr) * G @ G.T
                    s["R"] = beta_lr * s["R"] + (1 - beta_lr) * G.T @ G
                    s["M"] = beta_g * s["M"] + (1 - beta_g) * G
                    s["A"] = beta_graft * s["A"] + (1 - beta_graft) * G * G
                    a_hat = s["A"] / (1 - beta_graft ** t)
                    D = (s["M"] / (1 - beta_g ** t)) / (a_hat.sqrt() + graft_eps)
                    D[s["A"] == 0] = 0
                    if t < start:
                        U = D
                    else:
                        if (t - start) % freq == 0:
                            for f in ("L", "R"):
                                X = s[f]
                                scale = max(torch.linalg.matrix_norm(X).item(), 1e-30)
                                values, vectors = torch.linalg.eigh(X / scale)
                                powers = (values.clamp_min(0) + eps) ** -0.25
                                s[f + "root"] = (vectors * powers) @ vectors.T * scale ** -0.25
                        U = s["Lroot"] @ s["M"] @ s["Rroot"]
                        U = U * (torch.linalg.matrix_norm(D) / torch.linalg.matrix_norm(U))
                    update[a * br:(a + 1) * br, b * bc:(b + 1) * bc] = U
            p.mul_(1 - lr * wd).sub_(lr * update[:rows, :cols])
    return params


def _model_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(10, 7), (4, 4), (6, 13), (9,)]  # blocks of 4: padded edges, one exact fit, a vector
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def _run(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()


@pytest.mark.parametrize("batched", [True, False])
def test_dash_evd_equals_plain_per_block_shampoo(batched):
    params = _model_params()
    steps = 7
    grads = _grads(params, steps)
    # Two groups with their own lr and weight decay (the authors use only the first group's lr).
    lrs = [(1e-2, 0.1), (3e-2, 0.0), (1e-2, 0.1), (3e-2, 0.0)]
    hyper = dict(block_size=4, eps=1e-6, graft_eps=1e-8, beta_lr=0.95, beta_g=0.9, beta_graft=0.95,
                 precond_freq=2, start_step=2, inv_root="evd", scaling="fro", batched=batched)
    opt = DASH([{"params": [params[0], params[2]], "lr": 1e-2, "weight_decay": 0.1},
                {"params": [params[1], params[3]], "lr": 3e-2, "weight_decay": 0.0}], **hyper)
    expected = plain_shampoo(params, grads, lrs, 4, 1e-6, 1e-8, (0.95, 0.9, 0.95), freq=2, start=2)
    initial = [p.detach().clone() for p in params]
    _run(opt, params, grads)
    for p, e, p0 in zip(params, expected, initial):
        assert (p.detach() - p0).abs().max() > 1e-2  # they moved
        torch.testing.assert_close(p.detach().double(), e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["cn", "ndb", "cheby"])
def test_iterative_roots_train_like_evd(method):
    """The same run with each iterative root stays near the EVD run (roots to their tolerance)."""
    finals = {}
    for m in ("evd", method):
        params = _model_params()
        opt = DASH(params, lr=1e-2, block_size=4, inv_root=m, eps=1e-2, newton_steps=20, cheby_degree=40)
        _run(opt, params, _grads(params, 6))
        finals[m] = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(finals[method], finals["evd"], atol=1e-4, rtol=0)


def test_batched_equals_block_loop():
    finals = []
    for batched in (True, False):
        params = _model_params()
        opt = DASH(params, lr=1e-2, block_size=4, batched=batched)
        _run(opt, params, _grads(params, 5))
        finals.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(finals[0], finals[1], atol=1e-6, rtol=0)


def test_blocks_of_all_parameters_share_one_stack():
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(8, 20))]
    opt = DASH(params, lr=1e-2, block_size=8)
    _run(opt, params, _grads(params, 1))
    shapes = {key[1:3]: len(stack.params) for key, stack in opt._stacks.items()}
    assert shapes == {(8, 8): 4}  # the 8x20 matrix is two 8x8 blocks and a padded one, stacked with the rest
    stack = next(iter(opt._stacks.values()))
    assert stack.tensors["L"].shape == (3 + 3, 8, 8)
    assert all(opt.state[p]["L"].untyped_storage().data_ptr() == stack.tensors["L"].untyped_storage().data_ptr()
               for p in params)


def test_one_dim_shampoo_preconditions_vectors():
    vector = torch.nn.Parameter(torch.randn(6))
    opt = DASH([vector], lr=1e-2, one_dim="shampoo", block_size=4)
    _run(opt, [vector], _grads([vector], 2))
    assert opt.state[vector]["L"].shape == (2, 1, 1) and opt.state[vector]["R"].shape == (2, 4, 4)
    plain = DASH([torch.nn.Parameter(torch.randn(6))], lr=1e-2)
    _run(plain, plain.param_groups[0]["params"], _grads([vector], 1))
    assert set(plain.state[plain.param_groups[0]["params"][0]]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_follow_fp32(dtype):
    finals = {}
    for dt in (torch.float32, dtype):
        params = [torch.nn.Parameter(p.detach().to(dt)) for p in _model_params()]
        opt = DASH(params, lr=1e-2, block_size=4)
        _run(opt, params, _grads(params, 4))
        assert all(p.dtype == dt for p in params)
        assert all(v.dtype == torch.float32 for p in params for v in opt.state[p].values() if torch.is_tensor(v))
        finals[dt] = torch.cat([p.detach().float().flatten() for p in params])
    # bf16 keeps 8 mantissa bits: the parameters agree to their own rounding (|p| ~ 3).
    torch.testing.assert_close(finals[dtype], finals[torch.float32], atol=0.05, rtol=0)


# --------------------------------------------------------------------------------------------
# 4. Zero and NaN gradients, checkpoints, state bytes, bad input
# --------------------------------------------------------------------------------------------


def test_zero_gradient_leaves_parameters_finite_and_unchanged():
    params = _model_params()
    initial = [p.detach().clone() for p in params]
    opt = DASH(params, lr=1e-2, block_size=4)
    _run(opt, params, [[torch.zeros(p.shape) for p in params]] * 2)
    for p, p0 in zip(params, initial):
        assert torch.equal(p.detach(), p0)
    _run(opt, params, _grads(params, 2))  # and it trains on from there
    assert all(torch.isfinite(p).all() for p in params)
    assert any((p.detach() - p0).abs().max() > 1e-3 for p, p0 in zip(params, initial))


def test_nan_gradient_skips_that_parameter_and_keeps_its_state():
    params = _model_params()
    opt = DASH(params, lr=1e-2, block_size=4)
    _run(opt, params, _grads(params, 2))
    before = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
              for i, p in enumerate(params)}
    frozen = params[0].detach().clone()
    grads = _grads(params, 1, seed=5)[0]
    grads[0][1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped the update of 1 parameter"):
        _run(opt, params, [grads])
    assert torch.equal(params[0].detach(), frozen)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, before[0][k]) if torch.is_tensor(v) else v == before[0][k], k
    assert opt.state[params[1]]["step"] == 3 and opt.state[params[0]]["step"] == 2
    assert not torch.equal(opt.state[params[2]]["L"], before[2]["L"])  # the others did step
    _run(opt, params, _grads(params, 2, seed=6))  # a step behind, it trains on in its own sub-batch
    assert opt.state[params[0]]["step"] == 4 and opt.state[params[1]]["step"] == 5
    assert all(torch.isfinite(p).all() for p in params)


def test_checkpoint_round_trip_is_exact(tmp_path):
    grads = _grads(_model_params(), 8)
    params = _model_params()
    opt = DASH(params, lr=1e-2, block_size=4, precond_freq=3)
    _run(opt, params, grads[:4])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved_params = [p.detach().clone() for p in params]
    _run(opt, params, grads[4:])

    params2 = [torch.nn.Parameter(p) for p in saved_params]
    opt2 = DASH(params2, lr=1e-2, block_size=4, precond_freq=3)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    _run(opt2, params2, grads[4:])
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    for a, b in zip(params, params2):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]) if torch.is_tensor(value) else value == opt2.state[b][key]


def test_checkpoint_of_another_optimizer_is_refused():
    params = _model_params()
    adam = torch.optim.Adam(params)
    _run(adam, params, _grads(params, 1))
    state = adam.state_dict()
    with pytest.raises(ValueError, match="not written by DASH"):
        DASH(_model_params(), block_size=4).load_state_dict(state)


def test_state_bytes_exact():
    params = _model_params()
    opt = DASH(params, lr=1e-2, block_size=4)
    _run(opt, params, _grads(params, 1))
    expected = 0
    for p in params:
        if p.ndim == 1:
            expected += 8 * p.numel()
            continue
        n = math.ceil(p.shape[0] / 4) * math.ceil(p.shape[1] / 4)
        expected += 4 * n * (2 * 16 + 2 * 16 + 2 * 16)  # L, R, their roots, momentum, graft: 4x4 each
    assert state_bytes(opt) == expected


@pytest.mark.parametrize("kwargs, words", [
    (dict(inv_root="svd"), ["inv_root='svd'", "ndb"]),
    (dict(block_size=1), ["block_size=1", ">= 2"]),
    (dict(beta_lr=1.0), ["beta_lr=1.0", "[0, 1)"]),
    (dict(eps=0), ["eps=0", "> 0"]),
    (dict(precond_freq=0), ["precond_freq=0", ">= 1"]),
    (dict(scaling="max"), ["scaling='max'", "power"]),
    (dict(one_dim="sgd"), ["one_dim='sgd'", "adamw"]),
    (dict(lr=-1.0), ["lr=-1.0", "> 0"]),
])
def test_bad_hyperparameters_name_the_argument(kwargs, words):
    with pytest.raises(ValueError) as err:
        DASH(_model_params(), **kwargs)
    for word in words:
        assert word in str(err.value)


def test_float64_parameters_are_refused():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        DASH([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))])


# --------------------------------------------------------------------------------------------
# 5. Kernels: Triton (interpreter on CPU) against the torch twins
# --------------------------------------------------------------------------------------------


@pytest.fixture
def triton_backend():
    pytest.importorskip("triton")
    saved = get_backend()
    set_backend("triton")
    yield
    set_backend(saved)


@pytest.mark.parametrize("transpose", [False, True])
def test_symmetric_ema_kernel_equals_twin(triton_backend, transpose):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 70, 45, generator=gen)  # sides not multiples of the 64-wide tiles
    x = g.mT if transpose else g
    n = x.shape[1]
    start = torch.randn(3, n, n, generator=gen)
    start = start + start.mT
    out = start.clone()
    K.symmetric_ema(x, out, 0.9)
    twin = start.clone()
    K.symmetric_ema_torch(x, twin, 0.9)
    torch.testing.assert_close(out, twin, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, out.mT)  # mirrored tiles: exactly symmetric


def test_graft_moments_kernel_equals_twin(triton_backend):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 40, 70)  # 2800 elements a block: three chunks of 1024
    g = torch.randn(shape, generator=gen)
    g[0, :3] = 0.0  # a == 0 there: d must be 0 with eps = 0
    m0, a0 = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen)
    a0[0, :3] = 0.0
    results = []
    for fn in (K.graft_moments, K.graft_moments_torch):
        m, a, d, sq = m0.clone(), a0.clone(), torch.empty(shape), torch.empty(3)
        fn(g, m, a, d, 0.9, 0.95, 0.19, 0.0975, 0.0, sq)
        results.append((m, a, d, sq))
    for kernel, twin in zip(*results):
        torch.testing.assert_close(kernel, twin, atol=1e-5, rtol=1e-5)
    m, a, d, sq = results[0]
    assert torch.equal(d[0, :3], torch.zeros(3, 70))
    torch.testing.assert_close(sq, d.reshape(3, -1).square().sum(1))


def test_optimizer_on_triton_kernels_equals_torch(triton_backend):
    finals = []
    for backend in ("triton", "torch"):
        set_backend(backend)
        params = _model_params()
        opt = DASH(params, lr=1e-2, block_size=4)
        _run(opt, params, _grads(params, 3))
        finals.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(finals[0], finals[1], atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    """On CUDA (compiled Triton kernels, cuBLAS batched matmuls) the state lives on the parameter's
    device and a few steps follow the torch twins on the CPU."""
    runs = []
    for device in ("cuda", "cpu"):
        params = [torch.nn.Parameter(p.detach().to(device=device, dtype=dtype)) for p in _model_params()]
        opt = DASH(params, lr=1e-2, block_size=4, inv_root="ndb", newton_steps=20, eps=1e-3)
        _run(opt, params, [[g.to(device) for g in step] for step in _grads(params, 4)])
        assert all(v.device.type == device for p in params for v in opt.state[p].values() if torch.is_tensor(v))
        runs.append(torch.cat([p.detach().float().cpu().flatten() for p in params]))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4 if dtype == torch.float32 else 0.05, rtol=0)
