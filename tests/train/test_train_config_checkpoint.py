"""Config resolution and YAML; atomic checkpoints and the fallback past a corrupt latest one."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.train import checkpoint as ckpt
from rankwise.train.config import TrainConfig, from_mapping, read_yaml, resolve, write_yaml


def test_resolve_fills_dependent_defaults() -> None:
    demo = resolve(TrainConfig())
    assert demo.max_steps is not None and demo.max_length == 64 and demo.lr == 5e-4
    full = resolve(TrainConfig(data="x.tsv", method="full"))
    assert full.max_steps is None and full.lr == 5e-5 and full.max_length == 128
    assert resolve(TrainConfig(data="x.tsv", lr=1e-3)).lr == 1e-3


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"method": "magic"}, "method"),
        ({"task": "ner"}, "task"),
        ({"dropout": 1.5}, "dropout"),
        ({"lr": -1.0}, "lr"),
        # finite, but beyond float32: the optimizer crashed mid-run with a traceback
        ({"lr": 1e300}, "lr.*float32"),
        ({"alpha": 1e300}, "alpha.*float32"),
        ({"loraplus_ratio": 1e300}, "loraplus_ratio.*float32"),
        ({"lr": 1e37, "loraplus_ratio": 1e3}, "B's learning rate"),
        ({"seed": 2**64}, "seed.*expected a seed"),  # "Overflow when unpacking long long"
        ({"seed": -(2**63) - 1}, "seed.*expected a seed"),
        # an unset $OUT: trained into ./runs/finetune-<time>, which --resume then could not find
        ({"output": ""}, r"--output .*expected a directory, found an empty string"),
        ({"data": " "}, r"--data .*found an empty string"),
    ],
)
def test_invalid_values_name_the_option(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve(from_mapping(values))


def test_yaml_round_trip_and_unknown_keys(tmp_path: Path) -> None:
    config = from_mapping({"r": 4, "targets": "query,value", "max-steps": 7, "lr": 1})
    assert config.targets == ("query", "value") and config.lr == 1.0
    write_yaml(config, tmp_path / "c.yaml")
    assert from_mapping(read_yaml(tmp_path / "c.yaml")) == config
    with pytest.raises(ConfigError, match="unknown option 'rank'"):
        from_mapping({"rank": 4})
    with pytest.raises(ConfigError, match="expected int"):
        from_mapping({"r": "four"})
    (tmp_path / "bad.yaml").write_text("r: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = {
        "a.lora_A.weight": torch.randn(4, 3, generator=g),
        "classifier.bias": torch.randn(2, generator=g),
    }
    opt = torch.optim.AdamW([torch.nn.Parameter(w["a.lora_A.weight"].clone())], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    opt.step()
    return {"weights": w, "optimizer": opt.state_dict(), "scheduler": {"last_epoch": seed}}


def test_checkpoint_round_trip_and_pruning(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, ckpt.Position(step, 0, step), keep=2, **_state(step))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    found = ckpt.load_latest(tmp_path)
    assert found is not None and found.position == ckpt.Position(6, 0, 6) and found.skipped == ()
    expected = _state(6)
    for key, value in expected["weights"].items():
        assert torch.equal(found.weights[key], value)
    assert torch.equal(
        found.optimizer["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"]
    )
    assert found.scheduler == {"last_epoch": 6}
    assert torch.equal(found.rng, torch.get_rng_state())


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_corrupt_latest_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, ckpt.Position(step, 0, step), **_state(step))
    latest = ckpt.list_checkpoints(tmp_path)[-1] / ckpt.WEIGHTS_FILE
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        latest.unlink()
    else:
        latest.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.warns(RuntimeWarning, match="step-000004 is unusable"):
        found = ckpt.load_latest(tmp_path)
    assert found is not None and found.position.step == 2 and len(found.skipped) == 1


def test_checkpoints_are_ordered_by_step_number_past_six_digits(tmp_path: Path) -> None:
    # by name, step-1000000 sorted before step-999999: pruning deleted each new checkpoint
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        ckpt.save_checkpoint(tmp_path, ckpt.Position(step, 0, 0), keep=2, **_state(1))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-1000000", "step-1000001"]
    found = ckpt.load_latest(tmp_path)
    assert found is not None and found.position.step == 1_000_001
    (tmp_path / ckpt.CHECKPOINTS_DIR / "step-latest").mkdir()  # not a step: ignored
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == names


def test_a_save_after_falling_back_drops_the_abandoned_newer_checkpoints(tmp_path: Path) -> None:
    # resumed from step 2 past an unusable step 4: saving step 3 with keep=1 deleted 2 and 3
    # and kept only the unusable 4
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, ckpt.Position(step, 0, step), **_state(step))
    (ckpt.list_checkpoints(tmp_path)[-1] / ckpt.WEIGHTS_FILE).write_bytes(b"damaged")
    ckpt.save_checkpoint(tmp_path, ckpt.Position(3, 0, 3), keep=1, **_state(3))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003"]
    found = ckpt.load_latest(tmp_path)
    assert found is not None and found.position.step == 3


@pytest.mark.parametrize("field", ["position", "sha256", "meta"])
def test_a_checkpoint_index_with_wrong_types_falls_back(tmp_path: Path, field: str) -> None:
    # a list where an object belongs escaped as an AttributeError traceback
    import json

    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, ckpt.Position(step, 0, step), **_state(step))
    index = ckpt.list_checkpoints(tmp_path)[-1] / ckpt.INDEX_FILE
    data = json.loads(index.read_text())
    data[field] = [1, 2]
    index.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="step-000004 is unusable"):
        found = ckpt.load_latest(tmp_path)
    assert found is not None and found.position.step == 2


def test_partial_temporary_checkpoint_is_ignored(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, ckpt.Position(2, 0, 2), **_state(2))
    (tmp_path / ckpt.CHECKPOINTS_DIR / ".tmp-step-000004-123").mkdir()
    found = ckpt.load_latest(tmp_path)
    assert found is not None and found.position.step == 2
    assert ckpt.load_latest(tmp_path / "nothing") is None
    # the next save clears what killed runs left behind (they used to pile up)
    (tmp_path / ckpt.CHECKPOINTS_DIR / ".stale-step-000002-77").mkdir()
    ckpt.save_checkpoint(tmp_path, ckpt.Position(6, 0, 6), **_state(6))
    names = sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS_DIR).iterdir())
    assert names == ["step-000002", "step-000006"]


def test_a_relative_model_directory_is_recorded_absolute(tmp_path, monkeypatch) -> None:
    """Adapters record their base model: a relative directory must work from anywhere (and
    never be mistaken for a hub id)."""
    from rankwise.train.models import resolve_model_source

    (tmp_path / "gpt2dir").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("gpt2dir") == str(tmp_path / "gpt2dir")
    assert resolve_model_source("./gpt2dir") == str(tmp_path / "gpt2dir")


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    # the error was "'utf-8' codec can't decode byte 0xff ...", naming no file
    bad = tmp_path / "run.yaml"
    bad.write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"config file '.*run\.yaml' is not UTF-8 text"):
        read_yaml(bad)


def test_damaged_metrics_lines_are_skipped(tmp_path: Path) -> None:
    # {"step": null} crashed resume with a TypeError, {"step": "x"} with an int() error, a
    # non-UTF-8 byte with a codec error, and a non-numeric loss crashed the curve's plot
    from rankwise.train.metrics import MetricsLog, read_metrics

    lines = [b'{"step": 1, "loss": 0.5}', b'{"step": null}', b'{"step": "x"}', b"\xff\xfe",
             b'{"step": 2, "loss": "abc", "lr": 0.1}', b'{"step": true}', b'{"step": 3, "loss": 0.25}']  # fmt: skip
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records == [{"step": 1, "loss": 0.5}, {"step": 2, "lr": 0.1}, {"step": 3, "loss": 0.25}]
    MetricsLog(tmp_path).truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    pytest.importorskip("matplotlib")
    from rankwise.train.metrics import plot_training_curve

    assert plot_training_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png").is_file()


def test_an_option_spelled_both_ways_is_refused() -> None:
    # {max-steps: 3, max_steps: 5} silently took the later one
    with pytest.raises(ConfigError, match="option 'max_steps' is given twice"):
        from_mapping({"max-steps": 3, "max_steps": 5})


@pytest.mark.parametrize(
    "key", ["batch_size", "r", "seed", "alpha", "warmup", "save-every", "dropout",
            "targets", "method"],
)  # fmt: skip
def test_an_empty_yaml_value_is_refused_by_name(key: str, tmp_path: Path) -> None:
    # `batch_size:` (null) reached validate and failed comparing None with an int: a traceback
    (tmp_path / "c.yaml").write_text(f"{key}:\nmax-steps: 2\n", encoding="utf-8")
    flag = key.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"option --{flag} .*expected a value, found none"):
        from_mapping(read_yaml(tmp_path / "c.yaml"))


def test_an_empty_yaml_value_of_an_unset_option_means_its_default(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("max_steps:\neval-data: null\nlr:\n", encoding="utf-8")
    assert from_mapping(read_yaml(tmp_path / "c.yaml")) == TrainConfig()


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"method": "lora", "loraplus_ratio": 4.0}, "loraplus-ratio"),
        ({"method": "dora", "ga_batches": 2}, "ga-batches"),
        ({"method": "full", "r": 4}, "r"),
        ({"method": "full", "alpha": 32.0}, "alpha"),
        ({"method": "full", "dropout": 0.0}, "dropout"),
    ],
)
def test_an_option_another_method_reads_is_named(values: dict, flag: str, capsys) -> None:
    # accepted and ignored without a word (while --init-r on another method and --targets
    # with full were refused): a warning from a file or the API, a refusal as a flag
    from rankwise.cli import main

    with pytest.warns(RuntimeWarning, match=rf"option --{flag} .*ignored by --method"):
        resolve(from_mapping({"data": "x.tsv", **values}))
    argv = ["finetune", "--data", "x.tsv", "--method", values["method"]]
    name, value = next((k, v) for k, v in values.items() if k != "method")
    assert main([*argv, f"--{flag}", str(value)]) == 2
    assert f"option --{flag}" in capsys.readouterr().err
    # the method that reads it takes it; the default value is never named
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve(from_mapping({"data": "x.tsv", "method": "full", "loraplus_ratio": 16.0, "r": 8}))
        resolve(from_mapping({"data": "x.tsv", "method": "loraplus", "loraplus_ratio": 4.0}))


def test_epochs_given_on_the_demo_corpus_counts() -> None:
    # an explicit --epochs 1 could not be told from the default: 200 steps all the same
    assert resolve(TrainConfig()).max_steps == 200
    given = resolve(TrainConfig(epochs=1.0))
    assert given.max_steps is None and given.epochs == 1.0
    assert resolve(TrainConfig(data="x.tsv")).epochs == 1.0


def test_an_ignored_option_is_warned_about_by_the_main_process_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # resolve() ran outside main_warns: under torchrun every rank printed the same warning
    from rankwise.train import loop
    from rankwise.train.distributed import DistInfo

    monkeypatch.setattr(loop.dist_, "teardown", lambda info: None)
    monkeypatch.setattr(loop, "_train", lambda *args: None)
    config = TrainConfig(method="full", r=16, output=str(tmp_path / "out"))
    for rank, expected in ((0, 1), (1, 0)):
        monkeypatch.setattr(loop.dist_, "setup", lambda rank=rank: DistInfo(rank, 2, rank, False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.train(config)
        assert sum("ignored by --method full" in str(w.message) for w in caught) == expected


def test_eval_split_with_eval_data_is_not_read_and_not_recorded() -> None:
    """The whole --eval-data file is evaluated: an eval_split next to it was ignored without a
    word and recorded in config.yaml as if applied (a config file's value is warned about)."""
    assert resolve(TrainConfig(data="x.tsv", eval_data="dev.tsv")).eval_split is None
    assert resolve(TrainConfig(data="x.tsv")).eval_split == 0.1
    with pytest.warns(RuntimeWarning, match=r"--eval-split .*ignored with option --eval-data"):
        resolved = resolve(TrainConfig(data="x.tsv", eval_data="dev.tsv", eval_split=0.5))
    assert resolved.eval_split is None


def test_a_run_with_eval_data_recorded_before_resumes(tmp_path: Path) -> None:
    """resolve() once recorded eval_split 0.1 beside eval_data; now it records None, and the
    resume check refused such a run ("eval-split: 0.1 in the run, None now")."""
    import dataclasses

    from rankwise.train.outputs import check_resumable

    now = resolve(TrainConfig(data="x.tsv", eval_data="dev.tsv", output=str(tmp_path)))
    write_yaml(dataclasses.replace(now, eval_split=0.1), tmp_path / "config.yaml")
    check_resumable(now, tmp_path / "config.yaml")  # no error
    other = dataclasses.replace(now, eval_data=None, eval_split=0.2)
    with pytest.raises(ConfigError, match="eval-split"):
        check_resumable(other, tmp_path / "config.yaml")


def test_a_runs_config_yaml_reads_back_with_its_record_of_derived_options(tmp_path: Path) -> None:
    from rankwise.train.config import filled_defaults, read_config_file

    given = TrainConfig(data="x.tsv", method="adalora")
    resolved = resolve(given)
    write_yaml(resolved, tmp_path / "config.yaml", filled=filled_defaults(given, resolved))
    assert from_mapping(read_yaml(tmp_path / "config.yaml")) == resolved  # a record, no option
    options, filled = read_config_file(tmp_path / "config.yaml")
    assert from_mapping(options) == resolved
    assert filled == {"lr": 5e-4, "epochs": 1.0, "max_length": 128, "eval_split": 0.1, "init_r": 12}


def test_filled_defaults_take_either_spelling(tmp_path: Path) -> None:
    from rankwise.train.config import read_config_file

    (tmp_path / "c.yaml").write_text("max-steps: 200\nfilled-defaults: {max-steps: 200}\n")
    options, filled = read_config_file(tmp_path / "c.yaml")
    assert options == {"max_steps": 200} and filled == {"max_steps": 200}


def test_a_flag_the_method_ignores_is_refused_after_the_rendezvous(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the CLI refused it before train() lined the processes up: under torchrun a fast process
    # exited and torchrun killed the other before it said why ("terminated")
    from rankwise.errors import ConfigError
    from rankwise.train import loop
    from rankwise.train.distributed import DistInfo

    calls: list[str] = []
    monkeypatch.setattr(
        loop.dist_, "setup", lambda: calls.append("setup") or DistInfo(0, 1, 0, False)
    )
    monkeypatch.setattr(loop.dist_, "teardown", lambda info: calls.append("teardown"))
    monkeypatch.setattr(loop, "_train", lambda *args: None)
    config = TrainConfig(method="full", r=4, output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"option --r .*ignored by --method full"):
        loop.train(config, given={"r"})
    assert calls == ["setup", "teardown"]
    # a misspelt method is named as such, not as a method that ignores the flag
    with pytest.raises(ConfigError, match=r"option --method .*: expected one of .* found 'fulll'"):
        loop.train(TrainConfig(method="fulll", r=4), given={"r", "method"})


@pytest.mark.parametrize("where", ["weights", "state"])
def test_a_checkpoint_that_cannot_be_written_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    # a full disk left checkpoints/.tmp-step-…-<pid>/ behind (removed only by a later save),
    # and safetensors' own error ("File too large (os error 27)") named no file
    import safetensors.torch
    from safetensors import SafetensorError

    ckpt.save_checkpoint(tmp_path, ckpt.Position(1, 0, 1), **_state(1))
    if where == "weights":

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: File too large (os error 27)")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
        match = r"checkpoint .*step-000002: could not be written \(Error while serializing"
    else:

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(torch, "save", full)
        match = "No space left on device"
    with pytest.raises(OSError, match=match):
        ckpt.save_checkpoint(tmp_path, ckpt.Position(2, 0, 2), **_state(2))
    root = tmp_path / ckpt.CHECKPOINTS_DIR
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]


def test_a_failed_atomic_write_names_the_file_meant(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from rankwise.io.files import atomic_write_bytes

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(tmp_path / "adapter_config.json", b"{}")
    assert caught.value.filename == str(tmp_path / "adapter_config.json")
    assert os.listdir(tmp_path) == []


def test_a_run_seed_may_be_negative_as_runs_recorded_it() -> None:
    # the generators' range narrowed to [0, 2**64 - 1]; a run's config.yaml with seed -1
    # (accepted before) must still resume
    assert resolve(TrainConfig(seed=-1)).seed == -1
