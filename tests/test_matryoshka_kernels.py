"""MatryoshkaLoRA's adapter-path kernels: the Triton kernels (in Triton's interpreter without a GPU,
fp32) against their torch twins, forward and gradients, and both against a dense autograd reference
written here."""
import pytest
import torch

from hf_ista.kernels import set_backend, triton_available
from hf_ista.kernels import matryoshka_lora as K

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _inputs(M=37, IN=24, OUT=40, R=8, rank=5, seed=0):
    """x, A (R, IN), B (OUT, R), base output, diagonal d (rank,): odd sizes so every mask is exercised."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, IN, generator=g)
    A = torch.randn(R, IN, generator=g)
    B = torch.randn(OUT, R, generator=g)
    base = torch.randn(M, OUT, generator=g)
    d = torch.rand(rank, generator=g) + 0.5
    return [t.to(DEVICE) for t in (x, A, B, base, d)]


def _run(backend, x, A, B, base, d, rank, scale, g_out):
    """Output and gradients (x, A, B, base) through ``matryoshka_lora`` on ``backend``."""
    leaves = [t.clone().requires_grad_() for t in (x, A, B, base)]
    set_backend(backend)
    try:
        out = K.matryoshka_lora(leaves[0], leaves[1][:rank], leaves[2][:, :rank], leaves[3], d, scale)
        out.backward(g_out)
    finally:
        set_backend("auto")
    return out.detach(), [t.grad for t in leaves]


def _reference(x, A, B, base, d, rank, scale, g_out):
    leaves = [t.clone().double().requires_grad_() for t in (x, A, B, base)]
    xx, AA, BB, bb = leaves
    out = bb + scale * ((xx @ AA[:rank].T) * d.double()) @ BB[:, :rank].T
    out.backward(g_out.double())
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_forward_and_gradients_match_dense_reference(backend):
    x, A, B, base, d = _inputs()
    g_out = torch.randn(base.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = _run(backend, x, A, B, base, d, 5, 0.7, g_out)
    ref_out, ref_grads = _reference(x, A, B, base, d, 5, 0.7, g_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("x", "A", "B", "base"), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")
    # only the served prefix of A and B gets gradient
    assert grads[1][5:].abs().max() == 0 and grads[2][:, 5:].abs().max() == 0


@needs_triton
@pytest.mark.parametrize("rank", [1, 8, 19])  # 19: a rank block of 32, padded
def test_triton_equals_torch_twin(rank):
    x, A, B, base, _ = _inputs(M=33, IN=20, OUT=18, R=20, rank=rank, seed=rank)
    d = torch.linspace(2.0, 0.5, rank).to(DEVICE)
    g_out = torch.randn(base.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out_t, grads_t = _run("triton", x, A, B, base, d, rank, 1.3, g_out)
    out_p, grads_p = _run("torch", x, A, B, base, d, rank, 1.3, g_out)
    torch.testing.assert_close(out_t, out_p, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_t, grads_p):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_triton
def test_each_triton_primitive_equals_its_twin():
    g = torch.Generator().manual_seed(3)
    x, w, c = torch.randn(21, 35, generator=g), torch.randn(9, 35, generator=g).T, torch.rand(9, generator=g)
    torch.testing.assert_close(K.project_triton(x, w, c), K.project_torch(x, w, c), rtol=1e-5, atol=1e-5)
    h, w2, base = torch.randn(21, 9, generator=g), torch.randn(40, 9, generator=g).T, torch.randn(21, 40, generator=g)
    torch.testing.assert_close(K.expand_triton(h, w2, base), K.expand_torch(h, w2, base), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.expand_triton(h, w2, None), h @ w2, rtol=1e-5, atol=1e-5)
    p, q = torch.randn(70, 9, generator=g), torch.randn(70, 13, generator=g)
    out_t, out_p = torch.empty(13, 9).T, torch.empty(13, 9).T  # a transposed destination, as grad_B uses
    K.weight_grad_triton(p, q, out_t)
    K.weight_grad_torch(p, q, out_p)
    torch.testing.assert_close(out_t, p.T @ q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p, p.T @ q, rtol=1e-6, atol=1e-6)


def test_rank_mismatch_is_a_value_error():
    x, A, B, base, d = _inputs()
    with pytest.raises(ValueError, match="rank mismatch"):
        K.matryoshka_lora(x, A[:4], B[:, :5], base, d, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernels_match_twin(dtype):
    """On a GPU (auto backend: Triton), every dtype against the torch twin, forward and gradients."""
    x, A, B, base, d = (t.cuda() for t in _inputs(M=300, IN=96, OUT=80, R=32, rank=24, seed=5))
    x, A, B, base = (t.to(dtype) for t in (x, A, B, base))
    g_out = torch.randn(base.shape, device="cuda", dtype=dtype)
    out_t, grads_t = _run("auto", x, A, B, base, d, 24, 0.5, g_out)
    out_p, grads_p = _run("torch", x, A, B, base, d, 24, 0.5, g_out)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(out_t.float(), out_p.float(), rtol=tol, atol=tol)
    for got, want in zip(grads_t, grads_p):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 10)
