"""benchmarks/merge.py: both libraries merge the same factors, and the report shows it."""

from __future__ import annotations

import pytest
import torch


def test_merge_benchmark_times_the_same_merge_in_both(bench) -> None:
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    merge_bench = bench("merge")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                      vocab_size=100, num_attention_heads=4)  # fmt: skip
    base = transformers.LlamaForCausalLM(config).eval()
    result = merge_bench.measure(base, merge_bench.LLAMA_TARGETS, repeats=1)
    assert result["layers"] == 14
    assert result["max_abs_weight_difference"] < 1e-6  # the same s·B A merged by both
    for what in ("merge", "unmerge"):
        assert result[what]["rankwise_ms"] > 0 and result[what]["peft_ms"] > 0
    text = merge_bench.markdown(
        {
            "setup": {"threads": 1, "repeats": 1, "cpu": "x", "torch": "t", "peft": "p"},
            "models": {"tiny": result},
        }  # fmt: skip
    )
    assert text.count("| tiny |") == 2 and "rankwise ÷ PEFT (paired)" in text
