"""torchrun with 2 CPU processes: LoRA-GA's initialization is the same on every process (the
same gradient batches, no communication), so 2 × batch 8 trains as 1 × batch 8 × grad-accum 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _finetune(argv: list[str], *, procs: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cmd = [sys.executable, "-m", "rankwise", "finetune", *argv]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", *cmd[1:]]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_lora_ga_two_processes_match_one_with_grad_accum(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # torchrun's own parser takes "--r" for an abbreviation of its options: --lora-r passes
    config = tmp_path / "run.yaml"
    config.write_text("method: lora-ga\nga_batches: 2\nbatch_size: 8\n", encoding="utf-8")
    common = ["--model", str(tiny_bert), "--data", str(toy_tsv), "--max-steps", "3",
              "--lr", "1e-2", "--dropout", "0", "--model-dropout", "0", "--save-every", "0",
              "--config", str(config), "--lora-r", "4"]  # fmt: skip
    two = _finetune([*common, "--output", str(tmp_path / "two")], procs=2, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _finetune(
        [*common, "--grad-accum", "2", "--output", str(tmp_path / "one")], procs=1, cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr[-3000:]
    name = "adapter/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    for run in ("one", "two"):  # --lora-r reached rankwise (LoRA-GA saves rank 2r)
        saved = json.loads((tmp_path / run / "adapter" / "adapter_config.json").read_text())
        assert saved["r"] == 8, saved["r"]
