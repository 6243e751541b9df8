"""The LoRA paper's analysis study (Hu et al. 2021, Sec. 7) on SST-2 with the bundled MiniLM.

One command regenerates every number and figure of the README's study (issue #7):

1. **Runs.** LoRA on ``W_q`` and ``W_v`` (targets ``query,value``; the classifier head trains in
   full, as PEFT's ``SEQ_CLS``) at r = 4, 8, 64 with seed 0 and r = 8 with seed 1. α = 16 is
   *fixed* in r, as in the paper (Sec. 4.1: "α is a constant in r … we simply set α to the first
   r we try and do not tune it"), so the scaling α/r is 4, 2 and 0.25. lr 5e-4, batch 16, max
   length 64, dropout 0.1, ``--max-steps`` 1000 (= 16,000 training examples; warmup 6%, linear
   decay), evaluated on SST-2 ``dev.tsv`` (872 sentences).
2. **Subspace similarity** (Eq. 4, Figs 3–4): ``φ(A_r8, A_r64, i, j)`` and the same for ``B``
   for the 12 adapted modules (6 layers × {query, value}); per type the top-direction φ(1, 1),
   the count with φ(1, 1) > 0.5 and the median of φ over the ``i ≤ r₁, j ≤ r₂`` grid against the
   random-subspace expectation ``E φ(i, j) = max(i, j)/d``. Seed 0 vs seed 1 at r = 8 likewise.
   With one seed the initial ``A`` of r = 8 may equal the first 8 rows of r = 64's (kaiming from
   the same generator); the script reconstructs both initial ``A`` (the engine's own
   :func:`rankwise.lora.inject` with the run's seed), reports which modules coincide and, besides
   the raw ``A``, compares the learned part ``ΔA = A_trained − A_init``, from which the
   shared initial rows cancel. ``--report-only`` trains nothing and reports the finished runs
   (unfinished budget sets shown as pending).
3. **Amplification** (Sec. 7.3, Table 7) at r = 4, 8, 64 for query and value: medians over the
   6 layers of ``‖ΔW‖_F``, ``‖UᵀWV‖_F`` on ΔW's top-r directions, W's own top-r and random
   ones, and the factor ``‖ΔW‖_F / ‖UᵀWV‖_F``.
4. **Budget** (Sec. 7.1, Table 5): what ``rankwise analyze budget --rank 8`` runs — the
   library's :func:`rankwise.analysis.budget_plan` over the paper's sets {q}, {k}, {v}, {o},
   {q,k}, {q,v}, {q,k,v,o}, then one engine run per set with the CLI's settings (α = 2r,
   i.e. scaling 2 in every run; same steps, batch and lr as above).
5. **Comparison with the paper** from the numbers, by the explicit rules in :func:`claims`.

Every run is resumable: a run whose ``result.json`` exists in ``--work DIR`` is skipped if it
ran with this invocation's settings (its ``config.yaml`` and torch threads; otherwise the study
stops, naming the option), an interrupted one continues from its latest checkpoint. Outputs:
``benchmarks/results/lora_study_sst2.{json,md}`` and ``benchmarks/results/lora_study_*.png``.

    python benchmarks/lora_study_sst2.py --work /work/runs/study --threads 1   # the study
    python benchmarks/lora_study_sst2.py --quick --work /tmp/study_quick           # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rankwise.analysis import ModuleAmplification, ModuleSimilarity, subspace_similarity
from rankwise.analysis.budget import PAPER_SETS, BudgetPlan
from rankwise.io.files import atomic_write_bytes

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_FILE = "result.json"
ALPHA = 16.0  # fixed in r (Hu et al. 2021, Sec. 4.1)
TARGETS = ("query", "value")
SHARED = 0.5  # "a shared direction": φ(1, 1) above this (the paper's Sec. 7.2 wording)
LAYER = 3  # the representative layer of the heatmaps (a middle one; layer 0 has the init overlap)
PAPER_BUDGET_WINNERS = (("q", "v"), ("q", "k", "v", "o"))  # Table 5, WikiSQL and MultiNLI
# Sec. 7.3 / Table 7: ‖ΔW_q‖_F / ‖UᵀW_qV‖_F of GPT-3 layer 48 (6.91/0.32 and 3.57/1.90).
PAPER_AMPLIFICATION = {4: "21.5", 64: "1.9"}


class RunSpec(NamedTuple):
    """One LoRA run of the study."""

    name: str  # directory in --work, e.g. "r8-s0"
    r: int
    alpha: float
    seed: int
    targets: tuple[str, ...]


STUDY_RUNS = (
    RunSpec("r4-s0", 4, ALPHA, 0, TARGETS),
    RunSpec("r8-s0", 8, ALPHA, 0, TARGETS),
    RunSpec("r64-s0", 64, ALPHA, 0, TARGETS),
    RunSpec("r8-s1", 8, ALPHA, 1, TARGETS),
)


class Settings(NamedTuple):
    """What every run shares."""

    train: Path
    dev: Path
    work: Path
    max_steps: int
    batch_size: int
    lr: float
    max_length: int
    dropout: float
    save_every: int


class TypeSimilarity(NamedTuple):
    """One comparison for one matrix type (query or value), over its layers."""

    comparison: str  # e.g. "r8 vs r64"
    factor: str  # "A", "dA" (A - A_init) or "B"
    kind: str  # "query" or "value"
    modules: int
    top_phi: tuple[float, ...]  # φ(1, 1) per layer, in layer order
    shared: int  # modules with φ(1, 1) > SHARED
    grid_median: float  # median over modules of the median of φ(i, j), i ≤ r₁, j ≤ r₂
    random_median: float  # the same for E φ(i, j) = max(i, j) / d


class TypeAmplification(NamedTuple):
    """Table 7 for one rank and matrix type: medians over the layers."""

    r: int
    kind: str
    delta_norm: float  # ‖ΔW‖_F
    delta_directions: float  # ‖UᵀWV‖_F, U, V: top-r singular vectors of ΔW
    weight_directions: float  # W's own top-r
    random_directions: float  # random r-subspaces
    factor: float  # median of ‖ΔW‖_F / ‖UᵀWV‖_F


def module_key(name: str) -> tuple[int, str]:
    """``"bert.encoder.layer.3.attention.self.value"`` -> ``(3, "value")`` (any prefix)."""
    found = re.search(r"layer\.(\d+)\..*?(\w+)$", name)
    if found is None:
        raise KeyError(f"module {name!r}: expected a name like '...layer.<i>....<type>'")
    return int(found.group(1)), found.group(2)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


# ---------------------------------------------------------------- similarity (pure functions)


def similarity_rows(
    first: Mapping[str, Tensor], second: Mapping[str, Tensor], *, factor: str
) -> tuple[ModuleSimilarity, ...]:
    """φ(i, j) (Hu et al. 2021, Eq. 4) for every module of ``first``, in (layer, type) order.

    ``first``/``second`` map module names to ``A`` factors ``(r, in)`` (``factor`` "A" or "dA")
    or ``B`` factors ``(out, r)`` (``factor`` "B"); modules are matched by (layer, type).
    """
    side = "B" if factor == "B" else "A"
    by_key = {module_key(name): x for name, x in second.items()}
    rows = []
    for name in sorted(first, key=module_key):
        key = module_key(name)
        if key not in by_key:
            raise KeyError(f"module {name!r} has no counterpart (layer, type) {key} in second")
        phi = subspace_similarity(first[name], by_key[key], factor=side)  # (r1, r2)
        dim = first[name].shape[1] if side == "A" else first[name].shape[0]
        rows.append(ModuleSimilarity(f"layer.{key[0]}.{key[1]}", *phi.shape, int(dim), phi))
    return tuple(rows)


def random_grid_median(rank1: int, rank2: int, dim: int) -> float:
    """Median over ``i ≤ rank1, j ≤ rank2`` of ``E φ(i, j) = max(i, j)/dim`` (random subspaces)."""
    i = torch.arange(1, rank1 + 1, dtype=torch.float64)[:, None]  # (r1, 1)
    j = torch.arange(1, rank2 + 1, dtype=torch.float64)[None, :]  # (1, r2)
    return float(torch.maximum(i, j).flatten().median()) / dim


def summarize_similarity(
    rows: Sequence[ModuleSimilarity], *, comparison: str, factor: str
) -> tuple[TypeSimilarity, ...]:
    """Per matrix type: φ(1, 1) per layer, the count above :data:`SHARED`, grid medians."""
    out = []
    for kind in sorted({module_key(r.module)[1] for r in rows}):
        mine = [r for r in rows if module_key(r.module)[1] == kind]
        top = tuple(float(r.phi[0, 0]) for r in mine)
        out.append(
            TypeSimilarity(
                comparison=comparison,
                factor=factor,
                kind=kind,
                modules=len(mine),
                top_phi=top,
                shared=sum(t > SHARED for t in top),
                grid_median=_median([float(r.phi.flatten().median()) for r in mine]),
                random_median=_median([random_grid_median(r.rank1, r.rank2, r.dim) for r in mine]),
            )
        )
    return tuple(out)


def init_overlap(small: Mapping[str, Tensor], large: Mapping[str, Tensor]) -> list[str]:
    """Modules whose ``small`` initial A equals the first rows of ``large``'s (same seed)."""
    by_key = {module_key(n): x for n, x in large.items()}
    equal = []
    for name, a in sorted(small.items(), key=lambda item: module_key(item[0])):
        b = by_key[module_key(name)][: a.shape[0]]  # (r_small, in): the leading rows
        if torch.equal(a, b):
            equal.append("layer.{}.{}".format(*module_key(name)))
    return equal


# ------------------------------------------------------------- amplification (pure function)


def summarize_amplification(
    rows: Sequence[ModuleAmplification], *, r: int
) -> tuple[TypeAmplification, ...]:
    """Medians over the layers of each matrix type of the Table 7 norms (one adapter)."""
    out = []
    for kind in sorted({module_key(row.module)[1] for row in rows}):
        amps = [row.amplification for row in rows if module_key(row.module)[1] == kind]
        out.append(
            TypeAmplification(
                r=r,
                kind=kind,
                delta_norm=_median([a.delta_norm for a in amps]),
                delta_directions=_median([a.delta_directions for a in amps]),
                weight_directions=_median([a.weight_directions for a in amps]),
                random_directions=_median([a.random_directions for a in amps]),
                factor=_median([a.factor for a in amps]),
            )
        )
    return tuple(out)


# ------------------------------------------------------------------ claims (explicit rules)


def _find(sims: Sequence[TypeSimilarity], comparison: str, factor: str) -> list[TypeSimilarity]:
    return [s for s in sims if s.comparison == comparison and s.factor == factor]


def similarity_claim(sims: Sequence[TypeSimilarity], *, factor: str) -> str:
    """Rule: the top direction is "shared" for a type when φ(1, 1) > 0.5 in more than half its
    layers (the paper: one direction with φ > 0.5 between r = 8 and r = 64, Sec. 7.2)."""
    parts = []
    for s in _find(sims, "r8 vs r64", factor):
        verdict = "shared" if 2 * s.shared > s.modules else "not shared"
        parts.append(
            f"{s.kind}: {verdict} (φ(1,1) > {SHARED} in {s.shared} of {s.modules} layers, "
            f"median {_median(s.top_phi):.2f})"
        )
    label = {"A": "A (raw)", "dA": "ΔA = A − A_init", "B": "B"}[factor]
    return f"Top direction, r = 8 vs r = 64, {label}: " + "; ".join(parts) + "."


def seed_claim(sims: Sequence[TypeSimilarity]) -> str:
    """Rule (Fig. 4): across seeds the top directions are "above random" for a type when its
    grid median of φ is over 3× the random expectation; the paper finds ΔW_q sharing more
    directions than ΔW_v, checked as query's grid median > value's."""
    rows = {s.kind: s for s in _find(sims, "seed 0 vs seed 1 (r8)", "A")}
    parts = [
        f"{k}: median φ {s.grid_median:.3f} vs random {s.random_median:.3f} "
        f"({'above' if s.grid_median > 3 * s.random_median else 'not clearly above'} random), "
        f"φ(1,1) median {_median(s.top_phi):.2f}"
        for k, s in rows.items()
    ]
    text = "Seed 0 vs seed 1 at r = 8 (A): " + "; ".join(parts)
    if "query" in rows and "value" in rows:
        more = rows["query"].grid_median > rows["value"].grid_median
        text += (
            "; query shares more than value, as in the paper"
            if more
            else "; query does not share more than value (the paper finds it does)"
        )
    return text + "."


def amplification_claim(amps: Sequence[TypeAmplification]) -> str:
    """Rule: "larger at small r" when the median factor at the smallest r exceeds the one at the
    largest r for every type; ΔW's directions are "above random" when ‖UᵀWV‖ on them is over 2×
    the random-subspace value (the paper: 0.32 vs 0.02 at r = 4)."""
    parts = []
    for kind in sorted({a.kind for a in amps}):
        mine = sorted((a for a in amps if a.kind == kind), key=lambda a: a.r)
        small, large = mine[0], mine[-1]
        trend = "larger at small r" if small.factor > large.factor else "NOT larger at small r"
        ratio = small.delta_directions / small.random_directions
        above = "above" if ratio > 2 else "barely above" if ratio > 1 else "not above"
        factors = ", ".join(f"r={a.r}: {a.factor:.3g}" for a in mine)
        parts.append(
            f"{kind}: {trend} ({factors}); at r = {small.r} ΔW's directions of W are {above} "
            f"random ({ratio:.2f}×)"
        )
    paper = ", ".join(f"r={r}: {f}" for r, f in PAPER_AMPLIFICATION.items())
    return "Amplification factor: " + "; ".join(parts) + f" (paper, GPT-3 ΔW_q: {paper})."


def budget_claim(rows: Sequence[Mapping[str, Any]], *, dev_size: int) -> str:
    """Rule: the winner is the set with the best dev accuracy; it "agrees" with the paper when it
    is {q,v} or {q,k,v,o}; a lead under two standard errors of a difference of two accuracies on
    ``dev_size`` examples (√(2p(1−p)/n)) is called within noise."""
    done = [r for r in rows if r.get("accuracy") is not None]
    if len(done) < 2:
        return "Budget table: fewer than two sets finished; no comparison."
    ranked = sorted(done, key=lambda r: r["accuracy"], reverse=True)
    best, second = ranked[0], ranked[1]
    p = best["accuracy"]
    noise = 2 * math.sqrt(2 * p * (1 - p) / dev_size)
    lead = p - second["accuracy"]
    name = "{" + ",".join(best["types"]) + "}"
    agrees = tuple(best["types"]) in PAPER_BUDGET_WINNERS
    verdict = "agrees with" if agrees else "differs from"
    margin = "within noise" if lead < noise else "beyond two standard errors"
    pending = ["{" + ",".join(r["types"]) + "}" for r in rows if r.get("accuracy") is None]
    return (
        f"Budget table: {name} wins ({100 * p:.2f}%), {verdict} the paper's winners "
        f"{{q,v}} / {{q,k,v,o}}; its lead over the runner-up "
        f"{{{','.join(second['types'])}}} is {100 * lead:.2f} points ({margin}: 2 SE = "
        f"{100 * noise:.2f})" + (f"; not run yet: {', '.join(pending)}." if pending else ".")
    )


def claims(
    sims: Sequence[TypeSimilarity],
    amps: Sequence[TypeAmplification],
    budget: Sequence[Mapping[str, Any]],
    *,
    dev_size: int,
) -> list[str]:
    """The "compared with the paper" list, each line from one rule above."""
    out = [
        similarity_claim(sims, factor=f) for f in ("A", "dA", "B") if _find(sims, "r8 vs r64", f)
    ]
    if _find(sims, "seed 0 vs seed 1 (r8)", "A"):
        out.append(seed_claim(sims))
    if amps:
        out.append(amplification_claim(amps))
    out.append(budget_claim(budget, dev_size=dev_size))
    out.append("One training seed per row (two for r = 8): read differences as indicative.")
    return out


# ---------------------------------------------------------------------------- files and runs


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so a reader sees the old file or the new one (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


# The command-line option behind each stored setting a finished run is checked against (the
# others are fixed by this script: a mismatch there means the runs come from another version).
OPTION_OF = {
    "max_steps": "--max-steps",
    "batch_size": "--quick",
    "data": "--data-dir (or --quick)",
    "eval_data": "--data-dir (or --quick)",
    "threads": "--threads",
}


def run_options(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """The TrainConfig fields of one run (YAML names), without ``output`` and ``resume``."""
    return {
        "data": str(settings.train),
        "eval_data": str(settings.dev),
        "r": spec.r,
        "alpha": spec.alpha,
        "targets": list(spec.targets),
        "dropout": settings.dropout,
        "max_steps": settings.max_steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "max_length": settings.max_length,
        "seed": spec.seed,
        "save_every": settings.save_every,
    }


def _same_setting(key: str, stored: Any, wanted: Any) -> bool:
    if key in ("data", "eval_data") and isinstance(stored, str):  # recorded absolute
        return Path(stored).expanduser().resolve() == Path(wanted).expanduser().resolve()
    return stored == wanted


def check_finished(out: Path, wanted: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """A finished run is reused only if it ran with this invocation's settings: its
    ``config.yaml`` (the engine's record of its options) and the torch threads stored in its
    ``result.json`` (its seconds depend on them). Refuses a mismatch, naming the option."""
    import yaml

    if "threads" not in record:  # made before the field existed: unknown, so not reused blindly
        raise SystemExit(
            f"--threads: {out / RESULT_FILE} does not record the torch threads its run trained "
            f"with; delete {out} to run it again, or, if you know it ran with "
            f'{wanted["threads"]}, add "threads": {wanted["threads"]} to that file'
        )
    stored = {**yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")),
              "threads": record["threads"]}  # fmt: skip
    for key, value in wanted.items():
        if key == "save_every":  # checkpoint cadence: the trained adapter is the same
            continue
        if not _same_setting(key, stored.get(key), value):
            option = OPTION_OF.get(key, f"{key} (fixed by this script)")
            raise SystemExit(
                f"{option}: the finished run {out} has {key} = {stored.get(key)!r}, this "
                f"invocation asks for {value!r}; use another --work directory or the run's "
                "settings"
            )


def train_run(
    spec: RunSpec, settings: Settings, *, train_missing: bool = True
) -> dict[str, Any] | None:
    """One engine run (:func:`rankwise.train.train`), skipped when its ``result.json`` exists
    and it ran with these settings (:func:`check_finished`, else the study stops); an
    interrupted run continues from its latest checkpoint (bit-identical, see the engine, which
    also refuses a resume with other options). With ``train_missing=False`` a run without
    ``result.json`` is not trained: ``None``."""
    from rankwise.train import train
    from rankwise.train.config import from_mapping

    out = settings.work / spec.name
    done = out / RESULT_FILE
    options = run_options(spec, settings)
    threads = torch.get_num_threads()
    if done.is_file():
        record = json.loads(done.read_text(encoding="utf-8"))
        check_finished(out, {**options, "threads": threads}, record)
        print(f"[study] {spec.name}: done before with these settings, skipped", flush=True)
        return record
    if not train_missing:
        return None
    checkpoints = out / "checkpoints"
    resume = checkpoints.is_dir() and any(checkpoints.iterdir())
    if out.exists() and not resume:
        shutil.rmtree(out)  # started but never checkpointed: start again
    config = from_mapping({**options, "output": str(out), "resume": resume})
    print(f"[study] {spec.name}: r={spec.r} alpha={spec.alpha} seed={spec.seed} "
          f"targets={','.join(spec.targets)} resume={resume}", flush=True)  # fmt: skip
    result = train(config, echo=lambda line: print(f"[{spec.name}] {line}", flush=True))
    record = {
        **spec._asdict(),
        "targets": list(spec.targets),
        "scaling": spec.alpha / spec.r,
        "steps": result.steps,
        "examples": result.steps * settings.batch_size,
        "accuracy_before": None if result.before is None else result.before.accuracy,
        "accuracy": None if result.after is None else result.after.accuracy,
        "loss": None if result.after is None else result.after.loss,
        "trainable": result.trainable,
        "examples_per_s": result.examples_per_s,
        "seconds": result.seconds,
        "threads": threads,  # checked when the run is reused (its seconds depend on it)
        "adapter": str(result.saved),
    }
    write_atomic(done, json.dumps(record, indent=2))
    return record


def initial_A(spec: RunSpec) -> dict[str, Tensor]:
    """The run's initial ``A`` factors, ``{module: (r, in)}``: the engine's injection replayed
    (same targets, r, and generator seeded with the run's seed; only the factors draw from it)."""
    from rankwise.lora import LoraConfig, inject
    from rankwise.train.models import load_base_model

    model = load_base_model(None)
    inject(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets)),
           generator=spec.seed)  # fmt: skip
    return {
        name: module.lora_A.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(getattr(module, "lora_A", None), torch.nn.Linear)
    }


def factors_of(adapter: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``({module: A (r, in)}, {module: s·B (out, r)})`` of a trained adapter directory."""
    from rankwise.analysis import read_factors

    factors = read_factors(adapter)
    return {m: f.A for m, f in factors.items()}, {m: f.B for m, f in factors.items()}


def delta_A(trained: Mapping[str, Tensor], init: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``A_trained − A_init`` per module, matched by (layer, type); inputs untouched."""
    by_key = {module_key(n): a for n, a in init.items()}
    return {n: a.double() - by_key[module_key(n)].double() for n, a in trained.items()}


def relative_change(trained: Mapping[str, Tensor], init: Mapping[str, Tensor]) -> float:
    """Median ``‖A − A_init‖_F / ‖A_init‖_F``: small when ``init`` is really the run's start."""
    delta = delta_A(trained, init)
    by_key = {module_key(n): a for n, a in init.items()}
    return _median(
        [float(d.norm() / by_key[module_key(n)].double().norm()) for n, d in delta.items()]
    )


# ------------------------------------------------------------------------------- the analyses


def similarity_study(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """All φ comparisons; the rows (for the heatmaps), summaries and the init check."""
    specs = {s.name: s for s in STUDY_RUNS}
    A8, B8 = factors_of(runs["r8-s0"]["adapter"])
    A64, B64 = factors_of(runs["r64-s0"]["adapter"])
    A8s1, B8s1 = factors_of(runs["r8-s1"]["adapter"])
    init8, init64 = initial_A(specs["r8-s0"]), initial_A(specs["r64-s0"])
    rows = {
        ("r8 vs r64", "A"): similarity_rows(A8, A64, factor="A"),
        ("r8 vs r64", "dA"): similarity_rows(delta_A(A8, init8), delta_A(A64, init64), factor="dA"),
        ("r8 vs r64", "B"): similarity_rows(B8, B64, factor="B"),
        ("seed 0 vs seed 1 (r8)", "A"): similarity_rows(A8, A8s1, factor="A"),
        ("seed 0 vs seed 1 (r8)", "B"): similarity_rows(B8, B8s1, factor="B"),
    }
    summaries = [
        s for (c, f), r in rows.items() for s in summarize_similarity(r, comparison=c, factor=f)
    ]
    check = {
        "modules_with_equal_initial_A_r8_r64": init_overlap(init8, init64),
        "median_relative_change_of_A_r8": relative_change(A8, init8),
        "median_relative_change_of_A_r64": relative_change(A64, init64),
    }
    return {"rows": rows, "summaries": summaries, "init_check": check}


def amplification_study(runs: Mapping[str, Mapping[str, Any]]) -> list[TypeAmplification]:
    """Table 7 at r = 4, 8, 64 (seed 0) on the base model's weights."""
    from rankwise.analysis import adapter_amplification
    from rankwise.train.models import load_base_model

    model = load_base_model(None)
    out = []
    for name in ("r4-s0", "r8-s0", "r64-s0"):
        rows = adapter_amplification(model, runs[name]["adapter"], generator=0)
        out.extend(summarize_amplification(rows, r=runs[name]["r"]))
    return out


def budget_study(
    settings: Settings, *, train_missing: bool = True
) -> tuple[list[BudgetPlan], list[dict[str, Any]]]:
    """``rankwise analyze budget --rank 8``: plans from :func:`budget_plan`, one run per set
    with the CLI's α = 2r (scaling 2) and seed 0; an untrained set's row has accuracy None."""
    from rankwise.analysis import budget_plan
    from rankwise.train.models import load_base_model

    plans = list(budget_plan(load_base_model(None), rank=8, sets=PAPER_SETS))
    rows = []
    for plan in plans:
        name = "budget-" + "".join(plan.types)
        spec = RunSpec(name, plan.rank, 2.0 * plan.rank, 0, plan.targets)
        record = train_run(spec, settings, train_missing=train_missing)
        if record is None:
            record = {**spec._asdict(), "targets": list(spec.targets), "accuracy": None}
        rows.append({**record, "types": list(plan.types), "layers": plan.layers,
                     "params": plan.params})  # fmt: skip
    return plans, rows


# ------------------------------------------------------------------------- figures and tables


class _Accuracy(NamedTuple):
    accuracy: float | None  # what plot_budget reads from an engine result


def write_figures(
    rows: Mapping[tuple[str, str], Sequence[ModuleSimilarity]],
    plans: Sequence[BudgetPlan],
    budget: Sequence[Mapping[str, Any]],
    results: Path,
) -> list[str]:
    """Heatmaps of layer :data:`LAYER` (Figs 3–4) and the budget bars, as ``lora_study_*.png``."""
    from rankwise.analysis.plots import plot_budget, plot_similarity

    wanted = {
        ("r8 vs r64", "A"): ("r8_r64_A", ("A, seed 0", "A, seed 0")),
        ("r8 vs r64", "dA"): ("r8_r64_dA", ("A - A_init, seed 0", "A - A_init, seed 0")),
        ("seed 0 vs seed 1 (r8)", "A"): ("seeds_r8_A", ("A, seed 0", "A, seed 1")),
    }
    written = []
    with tempfile.TemporaryDirectory(dir=results, prefix=".lora_study_plots.") as tmp:
        for key, (stem, labels) in wanted.items():
            layer_rows = [r for r in rows.get(key, ()) if module_key(r.module)[0] == LAYER]
            for path in plot_similarity(layer_rows, tmp, labels=labels, zoom=8):
                kind = path.stem.rsplit(".", 1)[-1]
                final = results / f"lora_study_{stem}_layer{LAYER}_{kind}.png"
                os.replace(path, final)
                written.append(final.name)
        finished = [(p, r) for p, r in zip(plans, budget) if r.get("accuracy") is not None]
        if finished:
            accuracies = [_Accuracy(r["accuracy"]) for _, r in finished]
            for path in plot_budget([p for p, _ in finished], accuracies, tmp):
                final = results / "lora_study_budget.png"
                os.replace(path, final)
                written.append(final.name)
    return written


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    right = ["---:" if i else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(right) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def runs_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    body = [
        [
            r["name"],
            str(r["r"]),
            f"{r['alpha']:g}",
            f"{r['scaling']:g}",
            str(r["seed"]),
            f"{r['examples']:,}",
            _pct(r["accuracy_before"]),
            _pct(r["accuracy"]),
            f"{r['seconds']:.0f}",
        ]  # fmt: skip
        for r in runs
    ]
    headers = ["run", "r", "α", "α/r", "seed", "train examples", "dev acc before (%)",
               "dev acc (%)", "seconds"]  # fmt: skip
    return _table(headers, body)


def similarity_table(sims: Sequence[Mapping[str, Any]]) -> list[str]:
    label = {"A": "A", "dA": "ΔA = A − A_init", "B": "B"}
    body = [
        [
            s["comparison"],
            label[s["factor"]],
            s["kind"],
            " ".join(f"{t:.2f}" for t in s["top_phi"]),
            f"{statistics.median(s['top_phi']):.2f}",
            f"{s['shared']}/{s['modules']}",
            f"{s['grid_median']:.3f}",
            f"{s['random_median']:.3f}",
        ]  # fmt: skip
        for s in sims
    ]
    headers = ["comparison", "factor", "type", "φ(1,1) by layer 0–5", "median φ(1,1)",
               f"φ(1,1) > {SHARED}", "median φ(i,j) over the grid", "random expectation"]  # fmt: skip
    return _table(headers, body)


def amplification_table(amps: Sequence[Mapping[str, Any]]) -> list[str]:
    body = [
        [
            str(a["r"]),
            a["kind"],
            f"{a['delta_norm']:.3g}",
            f"{a['delta_directions']:.3g}",
            f"{a['weight_directions']:.3g}",
            f"{a['random_directions']:.3g}",
            f"{a['factor']:.3g}",
        ]  # fmt: skip
        for a in amps
    ]
    headers = ["r", "type", "‖ΔW‖_F", "‖UᵀWV‖_F, ΔW's top-r", "W's top-r", "random",
               "factor ‖ΔW‖/‖UᵀWV‖"]  # fmt: skip
    return _table(headers, body)


def budget_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    body = [
        [
            "{" + ",".join(r["types"]) + "}",
            str(r["r"]),
            str(r["layers"]),
            f"{r['params']:,}",
            _pct(r.get("accuracy")),
        ]  # fmt: skip
        for r in rows
    ]
    return _table(["weight types", "rank", "layers", "LoRA params", "dev acc (%)"], body)


def init_note(check: Mapping[str, Any]) -> str:
    """Rule: A "stays near its initialization" when ‖A − A_init‖/‖A_init‖ < 0.5 (both ranks);
    then the raw-A φ mostly compares the random initial A, and ΔA is the learned part."""
    moved = max(check["median_relative_change_of_A_r8"], check["median_relative_change_of_A_r64"])
    if moved < 0.5:
        return (
            "A stays near its random initialization, so φ on the raw A mostly compares the "
            "initializations; ΔA = A − A_init is the learned part (the fair comparison)."
        )
    return (
        "A moved well away from its random initialization; the ΔA rows compare the learned "
        "part alone, with the shared initial rows (if any) cancelled."
    )


def markdown(report: Mapping[str, Any]) -> str:
    """The study as markdown, from the JSON report alone."""
    s = report["settings"]
    check = report["init_check"]
    lines = [
        "# LoRA paper study on SST-2 (MiniLM)",
        "",
        f"`{report['command']}` — {report['date']}. LoRA on {', '.join(TARGETS)} + classifier, "
        f"{s['max_steps']} steps × batch {s['batch_size']} = {s['max_steps'] * s['batch_size']:,} "
        f"training examples, lr {s['lr']:g}, max length {s['max_length']}, dropout "
        f"{s['dropout']:g}, α = {ALPHA:g} fixed in r (Hu et al. 2021 Sec. 4.1); dev = "
        f"{report['dev_size']} sentences.",
        "",
        "## Runs",
        "",
        *runs_table(report["runs"]),
        "",
        "## Subspace similarity (Sec. 7.2, Figs 3–4)",
        "",
        f"Initial A of r = 8 equal to the first 8 rows of r = 64's (seed 0) in: "
        f"{', '.join(check['modules_with_equal_initial_A_r8_r64']) or 'no module'}; median "
        f"‖A − A_init‖/‖A_init‖ after training: r = 8 {check['median_relative_change_of_A_r8']:.3f}, "
        f"r = 64 {check['median_relative_change_of_A_r64']:.3f}. {init_note(check)}",
        "",
        *similarity_table(report["similarity"]),
        "",
        "## Amplification (Sec. 7.3, Table 7), medians over the 6 layers",
        "",
        *amplification_table(report["amplification"]),
        "",
        "## Equal budget (Sec. 7.1, Table 5): `rankwise analyze budget --rank 8`, α = 2r "
        f"({sum(r.get('accuracy') is not None for r in report['budget'])} of "
        f"{len(report['budget'])} sets finished)",
        "",
        *budget_table(report["budget"]),
        "",
        "## Compared with the paper",
        "",
        *[f"* {c}" for c in report["claims"]],
        "",
        "Figures: " + ", ".join(f"`{f}`" for f in report["figures"]) + ".",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ command


def quick_data(source: Path, work: Path, *, train_rows: int, dev_rows: int) -> tuple[Path, Path]:
    """The first rows of SST-2's files, in the work directory (smoke tests only)."""
    paths = []
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        with open(source / name, encoding="utf-8") as handle:
            head = [next(handle) for _ in range(rows + 1)]  # header + rows
        write_atomic(work / "quick_data" / name, "".join(head))
        paths.append(work / "quick_data" / name)
    return paths[0], paths[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="run directories (resumable)")
    p.add_argument("--data-dir", type=Path, default=SST2, help=f"SST-2 directory ({SST2})")
    p.add_argument("--results", type=Path, help=f"output directory ({RESULTS}; --quick: --work)")
    p.add_argument("--max-steps", type=int, default=1000, help="steps per run (1000 = 16,000 ex.)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--skip-budget", action="store_true", help="leave out the 7 budget runs")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the finished runs in --work (unfinished budget sets pending)",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke test: 4 steps, 256 examples")
    args = p.parse_args(argv)
    if args.max_steps < 1:
        p.error(f"--max-steps must be >= 1; found {args.max_steps}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    train, dev = args.data_dir / "train.tsv", args.data_dir / "dev.tsv"
    if not train.is_file() or not dev.is_file():
        sys.exit(f"SST-2 not found: expected {train} and {dev} (see /work/shared/DESIGN.md §5)")
    if args.quick:
        train, dev = quick_data(args.data_dir, args.work, train_rows=256, dev_rows=64)
    return Settings(
        train=train, dev=dev, work=args.work, max_steps=4 if args.quick else args.max_steps,
        batch_size=4 if args.quick else 16, lr=5e-4, max_length=64, dropout=0.1,
        save_every=0 if args.quick else 200,
    )  # fmt: skip


def _environment() -> dict[str, Any]:
    import platform

    import transformers

    import rankwise

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "rankwise": rankwise.__version__,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from(args)
    results = args.results or (args.work if args.quick else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_missing = not args.report_only
    runs = {
        spec.name: train_run(spec, settings, train_missing=train_missing) for spec in STUDY_RUNS
    }
    missing = [name for name, record in runs.items() if record is None]
    if missing:
        sys.exit(f"--report-only: runs {missing} have no {RESULT_FILE} in {settings.work}")
    sim = similarity_study(runs)
    amps = amplification_study(runs)
    plans, budget = (
        ([], []) if args.skip_budget else budget_study(settings, train_missing=train_missing)
    )
    dev_size = sum(1 for _ in open(settings.dev, encoding="utf-8")) - 1
    command = "python benchmarks/lora_study_sst2.py " + " ".join(argv or sys.argv[1:])
    report = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in settings._asdict().items()
        },  # fmt: skip
        "alpha_rule": "fixed alpha = 16 for the r = 4, 8, 64 runs (Hu et al. 2021 Sec. 4.1); "
        "budget runs use rankwise analyze budget's alpha = 2r",
        "dev_size": dev_size,
        "representative_layer": LAYER,
        "runs": list(runs.values()),
        "init_check": sim["init_check"],
        "similarity": [s._asdict() for s in sim["summaries"]],
        "amplification": [a._asdict() for a in amps],
        "budget": budget,
        "claims": claims(sim["summaries"], amps, budget, dev_size=dev_size),
        "figures": write_figures(sim["rows"], plans, budget, results),
        "environment": _environment(),
        "analysis_seconds": time.perf_counter() - started,
    }
    write_atomic(results / "lora_study_sst2.json", json.dumps(report, indent=2, default=list))
    write_atomic(results / "lora_study_sst2.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
