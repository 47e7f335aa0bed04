"""The scaling-format Triton kernels (interpreter on CPU, fp32) equal their torch twins bitwise,
and the twins equal an independent reference (nearest grid level; a full sort)."""
import pytest
import torch

pytest.importorskip("triton")

from hf_ista.kernels import scaling as K  # noqa: E402
from hf_ista.scaling import Int, Sparse  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_kernel_equals_twin_and_nearest_level(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(7, 300, generator=g)
    scale = Int(bits).clip * x.pow(2).mean(-1, keepdim=True).sqrt()
    q_t, in_t = K.fake_quant_torch(x, scale, bits)
    q_k, in_k = K.fake_quant_triton(x, scale, bits)
    assert torch.equal(q_t, q_k) and torch.equal(in_t, in_k)
    grid = torch.linspace(-1, 1, 2 ** bits, dtype=torch.float64).view(1, 1, -1) * scale.double().unsqueeze(-1)
    nearest = grid.squeeze(1).gather(1, (x.double().unsqueeze(-1) - grid).abs().argmin(-1))
    assert torch.allclose(q_t.double(), nearest, atol=1e-5)
    assert torch.equal(in_t, x.abs() <= scale)


@pytest.mark.parametrize("cols,k", [(300, 150), (2500, 625), (64, 1)])
def test_topk_mask_kernel_equals_twin_and_sort(cols, k):
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(5, cols, generator=g)
    x[0, :40] = 0.5  # ties at the threshold: the first ones in index order are taken
    x[0, 40:] = torch.where(x[0, 40:].abs() > 0.5, x[0, 40:], torch.zeros(()))
    m_t = K.topk_mask_torch(x, k)
    m_k = K.topk_mask_triton(x, k)
    assert torch.equal(m_t, m_k)
    assert torch.all(m_t.sum(-1) == k)
    order = torch.sort(x[1:].abs(), dim=-1, descending=True).values
    assert torch.equal((x[1:].abs() >= order[:, k - 1:k]), m_t[1:])  # no ties in the random rows


def test_formats_run_through_the_kernels(monkeypatch):
    from hf_ista.kernels import backend

    x = torch.randn(16, 256)
    ref_q, ref_s = Int(4).compress(x), Sparse(0.5).compress(x)
    monkeypatch.setattr(backend, "_backend", "triton")
    assert torch.equal(Int(4).compress(x), ref_q) and torch.equal(Sparse(0.5).compress(x), ref_s)


@pytest.mark.gpu
def test_kernels_on_cuda_equal_the_cpu_twins():
    x = torch.randn(33, 1000, generator=torch.Generator().manual_seed(5))
    scale = Int(4).clip * x.pow(2).mean(-1, keepdim=True).sqrt()
    q_t, in_t = K.fake_quant_torch(x, scale, 4)
    q_k, in_k = K.fake_quant_triton(x.cuda(), scale.cuda(), 4)
    assert torch.equal(q_t, q_k.cpu()) and torch.equal(in_t, in_k.cpu())
    assert torch.equal(K.topk_mask_torch(x, 300), K.topk_mask_triton(x.cuda(), 300).cpu())
