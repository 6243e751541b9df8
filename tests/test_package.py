"""The package as a new user meets it: imports, laziness, the command-line table, style."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rankwise
from rankwise.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "matplotlib", "scipy", "datasets", "sklearn", "peft")


def test_every_module_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages(rankwise.__path__, "rankwise.")]
    names = [n for n in names if n != "rankwise.__main__"]
    assert "rankwise.cli" in names
    for name in names:
        importlib.import_module(name)


def test_import_rankwise_stays_light() -> None:
    code = (
        "import sys, rankwise\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import rankwise pulled in: {out.stdout.strip()}"


def test_lazy_public_names_resolve() -> None:
    for name in rankwise._LAZY:
        assert getattr(rankwise, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        rankwise.no_such_name  # noqa: B018


@pytest.mark.parametrize("argv", [["--help"], []])
def test_cli_help_lists_the_table(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits after --help
        code = exc.code
    assert code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert rankwise.__version__ in capsys.readouterr().out


def test_cli_unknown_command_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "no-such-command" in capsys.readouterr().err


def test_python_dash_m_lists_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rankwise", "--help"], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert name in out.stdout


def test_every_command_module_has_the_protocol() -> None:
    for name, command in COMMANDS.items():
        module = importlib.import_module(f"rankwise.cli.{command.module}")
        assert callable(module.add_arguments) and callable(module.run), name


def test_no_pickle_and_safe_torch_load_in_the_package() -> None:
    import re

    for path in (ROOT / "src" / "rankwise").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill)\b", text, re.M), path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args: list[str]) -> None:
    targets = [str(ROOT / p) for p in ("src", "tests", "benchmarks") if (ROOT / p).exists()]
    out = subprocess.run(["ruff", *args, *targets], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
