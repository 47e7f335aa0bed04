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
    args = parser.parse_args(argv)
    import hf_ista  # noqa: F401  (registers the optimizers)

    args.func(args)


if __name__ == "__main__":
    main()
