"""``rankwise extract``: a LoRA adapter from a fully fine-tuned model and its base (by SVD)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rankwise.cli import (
    CliError,
    add_out_option,
    energy_fraction,
    figure_directory,
    new_output_dir,
    require_plotting,
    seed,
)
from rankwise.cli.resize import spectrum_figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        "--model",
        dest="base",
        help="base model directory (default: the bundled MiniLM)",
    )
    parser.add_argument("--finetuned", required=True, help="fine-tuned model directory")
    add_out_option(parser, "adapter directory to write")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every layer (capped at min(out, in))")
    size.add_argument(
        "--energy", type=energy_fraction, help="keep this fraction of each |dW|_F^2, per layer"
    )
    parser.add_argument(
        "--targets", help="comma-separated module names (default: every changed linear layer)"
    )
    parser.add_argument("--randomized", action="store_true", help="randomized SVD (needs --rank)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the randomized SVD")
    parser.add_argument(
        "--plot", type=figure_directory, metavar="DIR", help="also write the adapter's spectrum PNG"
    )


# Tokenizer files and the run's task file: copied from --finetuned so predict/evaluate work
SIDECARS = ("rankwise_task.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
            "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
            "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")  # fmt: skip


def load_pair(base: str | None, finetuned: str) -> tuple[Any, Any, list[str]]:
    """Both models with the fine-tuned one's architecture class (so module paths agree), and
    the head modules to store whole: those the base checkpoint lacks (initialized at random
    on load, so a delta against them would be noise) and, for sequence classification, a
    changed ``classifier``/``score``."""
    import torch
    import transformers

    from rankwise.train.models import HEADS, load_config, quiet_transformers, resolve_model_source

    quiet_transformers()
    source, base_source = resolve_model_source(finetuned), resolve_model_source(base)
    config = load_config(source, option="--finetuned")
    _check_same_model(base_source, load_config(base_source, option="--base"), config)
    names = getattr(config, "architectures", None) or ["AutoModel"]
    cls = getattr(transformers, names[0], transformers.AutoModel)
    tuned = cls.from_pretrained(source).eval()
    base_model, info = cls.from_pretrained(base_source, output_loading_info=True)
    modules = dict(tuned.named_modules())
    missing = set(info.get("missing_keys", ()))
    absent = {  # modules whose every parameter the base checkpoint lacks (initialized at random)
        name
        for name, module in modules.items()
        if name
        and any(True for _ in module.parameters())
        and all(f"{name}.{n}" in missing for n, _ in module.named_parameters())
    }
    # the outermost of them: a new head, or a pooler a base saved without one lacks
    heads = {n for n in absent if not any(n.startswith(a + ".") for a in absent)}
    if names[0].endswith("ForSequenceClassification"):
        base_params = dict(base_model.named_parameters())
        for head in HEADS:
            if head in modules and any(
                not torch.equal(p, base_params[f"{head}.{n}"])
                for n, p in modules[head].named_parameters()
            ):
                heads.add(head)
    return base_model.eval(), tuned, sorted(heads)


# config fields that must agree for two checkpoints to be one model before and after tuning
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "n_embd",
                 "n_layer", "d_model", "num_layers")  # fmt: skip


def _check_same_model(base: str, base_config: Any, tuned_config: Any) -> None:
    """Refuse, before any weight is loaded, a base of another architecture or size (loading it
    with the fine-tuned model's class would build that class's defaults, possibly billions of
    parameters)."""
    for field in _SHAPE_FIELDS:
        a, b = getattr(base_config, field, None), getattr(tuned_config, field, None)
        if a != b:
            raise CliError(
                f"--base {base!r} is not the fine-tuned model's base: {field} is {a!r} there and "
                f"{b!r} in --finetuned (pass the model it was fine-tuned from)"
            )


def _read_task(source: str) -> dict | None:
    """The fine-tuned model's ``rankwise_task.json`` (None without one); read and checked
    before anything is written, so a broken one leaves no half-made adapter behind."""

    from rankwise.train.inference import TASK_FILE, read_task_info

    if not (Path(source) / TASK_FILE).is_file():
        return None
    try:
        return read_task_info(source)
    except ValueError as err:
        raise CliError(f"--finetuned: {err}") from None


def _copy_sidecars(
    source: str, destination: str, *, task: dict | None, base: str, tuned_config: Any
) -> list[str]:
    """Tokenizer files as they are; the task file with ``base_model`` set to ``base`` (the
    extracted adapter applies to that model, not to the fine-tuned one's own base). A model
    fine-tuned elsewhere has no task file: one is written from its config (the task from its
    class, the label names from its ``id2label``), so predict/evaluate/merge name the labels as
    the fine-tuned model does instead of the base's (often ``LABEL_i``)."""
    import json
    import shutil

    from rankwise.train.config import atomic_write_text

    copied = []
    for name in SIDECARS:
        path = Path(source) / name
        if name == "rankwise_task.json":
            info = task if path.is_file() else _task_from_config(tuned_config)
            if info is None:
                continue
            info = {**info, "base_model": base}
            atomic_write_text(Path(destination) / name, json.dumps(info, indent=2))
        elif path.is_file():
            shutil.copy2(path, Path(destination) / name)
        else:
            continue
        copied.append(name)
    return copied


def _task_from_config(config: Any) -> dict | None:
    """``rankwise_task.json`` fields of a transformers model without one (None if its class
    is neither a sequence classifier nor a causal LM)."""
    names = getattr(config, "architectures", None) or []
    if any(n.endswith("ForSequenceClassification") for n in names):
        id2label = config.id2label or {}
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        return {"task": "classification", "label_names": labels}
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return {"task": "causal-lm", "label_names": []}
    return None


def run(args: argparse.Namespace) -> int:
    from rankwise.analysis import extract_adapter
    from rankwise.analysis.report import format_table, layer_table
    from rankwise.train.models import resolve_model_source

    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be a positive integer; found {args.rank}")
    if args.randomized and args.rank is None:  # before both models load, naming the options
        given = f"--energy {args.energy}" if args.energy is not None else "no --rank"
        raise CliError(f"--randomized needs --rank (an integer); found {given}")
    task = _read_task(args.finetuned)
    require_plotting(args.plot)
    with new_output_dir(args.out, outside={"--plot": args.plot}) as tmp:
        base, tuned, heads = load_pair(args.base, args.finetuned)
        seq_cls = type(tuned).__name__.endswith("ForSequenceClassification")
        targets = (
            [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
        )
        report = extract_adapter(
            base,
            tuned,
            tmp,
            rank=args.rank,
            energy=args.energy,
            targets=targets,
            randomized=args.randomized,
            generator=args.seed,
            task_type="SEQ_CLS" if seq_cls else None,
            modules_to_save=heads,
            base_model_name_or_path=resolve_model_source(args.base),
        )
        if heads:
            print(f"stored whole (modules_to_save): {', '.join(heads)}")
        copied = _copy_sidecars(
            args.finetuned,
            str(tmp),
            task=task,
            base=resolve_model_source(args.base),
            tuned_config=tuned.config,
        )
        print(format_table(*layer_table(report.layers)))
        if report.uncaptured:
            print(
                "not captured (changed outside the extracted weights): "
                + ", ".join(report.uncaptured)
            )
        plotted = spectrum_figures(tmp, args.plot)
    print(f"wrote {args.out}" + (f" (with {', '.join(copied)})" if copied else ""))
    for path in plotted:
        print(f"wrote {path}")
    return 0
