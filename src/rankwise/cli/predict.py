"""``rankwise predict``: the label (and its probability) a trained classifier gives each text."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="adapter (or full/merged model) directory from rankwise finetune",
    )
    parser.add_argument(
        "--model", metavar="PATH", help="base model (default: the one recorded with the adapter)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    parser.add_argument(
        "texts",
        nargs="*",
        metavar="TEXT",
        help="texts to classify (default: one per line on stdin)",
    )


def run(args: argparse.Namespace) -> int:
    from rankwise.train.models import quiet_transformers

    quiet_transformers()
    from rankwise.train.inference import load_trained, predict

    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    trained = load_trained(args.adapter, model=args.model)
    for p in predict(trained, texts):
        if args.json:
            print(json.dumps({"text": p.text, "label": p.label, "probability": p.probability}))
        else:
            print(f"{p.label}\t{p.probability:.3f}\t{p.text}")
    return 0
