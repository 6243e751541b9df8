"""benchmarks/variants.py's README summary from a synthetic run: both PEFT PiSSA paths."""

from __future__ import annotations


def test_variants_summary_reports_both_peft_pissa_paths(bench) -> None:
    variants = bench("variants")
    ours, exact, full, niter = variants.PISSA_PEERS
    names = list(variants.PISSA_PEERS)
    result = {
        "setup": {"repeats": 11, "init_repeats": 5},
        "ratios": {
            "DoRA train step / LoRA step (rankwise)": 1.05,
            "DoRA train step / LoRA step (peft)": 1.4,
            variants.DORA_EVAL_CACHED: 1.0,
            variants.DORA_EVAL_UNCACHED: 1.2,
            "DoRA eval forward / base (peft)": 1.3,
        },
        "pissa": {
            "layers": 37,
            "median_s": dict(zip(names, (0.2, 1.2, 1.3, 0.25))),
            "paired_ratio_to_rankwise_pissa": dict(zip(names, (1.0, 6.0, 6.5, 0.8))),
            "worst_error_over_optimal": dict(zip(names, (1.005, 1.0, 1.0, 1.02))),
        },
        "lora_ga": {"paired_time_ratio": 1.4, "lora_ga_init_peak_bytes": 115,
                    "lora_train_step_peak_bytes": 100},
    }  # fmt: skip
    text = "\n".join(variants.summary(result))
    assert '| PiSSA: PEFT "pissa" time ÷ rankwise "pissa" (paired) | ≥ 5× | 6.50× |' in text
    assert '"pissa_niter_4" time ÷ rankwise "pissa" (paired) | — | 0.80× |' in text
    assert "`pissa_niter_4` 1.0200" in text and "`pissa` 1.0050" in text
    assert "| 1.40, 1.15 |" in text
