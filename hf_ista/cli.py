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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-ista", description="IST Austria DAS-lab methods for Hugging Face")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("optimizers", help="list the optim= names and their optim_args").set_defaults(func=_optimizers)
    train = commands.add_parser("train", help="run a recipe (one process; use accelerate launch for more)")
    train.add_argument("recipe")
    train.set_defaults(func=_train)
    args = parser.parse_args(argv)
    import hf_ista  # noqa: F401  (registers the optimizers)

    args.func(args)


if __name__ == "__main__":
    main()
