"""The fine-tuning loop: data, model, method, AdamW + linear schedule, checkpoints, evaluation.

One optimizer step sees ``batch_size × grad_accum × world_size`` examples. Its gradient is the
gradient of the *mean* loss over those examples (or predicted tokens): each micro-batch's
summed loss is divided by the step's global count of terms and multiplied by the world size
(DDP averages gradients over processes), so 2 processes × batch 8 give the same update as
1 process × batch 16, and grad-accum 2 × batch 8 the same as batch 16.

Schedule: AdamW (Loshchilov & Hutter 2019; torch's fused kernel, :func:`fused_adamw`) with
weight decay on matrices only, linear warmup to ``lr`` then linear decay to 0 (every parameter
group's own lr scaled alike), gradient norm clipped at 1.0. The warmup takes
``ceil(warmup · steps)`` steps, as transformers.Trainer counts them, at
``lr·(t+1)/(w+1)``: transformers' ``get_linear_schedule_with_warmup`` ramps
``lr·t/w`` instead and spends its first step at lr 0; the decay is the same.
Method-specific parts (parameter groups, an extra loss term such as AdaLoRA's orthogonality
penalty, a hook after each optimizer step, hook state in checkpoints) come from
:mod:`rankwise.train.hooks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rankwise.errors import ConfigError
from rankwise.lora import set_inference_cache
from rankwise.train import checkpoint as ckpt
from rankwise.train import distributed as dist_
from rankwise.train.batching import (
    Encoded,
    collate,
    count_targets,
    encode,
    epoch_generator,
    length_grouped_batches,
    shard,
)
from rankwise.train.config import TrainConfig, filled_defaults, option, resolve
from rankwise.train.evaluate import EvalResult, evaluate, loss_sum
from rankwise.train.hooks import MethodHooks, gradient_batches, make_hooks
from rankwise.train.inputs import RunData, load_run_data
from rankwise.train.methods import MergeCheck, Prepared, prepare, trainable_state
from rankwise.train.metrics import MetricsLog, read_metrics
from rankwise.train.models import check_positions
from rankwise.train.outputs import (
    check_output,
    finish_outputs,
    prepare_output,
    record_config,
    releasing_claims,
    task_info,
)

MAX_GRAD_NORM = 1.0


class TrainResult(NamedTuple):
    """What :func:`train` did. Under torchrun ``saved``/``merged`` are set on rank 0 only
    (None elsewhere); the metrics (``before``, ``after``, ``merge_check``) on every process,
    whose evaluations are sharded."""

    output: Path
    saved: Path | None  # the adapter (or, for full fine-tuning, the model) directory
    merged: Path | None
    steps: int
    examples_per_s: float
    before: EvalResult | None
    after: EvalResult | None
    trainable: int
    total: int
    merge_check: MergeCheck | None
    seconds: float
    resumed_from: int | None


@dataclasses.dataclass
class _Run:
    config: TrainConfig
    info: dist_.DistInfo
    out: Path
    prepared: Prepared
    wrapped: Any  # the model, or its DistributedDataParallel wrapper
    data: RunData
    train_enc: Encoded
    eval_enc: Encoded
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    hooks: MethodHooks
    log: MetricsLog
    echo: Callable[[str], None]
    pad_id: int
    train_digest: str  # Encoded.digest() of train_enc, recorded in checkpoints


def steps_per_epoch(n_examples: int, config: TrainConfig, world_size: int) -> int:
    return math.ceil(n_examples / (config.batch_size * config.grad_accum * world_size))


def total_steps(n_examples: int, config: TrainConfig, world_size: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * steps_per_epoch(n_examples, config, world_size)))


# devices with torch's fused AdamW kernel
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def fused_adamw(groups: list[dict[str, Any]]) -> bool:
    """Whether AdamW runs as torch's fused kernel (``fused=True``, transformers.Trainer's default
    ``adamw_torch_fused``): every parameter a floating-point tensor on the CPU or a GPU.

    The same update in one pass over each parameter instead of the single-tensor loop's ~10
    (torch's default on the CPU); the parameters agree to float rounding (1.2e-7 after 11
    steps). Measured per ``step()`` (``python benchmarks/adamw.py``: 2 threads, medians of
    alternating steps, AMD EPYC): MiniLM's 76 LoRA tensors 1.3 ms against 4.7 ms; its 22.7M
    parameters (``--method full``) 9.4 ms against 81 ms, which took ``rankwise finetune
    --method full`` on SST-2 (batch 32, 20 steps) from 104 to 131-144 examples/s; LoRA's
    ~3 ms a step is within that run's noise."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(
        p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params
    )


def _optimizer(
    groups: list[dict[str, Any]], config: TrainConfig, total: int
) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=fused_adamw(groups) or None)
    # a fraction counts up (Trainer's ceil): 10 steps at 0.06 warm up for 1, not 0
    warm = math.ceil(config.warmup * total) if config.warmup < 1 else int(config.warmup)

    def factor(step: int) -> float:  # linear warmup to 1, then linear decay to 0
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _no_sync(run: _Run, last: bool) -> contextlib.AbstractContextManager[Any]:
    if run.info.world_size > 1 and not last:
        return run.wrapped.no_sync()
    return contextlib.nullcontext()


def _optimizer_step(run: _Run, step_batch: list[int], step: int) -> float:
    """Optimizer step number ``step`` (1-based) on a global batch; returns its mean task loss
    over all processes.

    The step batch is cut into ``grad_accum`` micro-batches, each micro-batch into one
    contiguous share per process (so the examples of a step do not depend on how they are
    spread over micro-batches and processes). A hook's extra loss ``R`` (a function of the
    weights alone, the same on every process) is added as ``R / micro-batches`` to every
    micro-batch of every process: accumulation sums it back to ``R`` and DDP's average over
    processes keeps it, so the step's gradient is that of ``mean task loss + R``.
    """
    task, info, accum = run.config.task, run.info, run.config.grad_accum
    micro = [m for m in (shard(step_batch, k, accum) for k in range(accum)) if m]
    local = [shard(m, info.rank, info.world_size) for m in micro]
    # An empty share still runs (on one borrowed example) to join DDP's all-reduce, weight 0.
    batches = [
        collate(run.train_enc, ids or m[:1], pad_id=run.pad_id) for ids, m in zip(local, micro)
    ]
    counts = [count_targets(x, task) if ids else 0 for x, ids in zip(batches, local)]
    terms = max(1, dist_.sum_int(sum(counts), info))
    loss_total = 0.0
    for k, (batch, ids) in enumerate(zip(batches, local)):
        with _no_sync(run, k == len(batches) - 1):
            loss, _ = loss_sum(run.wrapped, batch, task)
            # DDP averages gradients over processes: x world / global terms = global mean.
            weight = info.world_size / terms if ids else 0.0
            extra = run.hooks.extra_loss(run.prepared.model)
            objective = loss * weight
            if extra is not None:
                objective = objective + extra / len(batches)
            objective.backward()
            loss_total += float(loss.detach()) if ids else 0.0
    params = [p for p in run.prepared.model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    run.optimizer.step()
    run.hooks.after_optimizer_step(step)  # gradients still present (AdaLoRA's allocator)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return dist_.sum_floats([loss_total], info)[0] / terms


def _evaluate(run: _Run, *, adapter_path: bool = False) -> EvalResult:
    """Held-out evaluation, sharded over the processes under torchrun (each evaluates its
    share of the batches and every process gets the whole set's result): no process waits in
    a collective for the length of an evaluation, which gloo's 30-minute default timeout would
    end on a large held-out set.

    ``adapter_path``: evaluate through the adapters' own low-rank forward (the eval-mode cache
    of ``W0 + s·BA`` off), so the final metrics — which the merge check compares with the
    merged model — come from the unmerged computation itself.
    """
    model = run.prepared.model
    uncached = adapter_path and run.prepared.lora_config is not None
    if uncached:
        set_inference_cache(model, False)
    try:
        return evaluate(
            model,
            run.eval_enc,
            batch_size=max(32, run.config.batch_size),
            pad_id=run.pad_id,
            info=run.info,
        )
    finally:
        if uncached:
            set_inference_cache(model, True)


def _trained_metrics(result: EvalResult, step: int) -> EvalResult:
    """``result`` of an evaluation after ``step`` optimizer steps, refused when its loss is not
    finite: each step's training loss is checked before its update, so an update that blows
    the weights up (the last one above all) shows only here."""
    if not math.isfinite(result.loss):  # the same on every process (summed over them)
        raise ValueError(
            f"training diverged by step {step}: the held-out loss is {result.loss} (learning "
            "rate too high for this model?); the adapter is not saved"
        )
    return result


def _save(run: _Run, position: ckpt.Position) -> None:
    rngs = dist_.gather_rng_states(run.info)  # collective: every process takes part
    if run.info.is_main:
        ckpt.save_checkpoint(
            run.out,
            position,
            weights=trainable_state(run.prepared.model),
            optimizer=run.optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(),
            keep=run.config.keep_checkpoints,
            meta={
                "global_batch": _global_batch(run),
                "base_digest": run.hooks.base_digest,
                "train_examples": len(run.train_enc.input_ids),
                "train_examples_digest": run.train_digest,  # Encoded.digest()
            },
            hooks=run.hooks.state_dict(),
            rank_rngs=rngs,
        )
    dist_.barrier(run.info)


def _progress(run: _Run, start: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=run.total_steps,
        initial=start,
        disable=not run.info.is_main,
        unit="step",
        desc="finetune",
        dynamic_ncols=True,
    )


def _global_batch(run: _Run) -> int:
    return run.config.batch_size * run.config.grad_accum * run.info.world_size


def _after_step(run: _Run, step: int, record: dict[str, Any], bar: Any, average: float) -> None:
    """Evaluate (every ``eval_every``), log the step's record and move the progress bar."""
    every = run.config.eval_every
    if every and step % every == 0 and step < run.total_steps:
        record.update(_trained_metrics(_evaluate(run), step).as_metrics())
    run.log.log(record)
    bar.set_postfix_str(f"loss={record['loss']:.4f}, ex/s={average:.1f}", refresh=False)
    bar.update(1)


def _train_steps(run: _Run, position: ckpt.Position, stop_after: int | None) -> tuple[int, float]:
    """Run optimizer steps from ``position`` to the end; returns (steps done, examples/s)."""
    config, lengths = run.config, run.train_enc.lengths()
    global_batch = _global_batch(run)
    step, epoch, next_batch = position
    bar, seen, clock = _progress(run, step), 0, time.perf_counter()
    # the group at --lr is logged: LoRA+ puts embedding adapters' group (PEFT's 1e-6) first
    # when they are the only adapters, and the log said 1e-6 whatever --lr was
    initial = [g.get("initial_lr", g["lr"]) for g in run.optimizer.param_groups]
    base_group = next((i for i, v in enumerate(initial) if v == config.lr), 0)
    run.prepared.model.train()
    try:
        while step < run.total_steps:
            gen = epoch_generator(config.seed, epoch)
            batches = length_grouped_batches(lengths, global_batch, generator=gen)
            for index in range(next_batch, len(batches)):
                tick = time.perf_counter()
                lr = run.scheduler.get_last_lr()[base_group]  # the rate this step trains at
                loss = _optimizer_step(run, batches[index], step + 1)
                if not math.isfinite(loss):  # the same on every process (summed over them)
                    raise ValueError(
                        f"training diverged at step {step + 1}: the loss is {loss} (learning "
                        f"rate {lr:.3g}: too high for this model?); the adapter is not saved"
                    )
                step, seen = step + 1, seen + len(batches[index])
                rate = len(batches[index]) / max(time.perf_counter() - tick, 1e-9)
                progress = round(epoch + (index + 1) / len(batches), 4)
                record = {
                    "step": step,
                    "epoch": progress,
                    "loss": loss,
                    "lr": lr,
                    "examples_per_s": rate,
                }
                average = seen / max(time.perf_counter() - clock, 1e-9)
                _after_step(run, step, record, bar, average)
                if config.save_every and step % config.save_every == 0 and step < run.total_steps:
                    done = index + 1 == len(batches)  # next: the first batch of the next epoch
                    _save(run, ckpt.Position(step, epoch + done, 0 if done else index + 1))
                if step >= run.total_steps or (stop_after is not None and step >= stop_after):
                    return step, seen / max(time.perf_counter() - clock, 1e-9)
            epoch, next_batch = epoch + 1, 0
        return step, seen / max(time.perf_counter() - clock, 1e-9)
    finally:
        bar.close()


def _resume(run: _Run) -> ckpt.Position:
    with warnings.catch_warnings(record=True) as caught:  # echoed below (rank 0 only)
        warnings.simplefilter("always", RuntimeWarning)
        found = ckpt.load_latest(run.out)
    for warning in caught if run.info.is_main else ():  # diagnostics: stderr, not the log
        print(f"warning: {warning.message}", file=sys.stderr)
    if found is None and ckpt.list_checkpoints(run.out):
        raise ValueError(
            f"--resume: no checkpoint in {run.out / ckpt.CHECKPOINTS_DIR} is usable (see the "
            "warnings); nothing was changed — move that directory away to start over"
        )
    if found is None:
        run.echo(f"no checkpoint in {run.out}; starting from step 0")
        run.log.truncate_after(-1)  # records of the attempt that never checkpointed
        return ckpt.Position(0, 0, 0)
    saved_batch = found.meta.get("global_batch", _global_batch(run))
    if saved_batch != _global_batch(run):
        raise ValueError(
            f"--resume: {found.path} was written with {saved_batch} examples per step, this run "
            f"has {_global_batch(run)} (batch size x grad accum x processes must stay the same)"
        )
    _check_same_data(run, found)
    model = run.prepared.model
    expected = set(trainable_state(model))
    if set(found.weights) != expected:
        raise ValueError(
            f"checkpoint {found.path}: its tensors do not match this run's trainable parameters (different --method, --r or --targets?)"
        )
    digest = found.meta.get("base_digest")
    if digest != run.hooks.base_digest:
        raise ValueError(
            f"--resume: {found.path} was trained on base weights with digest {digest}, this run "
            f"rebuilt {run.hooks.base_digest} (LoRA-GA's initialization differs: other data, "
            "seed, --ga-batches or hardware?)"
        )
    model.load_state_dict(found.weights, strict=False)
    run.hooks.load_state_dict(found.hooks)
    run.optimizer.load_state_dict(found.optimizer)
    run.scheduler.load_state_dict(found.scheduler)
    torch.set_rng_state(found.rng_for(run.info.rank, run.info.world_size))
    if found.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(found.cuda_rng)
    run.log.truncate_after(found.position.step)
    run.echo(f"resumed from {found.path} (step {found.position.step})")
    return found.position


def _check_same_data(run: _Run, found: ckpt.Checkpoint) -> None:
    """Refuse a resume whose training examples differ from the checkpoint's (the data file
    edited since, say): its schedule, data order and epoch position belong to those. A
    checkpoint written before this was recorded is not checked."""
    saved = found.meta.get("train_examples_digest")  # (an earlier key held another format)
    if saved is None or saved == run.train_digest:
        return
    n = found.meta.get("train_examples", "?")
    raise ValueError(
        f"--resume: {found.path} was trained on other training examples ({n}; this run has "
        f"{len(run.train_enc.input_ids)}): the training data {run.data.split.train.source!r} "
        f"changed since ({option('data')}); resume with the same data, or start a new run"
    )


def train(
    config: TrainConfig,
    *,
    echo: Callable[[str], None] = print,
    stop_after: int | None = None,
    given: Collection[str] = (),
) -> TrainResult:
    """Fine-tune as ``config`` says; see the module docstring. ``stop_after`` ends the run after
    that many optimizer steps without any final output (as a kill would; for resume tests).
    ``given``: the options typed as flags, refused where the method ignores them."""
    started = time.perf_counter()
    info = dist_.setup()
    try:
        # options checked right after the rendezvous, which lines the processes up, so each
        # refuses a bad one at about the same moment (checked before it, a fast process could
        # exit and have torchrun kill the others before they said why); a warning (an option
        # the method ignores) from rank 0 only
        with dist_.main_warns(info):
            resolved = resolve(config, given)
        filled = filled_defaults(config, resolved)
        echo_ = echo if info.is_main else (lambda _: None)
        # the run seeds torch's RNG (and a resume restores its state): in a fork, so the
        # caller's RNG is as it was after train() returns; the output directory's lock is
        # held for the run
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), releasing_claims():
            return _train(resolved, info, echo_, stop_after, started, filled)
    finally:
        dist_.teardown(info)


def _build_run(
    config: TrainConfig,
    info: dist_.DistInfo,
    echo: Callable[[str], None],
    filled: dict[str, Any],
) -> _Run:
    """Load inputs (nothing written yet), adapt the model, then open the output directory."""
    out = check_output(config, info)  # a refused --output or resume before anything loads
    torch.manual_seed(config.seed)  # the head's and the adapters' initial values
    data = load_run_data(config)
    model = data.loaded.model
    tokenizer, length = data.loaded.tokenizer, config.max_length or 128
    train_enc = encode(data.split.train, tokenizer, task=config.task, max_length=length)
    eval_enc = encode(data.split.eval, tokenizer, task=config.task, max_length=length)
    for part, name in ((train_enc, "training data"), (eval_enc, "evaluation data")):
        check_positions(model, part.lengths(), where=name)
    total = total_steps(len(train_enc.input_ids), config, info.world_size)
    ga = None
    if config.method == "lora-ga":
        ga = gradient_batches(
            train_enc, config, pad_id=tokenizer.pad_token_id, world_size=info.world_size
        )
    prepared = prepare(model, config, base_model=data.loaded.source, generator=config.seed,
                       total_steps=total, gradient_batches=ga)  # fmt: skip
    if config.merge and prepared.lora_config is not None:
        from rankwise.lora.merge import merge_blocker

        reason = merge_blocker(model)  # found now, not after training
        if reason is not None:
            raise ConfigError(f"--merge: {reason} (drop --merge or that target)")
    out = prepare_output(config, info, out, filled)
    hooks = make_hooks(config, model)
    optimizer, scheduler = _optimizer(hooks.param_groups(model), config, total)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if info.world_size > 1 else model
    return _Run(
        config=config, info=info, out=out, prepared=prepared, wrapped=wrapped, data=data,
        train_enc=train_enc, eval_enc=eval_enc, optimizer=optimizer, scheduler=scheduler,
        total_steps=total, hooks=hooks, log=MetricsLog(out, enabled=info.is_main), echo=echo,
        pad_id=tokenizer.pad_token_id, train_digest=train_enc.digest(),
    )  # fmt: skip


def _announce(run: _Run) -> None:
    p, config, split = run.prepared, run.config, run.data.split
    share = 100 * p.trainable / p.total
    run.echo(f"model {run.data.loaded.source}: {p.trainable:,} trainable of {p.total:,} "
             f"parameters ({share:.2f}%), method {config.method}")  # fmt: skip
    per_step = config.batch_size * config.grad_accum * run.info.world_size
    run.echo(f"data {split.train.source}: {len(split.train.texts):,} training, "
             f"{len(split.eval.texts):,} held-out examples; {run.total_steps} steps of "
             f"{per_step} examples")  # fmt: skip


def _train(
    config: TrainConfig,
    info: dist_.DistInfo,
    echo: Callable[[str], None],
    stop_after: int | None,
    started: float,
    filled: dict[str, Any],
) -> TrainResult:
    with dist_.main_warns(info):  # the same data and model on every process: warned once
        run = _build_run(config, info, echo, filled)
    _announce(run)
    position = _resume(run) if config.resume else ckpt.Position(0, 0, 0)
    if config.resume:  # checked: now the run's options are this invocation's
        record_config(config, info, run.out, filled)
    before = _before(run, position)
    steps, rate = _train_steps(run, position, stop_after)
    result = TrainResult(
        output=run.out, saved=None, merged=None, steps=steps, examples_per_s=rate,
        before=before, after=None, trainable=run.prepared.trainable, total=run.prepared.total,
        merge_check=None, seconds=0.0, resumed_from=position.step or None,
    )  # fmt: skip
    if stop_after is not None and steps < run.total_steps:  # stopped as if killed: no outputs
        return result._replace(seconds=time.perf_counter() - started)
    after = _trained_metrics(_evaluate(run, adapter_path=True), steps)
    run.log.log({"step": steps, **after.as_metrics()})
    echo(f"held-out after training:  {_fmt(after.as_metrics())}")
    task = task_info(config, run.data.split.train.label_names, run.data.loaded.source)
    finished = finish_outputs(
        run.prepared, config, info, run.out, tokenizer=run.data.loaded.tokenizer, task=task,
        eval_enc=run.eval_enc, after=after, pad_id=run.pad_id, echo=echo,
        merged_dtype=run.data.loaded.stored_dtype,
    )  # fmt: skip
    return result._replace(
        saved=finished.saved, merged=finished.merged, after=after,
        merge_check=finished.merge_check, seconds=time.perf_counter() - started,
    )  # fmt: skip


def _before(run: _Run, position: ckpt.Position) -> EvalResult | None:
    """Held-out metrics before training (read back from metrics.jsonl when resuming)."""
    if position.step > 0:
        records = [r for r in read_metrics(run.log.path) if r.get("step") == 0]
        if records:
            run.echo(f"held-out before training: {_fmt(records[0])}")
        return None
    result = _evaluate(run)
    run.log.log({"step": 0, **result.as_metrics()})
    run.echo(f"held-out before training: {_fmt(result.as_metrics())}")
    return result


def _fmt(metrics: dict[str, Any]) -> str:
    if "eval_accuracy" in metrics:
        return f"accuracy {100 * metrics['eval_accuracy']:.2f}% (loss {metrics['eval_loss']:.4f})"
    return f"perplexity {metrics.get('eval_perplexity', float('nan')):.3f} (loss {metrics['eval_loss']:.4f})"
