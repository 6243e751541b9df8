"""``rankwise analyze``: the LoRA paper's questions about trained adapters, as tables and PNGs.

* ``similarity A1 A2`` — subspace similarity φ per shared module (Hu et al. 2021, Sec. 7.2)
* ``spectrum ADAPTER`` — singular values, stable/effective rank, energy of each ``ΔW``
* ``amplification ADAPTER --model M`` — how ``ΔW`` amplifies directions of ``W`` (Sec. 7.3)
* ``budget --data FILE`` — which weight types to adapt under a fixed parameter budget
  (Sec. 7.1, Table 5): one fine-tuning run (:mod:`rankwise.train`) per set of types
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rankwise.cli import DATA_FORMATS, CliError, figure_directory, require_plotting, seed


def _plot_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plot", type=figure_directory, metavar="DIR", help="also write PNG figures to DIR"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    p = sub.add_parser("similarity", help="subspace similarity phi(i, j) between two adapters")
    p.add_argument("adapter1", help="adapter directory (PEFT format)")
    p.add_argument("adapter2", help="adapter directory (PEFT format)")
    p.add_argument(
        "--factor",
        choices=("A", "B"),
        default="A",
        help="compare A factors (right singular vectors, default) or B factors (left)",
    )
    _plot_option(p)
    p = sub.add_parser("spectrum", help="singular values and ranks of each module's update")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    _plot_option(p)
    p = sub.add_parser("amplification", help="how each update amplifies directions of W")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    p.add_argument(
        "--model",
        help="base model directory (default: the one recorded with the adapter, else the "
        "bundled MiniLM)",
    )
    p.add_argument("--rank", type=int, help="directions to project on (default: each adapter's r)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the random-subspace baseline")
    _plot_option(p)
    _budget_arguments(sub.add_parser("budget", help="compare weight types at an equal budget"))


def _sets(text: str) -> list[tuple[str, ...]]:
    """``"q,v,qv,qkvo"`` -> ``[("q",), ("v",), ("q", "v"), ("q", "k", "v", "o")]``."""
    groups = [tuple(g.strip()) for g in text.split(",") if g.strip()]
    if not groups:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sets such as q,v,qv; found {text!r}"
        )
    from rankwise.analysis.budget import check_sets

    try:
        check_sets(groups)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return groups


def _types(text: str) -> dict[str, str]:
    """``"q=q_proj,v=v_proj"`` -> ``{"q": "q_proj", "v": "v_proj"}``."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise argparse.ArgumentTypeError(
            f"expected type=module pairs such as q=q_proj; found {text!r}"
        )
    long = [k.strip() for k, _ in pairs if len(k.strip()) != 1]
    if long:  # a set names its types letter by letter (qv = q and v)
        raise argparse.ArgumentTypeError(
            f"expected one-letter type names (--sets spells a set letter by letter, qv = q + v); "
            f"found {long[0]!r}"
        )
    return {k.strip(): v.strip() for k, v in pairs}


def _budget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (default: the bundled MiniLM)")
    p.add_argument("--data", required=True, help=f"training data: {DATA_FORMATS}")
    p.add_argument("--eval-data", help="held-out data (default: a split of --data)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, help="trainable LoRA parameters per run")
    size.add_argument("--rank", type=int, default=8, help="budget = this rank on the first set (8)")
    p.add_argument("--sets", type=_sets, help="sets of types q,k,v,o (default q,k,v,o,qk,qv,qkvo)")
    p.add_argument(
        "--types",
        type=_types,
        help="type=module-suffix pairs, e.g. q=q_proj,k=k_proj,v=v_proj,o=o_proj "
        "(default: BERT's attention.self.query/key/value, attention.output.dense)",
    )
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps per run (200)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (64)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (16)")
    p.add_argument("--lr", type=float, help="learning rate (default: the engine's LoRA default)")
    p.add_argument("--seed", type=seed, default=0, help="seed of every run (0)")
    p.add_argument("--output", required=True, metavar="DIR", help="one run directory per set")
    _plot_option(p)


def _print(table: tuple[list[str], list[list[str]]]) -> None:
    from rankwise.analysis.report import format_table

    print(format_table(*table))


def _plotted(paths: list[Any]) -> None:
    for path in paths:
        print(f"wrote {path}")


def _label(path: str) -> str:
    """The last two path components: ``runs/r8/adapter`` -> ``r8/adapter``."""
    return "/".join(Path(path).parts[-2:])


def _similarity(args: argparse.Namespace) -> int:
    from rankwise.analysis import adapter_similarity
    from rankwise.analysis.report import similarity_table

    rows = adapter_similarity(args.adapter1, args.adapter2, factor=args.factor)
    _print(similarity_table(rows))
    if args.plot:
        from rankwise.analysis.plots import plot_similarity

        _plotted(
            plot_similarity(rows, args.plot, labels=(_label(args.adapter1), _label(args.adapter2)))
        )
    return 0


def _spectrum(args: argparse.Namespace) -> int:
    from rankwise.analysis import adapter_spectrum
    from rankwise.analysis.report import spectrum_table

    rows = adapter_spectrum(args.adapter)
    _print(spectrum_table(rows))
    if args.plot:
        from rankwise.analysis.plots import plot_spectra

        _plotted(plot_spectra(rows, args.plot))
    return 0


def _amplification(args: argparse.Namespace) -> int:
    from rankwise.analysis import adapter_amplification
    from rankwise.analysis.report import amplification_table

    if args.rank is not None and args.rank < 1:
        raise CliError(f"--rank must be a positive integer; found {args.rank}")
    from rankwise.train.models import quiet_transformers

    quiet_transformers()  # one-line errors, no load reports or progress bars (as merge)
    from rankwise.io import read_adapter_config
    from rankwise.train.models import load_base_model

    config = read_adapter_config(args.adapter)
    name = args.model or config.base_model_name_or_path  # default: the adapter's own base
    model = load_base_model(name, config.task_type)
    rows = adapter_amplification(model, args.adapter, rank=args.rank, generator=args.seed)
    _print(amplification_table(rows))
    if args.plot:
        from rankwise.analysis.plots import plot_amplification

        _plotted(plot_amplification(rows, args.plot))
    return 0


def _budget(args: argparse.Namespace) -> int:
    """Plan equal-budget ranks (:func:`budget_plan`), then fine-tune once per set
    (:func:`rankwise.train.budget_runs.budget_runs`)."""
    import transformers

    from rankwise.analysis.budget import BERT_TYPES, PAPER_SETS, budget_plan
    from rankwise.analysis.report import budget_table
    from rankwise.train.budget_runs import budget_runs
    from rankwise.train.models import load_config, quiet_transformers, resolve_model_source

    missing = sorted({t for s in PAPER_SETS for t in s} - set(args.types or "qkvo"))
    if missing and not args.sets:  # the default sets name q, k, v, o: say where 'k' came from
        raise CliError(
            f"--types: no type {', '.join(missing)}, which the default --sets "
            f"({','.join(''.join(s) for s in PAPER_SETS)}) use; give --sets with the types "
            f"{','.join(args.types)}"
        )
    # planned on the model the runs train (a classification model: its head is trained in
    # full, never adapted), so the table's counts are the adapters' own
    quiet_transformers()  # no per-run load reports and progress bars (as finetune)
    source = resolve_model_source(args.model)
    load_config(source)  # a one-line error naming --model when it is not at hand
    model = transformers.AutoModelForSequenceClassification.from_pretrained(source)
    sets = args.sets or PAPER_SETS
    budget = args.budget
    types = args.types or BERT_TYPES
    rank = None if budget is not None else args.rank
    plans = budget_plan(
        model, budget=budget, rank=rank, sets=sets, types=types, task_type="SEQ_CLS"
    )
    del model
    fixed = {"model": args.model, "data": args.data, "eval_data": args.eval_data,
             "max_steps": args.max_steps, "max_length": args.max_length,
             "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}  # fmt: skip
    results = budget_runs(plans, Path(args.output), fixed, progress=print)
    _print(budget_table(plans, results))
    if args.plot:
        from rankwise.analysis.plots import plot_budget

        _plotted(plot_budget(plans, results, args.plot))
    return 0


_RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "similarity": _similarity,
    "spectrum": _spectrum,
    "amplification": _amplification,
    "budget": _budget,
}


def run(args: argparse.Namespace) -> int:
    require_plotting(getattr(args, "plot", None))  # before any work (budget trains for hours)
    return _RUN[args.analysis](args)
