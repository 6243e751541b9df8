"""``rankwise predict``: the label (and its probability) a trained classifier gives each text."""

from __future__ import annotations

import argparse
import json
import re
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
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="cut texts at N tokens (default: the length the run trained with; for an "
        "adapter without that record, the tokenizer's model_max_length within the model's "
        "positions)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per text (default: label, probability and text separated "
        "by tabs, one line per text: a tab or line break in a text is printed as \\t, \\n, \\r)",
    )
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

    if args.max_length is not None and args.max_length < 1:
        from rankwise.cli import CliError

        raise CliError(f"--max-length: expected an integer >= 1, found {args.max_length}")
    texts = _checked_texts(args.texts) if args.texts else None
    trained = load_trained(args.adapter, model=args.model, max_length=args.max_length)
    if texts is None:  # stdin read once the options and the adapter are known good (a bad
        texts = _stdin_texts()  # --adapter at a terminal waited for input first)
    for p in predict(trained, texts):
        if args.json:
            print(json.dumps({"text": p.text, "label": p.label, "probability": p.probability}))
        else:
            print(f"{_field(p.label)}\t{p.probability:.3f}\t{_field(p.text)}")
    return 0


# one line per text, three tab-separated fields: a tab or line break in a text (or label) is
# written as its escape (a text with a newline printed as two lines, the second looking like a
# row of its own); nothing else is changed, so the text reads as before (a backslash stays one:
# --json gives the exact text)
_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _field(value: str) -> str:
    return value.translate(_ESCAPES)


def _checked_texts(texts: list[str]) -> list[str]:
    """The TEXT arguments, each valid Unicode (Python decodes a non-UTF-8 byte in an argument
    to a lone surrogate, which the tokenizer cannot take)."""
    from rankwise.cli import CliError
    from rankwise.train.data import valid_text

    for i, t in enumerate(texts, start=1):
        if not t.strip():  # as a blank stdin line, which is skipped
            raise CliError(f"TEXT argument {i}: expected a text to classify, found {t!r}")
    return [valid_text(t, where=f"TEXT argument {i}") for i, t in enumerate(texts, start=1)]


def _stdin_texts() -> list[str]:
    """The non-blank lines of stdin, without their line ending (``\\n``, ``\\r\\n`` or a lone
    ``\\r``, as Python's universal newlines).

    The bytes are decoded here, with surrogateescape, so that a line that is not valid in the
    stdin encoding is named by its number whatever the locale (a strict decoder would fail
    somewhere in a chunk; the C locale's decoder would pass surrogates to the tokenizer)."""
    from rankwise.train.data import valid_text

    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream put in place of stdin (tests, embedding)
        text = sys.stdin.read()
    else:
        text = raw.read().decode(sys.stdin.encoding or "utf-8", errors="surrogateescape")
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark (Windows editors), as data files
    texts = [
        valid_text(line, where=f"stdin line {number}")
        for number, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1)
        if line.strip()
    ]
    if not texts:
        from rankwise.cli import CliError

        raise CliError("stdin: expected texts to classify, one per line; found none")
    return texts
