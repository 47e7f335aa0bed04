"""EFCP side by side: sparse (error-feedback top-k) vs dense M-FAC and GGT, and AdamW.

1. **Memory and step time** — the weights of one ``tiny_llama`` (``--size``) with one fixed
   gradient; every optimizer takes ``--warmup`` untimed steps (which fill the window), then
   ``--steps`` timed ones, the optimizers stepping in turn (round robin) so that a busy machine
   slows every row alike. Reported: the window's bytes (indices + values), all state bytes per
   parameter, the mean step time and its ratio to ``torch.optim.AdamW`` measured in the same run.
2. **Convergence** — the quickstart task (a ``tiny_llama`` from scratch on Python's own sources,
   byte level) at equal steps through the Trainer, each optimizer at its best lr of a small sweep
   (``benchmarks/convergence.py``'s from-scratch regime). The gap of sparse M-FAC to dense M-FAC
   is the issue's acceptance figure (within 5 %).

    PYTHONPATH=. python benchmarks/efcp.py                       # CPU: tiny Llama, m = 32
    PYTHONPATH=. python benchmarks/efcp.py --m 1024 --size small   # GPU, the paper's window
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import convergence as conv  # noqa: E402  (from-scratch sweep: corpus, Trainer runs, tables)
import optimizers as common  # noqa: E402  (environment, device label, sync, table formatter)

import torch  # noqa: E402
import transformers  # noqa: E402

from hf_ista import state_bytes  # noqa: E402
from hf_ista.data import MODEL_SIZES, tiny_llama  # noqa: E402
from hf_ista.optim import SparseGGT, SparseMFAC  # noqa: E402


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="step,convergence", help="comma list of: step, convergence")
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES))
    p.add_argument("--m", type=int, default=32, help="window size of every M-FAC / GGT row")
    p.add_argument("--density", type=float, default=0.01, help="density of the sparse rows")
    p.add_argument("--damp", type=float, default=1e-6, help="M-FAC's damping")
    p.add_argument("--ggt-eps", type=float, default=1e-4, help="GGT's epsilon")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: m, the window fills)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--batch", type=int, default=8, help="sequences of 128 bytes for the one fixed gradient")
    p.add_argument("--scratch-steps", type=int, default=150, help="convergence: steps per run")
    p.add_argument("--scratch-batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--eval-blocks", type=int, default=256)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--lrs-adamw", type=float_list, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--lrs-mfac", type=float_list, default=[3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--lrs-ggt", type=float_list, default=[0.03, 0.1, 0.3, 1.0])
    p.add_argument("--rows", default="adamw,mfac,mfac-dense,ggt,ggt-dense", help="convergence rows to run")
    common.add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/efcp-<device>.json)")
    return p.parse_args(argv)


def optimizer_rows(args) -> list[tuple[str, callable]]:
    m, rho = args.m, args.density
    return [
        ("adamw_torch", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
        (f"sparse_mfac density={rho:g}", lambda ps: SparseMFAC(ps, lr=1e-3, m=m, density=rho, damp=args.damp)),
        ("sparse_mfac density=1 (dense M-FAC)", lambda ps: SparseMFAC(ps, lr=1e-3, m=m, density=1.0, damp=args.damp)),
        (f"sparse_ggt density={rho:g}", lambda ps: SparseGGT(ps, lr=1e-4, m=m, density=rho, eps=args.ggt_eps)),
        ("sparse_ggt density=1 (dense GGT)", lambda ps: SparseGGT(ps, lr=1e-4, m=m, density=1.0, eps=args.ggt_eps)),
    ]


def fixed_gradients(args, device) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model = tiny_llama(args.size, seed=args.seed).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, 256, (args.batch, 128), generator=gen).to(device)
    model(input_ids=batch, labels=batch).loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return model, grads


def part_step(args, device) -> list[dict]:
    """Every optimizer steps in turn (round robin), so a busy machine slows all rows alike."""
    model, grads = fixed_gradients(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    warmup = args.m if args.warmup is None else args.warmup
    runs = []
    for label, make in optimizer_rows(args):
        params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        runs.append((label, params, make(params)))

    def set_grads(params):
        def prepare(i):
            for p, g in zip(params, grads):
                # a different gradient each step (the window must not hold one vector m times)
                p.grad = g * (1.0 + 0.01 * (i % 7)) + 1e-4 * torch.randn_like(g)
        return prepare

    all_times = common.round_robin_times([(set_grads(params), opt.step) for _, params, opt in runs],
                                         warmup + args.steps, warmup)
    rows = []
    for (label, params, opt), times in zip(runs, all_times):
        window = opt.window_bytes() if hasattr(opt, "window_bytes") else 0
        rows.append({"optimizer": label, "params": n_params, "window_bytes": window,
                     "dense_window_bytes": 4 * args.m * n_params if hasattr(opt, "window_bytes") else 0,
                     "state_bytes": state_bytes(opt), "state_bytes_per_param": state_bytes(opt) / n_params,
                     "step_s_mean": statistics.fmean(times), "step_s_median": statistics.median(times)})
        print(f"  {label}: {rows[-1]['step_s_mean'] * 1e3:.1f} ms/step", flush=True)
    base = rows[0]["step_s_mean"]
    for r in rows:
        r["step_ratio"] = r["step_s_mean"] / base
    return rows


def paper_window(model, density: float, m: int = 1024) -> dict:
    """Window bytes at the paper's m (from the layout, nothing allocated): sparse vs dense rows."""
    from hf_ista.kernels.efcp import layout

    sparse = sum(m * layout(p.numel(), density).k * 8 for p in model.parameters())  # int32 + fp32
    dense = sum(m * p.numel() * 4 for p in model.parameters())
    return {"m": m, "density": density, "sparse_bytes": sparse, "dense_bytes": dense, "ratio": sparse / dense}


def step_table(rows: list[dict]) -> str:
    head = ["optimizer", "window MiB", "window / dense window", "state B/param", "step ms", "step / adamw"]
    lines = []
    for r in rows:
        dense = r["dense_window_bytes"]
        lines.append([r["optimizer"], f"{r['window_bytes'] / 2**20:.2f}" if dense else "-",
                      f"{r['window_bytes'] / dense:.4f}" if dense else "-", f"{r['state_bytes_per_param']:.2f}",
                      f"{r['step_s_mean'] * 1e3:.1f}", f"{r['step_ratio']:.2f}x"])
    return common.format_table(head, lines)


def part_convergence(args) -> dict:
    m, rho = args.m, args.density
    plan = {
        "adamw": (conv.ADAMW, conv.ADAMW, None, args.lrs_adamw),
        "mfac": (f"sparse_mfac {rho:g}", "sparse_mfac", f"m={m},density={rho},damp={args.damp}", args.lrs_mfac),
        "mfac-dense": ("sparse_mfac 1 (dense)", "sparse_mfac", f"m={m},density=1.0,damp={args.damp}", args.lrs_mfac),
        "ggt": (f"sparse_ggt {rho:g}", "sparse_ggt", f"m={m},density={rho},eps={args.ggt_eps}", args.lrs_ggt),
        "ggt-dense": ("sparse_ggt 1 (dense)", "sparse_ggt", f"m={m},density=1.0,eps={args.ggt_eps}", args.lrs_ggt),
    }
    ns = argparse.Namespace(size=args.size, scratch_source="stdlib", block_size=args.block_size,
                            scratch_steps=args.scratch_steps, scratch_batch_size=args.scratch_batch_size,
                            max_bytes=args.max_bytes, eval_blocks=args.eval_blocks, seed=args.seed,
                            warmup_ratio=args.warmup_ratio,
                            plan={"scratch": [plan[r] for r in args.rows.split(",") if r]})
    with tempfile.TemporaryDirectory() as tmp:
        out = conv.regime_scratch(ns, Path(tmp))
    best = out["best"]
    sparse, dense = best.get(f"sparse_mfac {rho:g}"), best.get("sparse_mfac 1 (dense)")
    if sparse and dense:
        out["mfac_sparse_vs_dense"] = (sparse["eval_loss"] - dense["eval_loss"]) / dense["eval_loss"]
        print(f"\nsparse ({rho:g}) vs dense M-FAC, best eval loss: {sparse['eval_loss']:.4f} vs "
              f"{dense['eval_loss']:.4f} ({out['mfac_sparse_vs_dense']:+.2%})")
    sparse, dense = best.get(f"sparse_ggt {rho:g}"), best.get("sparse_ggt 1 (dense)")
    if sparse and dense:
        out["ggt_sparse_vs_dense"] = (sparse["eval_loss"] - dense["eval_loss"]) / dense["eval_loss"]
        print(f"sparse ({rho:g}) vs dense GGT, best eval loss: {sparse['eval_loss']:.4f} vs "
              f"{dense['eval_loss']:.4f} ({out['ggt_sparse_vs_dense']:+.2%})")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    conv.quiet_environment()
    common.set_threads(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    label = common.device_label(args.device_name)
    result = {"environment": common.environment(label), "args": {k: v for k, v in vars(args).items()}}
    parts = args.parts.split(",")
    if "step" in parts:
        print(f"(1) memory and step time: tiny_llama({args.size!r}), m = {args.m}, density {args.density:g}", flush=True)
        result["step"] = part_step(args, device)
        print(step_table(result["step"]), flush=True)
        paper = result["paper_window"] = paper_window(tiny_llama(args.size), args.density)
        print(f"window at m = 1024 (computed from the layout): {paper['sparse_bytes'] / 2**20:.1f} MiB sparse vs "
              f"{paper['dense_bytes'] / 2**20:.1f} MiB dense ({paper['ratio']:.4f}, 1/{1 / paper['ratio']:.0f})", flush=True)
    if "convergence" in parts:
        result["convergence"] = part_convergence(args)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"efcp-{common.slug(label)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
