"""``LoraConfig``: what to adapt and how, with PEFT's field names and meanings.

The fields mirror ``peft.LoraConfig`` (peft 0.21.2) so that ``adapter_config.json`` written by
either library reads back into the other. Invalid values raise :class:`ConfigError` at
construction, naming the field, the expected and the found value.

The *scaling rule* is one of the four variant axes (see ``DESIGN.md``): the adapter's update
``ΔW = s · B A`` uses ``s = lora_alpha / r`` (Hu et al. 2021, §4.1) or, with ``use_rslora``,
``s = lora_alpha / sqrt(r)`` (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor",
Thm. 3.2), which keeps the update's magnitude stable as ``r`` grows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from rankwise.errors import ConfigError

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
# PEFT adds these to modules_to_save for SEQ_CLS (peft.utils.constants.SEQ_CLS_HEAD_NAMES).
SEQ_CLS_HEAD_NAMES = ("classifier", "score")
# The task heads PEFT's task models add to modules_to_save (PeftModelForSequenceClassification,
# ...ForTokenClassification, ...ForQuestionAnswering), so they are trained in full and saved.
TASK_HEAD_NAMES: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": SEQ_CLS_HEAD_NAMES,
    "TOKEN_CLS": SEQ_CLS_HEAD_NAMES,
    "QUESTION_ANS": ("qa_outputs",),
}

# Scaling rules: name -> s(alpha, r). One entry per rule; variants add entries, not branches.
SCALING_RULES: dict[str, Callable[[float, int], float]] = {
    "standard": lambda alpha, r: alpha / r,
    "rslora": lambda alpha, r: alpha / math.sqrt(r),
}


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter, field for field as ``peft.LoraConfig``.

    ``h = W0 x + s · B A x`` with ``A: (r, in)``, ``B: (out, r)`` and ``s`` from
    :data:`SCALING_RULES` (Hu et al. 2021, "LoRA", eq. 3).

    * ``target_modules``: a list (or tuple/set) of names — each matches a module whose
      qualified name equals it or ends with ``"." + name``; a str — a regex that must match the
      whole qualified name; ``"all-linear"`` — every ``nn.Linear``/``Conv1D`` except the output
      head (``get_output_embeddings()``) or, for ``SEQ_CLS``, the classifier.
    * ``exclude_modules``: same matching rules; matched modules are never adapted.
    * ``layers_to_transform`` / ``layers_pattern``: keep only targets inside the given layer
      indices (the first numbered path segment, or the one after ``layers_pattern``).
    * ``rank_pattern`` / ``alpha_pattern``: regex key -> r / alpha for modules whose name
      ends with a match of the key (PEFT's ``get_pattern_key``).
    * ``modules_to_save``: modules trained in full and saved beside the adapter
      (``SEQ_CLS`` and ``TOKEN_CLS`` add ``classifier``/``score`` at injection,
      ``QUESTION_ANS`` adds ``qa_outputs``, as PEFT's task models do).
    * ``init_lora_weights``: ``True`` (kaiming-uniform A, zero B), ``False`` (random A and B,
      for tests), or a registered initializer name (``"gaussian"``, ``"pissa"`` — randomized
      SVD, PEFT's ``"pissa_niter_N"``, which is read as ``"pissa"`` (adaptive iterations
      instead of ``N``) —, ``"pissa_exact"`` — full SVD, PEFT's ``"pissa"`` —, ``"olora"``,
      ``"lora_ga"`` — set by
      :func:`~rankwise.lora.lora_ga.lora_ga_init`, which ``inject`` points to —; see
      :data:`rankwise.lora.initializers.INITIALIZERS`).
    * ``use_dora``: the DoRA parametrization (:mod:`rankwise.lora.dora`);
      ``use_lora_fa``: LoRA-FA, ``A`` frozen at its initialization and only ``B`` trained
      (Zhang et al. 2023, "LoRA-FA"; a training flag, not written to ``adapter_config.json``).
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    use_lora_fa: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR  # any case, as PEFT ("All-Linear" was a regex)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = _name_list("modules_to_save", self.modules_to_save)
        if isinstance(self.layers_pattern, (list, tuple)):
            self.layers_pattern = [str(p) for p in self.layers_pattern]
        if self.layers_pattern in ("", []):  # PEFT: empty means its default layer pattern
            self.layers_pattern = None
        self.rank_pattern = _mapping("rank_pattern", self.rank_pattern)
        self.alpha_pattern = _mapping("alpha_pattern", self.alpha_pattern)
        if isinstance(self.layers_to_transform, (list, tuple)):
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.init_lora_weights, str) and PEFT_PISSA_NITER.fullmatch(
            self.init_lora_weights
        ):  # PEFT's randomized PiSSA is ours: N is left to its adaptive iteration count
            self.init_lora_weights = "pissa"
        _validate(self)

    def validate(self) -> None:
        """Check every field again, e.g. after one was assigned (``inject`` calls this):
        ConfigError naming the field."""
        self.__post_init__()

    @property
    def scaling_rule(self) -> str:
        """Name of the scaling rule in :data:`SCALING_RULES`."""
        return "rslora" if self.use_rslora else "standard"

    @property
    def parametrization(self) -> str:
        """Row of :data:`rankwise.lora.registry.WRAPPERS`: ``"dora"`` or ``"vanilla"``."""
        return "dora" if self.use_dora else "vanilla"

    @property
    def initializer(self) -> str:
        """Key of :data:`rankwise.lora.initializers.INITIALIZERS` for ``init_lora_weights``."""
        from rankwise.lora.initializers import initializer_name

        return initializer_name(self.init_lora_weights)

    def scaling(self, *, r: int, alpha: float) -> float:
        """The factor ``s`` multiplying ``B A`` for a layer of rank ``r`` and alpha ``alpha``."""
        return SCALING_RULES[self.scaling_rule](float(alpha), int(r))

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``(r, alpha)`` for ``module_name`` after ``rank_pattern`` / ``alpha_pattern``."""
        r_key = pattern_key(self.rank_pattern, module_name)
        a_key = pattern_key(self.alpha_pattern, module_name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.lora_alpha
        return int(r), alpha

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with ``changes`` applied (the original is not modified)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields (lists, not sets)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, (tuple, set)) else value
        return out


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first key of ``patterns`` whose regex matches a dotted suffix of ``module_name``.

    Same rule as PEFT's ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)``.
    """
    for key in patterns:
        if re.match(pattern_key_regex(key), module_name):
            return key
    return None


def pattern_key_regex(key: str) -> str:
    """The regex a ``rank_pattern``/``alpha_pattern`` key is used as (PEFT's)."""
    return rf"(.*\.)?({key})$"


def layers_regex(pattern: str) -> str:
    """The regex a ``layers_pattern`` entry is used as (PEFT's): its layer index as ``idx``."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _names_or_regex(name: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return _name_list(name, value)


def _mapping(name: str, value: Any) -> dict[str, Any]:
    """A copy of ``value`` as a dict; ConfigError naming ``name`` if it is not a mapping."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{name}: expected a mapping of module-name regex -> value, "
            f"found {type(value).__name__} {value!r}"
        )
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{name}: expected string keys, found {key!r}")
    return dict(value)


def _name_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (Sequence, set, frozenset)):
        raise ConfigError(f"{name}: expected a list of module names, found {value!r}")
    items = list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{name}: expected non-empty strings, found {item!r}")
    return sorted(set(items), key=items.index)


def _validate(cfg: LoraConfig) -> None:
    _check_rank("r", cfg.r)
    _check_alpha("lora_alpha", cfg.lora_alpha)
    if not isinstance(cfg.lora_dropout, (int, float)) or not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout: expected a float in [0, 1), found {cfg.lora_dropout!r}")
    if cfg.bias not in BIAS_MODES:
        raise ConfigError(f"bias: expected one of {BIAS_MODES}, found {cfg.bias!r}")
    base = cfg.base_model_name_or_path
    if base is not None and not isinstance(base, str):  # read as a path or hub id later
        raise ConfigError(
            f"base_model_name_or_path: expected a model id or path (a string) or None, found {base!r}"
        )
    if cfg.task_type is not None and cfg.task_type not in TASK_TYPES:
        raise ConfigError(
            f"task_type: expected None or one of {TASK_TYPES}, found {cfg.task_type!r}"
        )
    for field_name in ("target_modules", "exclude_modules"):
        value = getattr(cfg, field_name)
        if isinstance(value, str) and value != ALL_LINEAR:
            _check_regex(field_name, value)
    for key, r in cfg.rank_pattern.items():
        _check_regex("rank_pattern", key, pattern_key_regex)
        _check_rank(f"rank_pattern[{key!r}]", r)
    for key, alpha in cfg.alpha_pattern.items():
        _check_regex("alpha_pattern", key, pattern_key_regex)
        _check_alpha(f"alpha_pattern[{key!r}]", alpha)
    _check_layers(cfg)
    _check_init(cfg.init_lora_weights)
    for flag in ("use_rslora", "use_dora", "use_lora_fa", "fan_in_fan_out", "inference_mode"):
        if not isinstance(getattr(cfg, flag), bool):
            raise ConfigError(f"{flag}: expected a bool, found {getattr(cfg, flag)!r}")


def _check_rank(name: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{name}: expected a positive int, found {r!r}")


def _check_alpha(name: str, alpha: Any) -> None:
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not ok or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"{name}: expected a positive finite number, found {alpha!r}")


def _check_regex(name: str, pattern: str, used_as: Callable[[str], str] | None = None) -> None:
    """``pattern`` compiles, alone and as it is used (``used_as``: a key inside PEFT's wider
    regex, where inline flags such as ``(?i)`` are an error in the middle)."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{name}: {pattern!r} is not a valid regex ({err})") from None
    if used_as is None:
        return
    try:
        re.compile(used_as(pattern))
    except re.error as err:
        hint = ""
        if "global flags" in str(err):  # '(?i)q' -> '(?i:q)', which holds inside
            hint = "; a scoped flag group such as '(?i:...)' works there"
        raise ConfigError(
            f"{name}: {pattern!r} is not valid where it is used, inside the regex "
            f"{used_as(pattern)!r} (as in PEFT): {err}{hint}"
        ) from None


def _check_layers(cfg: LoraConfig) -> None:
    idx = cfg.layers_to_transform
    if idx is not None:
        items = [idx] if isinstance(idx, int) else idx
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            raise ConfigError(f"layers_to_transform: expected non-negative ints, found {idx!r}")
    if isinstance(cfg.target_modules, str) and (idx is not None or cfg.layers_pattern):
        raise ConfigError(
            "layers_to_transform/layers_pattern: cannot be used when target_modules is a regex "
            f"string ({cfg.target_modules!r}); give a list of names instead"
        )
    if cfg.layers_pattern and idx is None:
        raise ConfigError("layers_pattern: requires layers_to_transform to be set as well")
    patterns = cfg.layers_pattern
    if patterns is not None and not isinstance(patterns, (str, list)):
        raise ConfigError(f"layers_pattern: expected a string or a list, found {patterns!r}")
    for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"layers_pattern: expected non-empty strings, found {pattern!r}")
        _check_regex("layers_pattern", pattern, layers_regex)  # PEFT reads it as a regex fragment


# PEFT's spelling of a randomized PiSSA: "pissa_niter_<subspace iterations>"
PEFT_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

# initializers that move s·B0 A0 out of the base weight (W_res = W - s·B0 A0), from r singular
# triplets (PiSSA) or QR columns (OLoRA) of it
RESIDUAL_INITIALIZERS = frozenset({"pissa", "pissa_exact", "olora"})

# registry entries that are not PEFT values of init_lora_weights: AdaLoraConfig's own init
# (AdaLoraConfig.initializer; its files say True / False)
INTERNAL_INITIALIZERS = frozenset({"adalora", "adalora_random"})


def _check_init(init: Any) -> None:
    if isinstance(init, bool):
        return
    from rankwise.lora.initializers import INITIALIZERS

    public = sorted(set(INITIALIZERS) - INTERNAL_INITIALIZERS)
    if not isinstance(init, str) or init not in public:
        raise ConfigError(
            f"init_lora_weights: expected True, False or one of {public}, found {init!r}"
        )
