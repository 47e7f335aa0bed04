"""The ``hf-ista`` command."""
from __future__ import annotations

import argparse


def _optimizers(_args) -> None:
    from hf_ista.integrations.transformers import OPTIMIZERS

    for name, spec in OPTIMIZERS.items():
        print(f"{name}  ({spec.cls_path.replace(':', '.')})")
        if spec.low_rank:
            print(f"    {'(weights)':<18} {'optim_target_modules: names, regex or all-linear':<40} default 'all-linear'")
        for key, hyper in spec.hypers.items():
            default = "from TrainingArguments" if hyper.default is None else repr(hyper.default)
            print(f"    {key:<18} {hyper.describe():<40} default {default}")


def _train(args) -> None:
    from hf_ista.train import main as train_main

    train_main([args.recipe])


def text_blocks(path: str, model_dir: str, seq_len: int, num_samples: int):
    """``num_samples`` rows of ``seq_len`` tokens cut from a local text file: the model dir's tokenizer
    if it has one, else bytes (the tiny models' 256-token vocabulary)."""
    import torch

    text = open(path, "rb").read()
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model_dir)(text.decode("utf-8", errors="replace"))["input_ids"]
    except (OSError, ValueError):
        ids = list(text)
    usable = len(ids) // seq_len * seq_len
    if usable == 0:
        raise ValueError(f"--calibration {path}: {len(ids)} tokens, fewer than --seq-len {seq_len}")
    return torch.tensor(ids[:usable]).view(-1, seq_len)[:num_samples]


def _prune(args) -> None:
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from hf_ista.model_card import write_pruning_card
    from hf_ista.pruning import prune

    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    rows = text_blocks(args.calibration, args.model_dir, args.seq_len, args.num_samples)
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    report = prune(model, calibration=batches, sparsity=args.sparsity, pattern=args.pattern, method=args.method,
                   iterations=args.iterations, num_samples=args.num_samples, damp=args.damp,
                   block_size=args.block_size, progress=True)
    print(report.table())
    out = Path(args.output or f"{args.model_dir.rstrip('/')}-pruned")
    model.save_pretrained(out)
    write_pruning_card(out / "README.md", report, {})
    (out / "pruning_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(f"saved the pruned model to {out}")


def _compare(args) -> None:
    from hf_ista.probes.compare import comparison_table, load_result, plot_comparison, run_label

    results = {}
    for path in args.runs:
        label = run_label(path)
        while label in results:  # two runs in dirs of the same name
            label += "'"
        results[label] = load_result(path)
    print(comparison_table(results))
    print(f"wrote {plot_comparison(results, args.plot)}")


def _scaling_fit(args) -> None:
    import json
    from pathlib import Path

    from hf_ista.callbacks.scaling_law import load_runs
    from hf_ista.scaling import capacity, fit_law, parse_format, plot_fit

    records = load_runs(args.store)
    fixed = {}
    for item in args.fix or []:
        key, _, value = item.partition("=")
        fixed[key] = float(value)
    result = fit_law(records, fit_lc=args.fit_lc, fixed=fixed, n_bootstrap=args.bootstrap, seed=args.seed)
    print(result.table())
    labels = sorted({parse_format(r["format"]).label: r["format"] for r in records}.items())
    print(f"{'format':<16} {'GMSE':>9} {'rho (fit)':>10} {'rho (paper)':>12}")
    for label, spec in labels:
        fmt = parse_format(spec)
        print(f"{label:<16} {fmt.gmse():>9.4g} {capacity(fmt, result.law):>10.4f} {capacity(fmt):>12.4f}")
    for item in args.predict or []:
        n, d, fmt = item.split(",")
        n, d = float(n), float(d)
        print(f"predict N={n:g} D={d:g} {fmt}: loss {result.predict(n, d, fmt):.4f}, "
              f"dense-equivalent N {result.dense_equivalent(n, fmt):.4g}")
    plot = Path(args.plot or Path(args.store).with_suffix(".png"))
    plot_fit(result, records, plot)
    print(f"wrote {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-ista", description="IST Austria DAS-lab methods for Hugging Face")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("optimizers", help="list the optim= names and their optim_args").set_defaults(func=_optimizers)
    train = commands.add_parser("train", help="run a recipe (one process; use accelerate launch for more)")
    train.add_argument("recipe")
    train.set_defaults(func=_train)
    prune = commands.add_parser("prune", help="prune a saved causal LM (magnitude, wanda, obs, iobs)")
    prune.add_argument("model_dir")
    prune.add_argument("--calibration", required=True, help="a local text file")
    prune.add_argument("--sparsity", type=float, default=None, help="share of weights pruned (default 0.5; "
                       "implied by an N:M pattern)")
    prune.add_argument("--method", default="iobs", choices=["magnitude", "wanda", "obs", "iobs"])
    prune.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M (N kept of every M), e.g. 2:4")
    prune.add_argument("--iterations", type=int, default=3, help="I-OBS iterations")
    prune.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    prune.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    prune.add_argument("--batch-size", type=int, default=8)
    prune.add_argument("--damp", type=float, default=0.01)
    prune.add_argument("--block-size", type=int, default=128)
    prune.add_argument("--output", default=None, help="where to save (default MODEL_DIR-pruned)")
    prune.set_defaults(func=_prune)
    compare = commands.add_parser("compare", help="compare the solution_probes.json of several output dirs")
    compare.add_argument("runs", nargs="+", help="output dirs (or solution_probes.json files)")
    compare.add_argument("--plot", default="solution_probes_compare.png", help="where to write the PNG")
    compare.set_defaults(func=_compare)
    scaling = commands.add_parser("scaling", help="compressed-format scaling laws").add_subparsers(
        dest="scaling_command", required=True)
    fit = scaling.add_parser("fit", help="fit L = A(N rho)^-alpha + B D^-beta + E to a ScalingLawCallback store")
    fit.add_argument("store", help="runs.jsonl written by ScalingLawCallback")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the confidence intervals")
    fit.add_argument("--fit-lc", action="store_true", help="fit Lc per family (default: fixed at 1)")
    fit.add_argument("--fix", action="append", help="pin a parameter, e.g. --fix alpha=0.13 --fix sparse.C=1.39")
    fit.add_argument("--predict", action="append", help="N,D,FORMAT, e.g. 1e8,2e9,int4 (repeatable)")
    fit.add_argument("--plot", default=None, help="plot path (default STORE with .png)")
    fit.add_argument("--json", default=None, help="write the fit as JSON here")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=_scaling_fit)
    args = parser.parse_args(argv)
    import hf_ista  # noqa: F401  (registers the optimizers)

    args.func(args)


if __name__ == "__main__":
    main()
