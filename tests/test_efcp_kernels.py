"""EFCP kernels: each Triton kernel against its torch twin, and the twins against expectations
written here. Without CUDA the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set in conftest.py): fp32 only, small windows, but parameters past 32768 elements (several
chunks, parameter-relative indices beyond int16)."""
import math

import pytest
import torch

from hf_ista.kernels import efcp as K
from hf_ista.kernels import triton_available

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not triton_available(), reason="triton is not installed")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("numel", [1, 1000, 32768, 32769, 70000, 2**31 + 5])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.5, 1.0])
def test_layout(numel, density):
    lay = K.layout(numel, density)
    assert lay.n_chunks == math.ceil(numel / 32768) and 1 <= lay.chunk <= 32768
    assert lay.padded >= numel and lay.padded - numel < lay.n_chunks
    assert lay.k_chunk == min(lay.chunk, math.ceil(density * lay.chunk))
    assert lay.dense == (lay.k_chunk == lay.chunk)
    assert lay.index_dtype == (torch.int64 if numel > 2**31 else torch.int32)


def _window(numel, density, m, seed):
    lay = K.layout(numel, density)
    indices = torch.zeros(m, lay.n_chunks, lay.k_chunk, dtype=torch.int32, device=DEVICE)
    values = torch.zeros(m, lay.n_chunks, lay.k_chunk, dtype=torch.float32, device=DEVICE)
    return lay, indices, values


@pytest.mark.parametrize("numel, density, ties", [(1000, 0.05, False), (70000, 0.002, False), (4097, 0.1, True)])
def test_compress_triton_equals_torch_and_the_definition(numel, density, ties):
    m, row = 3, 1
    lay, indices, values = _window(numel, density, m, 0)
    grad = _randn(numel, 1)
    if ties:  # many equal magnitudes: ties go to the lower position in both twins
        grad = torch.round(grad * 2) / 2
    error = torch.zeros(lay.padded, device=DEVICE)
    error[:numel] = 0.3 * _randn(numel, 2)
    outs = []
    for fn in (K.compress_torch, K.compress_triton):
        e, i, v = error.clone(), indices.clone(), values.clone()
        c = torch.full((lay.padded,), float("nan"), device=DEVICE)
        fn(grad, e, i, v, c, row, lay.chunk)
        outs.append((e, i, v, c))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    e, i, v, c = outs[0]
    acc = error.clone()
    acc[:numel] += grad
    # the definition: per chunk, the k largest |acc|; c + e = acc; the other rows untouched
    for j in range(lay.n_chunks):
        sl = slice(j * lay.chunk, (j + 1) * lay.chunk)
        kept = i[row, j].long()
        assert kept.min() >= j * lay.chunk and kept.max() < (j + 1) * lay.chunk
        assert torch.all(kept[1:] > kept[:-1])
        threshold = acc[kept].abs().min()
        rest = torch.ones(lay.padded, dtype=torch.bool, device=DEVICE)
        rest[kept] = False
        assert acc[sl][rest[sl]].abs().max() <= threshold
    torch.testing.assert_close(v[row].reshape(-1), acc[i[row].reshape(-1).long()], rtol=0, atol=0)
    torch.testing.assert_close(c + e, acc, rtol=0, atol=0)
    assert torch.count_nonzero(c) <= lay.k
    assert torch.count_nonzero(i[0]) == 0 and torch.count_nonzero(i[2]) == 0
    if numel > 32768:
        assert i.max() > 32767  # parameter-relative: no int16 anywhere


def _filled(numel, density, m, seed):
    lay, indices, values = _window(numel, density, m, seed)
    error = torch.zeros(lay.padded, device=DEVICE)
    c = torch.empty(lay.padded, device=DEVICE)
    for r in range(m):
        K.compress_torch(_randn(numel, seed + r), error, indices, values, c, r, lay.chunk)
    return lay, indices, values


def _dense(lay, indices, values):
    m = values.shape[0]
    dense = torch.zeros(m, lay.padded, dtype=torch.float64, device=DEVICE)
    return dense.scatter_(1, indices.view(m, -1).long(), values.view(m, -1).double())


@pytest.mark.parametrize("numel, density", [(1000, 0.05), (70000, 0.003)])
def test_row_dots_triton_equals_torch_and_the_dense_product(numel, density):
    m = 4
    lay, indices, values = _filled(numel, density, m, 10)
    x = _randn(lay.padded, 20)
    got_torch = K.row_dots_torch(indices, values, x, torch.empty(m, device=DEVICE))
    got_triton = K.row_dots_triton(indices, values, x, torch.empty(m, device=DEVICE))
    expected = _dense(lay, indices, values) @ x.double()
    torch.testing.assert_close(got_torch.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_triton, got_torch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("numel, density", [(1000, 0.05), (70000, 0.003)])
def test_combine_rows_triton_equals_torch_and_the_dense_product(numel, density):
    m = 4
    lay, indices, values = _filled(numel, density, m, 30)
    w = _randn(m, 40)
    base = _randn(lay.padded, 50)
    got_torch = K.combine_rows_torch(indices, values, w, base.clone())
    got_triton = K.combine_rows_triton(indices, values, w, base.clone())
    expected = base.double() + w.double() @ _dense(lay, indices, values)
    torch.testing.assert_close(got_torch.double(), expected, rtol=1e-5, atol=1e-5)
    # rows are added in the same order 0..m-1 in both: the same float32 numbers
    torch.testing.assert_close(got_triton, got_torch, rtol=1e-6, atol=1e-6)


def test_dense_rows_are_plain_products():
    m, numel = 3, 500
    lay = K.layout(numel, 1.0)
    indices = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    values = torch.zeros(m, lay.n_chunks, lay.k_chunk, device=DEVICE)
    c = torch.empty(lay.padded, device=DEVICE)
    grads = [_randn(numel, s) for s in range(m)]
    for r, g in enumerate(grads):
        K.compress(g, torch.zeros(0, device=DEVICE), indices, values, c, r, lay.chunk)
    G = torch.stack(grads)
    torch.testing.assert_close(values.view(m, -1), G)
    x, w = _randn(numel, 7), _randn(m, 8)
    for dots, combine in ((K.row_dots_torch, K.combine_rows_torch), (K.row_dots_triton, K.combine_rows_triton)):
        torch.testing.assert_close(dots(indices, values, x, torch.empty(m, device=DEVICE)), G @ x)
        torch.testing.assert_close(combine(indices, values, w, torch.zeros(numel, device=DEVICE)), w @ G)


def test_optimizer_on_triton_backend_equals_torch_backend():
    from hf_ista.kernels import backend
    from hf_ista.optim import SparseMFAC

    shapes = [(40, 30), (33000,)]
    results = []
    for name in ("torch", "triton"):
        backend.set_backend(name)
        try:
            params = [torch.zeros(s, device=DEVICE, requires_grad=True) for s in shapes]
            opt = SparseMFAC(params, lr=1e-2, m=3, density=0.01, damp=1e-4)
            for t in range(3):
                for i, p in enumerate(params):
                    p.grad = _randn(shapes[i], 100 * t + i) if len(shapes[i]) == 1 else \
                        _randn(math.prod(shapes[i]), 100 * t + i).view(shapes[i])
                opt.step()
            results.append((params, opt))
        finally:
            backend.set_backend("auto")
    (pa, oa), (pb, ob) = results
    for p, q in zip(pa, pb):
        assert torch.equal(oa.state[p]["indices"], ob.state[q]["indices"])
        assert torch.equal(oa.state[p]["error"], ob.state[q]["error"])
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_compress_of_a_bf16_gradient_on_cuda_equals_the_cpu_twin():
    numel, density = 70000, 0.01
    lay = K.layout(numel, density)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    outs = []
    for device, fn in (("cpu", K.compress_torch), ("cuda", K.compress_triton)):
        e = torch.zeros(lay.padded, device=device)
        i = torch.zeros(2, lay.n_chunks, lay.k_chunk, dtype=torch.int32, device=device)
        v = torch.zeros(2, lay.n_chunks, lay.k_chunk, device=device)
        c = torch.empty(lay.padded, device=device)
        fn(grad.to(device), e, i, v, c, 0, lay.chunk)
        outs.append([t.cpu() for t in (e, i, v, c)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
