"""MicroAdam kernels: each Triton kernel against its torch twin, and both against an independent
expectation written here.

Without CUDA the Triton kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set in conftest.py), which is ~300x slower than torch, so every case is small. The interpreter
gets bf16 arithmetic wrong, so bf16 cases only run on a GPU.
"""
import math

import pytest
import torch

from hf_ista.kernels import microadam as K
from hf_ista.kernels import triton_available


pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
FP32 = pytest.param(torch.float32, id="fp32")
FP16 = pytest.param(torch.float16, id="fp16")
BF16_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(n, seed, dtype=torch.float32):
    return torch.randn(n, generator=_gen(seed)).to(device=DEVICE, dtype=dtype)


def _clone_all(args):
    return [a.clone() if torch.is_tensor(a) else a for a in args]


def _nibbles(error: torch.Tensor) -> torch.Tensor:
    """Codes in element order, decoded one element at a time from the byte layout."""
    e = error.long().cpu()
    i = torch.arange(2 * e.numel())
    return (e[i // 2] >> (4 * (i % 2))) & 0xF


def _bf16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


# ---------------------------------------------------------------------------------------------
# layout and window weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 7, 1000, 32767, 32768, 32769, 33000, 70000, 1_000_003, 4096 * 4096])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.37, 1.0])
@pytest.mark.parametrize("qb", [4, 64, 100])
def test_layout_chunks_fit_int16(numel, density, qb):
    lay = K.layout(numel, density, qb)
    assert lay.n_chunks == math.ceil(numel / 32768)
    assert 1 <= lay.chunk <= 32768
    assert lay.chunk - 1 <= torch.iinfo(torch.int16).max  # every chunk offset fits int16
    assert lay.padded == lay.n_chunks * lay.chunk >= numel
    assert (lay.n_chunks - 1) * lay.chunk < numel  # no empty chunk
    assert lay.padded - numel < lay.n_chunks  # padding is less than one element per chunk
    assert lay.k_chunk == min(lay.chunk, max(1, math.ceil(density * lay.chunk)))
    assert lay.k == lay.n_chunks * lay.k_chunk
    assert lay.n_qblocks == math.ceil(lay.padded / qb)
    assert (lay.n_qblocks - 1) * qb < lay.padded <= lay.n_qblocks * qb


@pytest.mark.parametrize("m", [1, 3, 10])
@pytest.mark.parametrize("step", [1, 2, 3, 9, 10, 11, 25])
def test_window_weights_are_powers_of_age(m, step):
    beta1, beta2 = 0.9, 0.999
    w = K.window_weights(step, m, beta1, beta2, "cpu")
    assert w.shape == (m, 2) and w.dtype == torch.float32
    # Row r was last written at the latest step s <= step with (s - 1) % m == r; its age is step - s.
    for r in range(m):
        s = max(s for s in range(step - m + 1, step + 1) if (s - 1) % m == r)
        age = step - s
        assert 0 <= age < m
        torch.testing.assert_close(w[r, 0].item(), beta1**age, rtol=1e-6, atol=0)
        torch.testing.assert_close(w[r, 1].item(), beta2**age, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# dequant_add
# ---------------------------------------------------------------------------------------------


def _random_error_state(n_qblocks, qb, seed):
    g = _gen(seed)
    error = torch.randint(0, 256, (n_qblocks * qb // 2,), generator=g, dtype=torch.uint8)
    lo = torch.randn(n_qblocks, generator=g)
    hi = lo + torch.rand(n_qblocks, generator=g) * 3
    hi[::5] = lo[::5]  # degenerate blocks (max == min) as the quantiser writes them
    minmax = torch.stack((lo, hi), 1).to(torch.bfloat16)
    return error.to(DEVICE), minmax.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16_GPU])
@pytest.mark.parametrize("qb", [4, 64, 100])
@pytest.mark.parametrize("numel", [1, 7, 1000, 33000, 70000])
def test_dequant_add(numel, qb, dtype):
    lay = K.layout(numel, 0.01, qb)
    error, minmax = _random_error_state(lay.n_qblocks, qb, seed=numel + qb)
    grad = _randn(numel, seed=numel, dtype=dtype)
    # non-zero garbage in the output: both twins must overwrite the padding with zeros
    out_torch = torch.full((lay.padded,), 7.0, device=DEVICE)
    out_triton = out_torch.clone()
    K.dequant_add_torch(grad, error, minmax, out_torch, qb)
    K.dequant_add_triton(grad, error, minmax, out_triton, qb)
    if DEVICE == "cpu":
        assert torch.equal(out_triton, out_torch)
    else:  # a GPU may contract code * step + lo into one FMA: an ulp apart
        torch.testing.assert_close(out_triton, out_torch, rtol=1e-6, atol=1e-6)

    # independent: decode each element from its byte and block bounds, in float64
    codes = _nibbles(error)[:numel].double()
    q = torch.arange(numel) // qb
    lo, hi = minmax.double().cpu().unbind(-1)
    expected = grad.double().cpu() + lo[q] + codes * (hi[q] - lo[q]) / 15
    torch.testing.assert_close(out_torch[:numel].double().cpu(), expected, rtol=1e-6, atol=1e-6)
    assert torch.all(out_torch[numel:] == 0)


# ---------------------------------------------------------------------------------------------
# select_topk
# ---------------------------------------------------------------------------------------------

TOPK_CASES = [  # numel, density
    (1, 0.01),
    (7, 0.3),
    (1000, 0.05),
    (1000, 1.0),
    (33000, 0.01),  # two chunks of 16500
    (70000, 0.01),  # three chunks of 23334, the last one padded
]


def _expected_topk(a_chunk: torch.Tensor, k: int) -> torch.Tensor:
    """k largest |a| of a chunk, ties to the lower position, in ascending position order."""
    order = torch.sort(-a_chunk.abs().cpu().double(), stable=True).indices
    return order[:k].sort().values


def _run_topk(impl, a, lay, m, row, values_dtype):
    # sentinel rows: only ``row`` may be written
    indices = torch.full((m, lay.n_chunks, lay.k_chunk), -5, dtype=torch.int16, device=DEVICE)
    values = torch.full((m, lay.n_chunks, lay.k_chunk), -9.0, dtype=values_dtype, device=DEVICE)
    impl(a, indices, values, row, lay.chunk)
    return indices, values


@needs_triton
@pytest.mark.parametrize("values_dtype", [FP32, FP16, BF16_GPU])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("numel,density", TOPK_CASES)
def test_select_topk(numel, density, ties, values_dtype):
    if ties and numel > 1000:
        pytest.skip("tie-heavy inputs are covered by the small sizes (the interpreter is slow)")
    if numel > 33000 and values_dtype == torch.float16:
        pytest.skip("the fp16 cast is covered at 33000 (the interpreter is slow)")
    lay = K.layout(numel, density, 64)
    a = torch.zeros(lay.padded, device=DEVICE)
    a[:numel] = _randn(numel, seed=numel)
    if ties:  # few distinct magnitudes, both signs: many exact ties in |a|
        a[:numel] = (a[:numel] * 2).round() / 2
    m, row = 3, 1
    idx_torch, val_torch = _run_topk(K.select_topk_torch, a, lay, m, row, values_dtype)
    idx_triton, val_triton = _run_topk(K.select_topk_triton, a, lay, m, row, values_dtype)
    assert torch.equal(idx_triton, idx_torch)
    assert torch.equal(val_triton.view(-1).float(), val_torch.view(-1).float())

    # independent expectation
    for r in range(m):
        if r != row:
            assert torch.all(idx_torch[r] == -5) and torch.all(val_torch[r] == -9)
    chunks = a.view(lay.n_chunks, lay.chunk)
    for j in range(lay.n_chunks):
        got = idx_torch[row, j].long().cpu()
        assert torch.equal(got, _expected_topk(chunks[j], lay.k_chunk))
        assert torch.all(got[1:] > got[:-1]) and got.min() >= 0 and got.max() < lay.chunk
        # the selected magnitudes are exactly the k largest (torch.topk, order-free)
        top = torch.topk(chunks[j].abs(), lay.k_chunk).values.sort().values
        assert torch.equal(chunks[j].abs()[got.to(DEVICE)].sort().values, top)
        assert torch.equal(val_torch[row, j], chunks[j][got.to(DEVICE)].to(values_dtype))


# ---------------------------------------------------------------------------------------------
# compress_error
# ---------------------------------------------------------------------------------------------

COMPRESS_CASES = [  # numel, quant block size (the quantiser runs one program per block)
    (1, 4),
    (7, 4),
    (300, 4),
    (1000, 64),
    (1000, 100),
    (33000, 1000),  # two chunks of 16500: block 16 straddles the chunk boundary
    (70000, 4096),  # three chunks, padded to 70002; the last block runs past the padding
]


def _prefloor(a, minmax, qb):
    """Torch-side ``(x - lo) * 15 / (hi - lo)`` per element (the value floor(. + 0.5) rounds)."""
    blocks = torch.zeros(minmax.shape[0] * qb, device=a.device)
    blocks[: a.numel()] = a
    lo, hi = minmax.float().unbind(-1)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((blocks.view(-1, qb) - lo[:, None]) * 15.0 / span[:, None]).view(-1)


@needs_triton
@pytest.mark.parametrize("numel,qb", COMPRESS_CASES)
def test_compress_error(numel, qb):
    lay = K.layout(numel, 0.02, qb)
    a = torch.zeros(lay.padded, device=DEVICE)
    a[:numel] = _randn(numel, seed=3 * numel + qb)
    indices = torch.zeros(1, lay.n_chunks, lay.k_chunk, dtype=torch.int16, device=DEVICE)
    values = torch.zeros(1, lay.n_chunks, lay.k_chunk, device=DEVICE)
    K.select_topk_torch(a, indices, values, 0, lay.chunk)
    row = indices[0]

    def run(impl):
        acc = a.clone()
        error = torch.full((lay.n_qblocks * qb // 2,), 0xAB, dtype=torch.uint8, device=DEVICE)
        minmax = torch.full((lay.n_qblocks, 2), 3.0, dtype=torch.bfloat16, device=DEVICE)
        impl(acc, row, error, minmax, qb, lay.chunk)
        return acc, error, minmax

    acc_t, err_t, mm_t = run(K.compress_error_torch)
    acc_k, err_k, mm_k = run(K.compress_error_triton)

    # the zeroed accumulator: exactly a with the selected entries set to 0
    expected_acc = a.clone().view(lay.n_chunks, lay.chunk).scatter_(1, row.long(), 0.0).view(-1)
    assert torch.equal(acc_t, expected_acc)
    assert torch.equal(acc_k, expected_acc)

    # block bounds: bf16 (round to nearest) of the min / max of the zero-padded blocks
    blocks = torch.zeros(lay.n_qblocks * qb, device=DEVICE)
    blocks[: lay.padded] = expected_acc
    blocks = blocks.view(-1, qb)
    expected_mm = torch.stack((blocks.amin(1), blocks.amax(1)), 1).to(torch.bfloat16)
    assert torch.equal(_bf16_bits(mm_t), _bf16_bits(expected_mm))
    assert torch.equal(_bf16_bits(mm_k), _bf16_bits(expected_mm))

    # codes: equal except a difference of exactly 1 at an exact .5 tie of the rounding
    codes_t, codes_k = _nibbles(err_t), _nibbles(err_k)
    pre = _prefloor(expected_acc, mm_t, qb).cpu()
    at_tie = (pre - (pre.floor() + 0.5)).abs() <= 1e-4
    diff = (codes_t - codes_k).abs()
    assert torch.all(diff <= 1)
    assert torch.all(at_tie[diff == 1]), "codes differ away from a .5 tie"
    # independent codes (float64 from the bf16 bounds), away from ties
    lo, hi = mm_t.double().cpu().unbind(-1)
    x = blocks.double().cpu()
    span = (hi - lo)[:, None]
    ref = torch.where(span > 0, ((x - lo[:, None]) * 15 / span + 0.5).floor(), torch.zeros_like(x))
    ref = ref.clamp(0, 15).view(-1).long()
    assert torch.equal(codes_t[~at_tie], ref[~at_tie])

    # round trip: dequantised error within half a step (+ the bf16 rounding of the bounds)
    out = torch.empty(lay.padded, device=DEVICE)
    K.dequant_add_torch(torch.zeros(numel, device=DEVICE), err_t, mm_t, out, qb)
    true_lo, true_hi = blocks.amin(1).cpu(), blocks.amax(1).cpu()
    bound = (true_hi - true_lo) / 30 + 2**-8 * torch.maximum(true_lo.abs(), true_hi.abs()) + 1e-6
    q = torch.arange(numel) // qb
    assert torch.all((out[:numel].cpu() - expected_acc[:numel].cpu()).abs() <= bound[q])


@needs_triton
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compress_error_zeroed_entries_at_exact_tie(impl):
    """In a block with lo == -hi a zeroed entry sits exactly on 7.5: it must round up to code 8
    (floor(7.5 + 0.5)) on both twins, whatever the rounding of a reciprocal would say."""
    fn = {"torch": K.compress_error_torch, "triton": K.compress_error_triton}[impl]
    qb, n_blocks = 4, 400
    g = _gen(21)
    hi = (torch.rand(n_blocks, generator=g) * 5 + 0.01).to(torch.bfloat16).float()
    lo = -hi
    mid = torch.randn(n_blocks, generator=g).clamp(-0.9, 0.9) * hi
    a = torch.stack((lo, hi, mid, 7 * hi), 1).view(-1).to(DEVICE)  # the 4th entry gets selected
    row = torch.arange(3, 4 * n_blocks, 4, dtype=torch.int16).view(1, -1).to(DEVICE)  # one chunk
    error = torch.zeros(n_blocks * qb // 2, dtype=torch.uint8, device=DEVICE)
    minmax = torch.zeros(n_blocks, 2, dtype=torch.bfloat16, device=DEVICE)
    fn(a, row, error, minmax, qb, 4 * n_blocks)
    codes = _nibbles(error).view(n_blocks, qb)
    assert torch.equal(minmax.float().cpu(), torch.stack((lo, hi), 1))
    assert torch.all(codes[:, 0] == 0) and torch.all(codes[:, 1] == 15)
    assert torch.all(codes[:, 3] == 8)


def test_compress_error_degenerate_block_is_exact():
    """A block with max == min (e.g. all zero after selection) decodes to that value exactly."""
    qb, chunk = 8, 16
    a = torch.tensor([0.0] * 8 + [2.5] * 8)
    row = torch.tensor([[0]], dtype=torch.int16)
    error = torch.zeros(8, dtype=torch.uint8)
    minmax = torch.zeros(2, 2, dtype=torch.bfloat16)
    K.compress_error_torch(a, row, error, minmax, qb, chunk)
    out = torch.empty(16)
    K.dequant_add_torch(torch.zeros(16), error, minmax, out, qb)
    assert torch.equal(out, a)


# ---------------------------------------------------------------------------------------------
# window_update
# ---------------------------------------------------------------------------------------------

WINDOW_CASES = [(1, 0.01), (7, 0.3), (1000, 0.05), (33000, 0.01), (70000, 0.01)]
DTYPE_PAIRS = [  # param dtype, values dtype
    pytest.param(torch.float32, torch.float32, id="fp32-fp32"),
    pytest.param(torch.float16, torch.float16, id="fp16-fp16"),
    pytest.param(torch.float32, torch.float16, id="fp32-fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, marks=pytest.mark.gpu, id="bf16-bf16"),
]


def _random_window(lay, m, values_dtype, seed):
    g = _gen(seed)
    # distinct offsets within a row (as select_topk writes them); rows overlap each other
    idx = torch.stack([
        torch.stack([torch.randperm(lay.chunk, generator=g)[: lay.k_chunk].sort().values for _ in range(lay.n_chunks)])
        for _ in range(m)
    ]).to(torch.int16)
    vals = torch.randn(m, lay.n_chunks, lay.k_chunk, generator=g)
    return idx.to(DEVICE), vals.to(device=DEVICE, dtype=values_dtype)


@needs_triton
@pytest.mark.parametrize("param_dtype,values_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("numel,density", WINDOW_CASES)
def test_window_update(numel, density, param_dtype, values_dtype):
    lay = K.layout(numel, density, 64)
    m, step = 3, 5
    beta1, beta2, lr, wd, eps = 0.9, 0.999, 1e-2, 0.1, 1e-8
    indices, values = _random_window(lay, m, values_dtype, seed=numel)
    weights = K.window_weights(step, m, beta1, beta2, DEVICE)
    c1 = (1 - beta1) / (1 - beta1**step)
    c2 = (1 - beta2) / (1 - beta2**step)
    p0 = _randn(numel, seed=numel + 1, dtype=param_dtype)
    p_torch, p_triton = p0.clone(), p0.clone()
    K.window_update_torch(p_torch, indices, values, weights, lr, wd, c1, c2, eps, lay.chunk)
    K.window_update_triton(p_triton, indices, values, weights, lr, wd, c1, c2, eps, lay.chunk)

    # independent dense float64 expectation: scatter every ring row, weight by beta**age
    m1 = torch.zeros(lay.padded, dtype=torch.float64)
    m2 = torch.zeros(lay.padded, dtype=torch.float64)
    w = weights.double().cpu()
    for r in range(m):
        for j in range(lay.n_chunks):
            pos = j * lay.chunk + indices[r, j].long().cpu()
            v = values[r, j].double().cpu()
            m1.index_add_(0, pos, w[r, 0] * v)
            m2.index_add_(0, pos, w[r, 1] * v * v)
    m1, m2 = m1[:numel], m2[:numel]
    expected = p0.double().cpu() * (1 - lr * wd) - lr * (c1 * m1) / ((c2 * m2).sqrt() + eps)

    if param_dtype == torch.float32:
        tol = dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p_triton, p_torch, **tol)
        torch.testing.assert_close(p_torch.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    else:  # both round the same fp32 result once: at most one ulp apart
        ulp = torch.finfo(param_dtype).eps * p_torch.float().abs().clamp_min(2**-14)
        assert torch.all((p_triton.float() - p_torch.float()).abs() <= ulp)
        assert torch.all((p_torch.double().cpu() - expected).abs() <= ulp.double().cpu() + 1e-6)
    # entries outside the window only decay
    touched = (m2 > 0) | (m1 != 0)
    untouched = ~touched
    decayed = (p0.float() * (1 - lr * wd)).to(param_dtype).cpu()
    assert torch.equal(p_torch.cpu()[untouched], decayed[untouched])
    assert torch.equal(p_triton.cpu()[untouched], decayed[untouched])
