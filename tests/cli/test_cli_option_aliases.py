"""The output and base-model options answer to one spelling across commands (aliases)."""

from __future__ import annotations

import pytest

from rankwise.cli import COMMANDS, _command_parser, main


@pytest.mark.parametrize(
    ("argv", "dest", "spellings"),
    [
        (["merge", "--adapter", "a"], "out", ["--out", "--output"]),
        (["resize", "a", "--rank", "2"], "out", ["--out", "--output"]),
        (["combine", "a", "b"], "out", ["--out", "--output"]),
        (["extract", "--finetuned", "t", "--rank", "2"], "out", ["--out", "--output"]),
        (["compress-image"], "out", ["--out", "--output"]),
        (["finetune"], "output", ["--out", "--output"]),
        (
            ["extract", "--finetuned", "t", "--rank", "2", "--out", "o"],
            "base",
            ["--base", "--model"],
        ),
    ],
)
def test_each_spelling_sets_the_same_option(
    argv: list[str], dest: str, spellings: list[str]
) -> None:
    """merge/resize/combine/extract/compress-image said --out, finetune and analyze budget
    --output, extract --base where every other command says --model: both spellings work."""
    parser, _ = _command_parser(argv[0], COMMANDS[argv[0]])
    for flag in spellings:
        args = parser.parse_args([*argv[1:], flag, "somewhere"])
        assert str(getattr(args, dest)) == "somewhere", flag


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys) -> None:
    # `rankwise analyze spectrum A | head` printed "error: [Errno 32] Broken pipe", exit 2
    import rankwise.cli.version as command
    from rankwise.cli import main

    def reader_left(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(command, "run", reader_left)
    assert main(["version"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "--adapter", "a"],
        ["resize", "a", "--rank", "2"],
        ["combine", "a", "b"],
        ["extract", "--finetuned", "t", "--rank", "2"],
    ],
)
def test_an_empty_out_is_a_usage_error(argv: list[str], capsys) -> None:
    # `rankwise merge --out "$UNSET"` wrote the model into the working directory
    from rankwise.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", ""])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out/--output: expected a directory, found an empty string" in err


def test_a_terminated_process_under_torchrun_says_which_rank(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "rankwise finetune: terminated" came unlabelled from rank 1 beside rank 0's messages
    import os
    import signal

    import rankwise.cli.version as command

    def killed(args: object) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # as torchrun stopping the other processes
        return 0

    monkeypatch.setattr(command, "run", killed)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        main(["version"])
    assert stop.value.code == 143
    assert "rankwise version (rank 1): terminated" in capsys.readouterr().err


def test_a_double_dash_before_the_command_runs_it(capsys: pytest.CaptureFixture[str]) -> None:
    # `rankwise -- version` went to the top-level parser: help printed, exit 2
    assert main(["--", "version"]) == 0
    assert capsys.readouterr().out.startswith("rankwise ")
    with pytest.raises(SystemExit) as stop:  # after "--" a name, not an option
        main(["--", "--help"])
    assert stop.value.code == 2 and "unknown command '--help'" in capsys.readouterr().err
