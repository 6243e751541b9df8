"""SIGKILL in the middle of training, then --resume: the final adapter is bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rankwise.train import TrainConfig, train


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    args = {"model": str(tiny_bert), "data": str(toy_tsv), "max_steps": 20, "save_every": 2,
            "batch_size": 8, "lr": 5e-3}  # fmt: skip
    train(TrainConfig(**args, output=str(tmp_path / "whole")), echo=lambda _: None)
    killed = tmp_path / "killed"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # same thread count: same float reductions
    cmd = [sys.executable, "-m", "rankwise", "finetune", *argv, f"--output={killed}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while not (killed / "checkpoints" / "step-000002").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "adapter").exists()
    resumed = train(TrainConfig(**args, output=str(killed), resume=True), echo=lambda _: None)
    assert resumed.resumed_from is not None and resumed.resumed_from >= 2
    name = "adapter/adapter_model.safetensors"
    assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
