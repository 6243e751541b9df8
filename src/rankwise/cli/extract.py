"""``rankwise extract``: a LoRA adapter from a fully fine-tuned model and its base (by SVD)."""

from __future__ import annotations

import argparse
from typing import Any

from rankwise.cli import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model directory (default: the bundled MiniLM)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every layer (capped at min(out, in))")
    size.add_argument("--energy", type=float, help="keep this fraction of each |dW|_F^2, per layer")
    parser.add_argument(
        "--targets", help="comma-separated module names (default: every changed linear layer)"
    )
    parser.add_argument("--randomized", action="store_true", help="randomized SVD (needs --rank)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    parser.add_argument("--plot", metavar="DIR", help="also write the adapter's spectrum PNG")


def load_pair(base: str | None, finetuned: str) -> tuple[Any, Any]:
    """Both models with the fine-tuned one's architecture class (so module paths agree)."""
    import transformers

    from rankwise.train.models import quiet_transformers, resolve_model_source

    quiet_transformers()
    source, base_source = resolve_model_source(finetuned), resolve_model_source(base)
    config = transformers.AutoConfig.from_pretrained(source)
    _check_same_model(base_source, transformers.AutoConfig.from_pretrained(base_source), config)
    names = getattr(config, "architectures", None) or ["AutoModel"]
    cls = getattr(transformers, names[0], transformers.AutoModel)
    tuned = cls.from_pretrained(source).eval()
    return cls.from_pretrained(base_source).eval(), tuned


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


def run(args: argparse.Namespace) -> int:
    from rankwise.analysis import extract_adapter
    from rankwise.analysis.report import format_table, layer_table

    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be a positive integer; found {args.rank}")
    base, tuned = load_pair(args.base, args.finetuned)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    report = extract_adapter(
        base,
        tuned,
        args.out,
        rank=args.rank,
        energy=args.energy,
        targets=targets,
        randomized=args.randomized,
        generator=args.seed,
    )
    print(format_table(*layer_table(report.layers)))
    if report.uncaptured:
        print(
            f"not captured (changed outside the extracted weights): {', '.join(report.uncaptured)}"
        )
    print(f"wrote {args.out}")
    if args.plot:
        from rankwise.analysis import adapter_spectrum
        from rankwise.analysis.plots import plot_spectra

        for path in plot_spectra(adapter_spectrum(args.out), args.plot):
            print(f"wrote {path}")
    return 0
