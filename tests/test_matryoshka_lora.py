"""MatryoshkaLoRA as a PEFT adapter: the math of P against sums written here, plain LoRA against
PEFT's own LoRA layer, save / load / merge round trips, several adapters, DyLoRA's draw."""
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import hf_ista
from hf_ista import MatryoshkaLoraConfig
from hf_ista.data import tiny_llama
from hf_ista.peft.matryoshka_lora import MatryoshkaLoraLinear, get_rank, matryoshka_diagonal, rank_scale, set_rank

pytestmark = pytest.mark.usefixtures("single_thread")

TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _s(t, scaling):
    return {"none": 1.0, "rank": 1.0 / t, "sqrt": t ** -0.5}[scaling]


def _peft(seed=0, **config):
    """A nano Llama with a MatryoshkaLoRA adapter whose B is random (so the adapter is not a no-op)."""
    config = {"r": 8, "target_modules": TARGETS, "init_lora_weights": False, **config}
    torch.manual_seed(seed + 100)
    return get_peft_model(tiny_llama("nano", seed=seed), MatryoshkaLoraConfig(**config))


def _one_layer(model) -> MatryoshkaLoraLinear:
    return next(m for m in model.modules() if isinstance(m, MatryoshkaLoraLinear))


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("ranks", [[1, 2, 4, 8], [3, 8], [2, 5, 6]])
def test_diagonal_P_equals_sum_of_scaled_prefixes(scaling, ranks):
    r = 8
    g = torch.Generator().manual_seed(len(ranks))
    x, A, B = torch.randn(5, 11, generator=g), torch.randn(11, r, generator=g), torch.randn(r, 7, generator=g)
    P = matryoshka_diagonal(r, ranks, scaling)
    expected = sum(_s(t, scaling) * x @ A[:, :t] @ B[:t, :] for t in ranks)
    torch.testing.assert_close(x @ A @ torch.diag(P) @ B, expected, rtol=1e-5, atol=1e-5)
    # and by hand for one case: S = {1, 2, 4, 8}, 'none' -> P = [4, 3, 2, 2, 1, 1, 1, 1]
    if ranks == [1, 2, 4, 8] and scaling == "none":
        assert P.tolist() == [4, 3, 2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_training_forward_is_the_mean_of_the_servable_rank_models(scaling):
    alpha, r, ranks = 4.0, 8, [1, 2, 4, 8]
    model = _peft(rank_scaling=scaling, lora_alpha=alpha, train_ranks=ranks)
    layer = _one_layer(model)
    x = torch.randn(3, layer.in_features)
    A, B = layer.matryoshka_lora_A["default"].detach(), layer.matryoshka_lora_B["default"].detach()
    w0 = layer.get_base_layer()(x)
    m = lambda t: (alpha / r if scaling == "none" else alpha) * _s(t, scaling)  # noqa: E731
    served = {t: w0 + m(t) * x @ A[:t].T @ B[:, :t].T for t in ranks}
    trained = sum(served.values()) / len(ranks)
    torch.testing.assert_close(layer(x), trained, rtol=1e-5, atol=1e-5)
    for t in (1, 3, 8):
        # 'rescale': the rank-t member alone, m(t) x A[:t] B[:t]
        layer.set_rank(t, "default", rule="rescale")
        torch.testing.assert_close(layer(x), w0 + m(t) * x @ A[:t].T @ B[:, :t].T, rtol=1e-5, atol=1e-5)
        # 'truncate' (default): every member of the mean cut to rank t
        layer.set_rank(t, "default", rule="truncate")
        cut = sum(m(u) * x @ A[:min(u, t)].T @ B[:, :min(u, t)].T for u in ranks) / len(ranks)
        torch.testing.assert_close(layer(x), w0 + cut, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), trained, rtol=1e-5, atol=1e-5)  # rank r, truncated: the trained forward


@pytest.mark.parametrize("scaling, lora_kwargs", [("rank", {}), ("none", {}), ("sqrt", {"use_rslora": True})])
def test_lora_mode_equals_peft_lora(scaling, lora_kwargs):
    """mode='lora' at every rank_scaling is PEFT's LoRA (rsLoRA for 'sqrt') with the same A, B."""
    lora = get_peft_model(tiny_llama("nano", seed=0), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                 init_lora_weights=False, **lora_kwargs))
    ours = _peft(mode="lora", rank_scaling=scaling, lora_alpha=16)
    copied, refs = 0, dict(lora.named_modules())
    for name, mod in ours.named_modules():
        if isinstance(mod, MatryoshkaLoraLinear):
            ref = refs[name]
            mod.matryoshka_lora_A["default"].data.copy_(ref.lora_A["default"].weight)
            mod.matryoshka_lora_B["default"].data.copy_(ref.lora_B["default"].weight)
            copied += 1
    assert copied == 4  # q and v in both layers
    with torch.no_grad():
        want = lora(IDS).logits
        got = ours(IDS).logits
    assert (want - tiny_llama("nano", seed=0)(IDS).logits).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_save_load_bit_identical_then_merge_at_a_rank(tmp_path):
    model = _peft(rank_scaling="sqrt", lora_alpha=8)
    model.eval()
    with torch.no_grad():
        before = model(IDS).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MATRYOSHKA_LORA" and saved["train_ranks"] == [1, 2, 4, 8]
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert len(keys) == 8 and all("matryoshka_lora_A" in k or "matryoshka_lora_B" in k for k in keys)  # no P

    loaded = PeftModel.from_pretrained(tiny_llama("nano", seed=0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, before)
        loaded.set_rank(2)
        at_2 = loaded(IDS).logits
        assert loaded.get_rank() == 2 and (at_2 - before).abs().max() > 1e-4
        merged = loaded.merge_and_unload()
        assert not any(isinstance(m, MatryoshkaLoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(IDS).logits, at_2, rtol=1e-5, atol=1e-5)


def test_transformers_load_adapter_and_two_adapters(tmp_path):
    first, second = _peft(seed=0), _peft(seed=0, r=4, rank_scaling="rank")
    # same base weights (seed 0), different adapters
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    with torch.no_grad():
        want_a, want_b = first(IDS).logits, second(IDS).logits
        second.set_rank(1)
        want_b1 = second(IDS).logits

        # transformers' own loader (its set_adapter / add_adapter need peft >= 0.22, not out yet)
        base = tiny_llama("nano", seed=0)
        base.load_adapter(str(tmp_path / "b"))
        assert torch.equal(base(IDS).logits, want_b)
        set_rank(base, 1)
        assert torch.equal(base(IDS).logits, want_b1)
        assert get_rank(base) == 1

        # two adapters on one PeftModel, each with its own rank
        peft_model = PeftModel.from_pretrained(tiny_llama("nano", seed=0), tmp_path / "a", adapter_name="a")
        peft_model.load_adapter(tmp_path / "b", adapter_name="b")
        peft_model.set_adapter("b")
        assert torch.equal(peft_model(IDS).logits, want_b)
        peft_model.set_rank(1)
        assert torch.equal(peft_model(IDS).logits, want_b1)
        peft_model.set_adapter("a")
        assert torch.equal(peft_model(IDS).logits, want_a)
        assert peft_model.get_rank("a") is None and peft_model.get_rank("b") == 1


def test_conv1d_targets_merge_at_rank():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    model = get_peft_model(gpt2, MatryoshkaLoraConfig(r=8, target_modules=["c_attn"], init_lora_weights=False))
    model.eval()
    assert sum(isinstance(m, MatryoshkaLoraLinear) for m in model.modules()) == 2
    with torch.no_grad():
        model.set_rank(4)
        want = model(IDS).logits
        torch.testing.assert_close(model.merge_and_unload()(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_dylora_draws_one_rank_per_forward_for_all_layers():
    model = _peft(mode="dylora", train_ranks=[1, 2, 4, 8])
    model.train()
    layers = [m for m in model.modules() if isinstance(m, MatryoshkaLoraLinear)]
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        out = model(IDS).logits
        drawn = {layer.sampled_rank["default"] for layer in layers}
        assert len(drawn) == 1  # the same rank in every layer
        rank = drawn.pop()
        seen.add(rank)
        model.eval()
        model.set_rank(rank, rule="rescale")  # the drawn member alone
        with torch.no_grad():
            torch.testing.assert_close(out.detach(), model(IDS).logits, rtol=1e-5, atol=1e-5)
        model.set_rank(None)
        model.train()
    assert seen <= {1, 2, 4, 8} and len(seen) >= 3
    # outside training a dylora adapter runs the mean of its draws: the matryoshka forward
    model.eval()
    matryoshka = _peft(mode="matryoshka", train_ranks=[1, 2, 4, 8])
    matryoshka.load_state_dict(model.state_dict())
    with torch.no_grad():
        mean = model(IDS).logits
        torch.testing.assert_close(mean, matryoshka(IDS).logits, rtol=0, atol=0)
        model.set_rank(8, rule="truncate")
        assert torch.equal(model(IDS).logits, mean)


def test_only_the_adapter_trains_and_bias_lora_only():
    model = _peft(bias="lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("matryoshka_lora_" in n for n in trainable) and len(trainable) == 8  # Llama q/v have no bias


def test_modules_to_save_train_and_round_trip(tmp_path):
    model = _peft(modules_to_save=["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save.default" in n for n in trainable)
    with torch.no_grad():
        head = next(p for n, p in model.named_parameters() if "lm_head.modules_to_save.default" in n)
        head.add_(0.5)  # a trained head differs from the base's
        want = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama("nano", seed=0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, want)


def test_bad_arguments_are_value_errors():
    for kwargs, match in [({"r": 0}, "r=0"), ({"mode": "x"}, "mode='x'"), ({"rank_scaling": "log"}, "rank_scaling"),
                          ({"train_ranks": [4, 2]}, "train_ranks"), ({"train_ranks": [16]}, "train_ranks"),
                          ({"bias": "some"}, "bias"), ({"lora_dropout": 1.5}, "lora_dropout"),
                          ({"serve_rule": "cut"}, "serve_rule")]:
        with pytest.raises(ValueError, match=match):
            MatryoshkaLoraConfig(**{"r": 8, **kwargs})
    model = _peft()
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="rank="):
            model.set_rank(bad)
    with pytest.raises(ValueError, match="rule='cut'"):
        model.set_rank(2, rule="cut")
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(tiny_llama("nano"), MatryoshkaLoraConfig(r=4, target_modules=["embed_tokens"]))


def test_defaults_and_version_guard():
    assert MatryoshkaLoraConfig(r=64).train_ranks == [1, 2, 4, 8, 16, 32, 64]
    assert MatryoshkaLoraConfig(r=12).train_ranks == [1, 2, 4, 8, 12]
    assert rank_scale(16, "sqrt") == 0.25 and rank_scale(16, "rank") == 1 / 16 and rank_scale(16, "none") == 1
    from hf_ista.integrations.peft import check_version

    with pytest.raises(ImportError, match=r"peft >= 0.21, < 0.22; found 0.17.0"):
        check_version("0.17.0")
    assert math.isclose(float(matryoshka_diagonal(4, [4], "sqrt")[0]), 0.5)
    assert hf_ista.integrations.peft.register()  # idempotent
