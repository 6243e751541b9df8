"""``rankwise merge``: fold an adapter into its base model and save a plain transformers model."""

from __future__ import annotations

import argparse

from rankwise.cli import add_out_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="adapter directory from rankwise finetune (PEFT format)",
    )
    add_out_option(parser, "new directory for the merged model")
    parser.add_argument(
        "--model", metavar="PATH", help="base model (default: the one recorded with the adapter)"
    )


def run(args: argparse.Namespace) -> int:
    from rankwise.train.models import quiet_transformers

    quiet_transformers()
    from rankwise.train.inference import load_trained, merge_to

    trained = load_trained(args.adapter, model=args.model)
    out = merge_to(trained, args.out)
    n = trained.max_length
    hint = (
        f"; pass truncation=True, max_length={n} to its tokenizer for the same answers"
        if trained.task == "classification"
        else ""
    )
    print(
        f"merged model: {out} (load it with transformers' from_pretrained; rankwise cuts "
        f"texts at {n} tokens{hint})"
    )
    return 0
