"""benchmarks/finetune.py without training: the generated report (paired ratios, token
counts, conditions text) from synthetic runs, and the token counter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def finetune(bench) -> ModuleType:
    return bench("finetune")


def test_finetune_report_is_generated_with_paired_ratios_and_tokens(
    finetune: ModuleType, tmp_path: Path
) -> None:
    M = finetune.Measured
    runs = {
        finetune.RANKWISE: [M(100.0, 1000.0, 5000, 4800, 10.0, 19.0, 0.8, 20.0),
                            M(120.0, 1200.0, 5000, 4800, 8.0, 15.2, 0.8, 18.0),
                            M(90.0, 900.0, 5000, 4800, 11.0, 20.9, 0.8, 21.0)],
        finetune.GROUPED: [M(50.0, 600.0, 6000, 4800, 20.0, 38.0, 0.79, 25.0),
                           M(100.0, 1200.0, 6000, 4800, 10.0, 19.0, 0.79, 15.0),
                           M(60.0, 720.0, 6000, 4800, 16.0, 30.4, 0.79, 22.0)],
    }  # fmt: skip
    args = argparse.Namespace(
        train_size=6400, repeats=3, batch_size=32, lr=5e-4, r=8, alpha=16.0, max_length=64,
        method="lora", seed=0, default_sampler_peer=False, out=str(tmp_path / "finetune"),
    )  # fmt: skip
    finetune.write_results(args, runs, "python benchmarks/finetune.py --x", (1.0, 1.0, 1.0))
    record = json.loads((tmp_path / "finetune.json").read_text(encoding="utf-8"))
    ratios = record["paired_ratios_rankwise_over_peer"][finetune.GROUPED]
    assert ratios["examples_per_s"] == pytest.approx([2.0, 1.2, 1.5])
    assert ratios["median_examples_per_s"] == pytest.approx(1.5)  # paired, not 100/60
    text = (tmp_path / "finetune.md").read_text(encoding="utf-8")
    assert text.startswith("# rankwise finetune vs PEFT + transformers.Trainer")
    assert "examples/s 1.50x** (median of the per-repeat ratios 2.00, 1.20, 1.50)" in text
    assert "| 5,000 | 4,800 |" in text and "| 6,000 | 4,800 |" in text
    assert "Conditions: `python benchmarks/finetune.py --x`" in text
    assert "= 50 batches" in text  # the Trainer's mega-batch at 6400 examples, batch 32


def test_finetune_counter_counts_padding(finetune: ModuleType) -> None:
    counter = finetune._Counter()
    batch = {
        "input_ids": torch.zeros(2, 5),
        "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]),
    }
    assert counter.add(batch) is batch
    assert (counter.padded, counter.real) == (10, 7)
