"""``rankwise evaluate``: accuracy (or perplexity) of a trained adapter or model on a data file."""

from __future__ import annotations

import argparse
import json

from rankwise.cli import DATA_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="adapter (or full/merged model) directory from rankwise finetune",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help=DATA_FORMATS,
    )
    parser.add_argument(
        "--model", metavar="PATH", help="base model (default: the one recorded with the adapter)"
    )
    parser.add_argument("--text-column", help="text column (detected when unambiguous)")
    parser.add_argument("--label-column", help="label column (detected when unambiguous)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="examples per forward pass (default 64)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="cut texts at N tokens (default: the length the run trained with; for an "
        "adapter without that record, the tokenizer's model_max_length within the model's "
        "positions)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from rankwise.train.models import quiet_transformers

    quiet_transformers()
    from rankwise.cli import CliError

    if args.batch_size < 1:
        raise CliError(f"--batch-size: expected an integer >= 1, found {args.batch_size}")
    from rankwise.train.inference import evaluate_file, load_trained

    if args.max_length is not None and args.max_length < 1:
        from rankwise.cli import CliError

        raise CliError(f"--max-length: expected an integer >= 1, found {args.max_length}")
    trained = load_trained(args.adapter, model=args.model, max_length=args.max_length)
    result = evaluate_file(
        trained,
        args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        batch_size=args.batch_size,
    )
    metrics = {"examples": result.examples, **result.as_metrics()}
    if args.json:
        print(json.dumps(metrics, allow_nan=False))
    elif result.accuracy is not None:
        print(
            f"{result.examples} examples: accuracy {100 * result.accuracy:.2f}%, loss {result.loss:.4f}"
        )
    else:
        print(
            f"{result.examples} examples: perplexity {result.perplexity:.3f}, loss {result.loss:.4f}"
        )
    return 0
