"""torch.distributed under ``torchrun``: process group setup, rank facts, small reductions.

``torchrun --nproc_per_node N -m rankwise finetune ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` then joins the process group with the gloo backend: the engine
trains on the CPU (model, batches and the tensors of the small reductions here all stay
there), so gloo is the backend that can carry them even on a machine with CUDA (nccl takes
GPU tensors only and would fail at the first collective).
Data parallelism follows torch's ``DistributedDataParallel``: every process holds the model,
takes its share of each global batch, and gradients are averaged across processes in
backward. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import NamedTuple, NoReturn

import torch
import torch.distributed as dist


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool  # this call created the process group (and should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Join the process group described by torchrun's environment (single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
    dist.init_process_group(backend="gloo")  # CPU tensors throughout (see module docstring)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)


@contextlib.contextmanager
def main_warns(info: DistInfo) -> Iterator[None]:
    """Python warnings from the main process only, for steps every process runs alike (reading
    the data, loading and adapting the model): the others' copies are the same lines again."""
    if info.is_main:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process that ran under torchrun with ``code``, skipping the C++ static teardown.

    After the gloo process group is destroyed and every file is written, that teardown aborts
    the interpreter's exit now and then ("terminate called without an active exception",
    SIGABRT; seen in about one of ten two-process runs here, on torch 2.13), and torchrun
    then reports a finished run as failed. Python's exit handlers (``atexit``, temporary
    files, logging) run first, as at a normal exit; then ``os._exit``."""
    import atexit
    import logging

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def sum_int(value: int, info: DistInfo) -> int:
    """``value`` summed over all processes (itself in a single process)."""
    if info.world_size == 1:
        return int(value)
    total = torch.tensor([int(value)], dtype=torch.long)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def sum_floats(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sums over all processes (float64, so counts and loss sums stay exact)."""
    if info.world_size == 1:
        return [float(v) for v in values]
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def max_int(value: int, info: DistInfo) -> int:
    """The largest ``value`` over all processes (itself in a single process)."""
    if info.world_size == 1:
        return int(value)
    top = torch.tensor([int(value)], dtype=torch.long)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top.item())


def sum_tensor(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``tensor`` summed element-wise over all processes, in place (a CPU tensor)."""
    if info.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every process (e.g. "rank 0 failed; stop")."""
    if info.world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.long)
    dist.broadcast(value, src=0)
    return bool(value.item())


def gather_rng_states(info: DistInfo) -> list[torch.Tensor]:
    """Every process's CPU generator state, in rank order (dropout draws differ per process,
    so a resumed run must give each process back its own)."""
    own = torch.get_rng_state()
    if info.world_size == 1:
        return [own]
    states = [torch.empty_like(own) for _ in range(info.world_size)]
    dist.all_gather(states, own)
    return states
