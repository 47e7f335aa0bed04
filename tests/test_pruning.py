"""Pruning (hf_ista.pruning): I-OBS against k-IHT on the paper's sparse recovery problem, OBS and
I-OBS against closed-form least squares, the four methods on a trained tiny Llama, and the Triton
kernels against their torch twins."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from hf_ista.data import load_corpus, tiny_llama
from hf_ista.kernels import pruning as K
from hf_ista.pruning import iobs_step, prune
from hf_ista.pruning.calibration import HessianCollector

pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------------------------
# 1. Sparse recovery (the paper's synthetic check)
# --------------------------------------------------------------------------------------------


def _topk(theta, k):
    out = torch.zeros_like(theta)
    keep = torch.topk(theta.abs(), k).indices
    out[keep] = theta[keep]
    return out


def test_iobs_recovers_sparse_vector_in_fewer_steps_than_iht():
    g = torch.Generator().manual_seed(0)
    n, d, k_true, k = 256, 128, 16, 64
    x = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(n)
    w_true = torch.zeros(d, dtype=torch.float64)
    w_true[torch.randperm(d, generator=g)[:k_true]] = torch.randn(k_true, generator=g, dtype=torch.float64)
    y = x @ w_true
    h = x.T @ x  # Hessian of f(θ) = ½‖Xθ − y‖²
    h_inv = torch.linalg.inv(h)

    def gradient(theta):
        return x.T @ (x @ theta - y)

    def steps_to_recover(step, limit):
        theta = torch.zeros(d, dtype=torch.float64)
        for t in range(1, limit + 1):
            theta = step(theta)
            if torch.linalg.norm(theta - w_true) < 1e-3:
                return t, theta
        return math.inf, theta

    eta = 1.0 / float(torch.linalg.eigvalsh(h)[-1])
    iht_steps, _ = steps_to_recover(lambda th: _topk(th - eta * gradient(th), k), 5000)
    iobs_steps, theta = steps_to_recover(lambda th: iobs_step(th, gradient(th), h_inv, k), 20)
    assert int((theta != 0).sum()) <= k
    assert iobs_steps <= 2
    assert iht_steps < math.inf  # k-IHT does get there: the comparison is of speed
    assert iobs_steps < iht_steps / 10, (iobs_steps, iht_steps)


# --------------------------------------------------------------------------------------------
# 2. One layer against closed forms
# --------------------------------------------------------------------------------------------


def _layer_problem(rows=5, cols=12, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix  # correlated inputs: compensation matters
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=g))
    return layer, x


def _augmented(x, damp):
    """Rows whose Gram matrix is the damped H = 2XᵀX/n + λI, λ = damp · mean(diag(2XᵀX/n))."""
    x = x.double().numpy()
    n, cols = x.shape
    lam = damp * np.mean(np.diag(2 * x.T @ x / n))
    return np.vstack([np.sqrt(2 / n) * x, np.sqrt(lam) * np.eye(cols)])


def _prune_one(layer, x, **kw):
    model = nn.Sequential(copy.deepcopy(layer))
    report = prune(model, calibration=[x[i:i + 100] for i in range(0, len(x), 100)], num_samples=len(x), **kw)
    return model[0].weight.detach().double().numpy(), report


@pytest.mark.parametrize("pattern, block_size", [("unstructured", 128), ("unstructured", 4), ("2:4", 8)])
def test_obs_one_shot_is_the_column_by_column_least_squares(pattern, block_size):
    """One-shot OBS sweeps the columns left to right: each kept weight is the least-squares optimum
    with the columns before it fixed and those after it free; each pruned one is 0. Solved here with
    lstsq on the data itself (damping as extra rows)."""
    layer, x = _layer_problem()
    pruned, report = _prune_one(layer, x, sparsity=0.5, pattern=pattern, method="obs", block_size=block_size)
    a = _augmented(x, 0.01)
    w = layer.weight.detach().double().numpy()
    expected = np.zeros_like(w)
    for r in range(w.shape[0]):
        target = a @ w[r]
        for i in range(w.shape[1]):
            if pruned[r, i] == 0:
                continue
            rest = target - a[:, :i] @ expected[r, :i]
            expected[r, i] = np.linalg.lstsq(a[:, i:], rest, rcond=None)[0][0]
    np.testing.assert_allclose(pruned, expected, atol=1e-4)
    assert report.layers[0].sparsity == 0.5


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_iobs_ends_on_the_exact_least_squares_of_its_support(pattern):
    layer, x = _layer_problem(seed=1)
    pruned, report = _prune_one(layer, x, sparsity=0.5, pattern=pattern, method="iobs", iterations=4)
    _, obs_report = _prune_one(layer, x, sparsity=0.5, pattern=pattern, method="obs")
    a = _augmented(x, 0.01)
    w = layer.weight.detach().double().numpy()
    for r in range(w.shape[0]):
        support = pruned[r] != 0
        assert support.sum() == w.shape[1] // 2
        solution = np.linalg.lstsq(a[:, support], a @ w[r], rcond=None)[0]
        np.testing.assert_allclose(pruned[r, support], solution, atol=1e-4)
    history = report.layers[0].iteration_errors
    assert len(history) == 4
    assert history[0] == pytest.approx(obs_report.layers[0].error, rel=1e-5)  # iteration 1 is one-shot OBS
    assert all(b <= a_ for a_, b in zip(history, history[1:]))
    assert history[-1] < 0.9 * history[0]
    assert report.layers[0].error == pytest.approx(history[-1], rel=1e-4)


def test_calibration_forms_give_the_same_prune(trained, corpus):
    """A Dataset, a DataLoader of dicts, a TensorDataset's DataLoader and a list of tensors are the
    same 24 calibration samples. (Batched differently, H differs in its last fp32 bits, which can flip
    a near-tie in a mask: the masks must agree almost everywhere; the layers that see the embeddings
    themselves, block 0's q/k/v, agree to 1e-3 in error, and a later layer's inputs carry the flips of
    the layers before it, so its error moves by up to ~6 % (measured) and the total by far less.)"""
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import default_data_collator

    ids = torch.tensor(corpus["train"]["input_ids"][:30])
    forms = [corpus["train"], DataLoader(corpus["train"], batch_size=5, collate_fn=default_data_collator),
             DataLoader(TensorDataset(ids), batch_size=7), [ids[i:i + 4] for i in range(0, 30, 4)]]
    masks, errors, first = [], [], None
    for calibration in forms:
        model = copy.deepcopy(trained)
        report = prune(model, calibration=calibration, num_samples=24, method="obs")
        assert report.num_samples == 24
        masks.append(torch.cat([(m.weight == 0).flatten() for n, m in model.named_modules()
                                if isinstance(m, nn.Linear) and n != "lm_head"]))
        errors.append(np.array([layer.error for layer in report.layers]))
        first = [i for i, layer in enumerate(report.layers) if layer.name.split(".")[-1] in ("q_proj", "k_proj", "v_proj")][:3]
    assert len(first) == 3
    for mask, error in zip(masks[1:], errors[1:]):
        assert (mask == masks[0]).float().mean() > 0.995
        np.testing.assert_allclose(error[first], errors[0][first], rtol=1e-3)
        np.testing.assert_allclose(error, errors[0], rtol=0.15)
        assert error.sum() == pytest.approx(errors[0].sum(), rel=0.03)


def test_report_error_is_the_relative_output_error():
    layer, x = _layer_problem(seed=2)
    pruned, report = _prune_one(layer, x, sparsity=0.5, method="wanda")
    w = layer.weight.detach().double().numpy()
    xd = x.double().numpy()
    expected = np.linalg.norm(xd @ (w - pruned).T) ** 2 / np.linalg.norm(xd @ w.T) ** 2
    assert report.layers[0].error == pytest.approx(expected, rel=1e-4)


def test_layer_scope_keeps_the_layer_share_and_iobs_keeps_row_counts():
    layer, x = _layer_problem(rows=8, cols=16, seed=3)
    magnitude, _ = _prune_one(layer, x, sparsity=0.5, method="magnitude", scope="layer")
    w = layer.weight.detach().double().numpy()
    assert (magnitude == 0).sum() == w.size // 2
    threshold = np.sort(np.abs(w).ravel())[w.size // 2 - 1]
    np.testing.assert_array_equal(magnitude == 0, np.abs(w) <= threshold)  # one ranking for the whole layer
    obs, obs_report = _prune_one(layer, x, sparsity=0.5, method="obs", scope="layer")
    iobs, iobs_report = _prune_one(layer, x, sparsity=0.5, method="iobs", scope="layer", iterations=3)
    assert (obs == 0).sum() == (iobs == 0).sum() == w.size // 2
    assert len(set((obs == 0).sum(1))) > 1  # rows do differ: the scope is really the layer
    np.testing.assert_array_equal((iobs == 0).sum(1), (obs == 0).sum(1))  # iterations move weights within rows
    assert iobs_report.layers[0].error <= obs_report.layers[0].error


def test_bf16_layer_prunes_like_fp32():
    layer, x = _layer_problem(seed=4)
    _, fp32 = _prune_one(layer, x, sparsity=0.5, method="obs")
    pruned, bf16 = _prune_one(layer.to(torch.bfloat16), x.to(torch.bfloat16), sparsity=0.5, method="obs")
    assert ((pruned == 0).sum(1) == 6).all()
    assert bf16.layers[0].error == pytest.approx(fp32.layers[0].error, rel=0.1)


# --------------------------------------------------------------------------------------------
# 3. A trained tiny Llama
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("stdlib", block_size=64, max_bytes=150_000, eval_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def trained(corpus):
    """The nano Llama after 150 AdamW steps on the corpus (~5 s)."""
    torch.manual_seed(0)
    model = tiny_llama("nano", max_position_embeddings=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.tensor(corpus["train"]["input_ids"])
    for _ in range(150):
        batch = data[torch.randint(0, len(data), (16,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def pruned_models(trained, corpus):
    out = {}
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda", "obs", "iobs"):
            model = copy.deepcopy(trained)
            report = prune(model, calibration=corpus["train"], sparsity=0.5, pattern=pattern, method=method,
                           iterations=3, num_samples=32)
            out[pattern, method] = model, report
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_methods_order_by_reconstruction_error(pruned_models, pattern):
    errors = {m: pruned_models[pattern, m][1].total_error for m in ("magnitude", "wanda", "obs", "iobs")}
    assert errors["iobs"] <= errors["obs"] <= errors["wanda"] <= errors["magnitude"], errors
    assert len(pruned_models[pattern, "iobs"][1].layers) == 14  # 2 blocks x 7 linears, no lm_head
    for layer in pruned_models[pattern, "iobs"][1].layers:
        assert all(b <= a + 1e-12 for a, b in zip(layer.iteration_errors, layer.iteration_errors[1:])), layer


@pytest.mark.parametrize("method", ["magnitude", "wanda", "obs", "iobs"])
def test_exact_sparsity_and_valid_2_4(pruned_models, trained, method):
    model, _ = pruned_models["unstructured", method]
    dense = dict(trained.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            zeros = (module.weight == 0).sum(1)
            assert (zeros == module.in_features // 2).all(), name
    model, _ = pruned_models["2:4", method]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kept = (module.weight != 0).view(module.out_features, -1, 4).sum(-1)
            if name == "lm_head":  # not a target: untouched
                assert torch.equal(module.weight, dense[name].weight)
            else:
                assert (kept == 2).all(), name


def test_layers_see_the_pruned_prefix(trained, corpus):
    """The decoder path (block by block on cached hidden states) prunes like the generic path (the
    whole model run for every group of layers), and the last layer's reported error is the one its
    inputs in the final pruned model give."""
    by_blocks = copy.deepcopy(trained)
    report = prune(by_blocks, calibration=corpus["train"], sparsity=0.5, method="obs", num_samples=16)

    class Wrapped(nn.Module):
        """A target after the blocks: no ModuleList holds every target, so the whole model is the stage."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.after = nn.Linear(256, 8)

        def forward(self, input_ids):
            return self.after(self.inner(input_ids=input_ids, use_cache=False).logits)

    whole = Wrapped(copy.deepcopy(trained))
    whole_targets = [f"inner.{n}" for n, m in trained.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    whole_targets.append("after")
    batches = [torch.tensor(corpus["train"]["input_ids"][i:i + 8]) for i in range(0, 16, 8)]
    prune(whole, calibration=batches, sparsity=0.5, method="obs", targets=whole_targets)
    for (name, a), (_, b) in zip(by_blocks.named_parameters(), whole.inner.named_parameters()):
        # rows whose masks agree carry the same weights (a last-bit difference in H may flip a near-tie)
        same = ((a == 0) == (b == 0)).all(-1) if a.dim() == 2 else torch.ones((), dtype=torch.bool)
        assert same.float().mean() > 0.95, name
        torch.testing.assert_close(a[same], b[same], rtol=1e-4, atol=1e-5, msg=name)

    last = "model.layers.1.mlp.down_proj"
    collector = HessianCollector({last: dict(by_blocks.named_modules())[last]})
    with torch.no_grad():
        for x in batches:
            by_blocks(input_ids=x)
    h = collector.hessians()[last].double()
    w = dict(trained.named_modules())[last].weight.detach().double()
    delta = dict(by_blocks.named_modules())[last].weight.detach().double() - w
    expected = float(torch.trace(delta @ h @ delta.T) / torch.trace(w @ h @ w.T))
    assert report.layers[-1].name == last
    assert report.layers[-1].error == pytest.approx(expected, rel=1e-3)


def test_bad_arguments_name_themselves(trained, corpus):
    model = copy.deepcopy(trained)
    for kwargs, word in [({"method": "sparsegpt"}, "method"), ({"pattern": "4:2"}, "pattern"),
                         ({"sparsity": 1.5}, "sparsity"), ({"pattern": "2:4", "sparsity": 0.7}, "sparsity"),
                         ({"iterations": 0}, "iterations"), ({"targets": ["nothing_like_this"]}, "targets"),
                         ({"num_samples": 0}, "num_samples"), ({"calibration": 3}, "calibration")]:
        kwargs = {"calibration": corpus["train"], **kwargs}
        with pytest.raises(ValueError, match=word):
            prune(model, **kwargs)
    with pytest.raises(ValueError, match="calibration"):
        prune(model, method="obs")


def test_per_module_sparsity_and_ignore(trained, corpus):
    model = copy.deepcopy(trained)
    report = prune(model, calibration=corpus["train"], num_samples=8, method="wanda",
                   sparsity={"*.mlp.*": 0.75, "q_proj": 0.25}, ignore=["re:.*layers\\.1\\..*"])
    got = {layer.name: layer.sparsity for layer in report.layers}
    assert got == {"model.layers.0.self_attn.q_proj": 0.25, "model.layers.0.mlp.gate_proj": 0.75,
                   "model.layers.0.mlp.up_proj": 0.75, "model.layers.0.mlp.down_proj": 0.75}
    assert float((model.model.layers[1].mlp.up_proj.weight == 0).float().mean()) == 0.0


# --------------------------------------------------------------------------------------------
# 4. Kernels: Triton (interpreter, fp32) against the torch twins
# --------------------------------------------------------------------------------------------

triton_only = pytest.mark.skipif(not K.triton_available(), reason="triton not installed")


def _scores(rows=9, cols=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0, :6] = 0.0
    w[1, 5] = -0.0
    w[2, :12] = 0.5  # ties
    w[3, 8:16] = -0.5
    d = torch.rand(cols, generator=g) + 0.2
    return w, d


@triton_only
@pytest.mark.parametrize("square", [True, False])
def test_select_rows_kernel_matches_torch(square):
    w, d = _scores()
    scores = w if square else (w * w / d)
    counts = torch.tensor([0, 1, 5, 12, 24, 47, 48, 3, 30], dtype=torch.int32)
    expected = K.select_mask_torch(scores, d, counts, square=square)
    assert torch.equal(K.select_mask_triton(scores, d, counts, square=square), expected)
    assert torch.equal(expected.sum(1).int(), counts)
    # the pruned ones are the lowest: every pruned score <= every kept score in the row
    s = w * w / d
    for r in range(len(counts)):
        if 0 < counts[r] < w.shape[1]:
            assert s[r][expected[r]].max() <= s[r][~expected[r]].min()


@triton_only
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_select_nm_kernel_matches_torch(n, m):
    w, d = _scores()
    expected = K.select_mask_torch(w, d, None, n, m)
    assert torch.equal(K.select_mask_triton(w, d, None, n, m), expected)
    assert ((~expected).view(w.shape[0], -1, m).sum(-1) == n).all()


@triton_only
@pytest.mark.parametrize("rows, b, n, m", [(5, 8, 0, 0), (19, 12, 0, 0), (33, 32, 0, 0), (19, 12, 2, 4), (9, 16, 1, 4)])
def test_obs_sweep_kernel_matches_torch(rows, b, n, m):
    g = torch.Generator().manual_seed(rows)
    a = torch.randn(b, b, generator=g)
    u = torch.linalg.cholesky(a @ a.T + b * torch.eye(b), upper=True).contiguous()
    w = torch.randn(rows, b, generator=g)
    given = torch.rand(rows, b, generator=g) < 0.5
    results = []
    for sweep in (K.obs_sweep_torch, K.obs_sweep_triton):
        block, q, err = w.clone(), torch.empty_like(w), torch.empty_like(w)
        mask = given.clone() if not m else torch.zeros_like(given)
        sweep(block, u, mask, q, err, n, m)
        results.append((block, q, err, mask))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    mask = results[0][3]
    assert (results[0][1][mask] == 0).all()
    if m:
        assert ((~mask).view(rows, -1, m).sum(-1) == n).all()
    # the sweep's closed form: err = (w_i − q_i)/U_ii after the updates of the columns before i, and
    # an N:M group's mask from the saliency w²/U_jj² of the weights as they stand when it is reached
    manual = w.clone()
    for i in range(b):
        if m and i % m == 0:
            s = manual[:, i:i + m] ** 2 / torch.diagonal(u)[i:i + m] ** 2
            lowest = torch.sort(s, dim=1, stable=True).indices[:, :m - n]
            assert torch.equal(torch.zeros_like(s, dtype=torch.bool).scatter_(1, lowest, True), mask[:, i:i + m])
        e = torch.where(mask[:, i], manual[:, i], 0.0) / u[i, i]
        torch.testing.assert_close(results[0][2][:, i], e)
        manual -= e[:, None] * u[i][None, :]


@pytest.mark.gpu
def test_pruning_on_cuda_matches_cpu(trained, corpus):
    """On a GPU the Triton kernels run (auto backend): same masks as the CPU twins, same model."""
    cuda = torch.device("cuda")
    w, d = _scores()
    counts = torch.tensor([0, 1, 5, 12, 24, 47, 48, 3, 30], dtype=torch.int32)
    assert torch.equal(K.select_mask(w.to(cuda), d.to(cuda), counts.to(cuda)).cpu(), K.select_mask_torch(w, d, counts))
    assert torch.equal(K.select_mask(w.to(cuda), d.to(cuda), None, 2, 4).cpu(), K.select_mask_torch(w, d, None, 2, 4))
    for n, m in ((0, 0), (2, 4)):
        b = 32
        a = torch.randn(b, b, generator=torch.Generator().manual_seed(1))
        u = torch.linalg.cholesky(a @ a.T + b * torch.eye(b), upper=True).contiguous()
        block = torch.randn(40, b, generator=torch.Generator().manual_seed(2))
        given = torch.rand(40, b, generator=torch.Generator().manual_seed(3)) < 0.5
        out = []
        for device in ("cpu", cuda):
            x, mask = block.to(device), (given.clone() if not m else torch.zeros_like(given)).to(device)
            q, err = torch.empty_like(x), torch.empty_like(x)
            K.obs_sweep(x, u.to(device), mask, q, err, n, m)
            out.append((q.cpu(), mask.cpu()))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
        assert torch.equal(out[1][1], out[0][1])
    on_cpu, on_gpu = copy.deepcopy(trained), copy.deepcopy(trained).to(cuda)
    reports = [prune(m, calibration=corpus["train"], method="iobs", pattern="2:4", num_samples=16) for m in (on_cpu, on_gpu)]
    assert reports[1].total_error == pytest.approx(reports[0].total_error, rel=1e-2)
    assert reports[1].sparsity == 0.5
