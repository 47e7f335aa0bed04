"""Low-rank optimizers side by side: ``ldadam``, ``dct_adamw``, transformers' ``galore_adamw``
(galore-torch) and ``adamw_torch``.

Three measurements, each printed as a table and written to one JSON file:

1. **Trainer** — every optimizer trains the quickstart model (``tiny_llama``, embedded stdlib corpus)
   through the plain ``Trainer`` with ``optim_target_modules="all-linear"``, at rank ``--rank``
   (LDAdam twice: its error in fp32 and in 4 bits):
   state bytes per trainable parameter, ``optimizer.step()`` time as a ratio to ``adamw_torch``,
   final eval loss (the machinery of ``optimizers.py``).
2. **Rank sweep** — the optimizers alone on the weight matrices of one Llama block of width
   ``--hidden`` (q, k, v, o, gate, up, down) with random gradients: steady-state step time per
   rank (4..256) as a ratio to AdamW on the same matrices, and the first step (the subspace is
   found there: an SVD for LDAdam and GaLore) apart. Shows whether the step time depends on rank.
3. **DCT route** — ``Q^T A`` by the matmul and by Makhoul's FFT per basis size: where
   ``fft="auto"`` should switch (``hf_ista.optim.dct_adamw.FFT_MIN_SIZE``).

    PYTHONPATH=. python benchmarks/lowrank.py                  # CPU, 1 thread
    PYTHONPATH=. python benchmarks/lowrank.py --hidden 2048    # GPU
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import optimizers as common  # noqa: E402  (environment, device label, the Trainer run and its table)

import torch  # noqa: E402
import transformers  # noqa: E402

from hf_ista.data import MODEL_SIZES, load_corpus  # noqa: E402
from hf_ista.linalg import dct, dct_matrix  # noqa: E402
from hf_ista.optim import DCTAdamW, LDAdam  # noqa: E402

TRAINER_OPTIMS = ["adamw_torch", "ldadam", "dct_adamw", "galore_adamw"]
RANKS = [4, 8, 16, 32, 64, 128, 256]
GALORE_GAP = 200


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="trainer,ranks,dct", help="comma list of: trainer, ranks, dct")
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES), help="Trainer part: tiny Llama size")
    p.add_argument("--steps", type=int, default=200, help="Trainer part: optimizer steps")
    p.add_argument("--rank", type=int, default=16, help="Trainer part: rank of every low-rank optimizer")
    # Each optimizer's best lr of the from-scratch sweep (results/convergence-cpu-scratch-lowrank.json).
    p.add_argument("--lr-per-optim", default="adamw_torch=1e-3,ldadam=1e-2,dct_adamw=1e-2,galore_adamw=3e-2",
                   help="Trainer part: learning rates, NAME=LR,...")
    p.add_argument("--hidden", type=int, default=1024, help="rank sweep: Llama block width (MLP is 2.75x)")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="rank sweep: ranks")
    p.add_argument("--sweep-steps", type=int, default=5, help="rank sweep: timed steps after the first")
    p.add_argument("--dct-sizes", default="256,512,1024,2048,4096", help="DCT part: basis sizes n")
    p.add_argument("--dct-aspect", type=float, default=1.0,
                   help="DCT part: A is n x (aspect n); a Llama MLP weight is 2.75")
    p.add_argument("--seed", type=int, default=0)
    common.add_device_args(p)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/lowrank-<device>.json)")
    return p.parse_args(argv)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        common.sync()
        start = time.perf_counter()
        fn()
        common.sync()
        out.append(time.perf_counter() - start)
    return out


# ---------------------------------------------------------------- 1. Trainer

def trainer_part(args) -> list[dict]:
    lr_map = dict(item.split("=") for item in args.lr_per_optim.split(",") if item)
    bench = common.parse_args(["--size", args.size, "--steps", str(args.steps), "--optims", ",".join(TRAINER_OPTIMS),
                               "--lr-per-optim", ",".join(f"{k}={v}" for k, v in lr_map.items())])
    runs = [("adamw_torch", None), ("ldadam", f"rank={args.rank},rho=0.908"),
            ("ldadam", f"rank={args.rank},rho=0.908,error_feedback=4bit"), ("dct_adamw", f"rank={args.rank}"),
            ("galore_adamw", f"rank={args.rank},update_proj_gap={GALORE_GAP},scale=0.25")]
    data = load_corpus("stdlib", block_size=bench.block_size, max_bytes=bench.max_bytes, seed=bench.seed)
    data["eval"] = data["eval"].select(range(min(bench.eval_blocks, len(data["eval"]))))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_ista_lowrank_") as workdir:
        for i, (name, optim_args) in enumerate(runs):
            print(f"  trainer: {name} ({optim_args}) ...", flush=True)
            common.OPTIMIZERS[name] = (optim_args, common.OPTIMIZERS[name][1])  # run_one reads its args there
            with contextlib.redirect_stdout(io.StringIO()):
                rows.append(common.run_one(name, bench, data, Path(workdir) / str(i)))
    base = next(r for r in rows if r["optim"] == "adamw_torch")
    for r in rows:
        r["step_ratio"] = r["step_mean_s"] / base["step_mean_s"] if r.get("step_mean_s") else None
        r["step_ratio_median"] = r["step_median_s"] / base["step_median_s"] if r.get("step_median_s") else None
    print(common.table(rows))
    return rows


# ---------------------------------------------------------------- 2. rank sweep

def block_shapes(hidden: int) -> list[tuple[int, int]]:
    mlp = int(hidden * 2.75)
    return [(hidden, hidden)] * 4 + [(mlp, hidden)] * 2 + [(hidden, mlp)]


def make_optimizer(name: str, params, rank: int):
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "ldadam":
        return LDAdam([{"params": params, "rank": rank}], lr=1e-3)
    if name == "dct_adamw":
        return DCTAdamW([{"params": params, "rank": rank}], lr=1e-3)
    if name == "galore_adamw":
        from galore_torch import GaLoreAdamW
        return GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": GALORE_GAP, "scale": 0.25,
                             "proj_type": "std"}], lr=1e-3)
    raise ValueError(name)


def sweep_one(name: str, rank: int, args, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(args.seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for s in block_shapes(args.hidden)]
    grads = [[torch.randn(s, device=device, generator=gen) * 1e-3 for s in block_shapes(args.hidden)] for _ in range(2)]
    opt = make_optimizer(name, params, rank)
    step = [0]

    def one_step():
        for p, g in zip(params, grads[step[0] % 2]):
            p.grad = g
        opt.step()
        step[0] += 1

    first = timed(one_step, 1)[0]
    times = timed(one_step, args.sweep_steps)
    return {"optim": name, "rank": rank, "first_step_s": first, "step_median_s": statistics.median(times),
            "step_mean_s": statistics.fmean(times), "state_bytes": common.state_bytes(opt),
            "params": sum(p.numel() for p in params)}


def ranks_part(args, device) -> list[dict]:
    ranks = [int(r) for r in args.ranks.split(",") if r]
    rows = [sweep_one("adamw_torch", 0, args, device)]
    for rank in ranks:
        for name in ("ldadam", "dct_adamw", "galore_adamw"):
            print(f"  ranks: {name} r={rank} ...", flush=True)
            rows.append(sweep_one(name, rank, args, device))
    base = rows[0]["step_median_s"]
    for r in rows:
        r["step_ratio"] = r["step_median_s"] / base
        r["state_bytes_per_param"] = r["state_bytes"] / r["params"]
    print(f"\nrank sweep: one Llama block at width {args.hidden} ({rows[0]['params'] / 1e6:.1f}M params), "
          f"median of {args.sweep_steps} steps after the first, ratio to AdamW "
          f"({base * 1e3:.1f} ms); first step apart")
    head = ["rank"] + [f"{n} step/adamw" for n in ("ldadam", "dct_adamw", "galore_adamw")] + \
           [f"{n} first step s" for n in ("ldadam", "dct_adamw", "galore_adamw")] + ["dct_adamw B/param"]
    lines = []
    for rank in ranks:
        by = {r["optim"]: r for r in rows if r["rank"] == rank}
        lines.append([str(rank)] + [f"{by[n]['step_ratio']:.2f}x" for n in ("ldadam", "dct_adamw", "galore_adamw")]
                     + [f"{by[n]['first_step_s']:.3f}" for n in ("ldadam", "dct_adamw", "galore_adamw")]
                     + [f"{by['dct_adamw']['state_bytes_per_param']:.3f}"])
    print(common.format_table(head, lines))
    return rows


# ---------------------------------------------------------------- 3. DCT route

def dct_part(args, device) -> list[dict]:
    rows = []
    for n in (int(x) for x in args.dct_sizes.split(",") if x):
        a = torch.randn(n, round(args.dct_aspect * n), device=device)
        q = dct_matrix(n, device)
        dct(a), q.T @ a  # warm-up (plans, caches)
        repeats = 3 if n >= 2048 else 10
        mm = statistics.median(timed(lambda: q.T @ a, repeats))
        fft = statistics.median(timed(lambda: dct(a), repeats))
        err = ((dct(a) - q.T @ a).abs().max() / (q.T @ a).abs().max()).item()
        rows.append({"n": n, "N": a.shape[1], "matmul_s": mm, "fft_s": fft, "fft_over_matmul": fft / mm, "max_rel_diff": err})
    print(f"\nDCT route: Q^T A for A of n x {args.dct_aspect:g}n, median time, FFT / matmul (< 1: the FFT is faster)")
    print(common.format_table(["n", "matmul ms", "fft ms", "fft/matmul", "max rel diff"],
                       [[str(r["n"]), f"{r['matmul_s'] * 1e3:.2f}", f"{r['fft_s'] * 1e3:.2f}",
                         f"{r['fft_over_matmul']:.2f}", f"{r['max_rel_diff']:.1e}"] for r in rows]))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    common.set_threads(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = common.device_label(args.device_name)
    out = Path(args.out or Path(__file__).parent / "results" / f"lowrank-{common.slug(label)}.json")
    parts = set(args.parts.split(","))
    print(f"device: {label} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    result = {"benchmark": "lowrank", "environment": common.environment(label), "args": vars(args),
              "loadavg_before": os.getloadavg()}
    if "trainer" in parts:
        result["trainer"] = trainer_part(args)
    if "ranks" in parts:
        result["ranks"] = ranks_part(args, device)
    if "dct" in parts:
        result["dct_route"] = dct_part(args, device)
    result["loadavg_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
