"""benchmarks/linalg.py's report from a synthetic run: the matched scikit-learn row and a
floor per power-iteration count."""

from __future__ import annotations


def test_linalg_markdown_matched_row_and_floor_per_q(bench) -> None:
    linalg = bench("linalg")
    base = {"spectrum": "1/j", "auto_power_iters": 3, "sklearn_default_n_iter": 7}
    rows = [
        {**base, "method": linalg.AUTO, "seconds": 0.3, "error_over_sigma_k1": 1.003,
         "paired_ratio_to_auto": 1.0, "power_iters": 3, "floor_seconds": 0.24,
         "floor_ratio": 1.25},
        {**base, "method": "rankwise randomized_svd (power_iters=2)", "seconds": 0.22,
         "error_over_sigma_k1": 1.016, "paired_ratio_to_auto": 0.7, "power_iters": 2,
         "floor_seconds": 0.19, "floor_ratio": 1.15},
        {**base, "method": linalg.SK_DEFAULTS, "seconds": 0.66, "error_over_sigma_k1": 1.0,
         "paired_ratio_to_auto": 2.1},
        {**base, "method": "sklearn randomized_svd (matched: n_iter=3, n_oversamples=10, LU)",
         "seconds": 0.4, "error_over_sigma_k1": 1.002, "paired_ratio_to_auto": 1.3},
    ]  # fmt: skip
    report = {
        "machine": "x", "torch": "t", "threads": 1, "repeats": 5, "id_repeats": 5,
        "svd_size": 4096, "svd_rank": 64, "randomized_svd": rows, "id_size": 1, "id_rank": 1,
        "interpolative": [],
    }  # fmt: skip
    text = linalg.markdown(report)
    assert "| 1.15 (q = 2) |" in text and "| 1.25 (q = 3) |" in text
    assert "floor: 6 passes (q = 2) | 0.190" in text and "floor: 8 passes (q = 3) | 0.240" in text
    assert "matched: n_iter=3" in text and "n_iter = 7" in text
