"""Resume and loading edge cases: changed options, directories that are not runs, runs killed
before their first checkpoint, models with another head or no tokenizer, the logged rate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rankwise.errors import ConfigError
from rankwise.train import TrainConfig, train
from rankwise.train.config import from_mapping
from rankwise.train.metrics import read_metrics


def _quiet(_: str) -> None:
    pass


def _config(model: Path, data: Path, out: Path, **changes) -> TrainConfig:
    base = {"model": str(model), "data": str(data), "output": str(out), "batch_size": 8,
            "lr": 5e-3, "save_every": 2, "max_steps": 4, "eval_split": 8}  # fmt: skip
    base.update(changes)
    return TrainConfig(**base)


def test_a_resume_keeps_the_runs_record_of_derived_options(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    """config.yaml lists the options derived rather than given (filled_defaults); a resume
    holds them as given values, and rewrote the file: the record must survive it."""
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out), echo=_quiet, stop_after=3)
    filled = {"epochs": 1.0, "max_length": 128}
    assert yaml.safe_load((out / "config.yaml").read_text())["filled_defaults"] == filled
    # as `--resume` reads them: the run's values, derived ones as if given
    train(_config(tiny_bert, toy_tsv, out, resume=True, epochs=1.0, max_length=128), echo=_quiet)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["filled_defaults"] == filled and saved["resume"] is False


def test_resume_refuses_changed_options_and_keeps_the_run(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out), echo=_quiet, stop_after=3)
    saved = (out / "config.yaml").read_text()
    for change in ({"lr": 0.1}, {"seed": 7}, {"weight_decay": 0.5}, {"max_steps": 8}):
        with pytest.raises(
            ConfigError, match=f"{next(iter(change)).replace('_', '-')}: .* in the run"
        ):
            train(_config(tiny_bert, toy_tsv, out, resume=True, **change), echo=_quiet)
        assert (out / "config.yaml").read_text() == saved
    # another data file: its own error ("label ... is not one of the training labels", or a
    # missing file) came first, after loading the model, where the resume refusal belongs
    other = tmp_path / "other.tsv"
    other.write_text("label\ttext\nfoo\ta\nbar\tb\n", encoding="utf-8")
    for data in (other, tmp_path / "missing.tsv"):
        with pytest.raises(ConfigError, match=r"--resume: options differ .*data: "):
            train(_config(tiny_bert, data, out, resume=True), echo=_quiet)
    # how often it saves or evaluates may change; the run then completes
    done = train(_config(tiny_bert, toy_tsv, out, resume=True, eval_every=1), echo=_quiet)
    assert done.resumed_from == 2 and done.steps == 4


def test_resume_refuses_a_directory_that_is_not_a_run(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a rankwise finetune run"):
        train(_config(tiny_bert, toy_tsv, out, resume=True), echo=_quiet)
    assert (out / "adapter" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]
    empty = tmp_path / "empty"  # a typo'd --output: would have trained a fresh run
    empty.mkdir()
    with pytest.raises(ConfigError, match="not a rankwise finetune run"):
        train(_config(tiny_bert, toy_tsv, empty, resume=True), echo=_quiet)
    assert list(empty.iterdir()) == []


def test_resume_without_a_checkpoint_logs_each_step_once(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out, save_every=0), echo=_quiet, stop_after=3)
    train(_config(tiny_bert, toy_tsv, out, save_every=0, resume=True), echo=_quiet)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 4]  # before, 4 steps, after (was 0..3 then 0..4, 4)


def test_logged_lr_is_the_rate_the_step_trained_at(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out, warmup=0.0, lr=1e-3), echo=_quiet)
    logged = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    assert logged == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # linear decay to 0 after 4


@pytest.mark.parametrize(
    ("warmup", "expected"),
    [
        (0.06, [0.5, 1.0, 2 / 3, 1 / 3]),
        (0.5, [1 / 3, 2 / 3, 1.0, 0.5]),
        (3, [0.25, 0.5, 0.75, 1.0]),
    ],
)
def test_a_warmup_fraction_counts_steps_up(
    warmup: float, expected: list[float], tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # Trainer's ceil(warmup · steps): 0.06 of 4 steps warms up for 1 step (int() gave 0: runs
    # under 17 steps had no warmup at the default 0.06)
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out, warmup=warmup, lr=1.0), echo=_quiet)
    logged = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    assert logged == pytest.approx(expected)


def test_a_trained_head_of_another_size_is_reinitialized(tiny_bert: Path, tmp_path: Path) -> None:
    data = tmp_path / "three.tsv"
    rows = [f"{i % 3}\tthe film was number {i}" for i in range(30)]
    data.write_text("label\tsentence\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert json.loads((tiny_bert / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"
    ]
    with pytest.warns(RuntimeWarning, match="head for 2 labels, the data has 3"):
        result = train(_config(tiny_bert, data, tmp_path / "run", max_steps=1), echo=_quiet)
    assert result.after is not None and result.after.logits.shape[1] == 3


def test_a_model_directory_without_tokenizer_files_is_refused(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    model = tmp_path / "no_tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert / name, model / name)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        train(_config(model, toy_tsv, out), echo=_quiet)
    assert not out.exists()


def test_yaml_numbers_without_a_dot_and_fractional_counts(tmp_path: Path) -> None:
    values = yaml.safe_load("lr: 1e-3\nweight_decay: 1e-2\n")
    assert isinstance(values["lr"], str)  # PyYAML's YAML 1.1 reading
    config = from_mapping(values)
    assert config.lr == 1e-3 and config.weight_decay == 1e-2
    with pytest.raises(ConfigError, match=r"option --lr \(lr in a config file\): expected float"):
        from_mapping({"lr": "fast"})
    from rankwise.train.config import validate

    for name in ("eval_split", "warmup"):
        with pytest.raises(
            ConfigError, match=rf"\({name} in a config file\): expected a fraction < 1 or a whole"
        ):
            validate(from_mapping({name: 1.5}))
    with pytest.raises(
        ConfigError, match=r"option --lr \(lr in a config file\): expected a finite number"
    ):
        validate(from_mapping({"lr": "inf"}))


def test_default_targets_on_a_gpt2_name_the_flag(
    tiny_gpt2: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    config = _config(tiny_gpt2, toy_tsv, tmp_path / "run", task="causal-lm")
    with pytest.raises(
        ValueError, match="'query' matches no module.*pass this model's, e.g. c_attn"
    ):
        train(config, echo=_quiet)


def test_resume_from_another_directory_and_with_every_checkpoint_unusable(
    tiny_bert: Path,
    toy_tsv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    shutil.copy(toy_tsv, project / "d.tsv")
    monkeypatch.chdir(project)
    train(_config(tiny_bert, Path("d.tsv"), Path("runs/a")), echo=_quiet, stop_after=3)
    saved = yaml.safe_load((project / "runs/a/config.yaml").read_text())
    assert saved["data"] == str(project / "d.tsv")  # recorded absolute
    monkeypatch.chdir(elsewhere)  # same file by absolute path: not a changed option
    config = _config(tiny_bert, project / "d.tsv", project / "runs/a", resume=True)
    # every checkpoint damaged: refused, and the killed run's metrics are kept
    for weights in (project / "runs/a/checkpoints").glob("step-*/trainable.safetensors"):
        weights.write_bytes(b"broken")
    before = (project / "runs/a/metrics.jsonl").read_text()
    messages: list[str] = []
    with pytest.raises(ValueError, match="no checkpoint in .* is usable"):
        train(config, echo=messages.append)
    # the fallback warnings are diagnostics: stderr, not the progress log (stdout)
    assert not any("unusable" in m for m in messages)
    err = capsys.readouterr().err
    assert "warning:" in err and "unusable" in err
    assert (project / "runs/a/metrics.jsonl").read_text() == before


def test_a_new_head_does_not_hide_other_mismatched_weights(tiny_bert: Path, tmp_path: Path) -> None:
    model = tmp_path / "inconsistent"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 64  # the weights hold 128 positions
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "three.tsv"
    data.write_text("label\tsentence\n" + "\n".join(f"{i % 3}\tfilm {i}" for i in range(30)) + "\n")
    with pytest.raises(ConfigError, match="position_embeddings.weight do not match"):
        with pytest.warns(RuntimeWarning, match="head is re-initialized"):
            train(_config(model, data, tmp_path / "run", max_steps=1), echo=_quiet)


def test_resume_removes_what_a_kill_during_the_final_save_left(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # atomic_dir's temporary of the adapter/model/merged output stayed forever after a SIGKILL
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out), echo=_quiet, stop_after=3)
    for name in (".tmp-adapter-99999", ".stale-merged-12", ".tmp-model-7"):
        (out / name).mkdir()
        (out / name / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".tmp-notes").mkdir()  # not the run's: kept
    done = train(_config(tiny_bert, toy_tsv, out, resume=True), echo=_quiet)
    assert done.steps == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".tmp-notes"]


def test_a_refused_resume_leaves_config_yaml_as_it_was(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # the checkpoint's checks ran after config.yaml was rewritten: a resume refused for another
    # global batch recorded the refused batch size, so every later plain resume failed too
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out), echo=_quiet, stop_after=3)
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match="examples per step"):
        train(_config(tiny_bert, toy_tsv, out, resume=True, batch_size=4), echo=_quiet)
    assert (out / "config.yaml").read_text() == saved
    for weights in (out / "checkpoints").glob("step-*/trainable.safetensors"):
        weights.write_bytes(b"broken")  # "nothing was changed" said the refusal
    with pytest.raises(ValueError, match="nothing was changed"):
        train(_config(tiny_bert, toy_tsv, out, resume=True, save_every=1), echo=_quiet)
    assert (out / "config.yaml").read_text() == saved


def test_a_resume_on_changed_training_data_is_refused(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # rows appended to the file: the resume was accepted and the run went from 5 to 8 steps
    # under the restored schedule and data order
    data = tmp_path / "d.tsv"
    shutil.copy(toy_tsv, data)
    out = tmp_path / "run"
    train(_config(tiny_bert, data, out, max_steps=None, epochs=1), echo=_quiet, stop_after=3)
    with data.open("a", encoding="utf-8") as handle:
        handle.write("".join(f"{i % 2}\textra text {i}\n" for i in range(40)))
    with pytest.raises(
        ValueError, match=r"other training examples \(88; this run has 128\).* changed since"
    ):
        train(_config(tiny_bert, data, out, max_steps=None, epochs=1, resume=True), echo=_quiet)


def test_config_yaml_repeats_a_resumed_run_elsewhere(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # config.yaml recorded resume: true, so --config runs/x/config.yaml --output new failed
    # ("--resume: output directory ... does not exist"); and ~ in output was taken literally
    from rankwise.cli import main

    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out), echo=_quiet, stop_after=3)
    train(_config(tiny_bert, toy_tsv, out, resume=True, max_steps=4), echo=_quiet)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["resume"] is False
    repeat = tmp_path / "repeat"
    args = ["finetune", "--config", str(out / "config.yaml"), "--output", str(repeat), "--no-merge"]
    assert main(args) == 0
    assert (repeat / "adapter" / "adapter_config.json").is_file()


def test_output_expands_the_home_directory(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = train(_config(tiny_bert, toy_tsv, Path("~/runs/x")), echo=_quiet)
    assert result.output == tmp_path / "home" / "runs" / "x"
    assert (tmp_path / "home" / "runs" / "x" / "adapter").is_dir()
    assert not (tmp_path / "~").exists()


def test_a_run_recording_an_option_its_method_ignores_still_resumes(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # config.yaml of a run from before the check (lora with loraplus_ratio 8): refusing it made
    # --resume impossible (a flag to change it back is refused as a changed option)
    from rankwise.cli import main

    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="loraplus-ratio.*ignored by --method lora"):
        train(_config(tiny_bert, toy_tsv, out, loraplus_ratio=8.0), echo=_quiet, stop_after=3)
    assert yaml.safe_load((out / "config.yaml").read_text())["loraplus_ratio"] == 8.0
    with pytest.warns(RuntimeWarning, match="loraplus-ratio.*ignored by --method lora"):
        assert main(["finetune", "--output", str(out), "--resume"]) == 0


def test_a_checkpoint_with_the_earlier_data_digest_still_resumes(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # the digest's format changed (repr of the whole set -> bytes per example): comparing the
    # earlier key's value refused a resume on unchanged data as "other training examples"
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out), echo=_quiet, stop_after=3)
    for index in (out / "checkpoints").glob("step-*/checkpoint.json"):
        data = json.loads(index.read_text())
        data["meta"]["train_digest"] = "0" * 64  # as the earlier format wrote it
        data["meta"].pop("train_examples_digest", None)
        index.write_text(json.dumps(data))
    done = train(_config(tiny_bert, toy_tsv, out, resume=True), echo=_quiet)
    assert done.resumed_from == 2 and done.steps == 4


def test_a_run_holds_its_output_directory_against_another(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    """Two runs in one --output (two fresh starts, two --resume, a --resume of a run still
    going) both ran and reported success, their metrics interleaved and the last save's
    adapter and config.yaml kept: the directory is locked for the length of a run."""
    import os

    from rankwise.train.outputs import held_outputs

    fcntl = pytest.importorskip("fcntl", reason="the lock is flock, POSIX only")

    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out), echo=_quiet, stop_after=3)
    assert held_outputs() == frozenset()  # released when the run ended
    metrics = (out / "metrics.jsonl").read_bytes()
    fd = os.open(out, os.O_RDONLY)  # another process's run, as its lock shows it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="is in use by another rankwise finetune run"):
            train(_config(tiny_bert, toy_tsv, out, resume=True), echo=_quiet)
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        fd2 = os.open(fresh, os.O_RDONLY)
        fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="in use"):
            train(_config(tiny_bert, toy_tsv, fresh), echo=_quiet)
        os.close(fd2)
        assert list(fresh.iterdir()) == []
    finally:
        os.close(fd)
    assert (out / "metrics.jsonl").read_bytes() == metrics and held_outputs() == frozenset()
    done = train(_config(tiny_bert, toy_tsv, out, resume=True), echo=_quiet)
    assert done.resumed_from == 2 and held_outputs() == frozenset()


def test_the_default_output_moves_on_when_another_run_took_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs without --output started in the same second picked one name; the second was
    refused, told to --resume a run it never started."""
    from rankwise.train.outputs import _absolute, _claim_default

    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "runs" / "finetune-x"
    taken.mkdir(parents=True)
    mine = _claim_default(Path("runs") / "finetune-x")
    assert mine.is_dir() and mine.resolve() != taken and list(mine.iterdir()) == []
    # an hf: local dataset directory is recorded absolute, as a file path is
    (tmp_path / "ds").mkdir()
    assert _absolute("hf:ds:train") == f"hf:{tmp_path / 'ds'}:train"
    assert _absolute("hf:glue/sst2:train") == "hf:glue/sst2:train"
    assert _absolute("ds") == str(tmp_path / "ds")


def test_a_run_releases_its_own_lock_only(tmp_path: Path) -> None:
    """train() released every lock taken since it started: another thread's run's too; and
    by the directory's name at the end, so a directory renamed meanwhile kept its lock."""
    pytest.importorskip("fcntl", reason="the lock is flock, POSIX only")
    from rankwise.train.outputs import claim_output, held_outputs, releasing_claims

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with releasing_claims():
        claim_output(a)
        with releasing_claims():  # another run, started and ended meanwhile
            claim_output(b)
            with pytest.raises(ConfigError, match="in use"):
                claim_output(b)
        assert held_outputs() == {str(a.resolve())}
        a.rename(tmp_path / "a.moved")
    assert held_outputs() == frozenset()


def test_train_leaves_the_callers_rng_as_it_was(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    """train() seeded torch's global RNG with the run's seed: a caller's next draw after it
    was the same whatever the caller had seeded."""
    import torch

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    train(_config(tiny_bert, toy_tsv, tmp_path / "run", max_steps=2), echo=_quiet)
    assert torch.equal(torch.get_rng_state(), state)
