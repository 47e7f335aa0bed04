"""DASH's optimizer step side by side with the baselines it replaces, on the same model.

1. **Step time** — the weights of one ``tiny_llama`` (``--size``) with fixed gradients; every
   optimizer takes ``--warmup`` untimed steps, then ``--steps`` timed ones (inverse roots every
   ``--precond-freq`` steps, so the timed window holds root steps at that frequency):

   (the optimizers take their steps in turn, round-robin, so a busy machine slows them alike):

   * ``adamw_torch`` (``torch.optim.AdamW``, the unit of the ratios),
   * ``dash`` with each inverse root (``ndb``, ``cn``, ``cheby``, ``evd``), blocks stacked,
   * ``dash block-loop evd``: the same algorithm one block at a time with eigendecompositions —
     the Distributed-Shampoo-style baseline the DASH paper measures against,
   * on CUDA, ``dash ndb`` again with the torch twins instead of the Triton kernels,
   * Shampoo-family optimizers from PyPI where installed: pytorch-optimizer's ``ScalableShampoo``
     (Google's blocked Shampoo with grafting) and heavyball's ``SOAP``.

   Reported: state bytes per parameter, the mean step time (inverse roots amortised), the median
   of the steps that compute roots and of those that do not, the mean's ratio to AdamW and the
   block-loop baseline's mean over each row's (the speed-up of stacking). On a CPU heavyball runs
   without ``torch.compile`` (its autotuning takes minutes per shape there).
2. **Convergence** — ``benchmarks/convergence.py``'s from-scratch regime (the quickstart task at
   equal steps, each optimizer at its best lr of a small sweep) for AdamW and each root method.
   Its JSON is written next to this one (``--parts step`` skips it: it takes ~30 min on 2 cores).

    PYTHONPATH=. python benchmarks/dash.py                      # CPU: tiny Llama, blocks of 128
    PYTHONPATH=. python benchmarks/dash.py --size small --block-size 1024 --steps 50   # GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import optimizers as common  # noqa: E402  (environment, device label, sync, table formatter)

import torch  # noqa: E402
import transformers  # noqa: E402

from hf_ista import state_bytes  # noqa: E402
from hf_ista.data import MODEL_SIZES, tiny_llama  # noqa: E402
from hf_ista.kernels import get_backend, set_backend  # noqa: E402
from hf_ista.optim import DASH  # noqa: E402

ROOTS = ("ndb", "cn", "cheby", "evd")
# Chebyshev is accurate from a damping of about 1e-3 at degree 60 (tests/test_dash.py).
ROOT_ARGS = {"cheby": dict(eps=1e-3, cheby_degree=60)}
TORCH_KERNELS = "(torch kernels)"  # a row run with HF_ISTA_KERNELS=torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="step,convergence", help="comma list of: step, convergence")
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES))
    p.add_argument("--block-size", type=int, default=128, help="DASH's and ScalableShampoo's block side")
    p.add_argument("--precond-freq", type=int, default=10, help="steps between inverse roots (all Shampoos)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps (the window holds steps/precond_freq root steps)")
    p.add_argument("--batch", type=int, default=8, help="sequences of 128 bytes for the one fixed gradient")
    p.add_argument("--scratch-steps", type=int, default=150, help="convergence part: steps per run")
    common.add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/dash-<device>.json)")
    return p.parse_args(argv)


def optimizer_rows(args) -> list[tuple[str, callable]]:
    """``(label, make(params) -> optimizer)`` for every row that can run here."""
    dash = dict(lr=1e-3, block_size=args.block_size, precond_freq=args.precond_freq)
    rows = [("adamw_torch", lambda ps: torch.optim.AdamW(ps, lr=1e-3))]
    for root in ROOTS:
        rows.append((f"dash {root}", lambda ps, r=root: DASH(ps, inv_root=r, **dash, **ROOT_ARGS.get(r, {}))))
    rows.append(("dash block-loop evd", lambda ps: DASH(ps, inv_root="evd", batched=False, **dash)))
    if torch.cuda.is_available():  # the Triton kernels against cuBLAS / torch elementwise ops
        rows.append((f"dash ndb {TORCH_KERNELS}", lambda ps: DASH(ps, inv_root="ndb", **dash)))
    if common.package_version("pytorch_optimizer"):
        from pytorch_optimizer import ScalableShampoo

        rows.append(("pytorch_optimizer ScalableShampoo", lambda ps: ScalableShampoo(
            ps, lr=1e-3, block_size=args.block_size, start_preconditioning_step=1,
            preconditioning_compute_steps=args.precond_freq, graft_type=2)))  # 2: Adam grafting
    if common.package_version("heavyball"):
        import heavyball

        if not torch.cuda.is_available():  # its torch.compile autotuning takes minutes per shape on a CPU
            heavyball.utils.compile_mode = None
        rows.append(("heavyball SOAP", lambda ps: heavyball.SOAP(
            ps, lr=1e-3, precondition_frequency=args.precond_freq)))
    return rows


class _Row:
    """One optimizer of the step part: its own copy of the weights, its optimizer, its times."""

    def __init__(self, label: str, make, weights: list[torch.Tensor]):
        self.label, self.times, self.error = label, [], None  # times: filled by step_part
        self.backend = "torch" if label.endswith(TORCH_KERNELS) else None
        self.params = [torch.nn.Parameter(w.clone()) for w in weights]
        self.opt = self._guard(lambda: make(self.params))

    def _guard(self, fn):
        saved = get_backend()
        if self.backend:
            set_backend(self.backend)
        try:
            return fn()
        except Exception as err:  # a row that cannot run here keeps its error
            self.error = f"{type(err).__name__}: {err}"
        finally:
            set_backend(saved)

    def set_grads(self, grads: list[torch.Tensor]) -> None:
        if not self.error:
            for p, g in zip(self.params, grads):
                p.grad = g.clone()

    def step(self) -> None:
        if not self.error:
            self._guard(self.opt.step)


def step_part(args, device) -> list[dict]:
    torch.manual_seed(args.seed)
    model = tiny_llama(args.size, seed=args.seed).to(device)
    x = torch.randint(0, 256, (args.batch, 128), device=device)
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    weights = [p.detach() for p in model.parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    runs = [_Row(label, make, weights) for label, make in optimizer_rows(args)]
    all_times = common.round_robin_times([(lambda i, r=run: r.set_grads(grads), run.step) for run in runs],
                                         args.warmup + args.steps, args.warmup)
    for run, times in zip(runs, all_times):
        run.times = times
    rows = []
    for run in runs:
        row = {"optim": run.label, "status": "error" if run.error else "ok"}
        if run.error:
            row["error"] = run.error
        else:
            # DASH computes the inverse roots at steps 1, 1 + f, 1 + 2f ... (start_step=1).
            steps = list(enumerate(run.times, start=args.warmup))
            roots = [s for i, s in steps if i % args.precond_freq == 0]
            others = [s for i, s in steps if i % args.precond_freq]
            row.update(step_mean_s=statistics.fmean(run.times), state_bytes_per_param=state_bytes(run.opt) / n_params,
                       finite=all(bool(torch.isfinite(p).all()) for p in run.params))
            if run.label.startswith("dash") and roots and others:  # the peers keep schedules of their own
                row.update(root_step_s=statistics.median(roots), other_step_s=statistics.median(others))
        rows.append(row)
    base = next(r for r in rows if r["optim"] == "adamw_torch")["step_mean_s"]
    loop = next((r for r in rows if r["optim"] == "dash block-loop evd" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok":
            r["step_ratio_adamw"] = r["step_mean_s"] / base
            r["block_loop_speedup"] = loop["step_mean_s"] / r["step_mean_s"] if loop else None
    return rows


def step_table(rows: list[dict]) -> str:
    head = ["optimizer", "state B/param", "step ms (mean)", "root step ms", "other step ms", "step / adamw",
            "block-loop evd / this"]
    ms = lambda r, k: common.fmt(r[k] * 1e3 if k in r else None, ".1f")  # noqa: E731
    lines = [[r["optim"], common.fmt(r.get("state_bytes_per_param"), ".2f"), ms(r, "step_mean_s"),
              ms(r, "root_step_s"), ms(r, "other_step_s"),
              common.fmt(r.get("step_ratio_adamw"), ".1f") + "x" if r.get("step_ratio_adamw") else r.get("error", "-"),
              common.fmt(r.get("block_loop_speedup"), ".2f") + "x" if r.get("block_loop_speedup") else "-"]
             for r in rows]
    return common.format_table(head, lines)


def convergence_part(args, out: Path) -> dict:
    import convergence

    labels = ["adamw_torch"] + [f"dash/{r}" for r in ROOTS]
    argv = ["--regimes", "scratch", "--optimizers", ",".join(labels), "--scratch-steps", str(args.scratch_steps),
            "--scratch-adamw-lrs", "3e-4,1e-3,3e-3", "--out", str(out)]
    for root in ROOTS:
        extra = "".join(f",{k}={v}" for k, v in ROOT_ARGS.get(root, {}).items())
        argv += ["--optim-args", f"dash/{root}=inv_root={root}{extra}", "--scratch-lrs", f"dash/{root}=1e-3,3e-3,1e-2"]
    convergence.main(argv)
    return json.loads(out.read_text())["scratch"]


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    common.set_threads(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = common.device_label(args.device_name)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    out = Path(args.out or Path(__file__).parent / "results" / f"dash-{common.slug(label)}.json")
    result = {"benchmark": "dash", "environment": common.environment(label),
              "args": vars(args)}
    print(f"{label} | torch {torch.__version__} | threads {torch.get_num_threads()} | tiny_llama({args.size!r}) "
          f"| blocks of {args.block_size} | roots every {args.precond_freq} steps")
    if "step" in parts:
        result["step"] = step_part(args, device)
        print("\n" + step_table(result["step"]))
    if "convergence" in parts:
        result["convergence"] = convergence_part(args, out.with_name(out.stem + "-convergence.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
