"""Mutation fuzzing of adapter directories: the strategies, the mutators and the oracle.

Shared by ``test_rel_fuzz.py`` (a few hundred examples) and ``benchmarks/fuzz_adapters.py``
(>= 10,000). A case starts from a valid adapter directory written by rankwise (a *seed*) and
applies one mutation — bit flips, truncation, inserted bytes, an edit of the safetensors JSON
header, an edit of ``adapter_config.json`` — then feeds the directory to the *targets*
(``read_adapter_config``, ``load_adapter`` and, in the benchmark, the analysis reader
``read_factors``). The oracle: a target either succeeds (and a loaded model holds only finite
values) or raises one of rankwise's own errors (:class:`rankwise.errors.RankwiseError`) with the
model unchanged; anything else — another exception, more than ``TIMEOUT_S`` seconds, a memory
error — is a failure, recorded with the mutation that caused it.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from hypothesis import strategies as st
from rel_kit import mlp, model_changes, snapshot, tiny
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.io import load_adapter, read_adapter_config, save_adapter
from rankwise.lora import LoraConfig, inject

TIMEOUT_S = 5.0
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


class Seed(NamedTuple):
    """A valid adapter as bytes, and the model it belongs to."""

    name: str
    config: bytes
    weights: bytes
    model_fn: Callable[[], nn.Module]


class Mutation(NamedTuple):
    """One edit: ``kind`` (bitflip, truncate, insert, header, json, delete), the file it hits
    and its parameters (JSON-ready, so a failure can be written to a report as is)."""

    kind: str
    file: str
    params: tuple[Any, ...]


class Outcome(NamedTuple):
    """The result of one target on one mutated directory."""

    target: str
    status: str  # "ok" | "refused" | "known" (a failure listed in KNOWN_BUGS) | "failure"
    detail: str  # exception type and message for refusals and failures
    seconds: float


def make_seeds(root: Path) -> list[Seed]:
    """Two seeds: every layer kind + modules_to_save; and rank/alpha patterns, rsLoRA, biases."""
    specs = [
        ("tiny", tiny, LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "proj", "conv"],
                                  modules_to_save=["head"], init_lora_weights=False)),
        ("mlp", mlp, LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], bias="lora_only",
                                use_rslora=True, rank_pattern={"2": 3}, alpha_pattern={"2": 5.0},
                                init_lora_weights=False)),
    ]  # fmt: skip
    seeds = []
    for name, model_fn, cfg in specs:
        directory = save_adapter(inject(model_fn(), cfg, generator=0), root / f"seed-{name}")
        seeds.append(
            Seed(
                name,
                (directory / CONFIG).read_bytes(),
                (directory / WEIGHTS).read_bytes(),
                model_fn,
            )
        )
    return seeds


# Failures already reported to the owners (each also a strict-xfail row of the catalogue, so a
# fix shows up as XPASS there): "ExceptionType: message" regex -> the fix needed.
KNOWN_BUGS: dict[str, str] = {
    r"^ValueError: dictionary update sequence element": (
        "lora.config.LoraConfig.__post_init__: dict(rank_pattern / alpha_pattern) of a string or "
        "list raises a bare ValueError; check it is a mapping and raise ConfigError naming the field"
    ),
    r"^TypeError: '<' not supported between instances": (
        "io.config_json.config_from_json sorts target_modules before LoraConfig validates it, so "
        "a list holding null/numbers raises TypeError; validate first (or sort with key=str)"
    ),
}


def classify(err: BaseException) -> tuple[str, str]:
    """``(status, detail)`` for an exception a target raised."""
    detail = f"{type(err).__name__}: {err}"
    if isinstance(err, RankwiseError):
        return "refused", detail
    known = any(re.search(pattern, detail) for pattern in KNOWN_BUGS)
    return ("known" if known else "failure"), detail


# -- strategies ------------------------------------------------------------------------------
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from([0, -1, 2**31, 2**40, 2**63, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8),
    st.sampled_from(["all-linear", "0", "proj", "../x", "(a+)+$", "((", ".*", "LORA", "none"]),
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "r", "lora_alpha", "target_modules", "modules_to_save", "rank_pattern", "alpha_pattern",
    "bias", "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "exclude_modules", "lora_dropout", "fan_in_fan_out", "task_type", "peft_type", "use_dora",
    "inference_mode", "base_model_name_or_path", "lora_bias", "layer_replication", "unknown_x",
]  # fmt: skip
HEADER_OPS = ["shape", "dtype", "offsets", "rename", "drop", "add", "metadata", "length", "swap"]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "Q7", "", "f32"]
FILES = st.sampled_from([WEIGHTS, CONFIG])
# positions and sizes are fractions of the file so one mutation fits any seed
FRACTION = st.floats(0.0, 1.0, allow_nan=False)
HEADER_FRACTION = st.floats(0.0, 0.25, allow_nan=False)  # the header is at the front


def mutations() -> st.SearchStrategy[Mutation]:
    """Every kind of mutation, with parameters drawn by hypothesis."""
    flip = st.tuples(st.lists(st.tuples(FRACTION | HEADER_FRACTION, st.integers(0, 7)),
                              min_size=1, max_size=8))  # fmt: skip
    header_value = st.one_of(
        st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 2**31, 2**63 - 1]), max_size=4),
        st.sampled_from(DTYPES),
        JSON_VALUES,
    )
    return st.one_of(
        st.builds(Mutation, st.just("bitflip"), FILES, flip),
        st.builds(Mutation, st.just("truncate"), FILES, st.tuples(FRACTION)),
        st.builds(
            Mutation,
            st.just("insert"),
            FILES,
            st.tuples(FRACTION, st.binary(min_size=1, max_size=16)),
        ),  # fmt: skip
        st.builds(
            Mutation,
            st.just("header"),
            st.just(WEIGHTS),
            st.tuples(st.sampled_from(HEADER_OPS), st.integers(0, 20), header_value),
        ),  # fmt: skip
        st.builds(
            Mutation,
            st.just("json"),
            st.just(CONFIG),
            st.tuples(
                st.sampled_from(["set", "delete", "replace"]),
                st.sampled_from(FIELDS) | st.text(max_size=6),
                JSON_VALUES,
            ),
        ),  # fmt: skip
        st.builds(Mutation, st.just("delete"), FILES, st.just(())),
    )


# -- mutators (bytes in, bytes or None out) ----------------------------------------------------
def _at(fraction: float, size: int) -> int:
    return min(int(fraction * size), max(size - 1, 0))


def _bitflip(data: bytes, flips: list[tuple[float, int]]) -> bytes:
    out = bytearray(data)
    for fraction, bit in flips:
        if out:
            out[_at(fraction, len(out))] ^= 1 << bit
    return bytes(out)


def _header_edit(data: bytes, op: str, index: int, value: Any) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    keys = sorted(k for k in header if k != "__metadata__")
    key = keys[index % len(keys)]
    entry = header[key]
    if op in ("shape", "offsets", "dtype"):
        entry[{"shape": "shape", "offsets": "data_offsets", "dtype": "dtype"}[op]] = value
    elif op == "rename":
        header[str(value) if not isinstance(value, str) else value] = header.pop(key)
    elif op == "drop":
        del header[key]
    elif op == "add":
        header[f"base_model.model.{value}.lora_A.weight"] = dict(entry)
    elif op == "metadata":
        header["__metadata__"] = value
    elif op == "swap":
        other = keys[(index + 1) % len(keys)]
        header[key], header[other] = header[other], entry
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    length = len(text)
    if op == "length" and isinstance(value, list) and value and type(value[0]) is int:
        length = value[0] % 2**64
    return struct.pack("<Q", length) + text + data[8 + n :]


def _json_edit(data: bytes, op: str, field: str, value: Any) -> bytes:
    doc = json.loads(data)
    if op == "set":
        doc[field] = value
    elif op == "delete":
        doc.pop(field, None)
    else:
        doc = value
    return json.dumps(doc).encode()


def apply(mutation: Mutation, files: dict[str, bytes]) -> dict[str, bytes | None]:
    """The directory's files after ``mutation`` (None: the file is absent)."""
    out: dict[str, bytes | None] = dict(files)
    data = files[mutation.file]
    kind, p = mutation.kind, mutation.params
    if kind == "bitflip":
        out[mutation.file] = _bitflip(data, p[0])
    elif kind == "truncate":
        out[mutation.file] = data[: _at(p[0], len(data))]
    elif kind == "insert":
        at = _at(p[0], len(data))
        out[mutation.file] = data[:at] + p[1] + data[at:]
    elif kind == "header":
        out[mutation.file] = _header_edit(data, *p)
    elif kind == "json":
        out[mutation.file] = _json_edit(data, *p)
    elif kind == "delete":
        out[mutation.file] = None
    return out


def write_dir(directory: Path, files: dict[str, bytes | None]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = directory / name
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)


# -- the oracle ------------------------------------------------------------------------------
class Hang(Exception):
    """A target ran longer than TIMEOUT_S."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _load_checked(model_fn: Callable[[], nn.Module], directory: Path) -> None:
    model = model_fn()
    before = snapshot(model)
    try:
        load_adapter(model, directory)
    except RankwiseError:
        changed = model_changes(model, before)
        if changed:  # refused, but left the model changed: a failure of its own
            raise AssertionError(f"model changed by a refused load: {changed[:3]}") from None
        raise
    bad = [
        k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise AssertionError(f"loaded non-finite values into {bad[:3]}")


def _read_factors(directory: Path) -> None:
    from rankwise.analysis import read_factors

    read_factors(directory)


def targets(seed: Seed, *, analysis: bool) -> dict[str, Callable[[Path], object]]:
    out: dict[str, Callable[[Path], object]] = {
        "read_adapter_config": read_adapter_config,
        "load_adapter": lambda d: _load_checked(seed.model_fn, d),
    }
    if analysis:
        out["read_factors"] = _read_factors
    return out


def run_case(
    seed: Seed, mutation: Mutation, directory: Path, *, analysis: bool = False
) -> list[Outcome]:
    """Mutate ``seed`` into ``directory`` and run every target under the oracle."""
    write_dir(directory, apply(mutation, {CONFIG: seed.config, WEIGHTS: seed.weights}))
    outcomes = []
    for name, target in targets(seed, analysis=analysis).items():
        start = time.perf_counter()
        try:
            with deadline(TIMEOUT_S):
                target(directory)
            status, detail = "ok", ""
        except Exception as err:  # noqa: BLE001 - every exception is classified
            status, detail = classify(err)
        outcomes.append(Outcome(name, status, detail[:300], time.perf_counter() - start))
    return outcomes
