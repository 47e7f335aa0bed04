"""Low-rank optimizer kernels (LDAdam, DCT-AdamW): each Triton kernel against its torch twin on the
same inputs, both against an expectation written here, and the dispatchers' backend switch.

Without CUDA the Triton kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set in conftest.py), so every case is small.
"""
import math

import pytest
import torch

from hf_ista.kernels import get_backend, set_backend, triton_available
from hf_ista.kernels import lowrank as K

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
F32_EPS = torch.finfo(torch.float32).eps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed)).to(DEVICE)


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in element order, decoded one element at a time from the byte layout (4 bits: element
    ``i`` sits in byte ``i // 2``, low nibble when ``i`` is even)."""
    c = codes.long().cpu()
    if bits == 8:
        return c
    i = torch.arange(2 * c.numel())
    return (c[i // 2] >> (4 * (i % 2))) & 0xF


@pytest.fixture
def restore_backend():
    saved = get_backend()
    yield
    set_backend(saved)  # "auto" unless HF_ISTA_KERNELS says otherwise


# ---------------------------------------------------------------------------------------------
# row_abs_sum
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 40), (5, 1024), (4, 2500), (1, 3001)])
def test_row_abs_sum(shape):
    s = _randn(*shape, seed=sum(shape))
    out_torch = torch.full((shape[0],), 7.0, device=DEVICE)
    out_triton = out_torch.clone()
    assert K.row_abs_sum_torch(s, out_torch) is out_torch
    assert K.row_abs_sum_triton(s, out_triton) is out_triton
    torch.testing.assert_close(out_triton, out_torch, rtol=1e-6, atol=1e-6)
    expected = s.double().abs().sum(1).float()
    torch.testing.assert_close(out_torch, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_triton, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# subspace_adam
# ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("numel", [1, 7, 1000, 1025, 3000])
def test_subspace_adam(numel, eps):
    beta1, beta2 = 0.9, 0.99
    states = {name: [torch.zeros(numel, device=DEVICE) for _ in range(3)] for name in ("torch", "triton")}
    m_ref = torch.zeros(numel, dtype=torch.float64)
    v_ref = torch.zeros(numel, dtype=torch.float64)
    for t in range(1, 4):
        g = _randn(numel, seed=10 * numel + t)
        g[::3] = 0.0  # entries whose gradient was always 0: v == 0, with eps = 0 a 0/0
        if t == 2:
            g[1::3] *= 1e3  # a wide dynamic range
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        m_t, v_t, u_t = states["torch"]
        m_k, v_k, u_k = states["triton"]
        K.subspace_adam_torch(g, m_t, v_t, u_t, beta1, beta2, bc1, bc2, eps)
        K.subspace_adam_triton(g, m_k, v_k, u_k, beta1, beta2, bc1, bc2, eps)
        for a, b in zip(states["triton"], states["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        # independent float64 expectation
        gd = g.double().cpu()
        m_ref = beta1 * m_ref + (1 - beta1) * gd
        v_ref = beta2 * v_ref + (1 - beta2) * gd * gd
        live = v_ref > 0
        u_ref = torch.zeros(numel, dtype=torch.float64)
        u_ref[live] = (m_ref[live] / bc1) / ((v_ref[live] / bc2).sqrt() + eps)
        for m, v, u in (states["torch"], states["triton"]):
            torch.testing.assert_close(m.double().cpu(), m_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v.double().cpu(), v_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(u.double().cpu(), u_ref, rtol=1e-5, atol=1e-6)
            assert torch.isfinite(u).all()
            assert torch.all(u[::3] == 0) and torch.all(v[::3] == 0)
            if t == 1:  # the first Adam direction is sign(g) on the live entries (|g| >> eps)
                big = g.abs() > 1e-3
                torch.testing.assert_close(u[big], g[big].sign(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# quantize / dequantize_add
# ---------------------------------------------------------------------------------------------

# (bits, block): even blocks whose half is odd (6, 10, 50) or even (64, 100); 8 bits also takes an
# odd block at the twin level (the dispatcher only accepts even blocks, see test_check_bits)
QUANT_CASES = [(4, 6), (4, 10), (4, 64), (4, 100), (8, 7), (8, 10), (8, 64)]
NUMELS = [1, 13, 128, 129, 301]  # most not a multiple of the block; 1 and 129 (block 64): a 1-element tail


def _quant_input(numel, block, seed):
    x = _randn(numel, seed=seed) * 3 + 0.5
    if numel >= 2 * block:
        x[block: 2 * block] = 0.37  # a constant block: step 0, every code 0, decodes exactly
    return x


def _quantize(impl, x, bits, block):
    codes = torch.full((K.code_bytes(x.numel(), bits, block),), 0xAB, dtype=torch.uint8, device=DEVICE)
    scales = torch.full((K.n_blocks(x.numel(), block), 2), 7.0, device=DEVICE)
    impl(x, codes, scales, bits, block)
    return codes, scales


@needs_triton
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("bits,block", QUANT_CASES)
def test_quantize_twins_agree(bits, block, numel):
    x = _quant_input(numel, block, seed=numel * 7 + block + bits)
    codes_t, scales_t = _quantize(K.quantize_torch, x, bits, block)
    codes_k, scales_k = _quantize(K.quantize_triton, x, bits, block)
    assert codes_t.shape == (math.ceil(numel / block) * block * bits // 8,)
    assert torch.equal(codes_k, codes_t)
    assert torch.equal(scales_k, scales_t)

    # independent: (low, step) = (min, (max - min) / levels) of each block's live elements
    levels = (1 << bits) - 1
    nb = K.n_blocks(numel, block)
    for b in range(nb):
        live = x[b * block: (b + 1) * block]
        lo, hi = live.min(), live.max()
        assert scales_t[b, 0] == lo
        assert scales_t[b, 1] == (hi - lo) / levels
    # codes of live elements round (x - low) / step; padding and step-0 blocks hold code 0
    q = _unpack(codes_t, bits)
    assert q.numel() == nb * block and q.max() <= levels
    blk = torch.arange(numel) // block
    lo, step = scales_t[blk, 0].cpu().double(), scales_t[blk, 1].cpu().double()
    live_step = step > 0
    exact = (x.cpu().double() - lo) / torch.where(live_step, step, 1.0)
    assert torch.all((q[:numel].double() - exact)[live_step].abs() <= 0.5 + 1e-4)
    assert torch.all(q[:numel][~live_step] == 0)
    assert torch.all(q[numel:] == 0)
    if numel >= 2 * block:
        assert scales_t[1, 1] == 0 and scales_t[1, 0] == x[block]


@needs_triton
@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("bits,block", QUANT_CASES)
def test_dequantize_add_twins_agree(bits, block, numel):
    gen = _gen(numel + block + bits)
    nb = K.n_blocks(numel, block)
    codes = torch.randint(0, 256, (K.code_bytes(numel, bits, block),), generator=gen, dtype=torch.uint8).to(DEVICE)
    lo = torch.randn(nb, generator=gen)
    step = torch.rand(nb, generator=gen) / 10
    step[::3] = 0  # constant blocks
    scales = torch.stack((lo, step), 1).to(DEVICE)
    g = _randn(numel, seed=numel + 1)
    out_t = torch.full_like(g, 5.0)
    out_k = torch.full_like(g, 5.0)
    assert K.dequantize_add_torch(g, codes, scales, bits, block, out_t) is out_t
    assert K.dequantize_add_triton(g, codes, scales, bits, block, out_k) is out_k
    torch.testing.assert_close(out_k, out_t, rtol=1e-6, atol=1e-6)
    # independent: element i = g_i + low + code_i * step of its block, in float64
    q = _unpack(codes, bits)[:numel].double()
    b = torch.arange(numel) // block
    expected = g.cpu().double() + lo.double()[b] + q * step.double()[b]
    torch.testing.assert_close(out_t.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    # out may be g itself
    g_t, g_k = g.clone(), g.clone()
    K.dequantize_add_torch(g_t, codes, scales, bits, block, g_t)
    K.dequantize_add_triton(g_k, codes, scales, bits, block, g_k)
    assert torch.equal(g_t, out_t)
    torch.testing.assert_close(g_k, out_t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("numel", [1, 129, 1001])
@pytest.mark.parametrize("bits,block", [(4, 64), (8, 64), (4, 10), (8, 50)])
def test_round_trip_within_half_a_step(bits, block, numel, impl):
    quantize, dequantize_add = getattr(K, f"quantize_{impl}"), getattr(K, f"dequantize_add_{impl}")
    x = _quant_input(numel, block, seed=numel + 3 * block + bits)
    codes, scales = _quantize(quantize, x, bits, block)
    back = dequantize_add(torch.zeros_like(x), codes, scales, bits, block, torch.empty_like(x))
    b = torch.arange(numel, device=DEVICE) // block
    lo, step = scales[b, 0], scales[b, 1]
    slack = 4 * F32_EPS * (lo.abs() + x.abs() + ((1 << bits) - 1) * step)
    err = (back - x).abs()
    assert torch.all(err <= step / 2 + slack), (err - step / 2).max()
    if numel >= 2 * block:
        assert torch.equal(back[block: 2 * block], x[block: 2 * block])  # the constant block: exact
    if numel > 100:  # the bound is not vacuous: random data errs by a sizeable fraction of a step
        live = step > 0
        assert (err[live] / step[live]).max() > 0.3


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_nibbles_are_interleaved(impl):
    """A hand-made input whose codes are the values themselves (low 0, high 15: step 1)."""
    quantize, dequantize_add = getattr(K, f"quantize_{impl}"), getattr(K, f"dequantize_add_{impl}")
    x = torch.tensor([3.0, 12, 0, 15, 7, 1, 9, 4, 15, 0], device=DEVICE)  # 10 elements, block 8: a tail of 2
    codes, scales = _quantize(quantize, x, 4, 8)
    # element 2i in the low nibble, 2i + 1 in the high nibble of byte i
    expected = [0xC3, 0xF0, 0x17, 0x49,  # block 0: (3, 12), (0, 15), (7, 1), (9, 4)
                0x0F, 0x00, 0x00, 0x00]  # block 1: (15, 0), then padding
    assert codes.tolist() == expected
    assert scales.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    back = dequantize_add(torch.zeros_like(x), codes, scales, 4, 8, torch.empty_like(x))
    assert torch.equal(back, x)
    # an odd number of elements: the last byte's high nibble is padding (0)
    codes, _ = _quantize(quantize, x[:5], 4, 8)
    assert codes.tolist() == [0xC3, 0xF0, 0x07, 0x00]


def test_interleaved_decode_is_exact_where_hstack_is_not():
    """The authors' 4-bit error feedback unpacks the bytes as [all low nibbles, all high nibbles]
    (hstack) instead of interleaving them: the codes land on the wrong elements."""
    numel, block = 1024, 64
    x = _randn(numel, seed=42)
    codes, scales = _quantize(K.quantize, x, 4, block)
    lo, step = scales[:, 0].repeat_interleave(block), scales[:, 1].repeat_interleave(block)
    true_codes = ((x - lo) / step + 0.5).floor().clamp(0, 15).long()  # no tie at this seed

    ours = K.dequantize_add(torch.zeros_like(x), codes, scales, 4, block, torch.empty_like(x))
    ours_codes = ((ours - lo) / step).round().long()
    assert torch.equal(ours_codes, true_codes)  # exact w.r.t. the codes
    hstack_codes = torch.cat((codes & 0xF, codes >> 4)).long()  # the bug
    hstack = lo + hstack_codes.float() * step
    assert (hstack_codes != true_codes).float().mean() > 0.5

    err_ours = (ours - x).abs()
    err_hstack = (hstack - x).abs()
    assert torch.all(err_ours <= step / 2 + 1e-6)
    assert err_hstack.mean() > 5 * err_ours.mean() and err_hstack.max() > 5 * err_ours.max()


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def _dispatch_cases():
    s = _randn(3, 5, seed=1)
    g = _randn(130, seed=2)
    codes = torch.zeros(K.code_bytes(130, 4, 64), dtype=torch.uint8, device=DEVICE)
    scales = torch.zeros(K.n_blocks(130, 64), 2, device=DEVICE)
    moments = [torch.zeros(130, device=DEVICE) for _ in range(3)]
    return {
        "row_abs_sum": (s, torch.empty(3, device=DEVICE)),
        "subspace_adam": (g, *moments, 0.9, 0.99, 0.1, 0.01, 1e-8),
        "quantize": (g, codes, scales, 4, 64),
        "dequantize_add": (g, codes, scales, 4, 64, torch.empty_like(g)),
    }


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton), "auto"])
@pytest.mark.parametrize("name", ["row_abs_sum", "subspace_adam", "quantize", "dequantize_add"])
def test_dispatch_honours_backend(name, backend, monkeypatch, restore_backend):
    calls = []
    for twin in ("torch", "triton"):
        real = getattr(K, f"{name}_{twin}", None)
        if real is None:
            continue

        def spy(*args, _real=real, _twin=twin):
            calls.append(_twin)
            return _real(*args)

        monkeypatch.setattr(K, f"{name}_{twin}", spy)
    set_backend(backend)
    getattr(K, name)(*_dispatch_cases()[name])
    expected = backend if backend != "auto" else ("triton" if DEVICE == "cuda" and triton_available() else "torch")
    assert calls == [expected]


@pytest.mark.parametrize("bits,block", [(2, 64), (16, 64), (4, 7), (8, 0), (4, 63)])
def test_check_bits(bits, block):
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        K.quantize(x, torch.zeros(64, dtype=torch.uint8), torch.zeros(1, 2), bits, block)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        K.dequantize_add(x, torch.zeros(64, dtype=torch.uint8), torch.zeros(1, 2), bits, block, x)


def test_backend_rejects_unknown_name(restore_backend):
    with pytest.raises(ValueError, match="HF_ISTA_KERNELS"):
        set_backend("cuda")
