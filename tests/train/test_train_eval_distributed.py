"""Held-out evaluation under torchrun is sharded: each process evaluates its share of the
batches and every process returns the whole set's result, equal to one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

_SCRIPT = """
import json, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from rankwise.train import distributed as dist_
from rankwise.train.batching import Encoded
from rankwise.train.evaluate import evaluate

model_dir, task, out = sys.argv[1], sys.argv[2], sys.argv[3]
info = dist_.setup()
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
n = 37  # 5 batches of 8: the processes get 3 and 2
lengths = torch.randint(3, 20, (n,), generator=g).tolist()
ids = tuple(tuple(torch.randint(5, 200, (k,), generator=g).tolist()) for k in lengths)
if task == "classification":
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    targets = tuple(torch.randint(0, 2, (n,), generator=g).tolist())
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    targets = tuple(tuple(-100 if j < 2 else t for j, t in enumerate(row)) for row in ids)
calls = []
model.register_forward_hook(lambda m, a, kw_out: calls.append(1))
res = evaluate(model, Encoded(ids, targets, task), batch_size=8, info=info)
tensors = {"loss": torch.tensor([res.loss], dtype=torch.float64)}
if res.logits is not None:
    tensors["logits"] = res.logits.contiguous()
    tensors["predictions"] = torch.tensor(res.predictions)
    tensors["accuracy"] = torch.tensor([res.accuracy], dtype=torch.float64)
else:
    tensors["perplexity"] = torch.tensor([res.perplexity], dtype=torch.float64)
save_file(tensors, f"{out}.{info.rank}.safetensors")
with open(f"{out}.{info.rank}.json", "w") as f:
    json.dump({"forwards": len(calls), "examples": res.examples}, f)
dist_.teardown(info)
dist_.exit_process(0)  # as `rankwise` does under torchrun (torch's C++ teardown may abort)
"""


def _run(script: Path, model: Path, task: str, out: Path, procs: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(script), str(model), task, str(out)]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_two_processes_share_the_batches_and_agree_with_one(
    task: str, tiny_bert: Path, tiny_gpt2: Path, tmp_path: Path
) -> None:
    script = tmp_path / "eval.py"
    script.write_text(_SCRIPT, encoding="utf-8")
    model = tiny_bert if task == "classification" else tiny_gpt2
    _run(script, model, task, tmp_path / "one", 1)
    _run(script, model, task, tmp_path / "two", 2)
    one = load_file(str(tmp_path / "one.0.safetensors"))
    meta_one = json.loads((tmp_path / "one.0.json").read_text())
    assert meta_one == {"forwards": 5, "examples": 37}
    forwards = []
    for rank in (0, 1):
        two = load_file(str(tmp_path / f"two.{rank}.safetensors"))
        meta = json.loads((tmp_path / f"two.{rank}.json").read_text())
        assert meta["examples"] == 37
        forwards.append(meta["forwards"])
        assert two.keys() == one.keys()
        for key in one:
            if key in ("logits", "predictions", "accuracy"):
                assert torch.equal(two[key], one[key]), key  # each row from one process
            else:  # the loss sum in another order
                torch.testing.assert_close(two[key], one[key], rtol=1e-12, atol=0.0)
    assert forwards == [3, 2]  # every other sorted batch: together the five, none twice
