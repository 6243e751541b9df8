"""The package's own exceptions.

Each is also a ``ValueError`` (or ``KeyError``) so callers that catch the builtin still work,
and the CLI prints any of them as one line with no traceback. Messages name the culprit
(argument, module or key), what was expected and what was found.
"""

from __future__ import annotations


class RankwiseError(Exception):
    """Base class of every error rankwise raises on purpose."""


class ConfigError(RankwiseError, ValueError):
    """A configuration value (LoraConfig field, adapter_config.json entry, CLI option) is invalid."""


class InjectionError(RankwiseError, ValueError):
    """Adapters cannot be injected: unknown target, unsupported layer, already injected, ..."""


class ShapeMismatchError(RankwiseError, ValueError):
    """A tensor's shape does not fit the module or key it is meant for."""


class AdapterFormatError(RankwiseError, ValueError):
    """An adapter directory or file is missing, corrupt, of another format, or unsafe to read."""


class MergeError(RankwiseError, ValueError):
    """A merge or unmerge cannot be done (already merged, non-finite result, ...)."""


class GeneratorError(RankwiseError, TypeError, ValueError):
    """A ``generator=`` argument is neither a ``torch.Generator``, an integer seed nor None
    (a TypeError, and a ValueError as ``rankwise.linalg`` raised before the rule was shared)."""
