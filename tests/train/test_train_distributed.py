"""torchrun with 2 CPU processes (gloo): 2 × batch 8 trains exactly as 1 × batch 16."""

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
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if procs == 1:
        cmd = [sys.executable, "-m", "rankwise", "finetune", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", "-m", "rankwise", "finetune", *argv]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_two_processes_match_one_with_the_global_batch(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    common = ["--model", str(tiny_bert), "--data", str(toy_tsv), "--max-steps", "3", "--lr", "1e-2",
              "--dropout", "0", "--model-dropout", "0", "--save-every", "2"]  # fmt: skip
    two = _finetune(
        [*common, "--batch-size", "8", "--output", str(tmp_path / "two")], procs=2, cwd=tmp_path
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = _finetune(
        [*common, "--batch-size", "16", "--output", str(tmp_path / "one")], procs=1, cwd=tmp_path
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    # Only rank 0 wrote: one summary, one metrics line per step (+ before/after), no stray files.
    assert two.stdout.count("held-out after training") == 1
    assert two.stdout.count("done:") == 1
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    assert two.stdout.count("merge check: merged vs unmerged on") == 1
    # the held-out evaluations (sharded over the two processes) give one process's metrics
    evals = {}
    for name in ("one", "two"):
        records = [
            json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        evals[name] = [
            (r["step"], r["eval_loss"], r["eval_accuracy"]) for r in records if "eval_loss" in r
        ]
    assert [e[0] for e in evals["two"]] == [e[0] for e in evals["one"]] == [0, 3]
    for (_, loss_two, acc_two), (_, loss_one, acc_one) in zip(evals["two"], evals["one"]):
        assert acc_two == acc_one
        assert abs(loss_two - loss_one) <= 1e-5 * abs(loss_one)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


_RUNNER = """
import json, sys
from rankwise.train import TrainConfig, train
from rankwise.train.distributed import exit_process
kw = json.loads(sys.argv[1])
stop = int(sys.argv[2]) if len(sys.argv) > 2 else None
train(TrainConfig(**kw), echo=lambda s: None, stop_after=stop)
exit_process(0)  # as `rankwise` does under torchrun (torch's C++ teardown may abort)
"""


@pytest.mark.slow
def test_two_process_resume_with_dropout_is_exact(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    """Each process draws its own dropout masks, so each gets its own RNG state back (only
    rank 0's was saved: the resumed run's losses differed from the step after the resume)."""

    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    base = {"model": str(tiny_bert), "data": str(toy_tsv), "batch_size": 5, "lr": 5e-3,
            "max_steps": 5, "save_every": 2, "model_dropout": 0.1, "dropout": 0.1,
            "eval_split": 8}  # fmt: skip

    def run(output: str, *extra: str, **changes: object) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(runner),
               json.dumps({**base, "output": str(tmp_path / output), **changes}), *extra]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    run("whole")
    run("cut", "3")  # killed after step 3: resumes from the step-2 checkpoint
    run("cut", resume=True)
    losses = [
        [json.loads(line).get("loss") for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("whole", "cut")
    ]
    assert losses[0] == losses[1]
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_setup_joins_with_gloo_even_where_cuda_is_available(monkeypatch) -> None:
    """The engine keeps model, batches and reduction tensors on the CPU, so the process group
    must be gloo: with CUDA present it chose nccl, which fails at the first CPU collective.
    (No GPU here: CUDA's presence and the group's creation are stood in for.)"""
    import torch.distributed as dist

    from rankwise.train import distributed

    calls: list[dict] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: calls.append({"set_device": a}))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.setup()
    assert calls == [{"backend": "gloo"}]
    assert info == distributed.DistInfo(1, 2, 1, True)


@pytest.mark.slow
def test_two_processes_warn_once_and_label_the_second_ones_error(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    """Every process printed the data's warnings, and both printed a refused option's error,
    once glued into one line; now the warning comes once and the copy says whose it is."""
    rows = toy_tsv.read_text().splitlines()[1:]
    lines = [json.dumps({"sentence": t, "label": int(y)}) for y, t in (r.split("\t") for r in rows)]
    lines += [json.dumps({"label": 1}), json.dumps({"sentence": None, "label": 0})]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    common = ["--model", str(tiny_bert), "--data", str(data), "--max-steps", "1",
              "--batch-size", "8", "--save-every", "0"]  # fmt: skip
    run = _finetune([*common, "--output", str(tmp_path / "a")], procs=2, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("2 of 98 rows have no 'sentence' value") == 1, run.stderr[-3000:]
    bad = _finetune([*common, "--output", str(tmp_path / "b"), "--lr", "-1"], procs=2, cwd=tmp_path)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if "error:" in line]
    assert sorted(line.split(": error:")[0] for line in errors) == [
        "rankwise finetune",
        "rankwise finetune (rank 1)",
    ], bad.stderr[-3000:]


def test_exit_process_runs_exit_handlers_and_keeps_the_code(tmp_path: Path) -> None:
    """The torchrun exit: Python's exit handlers and buffered output first, then the code."""
    script = tmp_path / "exit.py"
    marker = tmp_path / "atexit.txt"
    script.write_text(
        "import atexit, sys\n"
        "from rankwise.train.distributed import exit_process\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "sys.stdout.write('buffered')\n"
        "exit_process(3)\n",
        encoding="utf-8",
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 3
    assert done.stdout == "buffered"
    assert marker.read_text() == "ran"


def test_the_executable_exits_through_exit_process_under_torchrun(tmp_path: Path) -> None:
    # an object finalized at interpreter shutdown says so; exit_process skips that shutdown
    code = (
        "import sys\n"
        "class D:\n"
        "    def __del__(self): print('finalized')\n"
        "d = D()\n"
        "sys.argv = ['rankwise', 'version']\n"
        "from rankwise.cli import entry\n"
        "entry()\n"
    )
    outputs = {}
    for world in ("1", "2", "", " 1 "):  # '' (a blank export) crashed after the command ran
        env = {**os.environ, "WORLD_SIZE": world}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert done.returncode == 0 and done.stdout.startswith("rankwise ")
        outputs[world] = done.stdout
    assert "finalized" in outputs["1"] and "finalized" not in outputs["2"]
    assert "finalized" in outputs[""] and "finalized" in outputs[" 1 "]
    env = {**os.environ, "WORLD_SIZE": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "rankwise", "finetune", "--lr", "-1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2  # an error's code survives the exit
