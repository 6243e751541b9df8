"""File primitives: atomic writes, header validation, config JSON round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rankwise.errors import AdapterFormatError
from rankwise.io.config_json import config_from_json, config_to_json
from rankwise.io.files import (
    TensorInfo,
    atomic_write_bytes,
    read_header,
    read_tensors,
    write_safetensors,
)
from rankwise.lora import LoraConfig


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.bin"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"a": torch.ones(2)}, metadata={"format": "pt"})
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert read_header(path) == {"a": TensorInfo("F32", (2,))} and len(os.listdir(tmp_path)) == 1


def test_header_is_read_without_data_and_tensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    t = {"x": torch.arange(6.0).view(2, 3).t(), "y": torch.zeros(1, dtype=torch.float16)}
    write_safetensors(path, t, metadata={"format": "pt"})
    assert read_header(path) == {"x": TensorInfo("F32", (3, 2)), "y": TensorInfo("F16", (1,))}
    assert torch.equal(read_tensors(path, ["x"])["x"], t["x"])


def test_header_pointing_past_the_end_is_refused(tmp_path: Path) -> None:
    header = json.dumps(
        {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    ).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(AdapterFormatError, match="bad.safetensors"):
        read_header(path)


@pytest.mark.parametrize(
    "cfg",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="CAUSAL_LM"),
        LoraConfig(
            target_modules=r".*\.q", use_rslora=True, init_lora_weights="gaussian", bias="all"
        ),
        LoraConfig(
            target_modules=["q"],
            layers_to_transform=[0, 2],
            layers_pattern="h",
            rank_pattern={"q": 2},
        ),
        LoraConfig(target_modules=["q"], init_lora_weights=False, modules_to_save=["head"]),
    ],
)
def test_config_json_round_trip(cfg: LoraConfig) -> None:
    data = json.loads(json.dumps(config_to_json(cfg)))
    assert data["peft_type"] == "LORA" and data["inference_mode"] is True
    back = config_from_json(data, source="test")
    assert back == cfg.replace(inference_mode=True)


def test_peft_reads_our_config(tmp_path: Path) -> None:
    from peft import LoraConfig as PeftConfig

    from rankwise.io import write_adapter_config

    cfg = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q", "v"], use_rslora=True, rank_pattern={"v": 2}
    )
    write_adapter_config(tmp_path, cfg)
    theirs = PeftConfig.from_pretrained(str(tmp_path))
    assert (theirs.r, theirs.lora_alpha, set(theirs.target_modules), theirs.use_rslora) == (
        4,
        16,
        {"q", "v"},
        True,
    )
    assert theirs.rank_pattern == {"v": 2}


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    # mkstemp creates 0600 files; an atomically written file must be as readable as open()'s.
    from rankwise.io.files import atomic_write_bytes, default_file_mode
    from rankwise.train.config import atomic_write_text

    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_text(tmp_path / "b.txt", "y")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "c.bin", b"z")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.bin").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "y"


def _write_pair(directory: Path, value: bytes) -> None:
    from rankwise.io.files import replaced_dir

    with replaced_dir(directory) as tmp:
        atomic_write_bytes(tmp / "weights.bin", value)
        atomic_write_bytes(tmp / "config.json", value)


def test_replacing_the_working_directory_keeps_the_process_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "." failed with EBUSY (renaming the cwd); its absolute path was swapped out and deleted,
    # so the process's later relative writes failed (Trainer(output_dir=".") + the callback)
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    monkeypatch.chdir(run)
    _write_pair(Path("."), b"one")
    _write_pair(run, b"two")
    monkeypatch.chdir(run / "sub")  # a directory above the working one: the same
    _write_pair(run, b"three")
    assert Path.cwd() == run / "sub" and os.path.samefile(".", run / "sub")
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json",
        "notes.txt",
        "sub",
        "weights.bin",
    ]
    assert (run / "weights.bin").read_bytes() == (run / "config.json").read_bytes() == b"three"
    Path("here.txt").write_text("still writable")  # the working directory still exists
    assert (run / "sub" / "here.txt").is_file()


def test_replacing_a_symlinked_directory_writes_into_its_target(tmp_path: Path) -> None:
    # the link was replaced by a real directory of hard links; its target never got the files
    target = tmp_path / "big_disk" / "run1"
    target.mkdir(parents=True)
    (target / "checkpoint.txt").write_text("kept")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    _write_pair(link, b"one")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "checkpoint.txt",
        "config.json",
        "weights.bin",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big_disk", "out"]  # nothing stray


def test_files_another_process_writes_during_a_save_are_kept(tmp_path: Path) -> None:
    # the swap installed the copy of the directory made before the save: files written into it
    # meanwhile (Trainer's rng_state_<i>.pth from each process in checkpoint-N) were deleted
    from rankwise.io.files import replaced_dir

    directory = tmp_path / "checkpoint-10"
    directory.mkdir()
    (directory / "optimizer.pt").write_bytes(b"opt")
    with replaced_dir(directory) as tmp:
        atomic_write_bytes(tmp / "weights.bin", b"w")
        (directory / "rng_state_1.pth").write_bytes(b"rng")  # another process, meanwhile
        (directory / "logs").mkdir()
        (directory / "logs" / "x.txt").write_text("x")
        atomic_write_bytes(tmp / "config.json", b"c")
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["config.json", "logs", "optimizer.pt", "rng_state_1.pth", "weights.bin"]
    assert (directory / "rng_state_1.pth").read_bytes() == b"rng"
    assert (directory / "logs" / "x.txt").read_text() == "x"


@pytest.mark.skipif(getattr(os, "geteuid", lambda: 1)() != 0, reason="chown needs root")
def test_a_directory_owned_by_another_user_keeps_its_owner(tmp_path: Path) -> None:
    # the swap replaced it with a new directory owned by the saver (a shared group folder
    # became root's)
    directory = tmp_path / "shared"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    os.chown(directory, 65534, 65534)
    inode = directory.stat().st_ino
    _write_pair(directory, b"one")
    assert directory.stat().st_uid == 65534 and directory.stat().st_ino == inode
    assert (directory / "weights.bin").read_bytes() == b"one"
    assert (directory / "notes.txt").read_text() == "mine"


def test_mount_points_and_read_only_parents_are_written_in_place(tmp_path: Path) -> None:
    # renaming a mount point (a container volume) fails with EBUSY, and a temporary directory
    # beside one whose parent is read-only cannot be made: nothing was saved
    from rankwise.io.files import _keep_in_place

    assert _keep_in_place(Path("/proc"))  # a mount point
    plain = tmp_path / "plain"
    plain.mkdir()
    assert not _keep_in_place(plain)


def test_the_default_file_mode_reads_the_umask_without_changing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # os.umask(0) to read it left a moment in which another thread's new file got 0o666
    from rankwise.io.files import default_file_mode

    old = os.umask(0o027)
    try:
        assert default_file_mode() == 0o640
        if Path("/proc/self/status").is_file():  # Linux: read, never set
            sets: list[int] = []
            real = os.umask
            monkeypatch.setattr(os, "umask", lambda mask: sets.append(mask) or real(mask))
            assert default_file_mode() == 0o640 and sets == []
    finally:
        os.umask(old)


@pytest.mark.skipif(getattr(os, "geteuid", lambda: 1)() != 0, reason="setuid needs root")
def test_a_foreign_directory_the_saver_cannot_write_is_still_swapped() -> None:
    # an adapter/ left by sudo in the user's own workspace: the in-place route for a foreign
    # owner made its temporary inside it and failed with PermissionError (the swap worked)
    import shutil
    import subprocess
    import sys
    import tempfile
    import textwrap

    root = Path(tempfile.mkdtemp(prefix="rankwise-foreign-"))  # pytest's tmp is root-only
    try:
        os.chmod(root, 0o755)
        parent = root / "workspace"
        (parent / "adapter").mkdir(parents=True)
        (parent / "adapter" / "config.json").write_bytes(b"old")
        os.chown(parent, 65534, 65534)  # the saver's own directory; adapter/ stays root's
        script = textwrap.dedent(f"""
            import os
            from pathlib import Path
            from rankwise.io.files import atomic_write_bytes, replaced_dir  # imported as root
            os.setgid(65534); os.setuid(65534)
            with replaced_dir(Path({str(parent / "adapter")!r})) as tmp:
                atomic_write_bytes(tmp / "config.json", b"new")
        """)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (parent / "adapter" / "config.json").read_bytes() == b"new"
        assert (parent / "adapter").stat().st_uid == 65534
        # the old root-owned copy could not be deleted: said, not left behind silently
        left = [p.name for p in parent.iterdir() if p.name.startswith(".adapter.")]
        assert len(left) == 1 and f"is left at {parent / left[0]}" in done.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_directory_holding_a_mount_point_is_written_in_place(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the swap carried the mount off with the old directory, whose removal then emptied the
    # mounted file system (seen with a tmpfs mounted at adapter/data)
    from rankwise.io import files
    from rankwise.io.files import replaced_dir

    final = tmp_path / "adapter"
    (final / "extra" / "data").mkdir(parents=True)  # a bind mount, two levels down
    (final / "extra" / "data" / "important.txt").write_text("keep")
    mount = str((final / "extra" / "data").resolve())
    monkeypatch.setattr(files, "_mount_points", lambda: ["/", mount])
    inode = final.stat().st_ino
    with replaced_dir(final) as tmp:
        atomic_write_bytes(tmp / "adapter_config.json", b"{}")
    assert final.stat().st_ino == inode  # kept in place, not swapped
    assert (final / "extra" / "data" / "important.txt").read_text() == "keep"
    assert (final / "adapter_config.json").read_bytes() == b"{}"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_long_valid_name_is_saved(tmp_path: Path) -> None:
    # the temporary sibling's name was the whole name plus marks: past NAME_MAX (255 bytes)
    # for a name of 245 characters, an OSError naming a hidden temporary path
    from rankwise.io.files import replaced_dir

    final = tmp_path / ("y" * 250)
    for _ in range(2):  # made, then replaced
        with replaced_dir(final) as tmp:
            atomic_write_bytes(tmp / "adapter_config.json", b"{}")
    atomic_write_bytes(tmp_path / ("z" * 250), b"x")
    assert sorted(os.listdir(tmp_path)) == ["y" * 250, "z" * 250]


def test_a_save_during_a_load_never_gives_a_mix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # load_adapter read the config, then opened the weights by path again: a save landing in
    # between gave one adapter's alpha with the other's factors (49 of 213 loads mixed)
    from lora_testkit import tiny_bert_cls

    from rankwise.io import adapter as adapter_io
    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import inject, lora_layers

    def saved(alpha: int, value: float):
        model = inject(tiny_bert_cls(), LoraConfig(r=2, lora_alpha=alpha, target_modules=["query"]))
        for _, layer in lora_layers(model):
            torch.nn.init.constant_(layer.lora_B.weight, value)
        return model

    directory = tmp_path / "adapter"
    save_adapter(saved(8, 8.0), directory)
    other = saved(16, 16.0)
    real = adapter_io.read_tensors
    calls: list[int] = []

    def saved_meanwhile(*args, **kwargs):
        if not calls:  # another process's save lands between the config and the weights
            save_adapter(other, directory)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_io, "read_tensors", saved_meanwhile)
    loaded = load_adapter(tiny_bert_cls(), directory)
    assert len(calls) == 2  # read again
    for _, layer in lora_layers(loaded):
        assert layer.scaling == 8.0 and bool((layer.lora_B.weight == 16.0).all())


def test_loading_does_not_draw_factors_the_file_replaces(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # load_adapter ran the config's initializer (init_lora_weights=False: both factors drawn)
    # and then overwrote every value: 0.5 s of a 1.1 s load on BERT-base at r = 64
    from lora_testkit import logits, tiny_bert_cls

    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import initializers, inject

    config = LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
    model = inject(tiny_bert_cls(), config, generator=3)
    save_adapter(model, tmp_path / "a")

    def drawn(*args, **kwargs):
        raise AssertionError("the initializer ran")

    monkeypatch.setitem(initializers.INITIALIZERS, "random", drawn)
    loaded = load_adapter(tiny_bert_cls(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, "bert"), logits(model.eval(), "bert"))


def test_save_adapter_streams_the_weights_file(tmp_path: Path) -> None:
    """safetensors' save() built the whole file as bytes before the write: a 611 MB adapter
    was held twice (+1.2 GB at peak; PEFT's save_pretrained ~0). Python's allocator sees
    those bytes, not torch's tensors."""
    import tracemalloc

    from torch import nn

    from rankwise.io import save_adapter
    from rankwise.lora import LoraConfig, inject

    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
    inject(model, LoraConfig(r=512, target_modules=["0", "1"]), generator=0)  # 16 MB factors
    tracemalloc.start()
    try:
        save_adapter(model, tmp_path / "a")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_size > 16 << 20


def test_the_finite_check_reads_in_blocks_and_casts_each() -> None:
    """A whole-tensor cast and test cost 2.4x a large embedding at peak; the blocks must
    still see every entry, after the cast (float64 beyond float32's range is inf there)."""
    from rankwise.io.adapter_keys import _all_finite

    x = torch.zeros(10, dtype=torch.float64)
    assert _all_finite(x, torch.float32, block=3)
    x[7] = float("nan")  # in the third block
    assert not _all_finite(x, torch.float64, block=3)
    x[7] = 1e300
    assert _all_finite(x, torch.float64, block=3) and not _all_finite(x, torch.float32, block=3)


def test_a_failed_weights_write_keeps_the_os_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors reports its I/O errors as SafetensorError; they become the OSError a write
    gives (errno from the message: EFBIG was EIO), and the old file stays."""
    import errno

    from safetensors import SafetensorError

    from rankwise.io import files

    path = tmp_path / "w.safetensors"
    files.write_safetensors(path, {"a": torch.ones(2)}, metadata={"format": "pt"})
    before = path.read_bytes()
    for message, code in [
        ("Error while serializing: I/O error: File too large (os error 27)", errno.EFBIG),
        ("No space left on device", errno.ENOSPC),
    ]:

        def fail(*args, message=message, **kwargs):
            raise SafetensorError(message)

        monkeypatch.setattr(files, "st_save_file", fail)
        with pytest.raises(OSError) as caught:
            files.write_safetensors(path, {"a": torch.zeros(2)}, metadata={"format": "pt"})
        assert caught.value.errno == code and caught.value.filename == str(path)
        assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]
