"""What LDAdam and DCT-AdamW refuse or survive: autocast around step(), a checkpoint whose states
would land on parameters of another shape, float64 parameters."""
import copy

import pytest
import torch

from hf_ista.optim import DCTAdamW, LDAdam

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIMIZERS = {"ldadam": (LDAdam, {}), "dct_adamw": (DCTAdamW, {"error_feedback": "8bit"})}


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((16, 64), (8, 64), (64,))]


def _step(opt, params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_under_autocast_is_the_fp32_step(name):
    cls, kw = OPTIMIZERS[name]
    plain, cast = _params(), _params()
    opts = [cls([{"params": ps[:2], "rank": 4}, {"params": ps[2:]}], lr=1e-2, **kw) for ps in (plain, cast)]
    for seed in range(3):
        _step(opts[0], plain, seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the optimizer's matmuls must stay fp32
            _step(opts[1], cast, seed)
    for a, b in zip(plain, cast):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoint_on_reordered_parameters_is_refused(name):
    cls, kw = OPTIMIZERS[name]
    params = _params()
    opt = cls([{"params": params[:2], "rank": 4}, {"params": params[2:]}], **kw)
    _step(opt, params, 0)
    saved = opt.state_dict()
    swapped = cls([{"params": [params[1], params[0]], "rank": 4}, {"params": params[2:]}], **kw)
    with pytest.raises(ValueError, match=r"does not fit .* parameter of shape \(8, 64\).*optim_target_modules"):
        swapped.load_state_dict(saved)
    # a checkpoint that fits loads, and the next step is the uninterrupted one's
    fresh = cls([{"params": params[:2], "rank": 4}, {"params": params[2:]}], **kw)
    fresh.load_state_dict(copy.deepcopy(saved))  # as from disk: torch shares in-memory state tensors
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = cls([{"params": copies[:2], "rank": 4}, {"params": copies[2:]}], **kw)
    twin.load_state_dict(copy.deepcopy(saved))
    _step(fresh, params, 1)
    _step(twin, copies, 1)
    assert all(torch.equal(a, b) for a, b in zip(params, copies))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float64_parameters_are_refused(name):
    cls, kw = OPTIMIZERS[name]
    with pytest.raises(ValueError, match="params=.*float64.*float32, bfloat16 or float16"):
        cls([{"params": [torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.float64))], "rank": 2}], **kw)


@pytest.mark.parametrize("error_feedback", ["none", "fp32", "8bit", "4bit"])
@pytest.mark.parametrize("shape", [(8, 24), (24, 8)], ids=["wide", "tall"])
def test_step_leaves_the_gradient_as_given(error_feedback, shape):
    """The Trainer may read p.grad after step() (clipping logs, accumulation): it must be untouched."""
    gen = torch.Generator().manual_seed(1)
    for cls, kw in ((DCTAdamW, {"error_feedback": error_feedback}), (LDAdam, {})):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        opt = cls([{"params": [p], "rank": 3}], lr=1e-2, **kw)
        for _ in range(3):
            p.grad = torch.randn(shape, generator=gen)
            given = p.grad.clone()
            opt.step()
            assert torch.equal(p.grad, given)
