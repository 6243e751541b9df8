"""A trained run used again: evaluate, predict and merge from its adapter directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rankwise.cli import main
from rankwise.train import TrainConfig, train
from rankwise.train.inference import evaluate_file, load_trained, merge_to, predict


@pytest.fixture(scope="module")
def run_dir(tiny_bert: Path, toy_tsv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inference") / "run"
    config = TrainConfig(model=str(tiny_bert), data=str(toy_tsv), output=str(out), max_steps=4,
                         batch_size=8, lr=1e-2, save_every=0)  # fmt: skip
    train(config, echo=lambda _: None)
    return out


def test_reloaded_adapter_matches_the_run(run_dir: Path, toy_tsv: Path) -> None:
    trained = load_trained(run_dir / "adapter")
    assert trained.has_adapter and trained.label_names == ("0", "1")
    result = evaluate_file(trained, str(toy_tsv))
    assert result.examples == 96 and 0.0 <= result.accuracy <= 1.0
    again = evaluate_file(load_trained(run_dir / "adapter"), str(toy_tsv))
    assert again.loss == result.loss  # loading is deterministic (no random re-init leaks in)


def test_merge_gives_the_same_predictions(run_dir: Path, toy_tsv: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    trained = load_trained(run_dir / "adapter")
    before = evaluate_file(trained, str(toy_tsv))
    merged_dir = merge_to(trained, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    assert not any("lora" in k for k in plain.state_dict())
    after = evaluate_file(load_trained(merged_dir), str(toy_tsv))
    assert after.predictions == before.predictions
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)


def test_cli_evaluate_predict_merge(run_dir: Path, toy_tsv: Path, tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--adapter", str(run_dir / "adapter"), "--data", str(toy_tsv)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert (
        main(["predict", "--adapter", str(run_dir / "adapter"), "a good film", "a bad film"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("0", "1")
    probs = predict(load_trained(run_dir / "adapter"), ["a good film"])
    assert 0.5 <= probs[0].probability <= 1.0
    assert main(["merge", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert main(["merge", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "m")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["evaluate", "--adapter", str(tmp_path / "none"), "--data", str(toy_tsv)]) == 2
    assert "does not exist" in capsys.readouterr().err
