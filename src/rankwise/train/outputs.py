"""The output directory of a run: created only after every input loaded, written by rank 0.

``<output>/`` holds ``config.yaml`` (the resolved options), ``metrics.jsonl``,
``training_curve.png``, ``checkpoints/``, and at the end ``adapter/`` (PEFT format, plus the
tokenizer and ``rankwise_task.json`` with the task and label names) or, for full fine-tuning,
``model/`` (``save_pretrained``); with ``--merge`` also ``merged/``, a plain transformers model
directory. Directories are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rankwise.errors import ConfigError
from rankwise.io.files import readable_files, swap_in
from rankwise.train import distributed as dist_
from rankwise.train.batching import Encoded
from rankwise.train.config import (
    TrainConfig,
    atomic_write_text,
    option,
    read_config_file,
    write_yaml,
)
from rankwise.train.evaluate import EvalResult, evaluate
from rankwise.train.methods import MergeCheck, Prepared
from rankwise.train.metrics import CURVE_FILE, METRICS_FILE, plot_training_curve
from rankwise.train.models import checkpoint_dropout

CONFIG_FILE = "config.yaml"
TASK_FILE = "rankwise_task.json"


class Finished(NamedTuple):
    saved: Path | None
    merged: Path | None
    merge_check: MergeCheck | None


def default_output() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"finetune-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"finetune-{stamp}-{n}"
    return out


def check_output(config: TrainConfig, info: dist_.DistInfo, out: Path | None = None) -> Path:
    """The output directory (``out``, else ``--output`` or a new default), checked without
    writing anything: new or empty, or with ``--resume`` a run whose options match. Called
    before the model and data load (a refused resume is told at once, not after them and not
    as an unrelated data error) and again by :func:`prepare_output`."""
    if config.output is None and info.world_size > 1:
        raise ConfigError(f"{option('output')}: pass --output DIR when running under torchrun")
    if config.output is None and out is None and config.resume:
        raise ConfigError(
            f"{option('resume')} needs {option('output')}: the run directory to continue"
        )
    if out is None:
        out = Path(config.output).expanduser() if config.output else default_output()
    if config.resume:
        if not out.is_dir():
            raise FileNotFoundError(f"--resume: output directory {str(out)!r} does not exist")
        if (out / CONFIG_FILE).is_file():
            check_resumable(config, out / CONFIG_FILE)
        else:
            raise ConfigError(
                f"--resume: {str(out)!r} holds no {CONFIG_FILE}, so it is not a rankwise "
                "finetune run: nothing to resume (its files are left alone); drop --resume to "
                "start a run there, or choose another --output"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"output directory {str(out)!r} is not empty; pass --resume to continue the run in it, or choose another --output"
        )
    elif out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {str(out)!r} is a file; expected a directory")
    return out


def prepare_output(
    config: TrainConfig,
    info: dist_.DistInfo,
    out: Path | None = None,
    filled: Mapping[str, Any] | None = None,
) -> Path:
    """Check (:func:`check_output`, again: the model and data loaded meanwhile), create and
    (rank 0) start the output directory; write the resolved config, except on a resume, whose
    checkpoint is checked first (:func:`record_config` then)."""
    out = check_output(config, info, out)
    dist_.barrier(info)  # every process checked before rank 0 creates anything
    if info.is_main:
        try:
            if config.output is None and not config.resume:
                out = _claim_default(out)
            else:
                out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PermissionError(
                f"output directory {str(out)!r} cannot be written ({err.strerror or err})"
            ) from None
        claim_output(out)
        if not config.resume and any(out.iterdir()):
            release_output(out)  # another run started there since the check
            check_output(config, info, out)  # its not-empty error
        if not config.resume:
            record_config(config, info, out, filled)
    dist_.barrier(info)
    return out


def _claim_default(out: Path) -> Path:
    """Create the default output directory, or the next free name when another run started
    in the same second took it (both found the name free; the second was then told the
    directory was not empty, as if it were its own run to resume)."""
    for _ in range(1000):
        try:
            out.mkdir(parents=True, exist_ok=False)
            return out
        except FileExistsError:
            out = default_output()
    raise FileExistsError(f"no free default output directory under {str(out.parent)!r}")


# Output directory -> the open descriptor holding its lock (on the directory itself: no file)
_LOCKS: dict[str, int] = {}
# The keys claimed within the current releasing_claims() block (a train() call)
_CLAIMED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "rankwise_claimed_outputs", default=None
)


def claim_output(out: Path) -> None:
    """(Rank 0) hold an exclusive lock on the output directory until :func:`release_output`
    (or the process ends): a second run, or a ``--resume`` of a run still going, in the same
    directory is refused instead of interleaving its metrics, checkpoints and final adapter
    with this one's and both reporting success. ``flock`` on the directory; where the file
    system has none (some network mounts), no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"output directory {str(out)!r} is in use by another rankwise finetune run; wait "
            "for it to end, or choose another --output"
        ) from None
    except OSError:
        os.close(fd)
        return
    key = str(out.resolve())
    _LOCKS[key] = fd
    claimed = _CLAIMED.get()
    if claimed is not None:
        claimed.append(key)


def release_output(out: Path | str) -> None:
    """Let go of :func:`claim_output`'s lock on ``out`` (nothing if it holds none)."""
    _release(str(Path(out).resolve()))


def _release(key: str) -> None:
    fd = _LOCKS.pop(key, None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def releasing_claims() -> Iterator[None]:
    """Release on the way out the locks :func:`claim_output` took inside (one ``train()``
    call's own: not another thread's run, and by the key it was taken under, whatever the
    directory is called by then)."""
    token = _CLAIMED.set([])
    try:
        yield
    finally:
        for key in _CLAIMED.get() or []:
            _release(key)
        _CLAIMED.reset(token)


def held_outputs() -> frozenset[str]:
    """The output directories this process holds locks on."""
    return frozenset(_LOCKS)


def record_config(
    config: TrainConfig, info: dist_.DistInfo, out: Path, filled: Mapping[str, Any] | None = None
) -> None:
    """(Rank 0) write the run's ``config.yaml``: local paths absolute, ``resume`` left out (it
    belongs to one invocation: the file repeats the run elsewhere as it is), and ``filled``:
    the options derived rather than given (:data:`~rankwise.train.config.FILLED_KEY`). On a
    resume, once the checkpoint was accepted (a refused one leaves the file as it was), keeping
    the file's own record of those and clearing what a kill during a final save left behind."""
    if not info.is_main:
        return
    filled = dict(filled or {})
    if config.resume:  # a kill during a final save left its temporary (as checkpoints do)
        for leftover in out.iterdir():
            if leftover.is_dir() and leftover.name.startswith(FINAL_LEFTOVERS):
                shutil.rmtree(leftover, ignore_errors=True)
        # the resumed options hold the run's derived values as if given: keep its record
        recorded = read_config_file(out / CONFIG_FILE)[1] if (out / CONFIG_FILE).is_file() else {}
        filled = {
            **{k: v for k, v in recorded.items() if getattr(config, k) == v},
            **filled,
        }
    try:
        write_yaml(
            dataclasses.replace(_absolute_paths(config), resume=False),
            out / CONFIG_FILE,
            filled=filled,
        )
    except OSError as err:
        raise PermissionError(
            f"output directory {str(out)!r} cannot be written ({err.strerror or err})"
        ) from None


def leftover_prefix(kind: str, name: str) -> str:
    """How :func:`atomic_dir` names its ``kind`` ("tmp", "stale") directory for ``name``,
    before the process id."""
    return f".{kind}-{name}-"


# what atomic_dir leaves of the run's final outputs when the process is killed mid-save
FINAL_LEFTOVERS = tuple(
    leftover_prefix(kind, name)
    for kind in ("tmp", "stale")
    for name in ("adapter", "model", "merged")
)

# Options a resumed run may change: where and how often it reports and saves, and how the
# global batch is split (the checkpoint checks batch size x grad accum x processes itself).
RESUMABLE = frozenset(
    {"output", "resume", "merge", "eval_every", "save_every", "keep_checkpoints", "batch_size",
     "grad_accum"}
)  # fmt: skip


def _same(name: str, saved: Any, given: Any) -> bool:
    if saved == given:
        return True
    if name in ("model", "data", "eval_data") and isinstance(saved, str) and isinstance(given, str):
        return _absolute(saved) == _absolute(given)  # one local path, two spellings
    return False


def _absolute(value: str) -> str:
    """A local path made absolute, in ``hf:<local dataset directory>[:split]`` too; anything
    else (a hub id, a path that does not exist) as it is."""
    prefix, name, sep, split = "", value, "", ""
    if value.startswith("hf:"):
        prefix = "hf:"
        name, sep, split = value[3:].partition(":")
    path = Path(name).expanduser()
    if not name or not path.exists():
        return value
    return f"{prefix}{path.resolve()}{sep}{split}"


def _absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local model/data paths recorded absolute (an ``hf:`` local dataset directory too), so
    the run resumes or repeats from any directory."""
    changes = {
        name: _absolute(value)
        for name in ("model", "data", "eval_data")
        if isinstance(value := getattr(config, name), str)
    }
    return dataclasses.replace(config, **changes)


def check_resumable(config: TrainConfig, saved_file: Path) -> None:
    """Refuse a resume whose options differ from the run's own ``config.yaml`` (other than
    :data:`RESUMABLE`): the checkpoint's optimizer, schedule and data order belong to those."""
    from rankwise.train.config import from_mapping, read_config_file

    saved = from_mapping(read_config_file(saved_file)[0])
    # eval_split is not read with eval_data: runs before 2026-12-07 recorded 0.1 there
    unread = (
        {"eval_split"} if saved.eval_data is not None and config.eval_data is not None else set()
    )
    changed = [
        (name, getattr(saved, name), getattr(config, name))
        for name in TrainConfig.__dataclass_fields__
        if name not in RESUMABLE | unread
        and not _same(name, getattr(saved, name), getattr(config, name))
    ]
    if changed:
        listed = "; ".join(
            f"{n.replace('_', '-')}: {a!r} in the run, {b!r} now" for n, a, b in changed
        )
        raise ConfigError(
            f"--resume: options differ from {str(saved_file)!r} ({listed}); a resumed run "
            "continues with its own settings; start a new --output to change them"
        )


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; rename it to ``final`` on success."""
    tmp = final.parent / f"{leftover_prefix('tmp', final.name)}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        readable_files(tmp)  # save_pretrained's safetensors files are 0o600
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stale = final.parent / f"{leftover_prefix('stale', final.name)}{os.getpid()}"
    try:  # the new version in place before the old one is deleted (it ends up at tmp)
        swap_in(tmp, final, stale=stale)
    finally:  # the old version after the swap; the new one if it failed (no hidden copy left)
        shutil.rmtree(tmp, ignore_errors=True)


def task_info(config: TrainConfig, label_names: tuple[str, ...], base_model: str) -> dict[str, Any]:
    return {
        "task": config.task,
        "label_names": list(label_names),
        "max_length": config.max_length,
        "base_model": base_model,
    }


def save_trained(prepared: Prepared, out: Path, *, tokenizer: Any, info: dict[str, Any]) -> Path:
    """The adapter (PEFT format) or, for full fine-tuning, the whole model; plus tokenizer."""
    if prepared.lora_config is None:
        final = out / "model"
        with atomic_dir(final) as tmp, checkpoint_dropout(prepared.model):
            prepared.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / TASK_FILE, json.dumps(info, indent=2))
        return final
    from rankwise.io import save_adapter
    from rankwise.io.adapter import needs_original_base

    final = out / "adapter"
    # LoRA-GA changed the base weight (W_res = W0 - s B0 A0), and PEFT cannot rebuild OLoRA's
    # on GPT-2's Conv1D layers: save the rank-2r plain LoRA relative to the original base,
    # which rankwise and PEFT load on the unchanged model.
    original = needs_original_base(prepared.model)
    with atomic_dir(final) as tmp:
        save_adapter(prepared.model, tmp, for_original_base=original)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / TASK_FILE, json.dumps(info, indent=2))
    return final


def check_merge(
    prepared: Prepared,
    eval_enc: Encoded,
    after: EvalResult,
    *,
    pad_id: int,
    info: dist_.DistInfo | None = None,
) -> MergeCheck:
    """Merge the adapters, evaluate again, unmerge: do merged and unmerged predict alike?
    Under torchrun every process takes part (the evaluation is sharded, :func:`evaluate`)."""
    from rankwise.lora import merge, unmerge

    merge(prepared.model)
    try:
        merged = evaluate(prepared.model, eval_enc, batch_size=64, pad_id=pad_id, info=info)
    finally:
        unmerge(prepared.model)
    if after.logits is not None and merged.logits is not None:
        diff = float((after.logits - merged.logits).abs().max())
        mismatches = sum(a != b for a, b in zip(after.predictions or (), merged.predictions or ()))
        # a NaN difference (non-finite logits) is no agreement, whatever argmax made of it
        same = mismatches == 0 and math.isfinite(diff)
        return MergeCheck(after.examples, same, mismatches, diff)
    diff = abs(after.loss - merged.loss)
    return MergeCheck(after.examples, diff <= 1e-4 * max(1.0, abs(after.loss)), 0, diff)


def save_merged(
    prepared: Prepared,
    out: Path,
    *,
    tokenizer: Any,
    info: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """``merge_and_unload`` and ``save_pretrained``: loadable by transformers alone; ``info``
    (the run's task file) written beside it, so evaluate/predict use the run's settings.
    ``dtype``: the checkpoint's own (float16 trained in float32), rounded to once after the
    merge, as ``rankwise merge`` of the saved adapter gives."""
    from rankwise.lora import merge_and_unload

    model = merge_and_unload(prepared.model) if prepared.lora_config is not None else prepared.model
    if dtype is not None and prepared.lora_config is not None:
        model = model.to(dtype)
        model.config.dtype = dtype
    final = out / "merged"
    with atomic_dir(final) as tmp, checkpoint_dropout(model):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            atomic_write_text(tmp / TASK_FILE, json.dumps(info, indent=2))
    return final


def finish_outputs(
    prepared: Prepared,
    config: TrainConfig,
    info: dist_.DistInfo,
    out: Path,
    *,
    tokenizer: Any,
    task: dict[str, Any],
    eval_enc: Encoded,
    after: EvalResult | None,
    pad_id: int,
    echo: Callable[[str], None],
    merged_dtype: torch.dtype | None = None,
) -> Finished:
    """Rank 0 saves, writes the ``--merge`` output and the training curve; every process
    takes part in the merge check (its evaluation is sharded)."""
    saved = merged = check = None
    if info.is_main:
        saved = save_trained(prepared, out, tokenizer=tokenizer, info=task)
        echo(f"saved {'adapter' if prepared.lora_config is not None else 'model'}: {saved}")
    from rankwise.lora.merge import merge_blocker

    # the same on every process (same model), so all or none enter the sharded evaluation
    blocker = merge_blocker(prepared.model) if prepared.lora_config is not None else None
    if blocker is not None and after is not None:
        echo(f"merge check skipped: {blocker}")
    elif prepared.lora_config is not None and after is not None:
        check = check_merge(prepared, eval_enc, after, pad_id=pad_id, info=info)
        verdict = (
            "identical predictions"
            if check.identical
            else f"{check.mismatches} DIFFERENT predictions"
        )
        echo(
            f"merge check: merged vs unmerged on {check.examples} held-out examples: {verdict} (max |Δ| {check.max_abs_diff:.2e})"
        )
    if info.is_main:
        if config.merge:
            with torch.no_grad():
                merged = save_merged(
                    prepared, out, tokenizer=tokenizer, info=task, dtype=merged_dtype
                )
            echo(f"merged model (transformers from_pretrained): {merged}")
        if (out / METRICS_FILE).exists():
            echo(f"metrics: {out / METRICS_FILE}; curve: {training_curve(out)}")
    dist_.barrier(info)
    return Finished(saved, merged, check)


def training_curve(out: Path) -> str:
    """Plot ``training_curve.png`` from the run's metrics, or say why not: the curve is the one
    output that needs matplotlib (the ``plot`` extra), and a run that trained and saved its
    adapter does not fail at the end for want of it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "not plotted (matplotlib is not installed: pip install 'rankwise[plot]')"
    return str(plot_training_curve(out / METRICS_FILE, out / CURVE_FILE))
