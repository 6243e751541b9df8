"""Bad input on the command line (catalogue part 3): a non-zero exit code, one line on stderr
naming the culprit, no traceback, and no file created or changed.

The commands run in-process through ``rankwise.cli.main`` (an exception escaping it is what a
user would see as a traceback); one case also runs ``python -m rankwise`` for real.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from rel_kit import mlp, tree_digest
from test_rel_catalogue_io import MLP_CFG, _first_tensor, edit_config, edit_header, edit_weights

from rankwise.cli import main
from rankwise.io import save_adapter
from rankwise.lora import inject


def _adapter(root: Path, name: str = "adapter", *, seed: int = 0, dims=(8, 6, 4)) -> Path:
    return save_adapter(inject(mlp(dims=dims), MLP_CFG, generator=seed), root / name)


def _bin_only(d: Path) -> None:
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def _nan(d: Path) -> None:
    edit_weights(d, lambda t: t["base_model.model.0.lora_B.weight"].fill_(float("nan")))


def _huge_header(d: Path) -> None:
    edit_header(d, lambda h: _first_tensor(h).update(shape=[2**31, 2**31]))


def _past_end(d: Path) -> None:
    edit_header(d, lambda h: _first_tensor(h).update(data_offsets=[0, 2**40]))


MUTATIONS = {
    "bin": _bin_only,
    "nan": _nan,
    "huge": _huge_header,
    "past_end": _past_end,
    "int": lambda d: edit_weights(d, lambda t: t.update({k: v.long() for k, v in t.items()})),
    "huge_r": lambda d: edit_config(d, r=2**40),
}

# (id, argv with {a}=a good adapter, {b}=a mutated one, {w}=one of another width, {t}=tmp,
#  mutation of {b}, regex for the stderr line, bug or None)
CASES = [
    ("resize --rank 0", "resize {a} --out {t}/o --rank 0", None, "--rank", None),
    ("resize --energy 1.5", "resize {a} --out {t}/o --energy 1.5", None, "energy.*1.5", None),
    (
        "resize both --rank and --energy",
        "resize {a} --out {t}/o --rank 1 --energy 0.5",
        None,
        "not allowed with argument",
        None,
    ),  # fmt: skip
    ("resize a missing adapter", "resize {t}/nope --out {t}/o --rank 1", None, "nope", None),
    (
        "resize a huge-tensor header",
        "resize {b} --out {t}/o --rank 1",
        "huge",
        "not a valid safetensors file",
        None,
    ),  # fmt: skip
    ("resize NaN factors", "resize {b} --out {t}/o --rank 1", "nan", "(?i)nan", None),
    (
        "resize a .bin-only adapter",
        "resize {b} --out {t}/o --rank 1",
        "bin",
        "pickle",
        None,
    ),  # fmt: skip
    (
        "resize an integer adapter",
        "resize {b} --out {t}/o --rank 1",
        "int",
        "int64",
        None,
    ),  # fmt: skip
    (
        "resize --out is an existing file",
        "resize {a} --out {a}/adapter_config.json --rank 1",
        None,
        "adapter_config.json",
        None,
    ),  # fmt: skip
    (
        "combine wrong number of weights",
        "combine {a} {a} --weights 1 --out {t}/o",
        None,
        r"--weights: expected 2 numbers \(one per adapter\), found 1",
        None,
    ),  # fmt: skip
    (
        "combine a weight that is not finite",
        "combine {a} {a} --weights 1,nan --out {t}/o",
        None,
        "--weights: expected finite numbers",
        None,
    ),  # fmt: skip
    (
        "combine ties density 2",
        "combine {a} {a} --method ties --density 2 --out {t}/o",
        None,
        r"--density: expected a fraction in \(0, 1\], found 2.0",
        None,
    ),  # fmt: skip
    ("combine adapters of other widths", "combine {a} {w} --out {t}/o", None, "'0'", None),
    ("combine unknown method", "combine {a} --method magic --out {t}/o", None, "magic", None),
    ("analyze spectrum huge r", "analyze spectrum {b}", "huge_r", "rank", None),
    (
        "analyze similarity offsets past end",
        "analyze similarity {a} {b}",
        "past_end",
        "not a valid safetensors file",
        None,
    ),  # fmt: skip
    ("finetune --r 0", "finetune --r 0", None, r"option --r \(r in a config file\)", None),
    ("finetune --alpha 0", "finetune --alpha 0", None, "option --alpha", None),
    ("finetune --lr -1", "finetune --lr -1 --output {t}/o", None, "option --lr", None),
    ("finetune --batch-size 0", "finetune --batch-size 0", None, "option --batch-size", None),
    (
        "finetune --resume without a run",
        "finetune --resume --output {t}/none",
        None,
        "does not exist",
        None,
    ),  # fmt: skip
    (
        "evaluate a missing adapter",
        "evaluate --adapter {t}/nope --data {t}/d.tsv",
        None,
        "nope",
        None,
    ),  # fmt: skip
]


def _argv(template: str, tmp: Path, mutation: str | None) -> list[str]:
    a = _adapter(tmp)
    w = _adapter(tmp, "wide", dims=(16, 6, 4))
    b = _adapter(tmp, "bad", seed=1)
    if mutation is not None:
        MUTATIONS[mutation](b)
    return template.format(a=a, b=b, w=w, t=tmp).split()


def _params() -> list[object]:
    out = []
    for name, argv, mutation, needle, bug in CASES:
        marks = pytest.mark.xfail(strict=True, reason=bug) if bug else ()
        out.append(pytest.param(argv, mutation, needle, id=name, marks=marks))
    return out


@pytest.mark.parametrize(("template", "mutation", "needle"), _params())
def test_bad_command_line(
    template: str, mutation: str | None, needle: str, tmp_path: Path, capsys
) -> None:
    argv = _argv(template, tmp_path, mutation)
    before = tree_digest(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    # any other exception propagates: the user would see a traceback -> the case fails
    err = capsys.readouterr().err.strip()
    assert code not in (0, None), "a bad command line exited with status 0"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    errors = [ln for ln in lines if ln.startswith("rankwise ") and ": error: " in ln]
    assert errors == lines[-1:], err  # one error line, last (argparse prints its usage first)
    assert re.search(needle, errors[0]), err
    assert tree_digest(tmp_path) == before, "files on disk changed"


def test_real_process_prints_one_line_without_traceback(tmp_path: Path) -> None:
    bad = _adapter(tmp_path)
    _huge_header(bad)
    before = tree_digest(tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rankwise",
            "resize",
            str(bad),
            "--out",
            str(tmp_path / "o"),
            "--rank",
            "1",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "not a valid safetensors file" in out.stderr
    assert tree_digest(tmp_path) == before
