"""``rankwise compress-image``: figures, the printed table, cropping rule, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rankwise.analysis.image import crop_for_monarch, monarch_blocks
from rankwise.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW = re.compile(r"^(SVD|ID|Monarch \(b=(\d+)\))\s+(\d+)\s+(\d+)\s+([\d.]+)x\s+([\d.]+)%$")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: avoid OpenMP wake-ups on a busy machine
    yield
    torch.set_num_threads(threads)


def _table(out: str) -> dict[tuple[str, int], tuple[int, float, float]]:
    rows = {}
    for line in out.splitlines():
        match = ROW.match(line.strip())
        if match:
            method = match.group(1).split(" ")[0]
            rows[(method, int(match.group(3)))] = (
                int(match.group(4)),
                float(match.group(5)),
                float(match.group(6)),
            )
    return rows


def test_default_image_writes_figures_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert main(["compress-image", "--ranks", "5,20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "image 420x640" in out  # 427x640 center-cropped to multiples of lcm(5, 20) = 20
    for name in ("compress_grid.png", "spectrum.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left nothing behind
    rows = _table(out)
    assert set(rows) == {(m, k) for m in ("SVD", "ID", "Monarch") for k in (5, 20)}
    for k in (5, 20):
        svd, ident, monarch = rows[("SVD", k)], rows[("ID", k)], rows[("Monarch", k)]
        assert svd[0] == monarch[0] == k * (420 + 640)  # equal parameter counts
        assert ident[0] == k * (420 + 640 - k)
        assert svd[1] == pytest.approx(420 * 640 / svd[0], abs=0.05)
        assert svd[2] <= ident[2] and svd[2] <= monarch[2]  # Eckart–Young
    for method in ("SVD", "ID", "Monarch"):
        assert rows[(method, 20)][2] < rows[(method, 5)][2]


def test_custom_image_with_awkward_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image = pytest.importorskip("PIL.Image")
    y, x = np.mgrid[0:70, 0:101]
    pixels = (127 + 120 * np.sin(x / 7.0) * np.cos(y / 11.0)).astype(np.uint8)
    path = tmp_path / "waves.png"
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(path)
    out_dir = tmp_path / "out"
    assert main(["compress-image", str(path), "--ranks", "3,7", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    # lcm(3, 7) = 21 keeps 63 of 70 rows and 84 of 101 columns: b = k exactly.
    assert "image 63x84" in out
    assert (out_dir / "compress_grid.png").read_bytes().startswith(PNG_MAGIC)
    rows = _table(out)
    assert rows[("Monarch", 7)][0] == 7 * (63 + 84)


def test_cropping_and_block_rules() -> None:
    image = np.zeros((427, 640))
    assert crop_for_monarch(image, (5, 20, 50)).shape == (400, 600)
    # lcm(7, 11, 13) = 1001 would discard too much: multiples of 16 instead.
    assert crop_for_monarch(image, (7, 11, 13)).shape == (416, 640)
    assert monarch_blocks((416, 640), 7) == 8  # divisors of gcd 32: 1, 2, 4, 8, 16, 32
    assert monarch_blocks((416, 640), 12) == 8  # tie between 8 and 16: the smaller
    assert monarch_blocks((400, 600), 50) == 50
    # small images: 16 did not fit (10x10 at ranks 3, 4 was "too small to crop"), and a crop
    # to multiples of 16 fell below a rank the image holds (40x60 at rank 36)
    assert crop_for_monarch(np.zeros((10, 10)), (3, 4)).shape == (8, 8)
    assert crop_for_monarch(np.zeros((40, 60)), (35, 36)).shape == (40, 56)  # multiples of 8
    assert crop_for_monarch(np.zeros((1, 60)), (1,)).shape == (1, 60)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ranks", "0,5"], "expected positive integers"),
        (["--ranks", "five"], "expected integers such as 5,20,50"),
    ],
)
def test_bad_ranks_are_argparse_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["compress-image", *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_image_and_too_large_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.png"
    assert main(["compress-image", str(missing), "--out", str(tmp_path)]) == 2
    assert "image: no such file" in capsys.readouterr().err
    Image = pytest.importorskip("PIL.Image")
    path = tmp_path / "small.png"
    Image.fromarray(np.full((32, 48), 128, np.uint8)).save(path)
    assert main(["compress-image", str(path), "--ranks", "40", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--ranks: expected ranks <= 32 (the image is 32x48), found 40" in err
    # the limit is the image's, not that of a crop to multiples of 16 (which said 32 for 40x60)
    Image.fromarray(np.full((40, 60), 128, np.uint8)).save(path)
    assert main(["compress-image", str(path), "--ranks", "41", "--out", str(tmp_path / "o")]) == 2
    assert "expected ranks <= 40 (the image is 40x60)" in capsys.readouterr().err
    assert main(["compress-image", str(path), "--ranks", "36", "--out", str(tmp_path / "o")]) == 0


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_grayscale_keeps_its_values(mode: str, tmp_path: Path) -> None:
    from PIL import Image

    from rankwise.analysis.image import load_gray

    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    ramp = np.tile(np.linspace(0, 60000, 64), (32, 1)).astype(dtype).astype(np.float64)
    path = tmp_path / "ramp.tif"
    Image.fromarray(ramp.astype(dtype), mode=mode if mode != "I;16" else None).save(path)
    gray = load_gray(str(path))
    assert gray.shape == (32, 64)
    # proportional to the stored values (RGB conversion clipped everything above 255 to white)
    np.testing.assert_allclose(gray / gray.max(), ramp / ramp.max(), atol=1e-6)
    assert gray.max() <= 1.0


def test_out_at_an_existing_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stray = tmp_path / "grid.png"
    stray.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["compress-image", "--ranks", "5", "--out", str(stray)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out/--output:" in err and str(stray) in err and "not a directory" in err
    assert stray.read_bytes() == b"keep me"


def test_a_failed_figure_removes_the_directory_it_made(tmp_path: Path, monkeypatch) -> None:
    # --out was made before any work: a failure (or Ctrl-C) left it empty or with one figure
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from rankwise.analysis import plots

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(plots, "plot_image_spectrum", broken)
    out = tmp_path / "figs"
    assert main(["compress-image", "--ranks", "5", "--out", str(out)]) == 2
    assert list(tmp_path.iterdir()) == []
    # and the parents made for it (they stayed, empty)
    assert main(["compress-image", "--ranks", "5", "--out", str(tmp_path / "a" / "b" / "c")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_decompression_bomb_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    # PIL's DecompressionBombError is not an OSError: it ended in a traceback
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("1", (14000, 14000)).save(path)
    out = tmp_path / "out"
    assert main(["compress-image", str(path), "--ranks", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankwise compress-image: error: image ") and "Traceback" not in err
    assert "decompression bomb" in err and not out.exists()


def test_bad_images_are_named_and_seed_needs_randomized(tmp_path: Path, capsys) -> None:
    """A truncated file failed when its pixels were read ("image file is truncated", no
    name), a NaN float TIFF as linalg's "M", a directory as "no such file"; --seed without
    --randomized was ignored."""
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.full((32, 48), 128, np.uint8)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:-40])
    nan = np.full((32, 48), np.nan, np.float32)
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    (tmp_path / "adir").mkdir()
    cases = {
        "trunc.png": r"image '.*trunc\.png': .*truncated",
        "nan.tif": r"image '.*nan\.tif': 1536 pixels are NaN or infinite",
        "adir": r"image: '.*adir' is a directory; expected an image file",
    }
    for name, pattern in cases.items():
        argv = ["compress-image", str(tmp_path / name), "--ranks", "2"]
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2, name
        assert re.search(pattern, capsys.readouterr().err), name
    argv = [
        "compress-image",
        str(good),
        "--ranks",
        "2",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "--seed: only --randomized uses it" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
