"""Numerics of merge / unmerge in float32, float16 and bfloat16 (issue 8).

rankwise merges ``W <- round(float32(W0) + s · B A)`` (factors of low-precision models are
kept in float32, ``rankwise.lora.layers.adapter_dtype``) and unmerges by subtracting the same
float32 product. Measured here for a ``d x d`` ``nn.Linear`` with LoRA rank ``r`` and factors
scaled so that ``‖s·B A‖_F / ‖W0‖_F = rho`` (a small fine-tuning update, 1e-3, or a large one,
1e-1), medians over ``--repeats`` seeds:

* ``merge_error``: ``‖W_merged - (W0 + s·B A)_float64‖ / ‖s·B A‖`` — the part of the update lost
  to rounding (float32 ~1e-7; low precision loses more the smaller ``rho`` is, because the
  update is rounded against the size of ``W0``'s entries);
* the same for the peer, PEFT (``peft_*``): ``merge_adapter`` / ``unmerge_adapter`` of a
  ``get_peft_model`` on a copy of the same ``W0`` with the same factors copied in (PEFT keeps a
  low-precision model's factors in float32 too: ``autocast_adapter_dtype=True``, its default);
* for scale, a *naive* merge computed in the weight's dtype (``W0 + (s·B).to(dtype) @
  A.to(dtype)``), built by this script as a careless implementation would (not a library);
* ``round_trip_drift`` after 1 and 10 merge/unmerge cycles: ``‖W_k - W0‖ / ‖W0‖`` (rankwise and
  PEFT);
* ``forward_rel``: ``‖y_merged - y_unmerged‖ / ‖y_unmerged‖`` on random inputs.

Run: ``python benchmarks/numerics.py`` (writes benchmarks/results/numerics.json and .md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.io.files import atomic_write_bytes
from rankwise.lora import LoraConfig, inject, lora_layers, merge, unmerge

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def alpha_for(r: int) -> float:
    """The LoRA alpha used at rank ``r`` (``2r``: scaling ``alpha / r = 2``, not 1, so a
    reference that forgot the scaling would show)."""
    return 2.0 * r


def _setup(d: int, r: int, rho: float, dtype: torch.dtype, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
    config = LoraConfig(r=r, lora_alpha=alpha_for(r), target_modules=["0"])
    model = inject(nn.Sequential(base.to(dtype)), config)
    _, layer = next(lora_layers(model))
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(r, d, generator=g))
        layer.lora_B.weight.copy_(torch.randn(d, r, generator=g))
        scaling = alpha_for(r) / r
        delta = scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
        factor = (rho * base.weight.double().norm() / delta.norm()).sqrt()
        layer.lora_A.weight.mul_(float(factor))
        layer.lora_B.weight.mul_(float(factor))
    return model


def _drift(W: torch.Tensor, W0: torch.Tensor) -> float:
    return float((W.detach().double() - W0.double()).norm() / W0.double().norm())


def peft_row(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, r: int) -> dict[str, Any]:
    """PEFT's merge of the same ``W0`` (a copy, in its dtype) with the same factors: the merged
    weight (float64) and its drift after 1 and 10 ``merge_adapter``/``unmerge_adapter`` cycles."""
    import peft

    base = nn.Linear(W0.shape[1], W0.shape[0], bias=False, dtype=W0.dtype)
    with torch.no_grad():
        base.weight.copy_(W0)
    config = peft.LoraConfig(r=r, lora_alpha=alpha_for(r), target_modules=["0"])
    model = peft.get_peft_model(nn.Sequential(base), config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    row: dict[str, Any] = {}
    for cycle in range(1, 11):
        model.merge_adapter()
        if cycle == 1:
            row["merged"] = layer.base_layer.weight.detach().double().clone()
        model.unmerge_adapter()
        if cycle in (1, 10):
            row[f"peft_round_trip_drift_{cycle}"] = _drift(layer.base_layer.weight, W0)
    return row


def measure(d: int, r: int, rho: float, dtype: torch.dtype, seed: int) -> dict[str, float]:
    model = _setup(d, r, rho, dtype, seed)
    _, layer = next(lora_layers(model))
    W0 = layer.base_weight.detach().clone()
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    # The float64 reference of the update, independent of rankwise's own delta_weight():
    # s = alpha / r from the configuration, the factors' product in float64.
    scaling = alpha_for(r) / r
    delta = scaling * (B.double() @ A.double())
    exact = W0.double() + delta
    naive = W0 + (B * scaling).to(dtype) @ A.to(dtype)  # a careless merge: all in `dtype`
    peft = peft_row(W0, A, B, r)  # before rankwise merges: W0, A and B as set up
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        y = model(x).double()
        merge(model)
        merged = layer.base_weight.detach().double()
        y_merged = model(x).double()
    row = {
        "merge_error": float((merged - exact).norm() / delta.norm()),
        "peft_merge_error": float((peft.pop("merged") - exact).norm() / delta.norm()),
        "naive_merge_error": float((naive.double() - exact).norm() / delta.norm()),
        **peft,
        "forward_rel": float((y_merged - y).norm() / y.norm()),
    }
    unmerge(model)
    for cycles in range(1, 11):
        if cycles > 1:
            merge(model)
            unmerge(model)
        if cycles in (1, 10):
            row[f"round_trip_drift_{cycles}"] = _drift(layer.base_weight, W0)
    return row


def run(dims: list[int], ranks: list[int], rhos: list[float], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, dtype in DTYPES.items():
        for d in dims:
            for r in ranks:
                for rho in rhos:
                    samples = [measure(d, r, rho, dtype, seed) for seed in range(repeats)]
                    row = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
                    rows.append({"dtype": name, "d": d, "r": r, "rho": rho, **row})
                    print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Merge / unmerge numerics",
        "",
        f"`{command}` — medians over seeds. `merge err` = ‖W_merged − (W0 + sBA)_f64‖ / ‖sBA‖ "
        f"for rankwise (merges through float32) and PEFT {peft_version()} (`merge_adapter` on "
        "the same W0 and factors); `naive` = a merge computed in the weight's dtype by this "
        "script (a careless implementation, not a library); the reference is computed "
        "independently of both as s·B.double() @ A.double() with s = alpha / r = 2 from the "
        "configuration; `PEFT ÷ rankwise` = the ratio of their merge errors; drift = ‖W_k − W0‖ "
        "/ ‖W0‖ after k merge+unmerge cycles; forward rel = rankwise's merged vs unmerged output.",
        "",
        "| dtype | d | r | ‖sBA‖/‖W0‖ | merge err | PEFT merge err | PEFT ÷ rankwise | naive merge err | drift k=1 | drift k=10 | PEFT drift k=1 | PEFT drift k=10 | forward rel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["peft_merge_error"] / max(row["merge_error"], 1e-300)
        lines.append(
            f"| {row['dtype']} | {row['d']} | {row['r']} | {row['rho']:g} | {row['merge_error']:.2e} | "
            f"{row['peft_merge_error']:.2e} | {ratio:.2f} | {row['naive_merge_error']:.2e} | "
            f"{row['round_trip_drift_1']:.2e} | {row['round_trip_drift_10']:.2e} | "
            f"{row['peft_round_trip_drift_1']:.2e} | {row['peft_round_trip_drift_10']:.2e} | "
            f"{row['forward_rel']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def peft_version() -> str:
    import peft

    return peft.__version__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--rhos", type=float, nargs="+", default=[1e-3, 1e-1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = run(args.dims, args.ranks, args.rhos, args.repeats)
    command = "python benchmarks/numerics.py" + (
        "" if args.repeats == 3 else f" --repeats {args.repeats}"
    )
    result = {"rows": rows, "python": platform.python_version(), "torch": torch.__version__,
              "peft": peft_version()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    for name, data in (("numerics.json", text), ("numerics.md", markdown(rows, command))):
        atomic_write_bytes(args.out / name, data.encode("utf-8"))  # temp file + rename
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
