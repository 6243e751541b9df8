"""benchmarks/methods_sst2.py without training: loss windows, aggregation over seeds, the
paper-claim rules, the markdown table, the plot, the run plan and the adapter size count.

The real sweep (an hour of training) is never part of the suite; these tests feed the script's
own aggregation/claims/markdown code synthetic per-run records whose verdicts are known.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "methods_sst2.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("methods_sst2_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple classes need their module registered
    spec.loader.exec_module(module)
    return module


def record(
    bench: ModuleType, row: str, seed: int, *, acc: float, early: float, late: float,
    trainable: int = 1000, method: str | None = None, steps: int = 40,
) -> Any:  # fmt: skip
    curve = [early] * 20 + [late] * (steps - 20)
    return bench.RunRecord(
        row=row, method=method or row, seed=seed, r=8, lr=5e-4, steps=steps, dev_accuracy=acc,
        loss_at={"20": early, "40": late}, window=20, threads=1, trainable=trainable,
        total=10_000,
        examples_per_s=50.0 + seed, seconds_per_epoch=67_349 / (50.0 + seed),
        peak_rss_mib=800.0 + seed, adapter_bytes=4096, saved_dir_bytes=9000, wall_seconds=60.0,
        curve=curve,
    )  # fmt: skip


def synthetic(bench: ModuleType) -> list[Any]:
    """Three seeds per row; the offsets make each claim's verdict known in advance."""
    rows = {
        # row: (accuracies, loss@20s, loss@40s, trainable)
        "lora": ((0.85, 0.86, 0.87), (0.60, 0.62, 0.64), (0.40, 0.42, 0.44), 1000),
        "full": ((0.88, 0.89, 0.90), (0.50, 0.52, 0.54), (0.30, 0.31, 0.32), 67_000),
        "pissa": ((0.85, 0.86, 0.87), (0.50, 0.55, 0.58), (0.40, 0.41, 0.42), 1000),  # faster
        "lora-ga": ((0.84, 0.86, 0.88), (0.59, 0.61, 0.66), (0.40, 0.42, 0.44), 1000),  # within
        "loraplus": ((0.80, 0.81, 0.82), (0.70, 0.71, 0.72), (0.40, 0.42, 0.44), 1000),  # slower
        "dora": ((0.855, 0.86, 0.87), (0.60, 0.62, 0.64), (0.40, 0.42, 0.44), 1030),  # >= lora
        "adalora": ((0.80, 0.82, 0.83), (0.60, 0.62, 0.64), (0.40, 0.42, 0.44), 1500),  # below
        "lora-fa": ((0.85, 0.855, 0.86), (0.60, 0.63, 0.64), (0.40, 0.42, 0.44), 1000),
        "lora-r64": ((0.85, 0.86, 0.87), (0.60, 0.62, 0.64), (0.40, 0.42, 0.44), 8000),
        "rslora": ((0.86, 0.87, 0.88), (0.55, 0.57, 0.60), (0.35, 0.36, 0.37), 8000),
    }
    out = []
    for seed in range(3):  # seed-outer, as the sweep writes them
        for row, (accs, early, late, trainable) in rows.items():
            out.append(record(bench, row, seed, acc=accs[seed], early=early[seed],
                              late=late[seed], trainable=trainable))  # fmt: skip
    return out


def test_loss_after_is_the_window_mean(bench: ModuleType) -> None:
    losses = [float(i) for i in range(1, 101)]  # step k has loss k
    assert bench.loss_after(losses, 100, 20) == pytest.approx(sum(range(81, 101)) / 20)
    assert bench.loss_after(losses, 10, 20) == pytest.approx(5.5)  # fewer steps than the window
    assert bench.loss_after(losses, 101, 20) is None
    with pytest.raises(ValueError, match="window"):
        bench.loss_after(losses, 10, 0)


def test_aggregate_medians_and_spreads(bench: ModuleType) -> None:
    summaries = bench.aggregate(synthetic(bench))
    assert list(summaries)[:3] == ["lora", "full", "pissa"]
    lora = summaries["lora"]
    assert lora.seeds == 3 and lora.trainable == 1000
    assert lora.accuracy == bench.Spread(0.86, 0.85, 0.87, (0.85, 0.86, 0.87))
    assert lora.loss_at["20"].median == pytest.approx(0.62)
    assert lora.loss_at["40"].low == pytest.approx(0.40)
    assert lora.seconds_per_epoch == pytest.approx(67_349 / 51.0)
    assert lora.peak_rss_mib == pytest.approx(801.0)


def test_aggregate_marks_unreached_loss_as_missing(bench: ModuleType) -> None:
    runs = [record(bench, "lora", s, acc=0.8, early=0.6, late=0.4) for s in range(2)]
    runs[1] = runs[1]._replace(loss_at={"20": 0.6, "40": None})
    summary = bench.aggregate(runs)["lora"]
    assert summary.loss_at["40"] is None and summary.loss_at["20"] is not None


def test_claim_verdicts_follow_the_rules(bench: ModuleType) -> None:
    found = {c.claim: c for c in bench.claims(bench.aggregate(synthetic(bench)), ["20", "40"])}
    verdict = {k.split(" ")[0] + (" acc" if "accurate" in k else ""): c.verdict
               for k, c in found.items()}  # fmt: skip
    assert verdict["PiSSA"] == "reproduces"  # 0.55 < lora's min 0.60
    assert verdict["LoRA-GA"] == "not reproduced"  # 0.61 inside [0.60, 0.64]
    assert verdict["LoRA+"] == "contradicted"  # 0.71 > lora's max 0.64
    assert verdict["LoRA+ acc"] == "contradicted"  # 81% below lora's min 85%
    assert verdict["DoRA acc"] == "reproduces"  # median 86% >= lora's 86%
    assert verdict["AdaLoRA acc"] == "contradicted"  # 82% below lora's min 85%
    assert verdict["rsLoRA"] == "reproduces"  # loss@40 0.36 < lora-r64's min 0.40
    assert verdict["rsLoRA acc"] == "not reproduced"  # 87% inside lora-r64's [85, 87]
    full_claim = next(c for k, c in found.items() if k.startswith("LoRA (r=8)"))
    assert full_claim.verdict == "not reproduced" and "+3.00 points" in full_claim.evidence


def test_claims_with_missing_methods_say_not_run(bench: ModuleType) -> None:
    runs = [r for r in synthetic(bench) if r.row in ("lora", "full")]
    found = bench.claims(bench.aggregate(runs), ["20", "40"])
    assert [c.verdict for c in found].count("not run") == len(found) - 1
    assert found[-1].verdict == "not reproduced"  # full is 3 points above lora


def test_compare_and_at_least_edges(bench: ModuleType) -> None:
    b = bench.Spread(0.5, 0.4, 0.6, (0.4, 0.5, 0.6))
    same = bench.Spread(0.6, 0.6, 0.6, (0.6,))
    assert bench.compare(same, b, higher_is_better=True) == "not reproduced"  # on the edge
    assert bench.compare(same._replace(median=0.61), b, higher_is_better=True) == "reproduces"
    assert bench.compare(same._replace(median=0.39), b, higher_is_better=False) == "reproduces"
    assert bench.at_least(same._replace(median=0.45), b) == "not reproduced"


def test_markdown_table_budget_and_claims(bench: ModuleType) -> None:
    runs = synthetic(bench)
    summaries = bench.aggregate(runs)
    found = bench.claims(summaries, ["20", "40"])
    report = {
        "flags": {"loss_at": [20, 40], "max_steps": 40, "batch_size": 16, "max_length": 64,
                  "seeds": [0, 1, 2], "window": 20, "threads": 2},
        "conditions": {"date": "2026-01-01 00:00 UTC", "machine": "x86_64, 2 CPUs, Linux",
                       "load_average_start": (0.1, 0.1, 0.1), "load_average_end": (0.2, 0.2, 0.2)},
        "dev_examples": 872, "failed": {"olora-s1": "exit 1: boom"},
        "command": "python benchmarks/methods_sst2.py --max-steps 40",
    }  # fmt: skip
    text = bench.markdown(report, summaries, found)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    assert "loss@20 median" in header and "loss@40 median" in header
    for name in summaries:  # one table row per method
        assert sum(line.startswith(f"| {name} | ") for line in lines) == 1
    lora_row = next(line for line in lines if line.startswith("| lora |"))
    assert "86.00 [85.00-87.00]" in lora_row and "0.6200" in lora_row and "4.0 KiB" in lora_row
    assert next(line for line in lines if line.startswith("| full |")).split(" | ")[1] == "-"
    assert "lora-fa 1.000" in text and "dora 1.030" in text  # matched-budget check line
    assert text.count("**reproduces**") == 3 and "olora-s1: exit 1: boom" in text
    assert "steps N-19..N" in text and "--max-steps 40" in text


def test_plan_is_seed_outer(bench: ModuleType) -> None:
    args = bench.parse(["--methods", "lora,full,pissa", "--seeds", "0,1"])
    order = [(row.name, seed) for row, seed in bench.plan(args)]
    assert order == [("lora", 0), ("full", 0), ("pissa", 0), ("lora", 1), ("full", 1),
                     ("pissa", 1)]  # fmt: skip


def test_parse_quick_preset_and_errors(bench: ModuleType) -> None:
    args = bench.parse(["--quick", "--max-steps", "30"])
    assert args.max_steps == 30 and args.seeds == [0] and args.loss_at == [10, 20]
    assert bench.parse([]).methods == list(bench.ROWS)
    with pytest.raises(SystemExit):
        bench.parse(["--methods", "lora,nope"])
    with pytest.raises(SystemExit):
        bench.parse(["--max-steps", "50"])  # loss@100 and 500 would not be reached


def test_run_config_matches_the_budget_table(bench: ModuleType) -> None:
    args = bench.parse([])
    configs = {name: bench.run_config(row, 1, args, Path("x")) for name, row in bench.ROWS.items()}
    assert configs["lora-fa"]["r"] == 16 and configs["rslora"]["r"] == 64
    assert configs["lora-r64"]["method"] == "lora" and configs["adalora"]["init_r"] == 12
    assert all(c["seed"] == 1 and c["alpha"] == 16.0 and "lr" not in c for c in configs.values())
    from rankwise.train.config import from_mapping

    for name in ("lora", "lora-r64", "full", "lora-fa", "dora"):  # valid TrainConfig fields
        assert from_mapping(configs[name]).max_steps == 500


def test_saved_bytes_counts_weights_and_config_only(bench: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "adapter_config.json").write_bytes(b"{}")
    (tmp_path / "tokenizer.json").write_bytes(b"t" * 1000)
    assert bench.saved_bytes(tmp_path) == (102, 1102)


def test_moving_average_and_plot(bench: ModuleType, tmp_path: Path) -> None:
    assert bench.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    path = tmp_path / "curve.png"
    bench.plot(synthetic(bench), path, window=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # no temp file left


def test_record_json_round_trip(bench: ModuleType) -> None:
    run = synthetic(bench)[0]
    assert bench.RunRecord(**json.loads(json.dumps(run._asdict()))) == run


def test_kept_finished_run_is_reused_only_with_the_same_options(
    bench: ModuleType, tmp_path: Path
) -> None:
    """Resumable at the run level: a kept result.json is returned without launching a child;
    a kept run made with other options is refused (no silent mixing of settings)."""
    import yaml

    args = bench.parse(["--methods", "lora", "--seeds", "0", "--keep", str(tmp_path),
                        "--loss-at", "20,40", "--window", "20"])  # fmt: skip
    row = bench.ROWS["lora"]
    run_dir = tmp_path / "lora-s0"
    (run_dir / "train").mkdir(parents=True)
    config = bench.run_config(row, 0, args, run_dir / "train")
    (run_dir / "train" / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    kept = record(bench, "lora", 0, acc=0.9, early=0.5, late=0.3)._replace(threads=args.threads)
    (run_dir / "result.json").write_text(json.dumps(kept._asdict()), encoding="utf-8")
    reused = bench.launch(row, 0, args, tmp_path)  # loss@N recomputed from the stored curve
    assert reused._replace(loss_at={}) == kept._replace(loss_at={})
    assert reused.loss_at == pytest.approx(kept.loss_at)
    other = kept._replace(threads=args.threads + 1)  # timings and memory depend on it
    (run_dir / "result.json").write_text(json.dumps(other._asdict()), encoding="utf-8")
    with pytest.raises(SystemExit, match="--threads"):
        bench.launch(row, 0, args, tmp_path)
    (run_dir / "result.json").write_text(json.dumps(kept._asdict()), encoding="utf-8")
    (run_dir / "train" / "config.yaml").write_text(
        yaml.safe_dump({**config, "max_steps": 100}), encoding="utf-8"
    )
    with pytest.raises(SystemExit, match="max_steps"):
        bench.launch(row, 0, args, tmp_path)
    assert (run_dir / "result.json").is_file()  # the refusal deletes nothing


def test_claims_need_three_seeds_on_both_sides(bench: ModuleType) -> None:
    """One seed's 'range' is a point, so any difference would pass the rule: not judged."""
    runs = [r for r in synthetic(bench) if r.seed == 0 or r.row != "pissa"]
    found = bench.claims(bench.aggregate(runs), ["20", "40"])
    pissa = next(c for c in found if c.claim.startswith("PiSSA"))
    assert pissa.verdict == "not judged" and "pissa: 1" in pissa.evidence
    assert next(c for c in found if c.claim.startswith("LoRA-GA")).verdict == "not reproduced"
