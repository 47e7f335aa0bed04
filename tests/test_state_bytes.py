"""hf_ista.state_bytes: exact byte counts of optimizer state, MicroAdam's ~1 byte per parameter."""
import math

import pytest
import torch

import hf_ista
from hf_ista.kernels import microadam as K
from hf_ista.optim import MicroAdam

pytestmark = pytest.mark.usefixtures("single_thread")


def _step(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


@pytest.fixture(scope="module")
def microadam_4096():
    """MicroAdam at m=10, density 1 % on one 4096 x 4096 weight, its state built by one step."""
    p = torch.nn.Parameter(torch.zeros(4096, 4096))
    opt = MicroAdam([p], m=10, density=0.01)
    _step(opt, [p])
    p.grad = None
    return p, opt


def test_microadam_under_one_byte_per_param(microadam_4096):
    p, opt = microadam_4096
    d = p.numel()
    got = hf_ista.state_bytes(opt)
    state = opt.state[p]
    assert got == sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))

    # the same number from the layout: 512 chunks of 32768, 328 kept per chunk and ring row
    n_chunks, chunk = 512, 32768
    k_chunk = math.ceil(0.01 * chunk)
    n_qblocks = math.ceil(n_chunks * chunk / 64)
    expected = (
        10 * n_chunks * k_chunk * 2  # int16 indices
        + 10 * n_chunks * k_chunk * 2  # bf16 values
        + n_qblocks * 64 // 2  # 4-bit error, two codes per byte
        + n_qblocks * 2 * 2  # bf16 (min, max) per quantisation block
    )
    assert K.layout(d, 0.01, 64).k_chunk == k_chunk
    assert got == expected
    assert got / d <= 1.0
    assert got / d == pytest.approx(0.963, abs=1e-3)


def test_accelerate_wrapper_counts_the_same(microadam_4096):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    p, opt = microadam_4096
    before = hf_ista.state_bytes(opt)
    try:
        wrapped = accelerate.Accelerator(cpu=True).prepare(opt)
        assert wrapped is not opt and wrapped.optimizer is opt
        assert hf_ista.state_bytes(wrapped) == before == hf_ista.state_bytes(opt)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_adamw_is_eight_bytes_per_param_plus_step():
    params = [torch.nn.Parameter(torch.zeros(256, 300)), torch.nn.Parameter(torch.zeros(300))]
    opt = torch.optim.AdamW(params)
    _step(opt, params)
    n = sum(p.numel() for p in params)
    steps = [opt.state[p]["step"] for p in params]
    assert all(torch.is_tensor(s) and s.dtype == torch.float32 and s.numel() == 1 for s in steps)
    # exp_avg and exp_avg_sq in fp32, plus one 4-byte step tensor per parameter
    assert hf_ista.state_bytes(opt) == 8 * n + 4 * len(params)


def test_sgd_momentum_is_four_bytes_per_param():
    params = [torch.nn.Parameter(torch.zeros(64, 70)), torch.nn.Parameter(torch.zeros(70))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    _step(opt, params)
    assert hf_ista.state_bytes(opt) == 4 * sum(p.numel() for p in params)
    # plain SGD has no state at all
    plain = torch.optim.SGD(params, lr=0.1)
    _step(plain, params)
    assert hf_ista.state_bytes(plain) == 0


def test_shared_tensors_counted_once():
    a, b = torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    _step(opt, [a, b])
    assert hf_ista.state_bytes(opt) == 2 * 400
    # the same tensor in two parameters' state (and twice in one) counts once
    shared = opt.state[a]["momentum_buffer"]
    opt.state[b]["momentum_buffer"] = shared
    opt.state[b]["again"] = [shared, {"nested": shared}]
    assert hf_ista.state_bytes(opt) == 400
    # views of one flat buffer, as a flattening optimizer keeps them: its bytes count once
    flat = torch.zeros(200)
    opt.state[a] = {"flat": flat}
    opt.state[b] = {"first": flat[:100], "second": flat[100:], "all": flat.view(10, 20)}
    assert hf_ista.state_bytes(opt) == 800
    # two views covering disjoint halves only: each half once
    opt.state[a] = {"first": flat[:100]}
    opt.state[b] = {"second": flat[100:], "again": flat[:100]}
    assert hf_ista.state_bytes(opt) == 800
    # a strided view spans its extent, overlapping its neighbour is not counted twice
    opt.state[a] = {"even": flat[::2]}  # covers bytes [0, 4 * 199)
    opt.state[b] = {"tail": flat[150:]}  # bytes [600, 800)
    assert hf_ista.state_bytes(opt) == 800


def test_tensors_in_objects_of_the_state_count():
    """An optimizer may keep a preconditioner object per parameter (pytorch-optimizer's
    ScalableShampoo does): the tensors among its attributes are state too, a cycle is no trap."""
    class Preconditioner:
        def __init__(self):
            self.left, self.right = torch.zeros(10, 10), torch.zeros(5, 5, dtype=torch.float64)
            self.stats = [torch.zeros(3, dtype=torch.int16)]
            self.me = self

    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"pre": Preconditioner(), "step": 3}
    assert hf_ista.state_bytes(opt) == 400 + 200 + 6


def test_torchao_adamw4bit_counts_inner_tensors():
    """4-bit moments: 2 x 0.5 B codes + fp32 scales per block of 128 + a 16-entry qmap each."""
    torchao_optim = pytest.importorskip("torchao.optim")
    name, limit = "AdamW4bit", 1.1
    cls = getattr(torchao_optim, name)
    p = torch.nn.Parameter(torch.randn(256, 256))
    opt = cls([p], lr=1e-3)
    p.grad = torch.randn(256, 256)
    try:
        opt.step()  # torchao compiles its step with torch.compile
    except Exception as exc:  # noqa: BLE001 - any backend failure means "does not run here"
        pytest.skip(f"torchao.optim.{name} does not run on CPU here: {type(exc).__name__}: {exc}")
    state = opt.state[p]
    inner = {state["step"].data_ptr(): state["step"]}
    for key in ("exp_avg", "exp_avg_sq"):
        sub = state[key]
        assert type(sub) is not torch.Tensor  # a tensor subclass: its own numel() would say fp32
        names, _ = sub.__tensor_flatten__()
        assert "codes" in names and "scale" in names
        assert sub.codes.dtype == torch.uint8
        inner.update({getattr(sub, n).data_ptr(): getattr(sub, n) for n in names})  # a shared qmap once
    expected = sum(t.numel() * t.element_size() for t in inner.values())
    got = hf_ista.state_bytes(opt)
    assert got == expected
    assert got / p.numel() <= limit < 8
