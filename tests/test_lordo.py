"""LoRDO on one process: the algorithm against references written here, its arguments, its
checkpoints, and the Trainer. Two processes: tests/test_lordo_distributed.py."""
import math
import warnings

import pytest
import torch

import hf_ista
from hf_ista.optim import LDAdam, LoRDO
from hf_ista.optim.lordo import top_subspace


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6)).to(dtype)
    data = torch.randn(64, 12, dtype=dtype), torch.randn(64, 6, dtype=dtype)
    return model, data


def _groups(model, rank=3):
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    return [{"params": weights, "rank": rank}, {"params": biases, "rank": None}]


def _train(opt, model, data, steps, start=0):
    x, y = data
    losses = []
    for i in range(start, start + steps):
        batch = slice((i * 16) % 64, (i * 16) % 64 + 16)
        loss = ((model(x[batch]) - y[batch]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _oriented(x):
    return x if x.shape[0] <= x.shape[1] else x.T


def _top(x, r):
    return torch.linalg.svd(x, full_matrices=False).U[:, :r]


class ReferenceLowRankAdam:
    """Low-rank Adam written out in float64: the gradient clipped to ``clip``, error feedback, Adam
    in the subspace of ``Q`` (the top-r subspace of the first clipped gradient, then of the
    pseudo-gradient every ``K`` steps, the moments carried over), AdamW for vectors."""

    def __init__(self, weights, biases, lr, rank, K, clip, betas=(0.9, 0.999), eps=1e-8, wd=0.0, error_feedback=True,
                 omega=1.0):
        self.weights, self.biases, self.error_feedback, self.omega = weights, biases, error_feedback, omega
        self.lr, self.r, self.K, self.clip, self.betas, self.eps, self.wd = lr, rank, K, clip, betas, eps, wd
        self.state = {}
        self.t = 0

    def step(self):
        b1, b2 = self.betas
        self.t += 1
        for p in self.weights:
            g = _oriented(p.grad).double()
            g = g * min(1.0, self.clip / g.norm().item())
            s = self.state.setdefault(p, {"Q": _top(g, self.r), "E": torch.zeros_like(g), "anchor": p.detach().clone(),
                                          "u": torch.zeros(self.r, g.shape[1], dtype=torch.float64),
                                          "v": torch.zeros(self.r, g.shape[1], dtype=torch.float64)})
            a = g + s["E"]
            low = s["Q"].T @ a
            if self.error_feedback:
                s["E"] = a - s["Q"] @ low
            s["u"] = b1 * s["u"] + (1 - b1) * low
            s["v"] = b2 * s["v"] + (1 - b2) * low * low
            d = (s["u"] / (1 - b1 ** self.t)) / ((s["v"] / (1 - b2 ** self.t)).sqrt() + self.eps)
            update = s["Q"] @ d
            if self.omega < 1:  # the full-rank term: G at the norm of d
                update = (1 - self.omega) * g * (d.norm() / g.norm()) + self.omega * update
            with torch.no_grad():
                _oriented(p).copy_((_oriented(p).double() * (1 - self.lr * self.wd) - self.lr * update).float())
        for p in self.biases:
            s = self.state.setdefault(p, {"m": torch.zeros_like(p, dtype=torch.float64),
                                          "v": torch.zeros_like(p, dtype=torch.float64)})
            g = p.grad.double()
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            d = (s["m"] / (1 - b1 ** self.t)) / ((s["v"] / (1 - b2 ** self.t)).sqrt() + self.eps)
            with torch.no_grad():
                p.copy_((p.double() * (1 - self.lr * self.wd) - self.lr * d).float())
        if self.t % self.K == 0:
            for p in self.weights:
                s = self.state[p]
                new = _top(_oriented(p.detach() - s["anchor"]).double(), self.r)
                C = new.T @ s["Q"]
                bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
                rotated = C @ s["u"]
                s["v"] = ((C * C) @ (s["v"] / bc2 - s["u"] ** 2 / bc1 ** 2) + rotated ** 2 / bc1 ** 2).abs() * bc2
                s["u"], s["Q"], s["anchor"] = rotated, new, p.detach().clone()


@pytest.mark.parametrize("wd, error_feedback, omega", [(0.0, "fp32", 1.0), (0.1, "fp32", 1.0), (0.1, "none", 1.0),
                                                       (0.1, "none", 0.6), (0.0, "fp32", 0.3)])
def test_omega_one_is_low_rank_adam(wd, error_feedback, omega):
    """omega=1 is low-rank Adam, written out in the test; omega < 1 adds the full-rank term."""
    model, data = _model()
    twin, _ = _model()
    opt = LoRDO(_groups(model), lr=0.02, omega=omega, sync_every=3, clip=0.5, weight_decay=wd,
                error_feedback=error_feedback)
    ref = ReferenceLowRankAdam([twin[0].weight, twin[2].weight], [twin[0].bias, twin[2].bias], lr=0.02, rank=3,
                               K=3, clip=0.5, wd=wd, error_feedback=error_feedback == "fp32", omega=omega)
    x, y = data
    for i in range(10):  # three synchronisations: the basis changes and the moments are carried over
        for m, o in ((model, opt), (twin, ref)):
            loss = ((m(x[i * 6:(i + 1) * 6]) - y[i * 6:(i + 1) * 6]) ** 2).mean()
            for p in m.parameters():
                p.grad = None
            loss.backward()
            o.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=2e-5)
    assert opt.syncs == 3 and opt.local_steps == 1 and opt.bytes_communicated == 0
    w = model[0].weight
    # the basis is the reference's up to the signs of its columns
    torch.testing.assert_close((opt.state[w]["basis"].T @ ref.state[twin[0].weight]["Q"].float()).abs(),
                               torch.eye(3), atol=1e-4, rtol=0)


def test_full_rank_term_normalisation():
    """One step from a fresh state, omega=0.3: the update is (1-ω) (|d|/|G|) G / μ + ω Q d."""
    model, (x, y) = _model()
    w = model[2].weight  # 6 x 20: oriented as is
    opt = LoRDO([{"params": [w], "rank": 2}], lr=0.1, omega=0.3, mu=2.0, clip=0.0, eps=1e-8)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    g, before = w.grad.double().clone(), w.detach().double().clone()
    opt.step()
    Q = opt.state[w]["basis"].double()
    torch.testing.assert_close(Q.abs(), _top(g, 2).abs(), atol=1e-5, rtol=0)
    low = Q.T @ g
    d = low / (low.abs() + 1e-8)  # Adam's first step: m̂ / (sqrt(v̂) + ε)
    full = g * (d.norm() / g.norm()) / 2.0
    expected = before - 0.1 * (0.7 * full + 0.3 * Q @ d)
    torch.testing.assert_close(w.detach().double(), expected, atol=1e-6, rtol=1e-6)
    # the two terms have one size (times 1 / mu)
    torch.testing.assert_close(full.norm() * 2.0, (Q @ d).norm())


def test_clipping_scales_the_gradient_to_clip():
    """The error feedback keeps what the subspace missed of the *clipped* gradient: clipping to c
    scales it by c / |g| (the basis does not depend on the scale)."""
    errors = []
    for clip in (0.0, 1e-3):
        model, (x, y) = _model()
        w = model[0].weight
        opt = LoRDO([{"params": [w], "rank": 3}], lr=0.05, clip=clip, error_feedback="fp32")
        ((model(x) - y) ** 2).mean().backward()
        grad_before, norm = w.grad.clone(), w.grad.norm()
        opt.step()
        assert torch.equal(w.grad, grad_before)  # the Trainer's gradient is left as it was
        errors.append(opt.state[w]["error"])
    assert norm > 1e-2
    torch.testing.assert_close(errors[1], errors[0] * (1e-3 / norm), atol=1e-9, rtol=1e-4)
    assert errors[1].norm() <= 1e-3


def _two_steps(**kwargs):
    """Two steps of LoRDO on the test model; the model, the optimizer and where the weight started."""
    model, data = _model()
    opt = LoRDO(_groups(model), lr=0.02, **kwargs)
    start = model[0].weight.detach().clone()
    _train(opt, model, data, 2)
    return model, opt, start


def test_one_process_sync_changes_only_the_basis():
    model, opt, start = _two_steps(sync_every=2)
    local, no_sync, _ = _two_steps(sync_every=100)
    assert opt.syncs == 1 and opt.local_steps == 0 and no_sync.syncs == 0
    for p, q in zip(model.parameters(), local.parameters()):
        assert torch.equal(p, q)  # alone, the sync keeps θ exactly
    w, v = model[0].weight, local[0].weight
    assert torch.equal(opt.state[w]["anchor"], w.detach())
    assert not torch.equal(opt.state[w]["basis"], no_sync.state[v]["basis"])
    # the new basis: the top subspace of Δ = θ_2 - θ_0
    torch.testing.assert_close((opt.state[w]["basis"].T @ _top(_oriented(w.detach() - start), 3)).abs(),
                               torch.eye(3), atol=1e-4, rtol=0)
    assert opt.bytes_communicated == 0


def test_outer_step_with_momentum_and_lr():
    model, opt, start = _two_steps(sync_every=2, outer_lr=0.7, outer_momentum=0.9)
    local, _, _ = _two_steps(sync_every=100)
    w = model[0].weight
    delta = local[0].weight.detach() - start  # the pseudo-gradient of the two local steps
    # first sync: buf = 0.9 * 0 + Δ, θ = θ_0 + 0.7 (Δ + 0.9 buf)
    torch.testing.assert_close(opt.state[w]["outer_buf"], delta, atol=1e-7, rtol=0)
    torch.testing.assert_close(w.detach(), start + 0.7 * 1.9 * delta, atol=1e-7, rtol=0)
    assert torch.equal(opt.state[w]["anchor"], w.detach())


def test_top_subspace_is_the_svd_subspace():
    torch.manual_seed(0)
    x = torch.randn(10, 40)
    q = top_subspace(x, 4)
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close((q.T @ _top(x, 4)).abs(), torch.eye(4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("error_feedback", ["fp32", "8bit", "4bit", "none"])
def test_checkpoint_mid_interval_round_trips(error_feedback):
    model, data = _model()
    opt = LoRDO(_groups(model), lr=0.02, sync_every=4, error_feedback=error_feedback, outer_momentum=0.5)
    _train(opt, model, data, 6)  # one sync behind, two local steps into the next interval
    saved = {k: v for k, v in opt.state_dict().items()}
    saved = {"state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                       for i, s in saved["state"].items()},
             "param_groups": saved["param_groups"], "lordo": dict(saved["lordo"])}
    params = [p.detach().clone() for p in model.parameters()]
    after = _train(opt, model, data, 6, start=6)

    twin, _ = _model()
    with torch.no_grad():
        for p, q in zip(twin.parameters(), params):
            p.copy_(q)
    resumed = LoRDO(_groups(twin), lr=0.02, sync_every=4, error_feedback=error_feedback, outer_momentum=0.5)
    resumed.load_state_dict(saved)
    assert resumed.local_steps == 2 and resumed.syncs == 1
    assert _train(resumed, twin, data, 6, start=6) == after
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other) and value.dtype == other.dtype if torch.is_tensor(value) else value == other


def test_checkpoint_of_another_optimizer_is_refused():
    model, data = _model()
    ldadam = LDAdam(_groups(model), lr=0.01)
    _train(ldadam, model, data, 2)
    opt = LoRDO(_groups(model), lr=0.01)
    with pytest.raises(ValueError, match="not written by LoRDO"):
        opt.load_state_dict(ldadam.state_dict())
    state = ldadam.state_dict()
    state["lordo"] = {"local_steps": 0, "syncs": 0, "bytes_communicated": 0, "sync_every": 16}
    with pytest.raises(ValueError, match="not written by LoRDO"):
        opt.load_state_dict(state)
    lordo = LoRDO(_groups(model), lr=0.01, sync_every=8)
    _train(lordo, model, data, 5)
    with pytest.raises(ValueError, match="sync_every=4"):
        LoRDO(_groups(model), lr=0.01, sync_every=4).load_state_dict(lordo.state_dict())
    with pytest.raises(ValueError, match="not written by LDAdam"):
        LDAdam(_groups(model), lr=0.01).load_state_dict(lordo.state_dict())


@pytest.mark.parametrize("kwargs, name", [
    ({"omega": 1.5}, "omega"), ({"omega": -0.1}, "omega"), ({"clip": -1.0}, "clip"), ({"mu": 0.0}, "mu"),
    ({"sync_every": 0}, "sync_every"), ({"sync_every": 2.5}, "sync_every"), ({"outer_lr": 0.0}, "outer_lr"),
    ({"outer_momentum": 1.0}, "outer_momentum"), ({"error_feedback": "2bit"}, "error_feedback"),
    ({"lr": -1.0}, "lr"),
])
def test_bad_arguments_are_named(kwargs, name):
    model, _ = _model()
    with pytest.raises(ValueError, match=f"^{name}="):
        LoRDO(_groups(model), **{"lr": 1e-3, **kwargs})


def test_bad_group_rank_is_named():
    model, _ = _model()
    with pytest.raises(ValueError, match="^rank=0"):
        LoRDO([{"params": [model[0].weight], "rank": 0}], lr=1e-3)


def test_float64_params_are_refused():
    model, _ = _model(dtype=torch.float64)
    with pytest.raises(ValueError, match="params=.*float64"):
        LoRDO(_groups(model), lr=1e-3)


def test_nan_gradient_skips_the_parameter_and_keeps_its_state():
    model, data = _model()
    opt = LoRDO(_groups(model), lr=0.02, sync_every=3)
    _train(opt, model, data, 2)
    w = model[0].weight
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[w].items()}
    weight = w.detach().clone()
    x, y = data
    loss = ((model(x[:16]) - y[:16]) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    w.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        opt.step()  # the third step: a sync, which still averages (w keeps θ: Δ from its last steps)
    assert opt.syncs == 1
    for key, value in before.items():
        if key not in ("basis", "anchor", "exp_avg", "exp_avg_sq"):  # a sync re-bases and carries moments
            assert torch.equal(opt.state[w][key], value) if torch.is_tensor(value) else opt.state[w][key] == value
    assert opt.state[w]["step"] == 2
    assert torch.equal(w.detach(), weight)  # one process: the sync keeps θ
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_train(dtype):
    model, data = _model(dtype=dtype)
    opt = LoRDO(_groups(model), lr=0.02, sync_every=3)
    start = [p.detach().clone() for p in model.parameters()]
    losses = _train(opt, model, data, 12)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.dtype == dtype for p in model.parameters())
    assert opt.state[model[0].weight]["anchor"].dtype == dtype
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_state_bytes_count_the_anchor():
    model, data = _model()
    opt = LoRDO(_groups(model, rank=3), lr=0.01)  # error_feedback="none" by default
    _train(opt, model, data, 1)
    # anchors (every parameter, fp32) + basis n x r + moments 2 r x N + AdamW moments of the biases
    n_params = sum(p.numel() for p in model.parameters())
    expected = 4 * (n_params + (12 * 3 + 2 * 3 * 20) + (6 * 3 + 2 * 3 * 20) + 2 * (20 + 6))
    assert hf_ista.state_bytes(opt) == expected


def _trainer(tmp_path, optim, optim_args="", steps=4, **kwargs):
    from transformers import Trainer
    from trainer_helpers import training_args

    from hf_ista.data import load_corpus, tiny_llama

    data = load_corpus("json", 64, 40_000, seed=0)
    args = training_args(tmp_path, optim=optim, optim_args=optim_args, learning_rate=1e-2, max_steps=steps,
                         logging_steps=1, save_strategy="no", **kwargs)
    return Trainer(model=tiny_llama("nano", seed=0, max_position_embeddings=64), args=args,
                   train_dataset=data["train"])


def test_every_trainer_gets_the_callback_and_lordo_alone_sends_nothing(tmp_path):
    from transformers import trainer

    from hf_ista.callbacks import LoRDOCallback

    assert LoRDOCallback in trainer.DEFAULT_CALLBACKS
    t = _trainer(tmp_path / "lordo", "lordo", "rank=4,sync_every=2")
    assert any(isinstance(cb, LoRDOCallback) for cb in t.callback_handler.callbacks)
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 4 and logs[-1]["loss"] < logs[0]["loss"]
    assert all(h["comm_bytes"] == 0 and h["ddp_comm_bytes"] == 0 for h in logs)
    assert [h["syncs"] for h in logs] == [0, 1, 1, 2]
    assert t.optimizer.optimizer.bytes_communicated == 0
    # for any other optimizer the callback stays out of the way
    other = _trainer(tmp_path / "adamw", "adamw_torch")
    other.train()
    assert not any("comm_bytes" in h for h in other.state.log_history)


def test_resume_on_several_processes_needs_each_ranks_state(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hf_ista.callbacks import LoRDOCallback

    model, _ = _model()
    opt = LoRDO(_groups(model), lr=1e-2)
    monkeypatch.setattr(LoRDO, "world_size", property(lambda self: 2))
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    (tmp_path / "checkpoint-6").mkdir()
    with pytest.raises(FileNotFoundError, match="lordo_rank0.pt"):
        LoRDOCallback()._load_rank_state(args, SimpleNamespace(global_step=6), model, opt)


def test_buckets_keep_one_dtype_and_close_at_the_size(monkeypatch):
    from hf_ista.optim import lordo

    monkeypatch.setattr(lordo, "BUCKET_BYTES", 64)
    ts = [torch.zeros(8), torch.zeros(8), torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(40)]
    sizes = [[t.numel() for t in b] for b in lordo._buckets(ts)]
    assert sizes == [[8, 8], [4], [4], [40]]


def test_fsdp_or_deepspeed_is_refused_with_a_clear_error():
    from types import SimpleNamespace

    from hf_ista.callbacks import LoRDOCallback

    model, _ = _model()
    opt = LoRDO(_groups(model), lr=1e-2)
    for args in (_args(fsdp=["full_shard"]), _args(deepspeed="ds.json")):
        with pytest.raises(ValueError, match="runs on DDP"):
            LoRDOCallback().on_train_begin(args, SimpleNamespace(global_step=0), None, model=model, optimizer=opt)


def _args(**kwargs):
    from types import SimpleNamespace

    return SimpleNamespace(**{"fsdp": None, "deepspeed": None, "fp16": False, "eval_strategy": "no", "eval_steps": None,
                              "save_strategy": "no", "save_steps": 500, "output_dir": "out",
                              "resume_from_checkpoint": None, **kwargs})


def test_fp16_is_refused_on_several_processes(monkeypatch):
    from types import SimpleNamespace

    from hf_ista.callbacks import LoRDOCallback

    model, _ = _model()
    opt = LoRDO(_groups(model), lr=1e-2)
    monkeypatch.setattr(LoRDO, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="fp16"):
        LoRDOCallback().on_train_begin(_args(fp16=True), SimpleNamespace(global_step=0), None, model=model,
                                       optimizer=opt)


def test_a_rank_file_of_another_run_is_refused(tmp_path, monkeypatch):
    """Resuming checks each rank's file against the optimizer.pt the Trainer loaded (rank 0's): a stale
    lordo_rank<r>.pt with the same step and world size is not silently used."""
    from types import SimpleNamespace

    from hf_ista.callbacks import LoRDOCallback
    from hf_ista.callbacks.lordo import RANK_STATE

    model, data = _model()
    opt = LoRDO(_groups(model), lr=1e-2, sync_every=4)
    _train(opt, model, data, 6)
    other_model, _ = _model(seed=1)
    other = LoRDO(_groups(other_model), lr=1e-2, sync_every=4)
    _train(other, other_model, data, 6)
    monkeypatch.setattr(LoRDO, "world_size", property(lambda self: 2))
    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    args, state = _args(output_dir=str(tmp_path)), SimpleNamespace(global_step=6)
    for source, ok in ((other, False), (opt, True)):
        torch.save({"world_size": 2, "global_step": 6, "params": {}, "optimizer": source.state_dict()},
                   folder / RANK_STATE.format(rank=0))
        if ok:
            LoRDOCallback()._load_rank_state(args, state, model, opt)
        else:
            with pytest.raises(ValueError, match="not from the checkpoint"):
                LoRDOCallback()._load_rank_state(args, state, model, opt)


def test_a_refused_checkpoint_leaves_the_optimizer_as_it_was():
    model, data = _model()
    opt = LoRDO(_groups(model), lr=1e-2, sync_every=8)
    _train(opt, model, data, 5)
    fresh = LoRDO(_groups(model), lr=1e-2, sync_every=4)
    with pytest.raises(ValueError, match="sync_every=4"):
        fresh.load_state_dict(opt.state_dict())
    assert not fresh.state and fresh.local_steps == 0


def test_the_optimizer_is_found_under_every_wrapper():
    from types import SimpleNamespace

    from hf_ista.callbacks.lordo import _lordo

    model, _ = _model()
    opt = LoRDO(_groups(model), lr=1e-2)
    assert _lordo(SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))) is opt
    assert _lordo(SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=1))) is None
