"""A trained run used again: evaluate, predict and merge from its adapter directory."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from rankwise.cli import main
from rankwise.errors import AdapterFormatError, ConfigError
from rankwise.train import TrainConfig, train
from rankwise.train.inference import evaluate_file, load_trained, merge_to, predict


@pytest.fixture(scope="module")
def run_dir(tiny_bert: Path, toy_tsv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inference") / "run"
    config = TrainConfig(model=str(tiny_bert), data=str(toy_tsv), output=str(out), max_steps=4,
                         batch_size=8, lr=1e-2, save_every=0)  # fmt: skip
    train(config, echo=lambda _: None)
    return out


def test_reloaded_adapter_matches_the_run(run_dir: Path, toy_tsv: Path) -> None:
    trained = load_trained(run_dir / "adapter")
    assert trained.has_adapter and trained.label_names == ("0", "1")
    result = evaluate_file(trained, str(toy_tsv))
    assert result.examples == 96 and 0.0 <= result.accuracy <= 1.0
    again = evaluate_file(load_trained(run_dir / "adapter"), str(toy_tsv))
    assert again.loss == result.loss  # loading is deterministic (no random re-init leaks in)


def test_merge_gives_the_same_predictions(run_dir: Path, toy_tsv: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    trained = load_trained(run_dir / "adapter")
    before = evaluate_file(trained, str(toy_tsv))
    merged_dir = merge_to(trained, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(merged_dir)
    assert not any("lora" in k for k in plain.state_dict())
    after = evaluate_file(load_trained(merged_dir), str(toy_tsv))
    assert after.predictions == before.predictions
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)


def test_cli_evaluate_predict_merge(run_dir: Path, toy_tsv: Path, tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--adapter", str(run_dir / "adapter"), "--data", str(toy_tsv)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert (
        main(["predict", "--adapter", str(run_dir / "adapter"), "a good film", "a bad film"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("0", "1")
    probs = predict(load_trained(run_dir / "adapter"), ["a good film"])
    assert 0.5 <= probs[0].probability <= 1.0
    assert main(["merge", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert main(["merge", "--adapter", str(run_dir / "adapter"), "--out", str(tmp_path / "m")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["evaluate", "--adapter", str(tmp_path / "none"), "--data", str(toy_tsv)]) == 2
    assert "does not exist" in capsys.readouterr().err


def _peft_adapter(base: Path, out: Path, task_type: str, targets: list[str]) -> torch.nn.Module:
    """An adapter PEFT wrote (no rankwise_task.json), random factors and head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if task_type == "CAUSAL_LM" else AutoModelForSequenceClassification
    model = get_peft_model(
        cls.from_pretrained(base),
        LoraConfig(r=4, target_modules=targets, task_type=task_type, init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad and "classifier" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    model.eval().save_pretrained(out)
    return model


def test_peft_adapters_without_a_task_file_evaluate_predict_and_merge(
    tiny_gpt2: Path, tiny_bert: Path, toy_tsv: Path, tmp_path: Path, capsys
) -> None:
    """The task comes from PEFT's task_type, the labels from the base model and the head: a
    PEFT adapter from elsewhere works (it was refused: "label names are not recorded")."""
    from transformers import AutoModelForCausalLM

    causal = _peft_adapter(tiny_gpt2, tmp_path / "lm", "CAUSAL_LM", ["c_attn"])
    trained = load_trained(tmp_path / "lm")
    assert trained.task == "causal-lm"
    assert main(["merge", "--adapter", str(tmp_path / "lm"), "--out", str(tmp_path / "m")]) == 0
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = causal(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert load_trained(tmp_path / "m").task == "causal-lm"  # the merged dir records it

    classifier = _peft_adapter(tiny_bert, tmp_path / "cls", "SEQ_CLS", ["query", "value"])
    trained = load_trained(tmp_path / "cls")
    assert trained.task == "classification" and trained.label_names == ("LABEL_0", "LABEL_1")
    capsys.readouterr()
    assert main(["predict", "--adapter", str(tmp_path / "cls"), "a good film"]) == 0
    label = capsys.readouterr().out.split("\t")[0]
    tok = trained.tokenizer("a good film", return_tensors="pt")
    with torch.no_grad():
        best = int(classifier(**tok).logits.argmax())
    assert label == f"LABEL_{best}"


def test_an_adapter_without_a_recorded_length_cuts_texts_where_transformers_would(
    tiny_bert: Path, tmp_path: Path, capsys
) -> None:
    """Without rankwise_task.json (PEFT's files) texts were cut at 128 tokens without a word,
    where transformers' truncation cuts at the tokenizer's model_max_length: a text of more
    than 128 tokens was classified as PEFT's model does only when cut at 128. Now the
    tokenizer's limit, within the model's position table."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    config = BertConfig.from_pretrained(tiny_bert)
    config.max_position_embeddings = 300  # room for more than 128 tokens
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    classifier = _peft_adapter(tmp_path / "base", tmp_path / "cls", "SEQ_CLS", ["query", "value"])
    trained = load_trained(tmp_path / "cls")
    assert trained.max_length == min(tok.model_max_length, 300) > 128
    text = " ".join(f"word{i} good" for i in range(60))  # > 128 tokens, < 300
    ids = tok(text, return_tensors="pt")
    assert 128 < ids["input_ids"].shape[1] < 300
    with torch.no_grad():
        want = torch.softmax(classifier(**ids).logits, dim=-1).max().item()
    capsys.readouterr()
    assert main(["predict", "--adapter", str(tmp_path / "cls"), "--json", text]) == 0
    got = json.loads(capsys.readouterr().out)["probability"]
    assert got == pytest.approx(want, abs=1e-6)


def test_default_max_length_takes_the_tightest_known_limit() -> None:
    from types import SimpleNamespace

    from rankwise.train.inference import FALLBACK_MAX_LENGTH, default_max_length

    def model(positions: int | None) -> torch.nn.Module:
        m = torch.nn.Module()  # no learned position table: the config's count, if any
        m.config = SimpleNamespace(max_position_embeddings=positions)
        return m

    sentinel = int(1e30)  # transformers' "no limit"
    cases = [(512, 2048, 512), (sentinel, 2048, 2048), (4096, 1_010_000, 4096),
             (1_010_000, 1_010_000, 1_010_000), (sentinel, None, FALLBACK_MAX_LENGTH),
             (None, None, FALLBACK_MAX_LENGTH)]  # fmt: skip
    for tokenizer_limit, positions, expected in cases:
        tokenizer = SimpleNamespace(model_max_length=tokenizer_limit)
        assert default_max_length(model(positions), tokenizer) == expected


def test_predict_reads_a_lone_carriage_return_as_a_line_break(
    run_dir: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr("sys.stdin", _stdin(b"great film\rawful\r"))
    assert main(["predict", "--adapter", str(run_dir / "adapter"), "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["text"] for line in out] == ["great film", "awful"]


def test_a_binary_classifier_saved_by_transformers_loads(tiny_bert: Path, tmp_path: Path) -> None:
    """transformers 5 leaves the default two-label id2label out of config.json; such a model
    (here PEFT's merge_and_unload + save_pretrained) was refused: "label names are not
    recorded". Its labels are read as transformers reads them."""
    from transformers import AutoTokenizer

    peft_model = _peft_adapter(tiny_bert, tmp_path / "cls", "SEQ_CLS", ["query", "value"])
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "merged")
    assert "id2label" not in (tmp_path / "merged" / "config.json").read_text()
    merged = load_trained(tmp_path / "merged")
    assert merged.task == "classification" and merged.label_names == ("LABEL_0", "LABEL_1")
    texts = ["a good film", "a bad film"]
    want = predict(load_trained(tmp_path / "cls"), texts)
    got = predict(merged, texts)
    assert [p.label for p in got] == [p.label for p in want]
    assert [p.probability for p in got] == pytest.approx([p.probability for p in want], abs=1e-5)


def test_an_adapter_file_is_named_as_a_file(run_dir: Path, capsys) -> None:
    adapter = run_dir / "adapter"
    assert main(["predict", "--adapter", str(adapter / "adapter_config.json"), "good"]) == 2
    err = capsys.readouterr().err
    assert "is a file; expected a directory" in err and f"{str(adapter)!r}?" in err


@pytest.mark.parametrize("value", [-5, 0, "abc", "128", 64.5, True, [128]])
def test_a_bad_max_length_in_the_task_file_is_an_error(
    run_dir: Path, tmp_path: Path, value: object
) -> None:
    import shutil

    from rankwise.errors import AdapterFormatError

    adapter = shutil.copytree(run_dir / "adapter", tmp_path / "adapter")
    task_file = adapter / "rankwise_task.json"
    info = json.loads(task_file.read_text())
    task_file.write_text(json.dumps({**info, "max_length": value}))
    message = f"rankwise_task.json: 'max_length' must be a positive integer, found {value!r}"
    with pytest.raises(AdapterFormatError, match=re.escape(message)):
        load_trained(adapter)
    del info["max_length"]
    task_file.write_text(json.dumps(info))
    assert load_trained(adapter).max_length == 128  # not recorded: the default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "expected a JSON object, found list"),
        ('"classification"', "expected a JSON object, found str"),
        (
            '{"task": "regression"}',
            "'task' must be one of classification, causal-lm, found 'regression'",
        ),
        ('{"label_names": "negative,positive"}', "'label_names' must be a list of strings"),
        ('{"label_names": ["negative", 1]}', "'label_names' must be a list of strings"),
        ('{"label_names": ["pos", "neg", "pos"]}', "'label_names' repeats 'pos'"),
        ('{"base_model": 7}', "'base_model' must be a string, found 7"),
        (b'{"task": "classification\xff"}', "not UTF-8 text"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON (nested too deeply)"),
    ],
)
def test_a_broken_task_file_is_an_error_naming_file_and_field(
    run_dir: Path, tmp_path: Path, text: str | bytes, message: str
) -> None:
    """A task file that is not an object, or whose fields have the wrong type, was read as
    if absent or half-used (label names split into characters, a list taken as missing)."""
    import shutil

    from rankwise.errors import AdapterFormatError

    adapter = shutil.copytree(run_dir / "adapter", tmp_path / "adapter")
    task_file = adapter / "rankwise_task.json"
    if isinstance(text, bytes):
        task_file.write_bytes(text)
    else:
        task_file.write_text(text)
    with pytest.raises(AdapterFormatError, match=re.escape(message)) as info:
        load_trained(adapter)
    assert "rankwise_task.json" in str(info.value)


def _stdin(data: bytes) -> io.TextIOWrapper:
    """A stand-in for sys.stdin on POSIX: UTF-8, strict, no newline translation."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="\n")


def test_predict_stdin_lines_lose_their_crlf_and_bom(run_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", _stdin(b"\xef\xbb\xbfgreat film\r\n\r\nawful\r\n"))
    assert main(["predict", "--adapter", str(run_dir / "adapter"), "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["text"] for line in out] == ["great film", "awful"]


def test_invalid_unicode_is_an_error_naming_the_text(
    run_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A lone surrogate (a non-UTF-8 byte in an argument or on stdin, or a JSON escape)
    crashed in the tokenizer with a traceback."""
    from rankwise.errors import ConfigError

    adapter = str(run_dir / "adapter")
    expected = "not valid UTF-8/Unicode (lone surrogate U+DCE9 at character 4; an undecodable byte 0xe9?)"  # fmt: skip
    assert main(["predict", "--adapter", adapter, "ok", "caf\udce9 great"]) == 2
    assert f"TEXT argument 2: the text is {expected}" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", _stdin(b"ok\n\ncaf\xe9 great\n"))
    assert main(["predict", "--adapter", adapter]) == 2
    assert f"stdin line 3: the text is {expected}" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok", "label": 1}\n{"text": "caf\\udce9 great", "label": 0}\n')
    assert main(["evaluate", "--adapter", adapter, "--data", str(data)]) == 2
    assert (
        "d.jsonl' row 2 (line 2): column 'text': the text is not valid" in capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match="predict: text 2: .*lone surrogate U\\+D800"):
        predict(load_trained(adapter), ["ok", "\ud800"])


def test_predict_needs_a_text(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An empty TEXT argument was classified (blank stdin lines are skipped), and stdin with
    no text printed nothing and exited 0."""
    adapter = str(run_dir / "adapter")
    assert main(["predict", "--adapter", adapter, "ok", " "]) == 2
    assert "TEXT argument 2: expected a text to classify, found ' '" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", _stdin(b"\n \r\n"))
    assert main(["predict", "--adapter", adapter]) == 2
    err = capsys.readouterr().err
    assert "stdin: expected texts to classify, one per line; found none" in err


def test_predict_refuses_non_finite_outputs(run_dir: Path) -> None:
    # NaN logits gave label 0 with probability nan, exit 0
    trained = load_trained(run_dir / "adapter")
    with torch.no_grad():
        trained.model.classifier.weight.fill_(float("nan"))  # the trained head
    with pytest.raises(ValueError, match="outputs for text 1 are not finite"):
        predict(trained, ["a good film"])


def test_evaluate_refuses_non_finite_outputs(run_dir: Path, toy_tsv: Path) -> None:
    # NaN logits' argmax was counted as a prediction ("accuracy 32.50%, loss nan") and
    # --json printed NaN, which is not JSON
    trained = load_trained(run_dir / "adapter")
    with torch.no_grad():
        trained.model.classifier.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"not finite \(NaN/inf\) for 96 of 96 examples"):
        evaluate_file(trained, str(toy_tsv))


def test_a_max_length_below_the_special_tokens_is_refused(run_dir: Path, toy_tsv: Path) -> None:
    # BERT's fast tokenizer asked for 1 token (< [CLS] [SEP]) did not truncate at all
    trained = load_trained(run_dir / "adapter", max_length=2)
    with pytest.raises(ConfigError, match="--max-length 2 leaves no token of text after the "):
        evaluate_file(trained, str(toy_tsv))
    assert evaluate_file(load_trained(run_dir / "adapter", max_length=3), str(toy_tsv)).examples


def test_a_recorded_base_path_missing_here_names_its_file_and_model(
    run_dir: Path, tmp_path: Path
) -> None:
    import shutil

    moved = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", moved)
    task = json.loads((moved / "rankwise_task.json").read_text())
    (moved / "rankwise_task.json").write_text(json.dumps({**task, "base_model": "/gone/model"}))
    with pytest.raises(FileNotFoundError, match=r"'/gone/model' \(recorded in .*rankwise_task"):
        load_trained(moved)
    assert load_trained(moved, model=task["base_model"]).has_adapter


def test_sigterm_during_merge_leaves_no_temporary_directory(
    run_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    # SIGTERM's default action killed the process mid-write: a ~90 MB .tmp-<out>-<pid>
    # directory stayed behind that nothing ever removed (Ctrl-C already cleaned up).
    import os
    import signal

    from transformers import PreTrainedModel

    saved = PreTrainedModel.save_pretrained

    def save_then_terminated(self, directory, *args, **kwargs):
        saved(self, directory, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` while the output is written

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_terminated)
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as stop:  # SIGTERM still ends the program calling main
        main(["merge", "--adapter", str(run_dir / "adapter"), "--out", str(out)])
    assert stop.value.code == 143 and "terminated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_an_adapter_tokenizer_without_a_pad_token_pads_with_eos(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    # a PEFT adapter saved with its GPT-2/Llama-style tokenizer (no pad token): evaluate
    # crashed in torch.full(fill_value=None); the base tokenizer already fell back to eos
    from transformers import AutoTokenizer

    _peft_adapter(tiny_gpt2, tmp_path / "lm", "CAUSAL_LM", ["c_attn"])
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.eos_token, tok.pad_token = "[SEP]", None
    tok.save_pretrained(tmp_path / "lm")
    trained = load_trained(tmp_path / "lm")
    assert trained.tokenizer.pad_token == "[SEP]"
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"a film {'so ' * i}good"}) + "\n" for i in range(6))
    )
    result = evaluate_file(trained, str(data), batch_size=3)
    assert result.perplexity is not None and result.perplexity > 1.0


def test_evaluate_and_predict_take_max_length(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the position check told evaluate's user to "set --max-length", which evaluate lacked
    long = tmp_path / "long.tsv"
    long.write_text("label\tsentence\n" + "".join(f"{i % 2}\t{'good ' * 150}\n" for i in range(4)))
    argv = ["evaluate", "--adapter", str(run_dir / "adapter"), "--data", str(long), "--json"]
    recorded = json.loads((run_dir / "adapter" / "rankwise_task.json").read_text())["max_length"]
    assert recorded == 128
    task = json.loads((run_dir / "adapter" / "rankwise_task.json").read_text())
    assert main([*argv, "--max-length", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 4
    assert load_trained(run_dir / "adapter", max_length=16).max_length == 16
    assert main(["predict", "--adapter", str(run_dir / "adapter"), "--max-length", "8",
                 "good " * 150]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("\t") == 2
    assert main([*argv, "--max-length", "0"]) == 2
    assert "--max-length: expected an integer >= 1" in capsys.readouterr().err
    assert json.loads((run_dir / "adapter" / "rankwise_task.json").read_text()) == task


def test_a_failed_merge_leaves_no_parent_directories(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a refused merge (say an adapter on a tied lm_head) left the --out's new parents behind
    import rankwise.lora
    from rankwise.errors import MergeError

    def refuse(model):
        raise MergeError("refused for the test")

    monkeypatch.setattr(rankwise.lora, "merge_and_unload", refuse)
    trained = load_trained(run_dir / "adapter")
    with pytest.raises(MergeError):
        merge_to(trained, tmp_path / "a" / "b" / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()
    with pytest.raises(MergeError):
        merge_to(trained, tmp_path / "keep" / "b" / "merged")
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]  # it existed before: kept


@pytest.mark.parametrize("spelling", [".", "absolute"])
def test_merge_into_the_empty_working_directory(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, spelling: str
) -> None:
    # `--out .` failed renaming '.' (EBUSY) and left the whole model in a hidden temporary;
    # `--out "$PWD"` swapped the directory out from under the shell (a deleted cwd)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    out = "." if spelling == "." else str(here)
    assert main(["merge", "--adapter", str(run_dir / "adapter"), "--out", out]) == 0
    capsys.readouterr()
    assert here.stat().st_ino == inode and Path.cwd().stat().st_ino == inode
    names = sorted(p.name for p in here.iterdir())
    assert "config.json" in names and not [n for n in names if n.startswith(".")]
    assert load_trained(here).label_names == ("0", "1")


def test_atomic_dir_removes_its_temporary_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from rankwise.train import outputs

    def busy(src, dst):
        raise OSError(16, "Device or resource busy")

    with pytest.raises(OSError, match="busy"):
        with outputs.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "weights").write_bytes(b"x" * 10)
            monkeypatch.setattr(os, "replace", busy)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_puts_the_new_version_in_place_before_deleting_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-save (say --resume of a finished run) deleted the old adapter/ before moving the
    new one in: a kill during that deletion left no adapter/ at all."""
    import shutil

    from rankwise.io import files
    from rankwise.train import outputs

    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights").write_text("old")
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if any(p.name == "weights" and p.read_text() == "old" for p in Path(path).glob("*")):
            raise KeyboardInterrupt  # the kill, while the old version is being deleted
        real_rmtree(path, *args, **kwargs)

    for exchange in (True, False):  # renameat2's atomic exchange, and the two-rename fallback
        if not exchange:
            monkeypatch.setattr(files, "_exchange", lambda a, b: False)
        monkeypatch.setattr(outputs.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            with outputs.atomic_dir(final) as tmp:
                (tmp / "weights").write_text("new")
        monkeypatch.setattr(outputs.shutil, "rmtree", real_rmtree)
        assert (final / "weights").read_text() == "new"
        (final / "weights").write_text("old")
        for leftover in tmp_path.glob(".*"):
            real_rmtree(leftover)


def test_loading_an_adapter_with_its_own_head_gives_no_reinit_warning(
    tiny_bert: Path, tmp_path: Path
) -> None:
    # a 3-label run over the 2-label checkpoint: evaluate/predict warned "the head is
    # re-initialized" although the trained head comes from the adapter
    import warnings

    data = tmp_path / "three.tsv"
    data.write_text("label\tsentence\n" + "\n".join(f"{i % 3}\tfilm {i}" for i in range(30)) + "\n")
    config = TrainConfig(model=str(tiny_bert), data=str(data), output=str(tmp_path / "run"),
                         max_steps=1, batch_size=8, save_every=0)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="head is re-initialized"):  # training: it is
        train(config, echo=lambda _: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained = load_trained(tmp_path / "run" / "adapter")
    assert trained.label_names == ("0", "1", "2")
    assert trained.model.classifier.out_features == 3  # the adapter's trained head


def test_an_adapter_saving_another_module_is_refused_over_a_head_of_other_size(
    tiny_bert: Path, tmp_path: Path
) -> None:
    # any modules_to_save counted as "the adapter brings the head": a 3-label adapter saving
    # only the pooler over the 2-label checkpoint got a random head without a word (then a
    # warning; now refused, as for a model directory: the head changed at every load)
    import json

    from transformers import AutoModelForSequenceClassification

    from rankwise.io import save_adapter
    from rankwise.lora import LoraConfig, inject

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3,
                                                               ignore_mismatched_sizes=True)  # fmt: skip
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["pooler"])
    adapter = save_adapter(inject(model, config, generator=0), tmp_path / "adapter")
    task = {"task": "classification", "label_names": ["0", "1", "2"], "base_model": str(tiny_bert)}
    (adapter / "rankwise_task.json").write_text(json.dumps(task))
    with pytest.raises(AdapterFormatError, match=r"saves no classification head .*has 2 labels"):
        load_trained(adapter)


def test_an_adapter_without_a_head_over_a_base_without_one_is_refused(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """No classifier in the adapter and a bare BertModel base (id2label in its config): the
    head was random and another at every load, so predict's labels and merge's weights changed
    from run to run without a word."""
    from transformers import AutoConfig, BertModel

    from rankwise.io import save_adapter
    from rankwise.lora import LoraConfig, inject

    base = tmp_path / "bare"
    bare = BertModel(AutoConfig.from_pretrained(tiny_bert))
    bare.config.id2label, bare.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    bare.save_pretrained(base)
    model = inject(bare, LoraConfig(r=2, target_modules=["query", "value"]), generator=0)
    adapter = save_adapter(model, tmp_path / "adapter")
    task = {"task": "classification", "label_names": ["neg", "pos"], "base_model": str(base)}
    (adapter / "rankwise_task.json").write_text(json.dumps(task))
    with pytest.raises(AdapterFormatError, match=r"saves no classification head.*\['BertModel'\]"):
        load_trained(adapter)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) != 0
    assert not out.exists()


def test_an_adapter_on_a_model_it_does_not_fit_names_both(
    run_dir: Path, tiny_gpt2: Path, tmp_path: Path, capsys
) -> None:
    """'target_modules: [...] matched no module' named neither --model nor the adapter."""
    out = tmp_path / "m"
    argv = ["merge", "--adapter", str(run_dir / "adapter"), "--model", str(tiny_gpt2)]
    assert main([*argv, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert f"adapter {str(run_dir / 'adapter')!r} on --model {str(tiny_gpt2)!r}" in err, err
    assert "recorded base" in err and "matched no module" in err and not out.exists()


@pytest.mark.parametrize(
    "saved", [["classifier.out_proj"], ["classifier.dense", "classifier.out_proj"]]
)
def test_a_roberta_style_head_saved_by_path_gives_no_reinit_warning(
    saved: list[str], tiny_bert: Path, tmp_path: Path
) -> None:
    # the head check read the last name of each modules_to_save entry: RoBERTa's head saved
    # as classifier.out_proj was "re-initialized" although the adapter's head was the one used
    import json
    import warnings

    import transformers

    from rankwise.io import save_adapter
    from rankwise.lora import LoraConfig, inject

    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    config = transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        vocab_size=tok.vocab_size, max_position_embeddings=140, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.RobertaForSequenceClassification(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=3, ignore_mismatched_sizes=True
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=saved)
    adapter = save_adapter(inject(model, lora, generator=0), tmp_path / "adapter")
    task = {"task": "classification", "label_names": ["0", "1", "2"],
            "base_model": str(tmp_path / "base")}  # fmt: skip
    (adapter / "rankwise_task.json").write_text(json.dumps(task))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trained = load_trained(adapter)
    assert torch.equal(trained.model.classifier.out_proj.weight, model.classifier.out_proj.weight)


def test_a_tokenizer_config_without_a_vocabulary_is_not_used(
    run_dir: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    """tokenizer_config.json alone made transformers build a 5-token tokenizer: every word and
    even [CLS]/[SEP] became other ids, and predictions were silently wrong."""
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        (adapter / name).unlink(missing_ok=True)
    assert (adapter / "tokenizer_config.json").is_file()
    with pytest.warns(RuntimeWarning, match="tokenizer_config.json without a vocabulary"):
        trained = load_trained(adapter)
    reference = load_trained(run_dir / "adapter")
    assert (
        trained.tokenizer("a good film")["input_ids"]
        == (reference.tokenizer("a good film")["input_ids"])
    )
    base = tmp_path / "base"  # a base directory with the config alone is refused
    base.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        shutil.copy(tiny_bert / name, base / name)
    with pytest.raises(ConfigError, match="has no tokenizer files"):
        load_trained(run_dir / "adapter", model=str(base))


def test_a_corrupt_model_file_and_a_model_for_a_model_directory_are_one_line_errors(
    run_dir: Path, toy_tsv: Path, tmp_path: Path, capsys
) -> None:
    merged = merge_to(load_trained(run_dir / "adapter"), tmp_path / "merged")
    # --model was ignored for a full model directory (a path that does not exist, too)
    argv = ["predict", "--adapter", str(merged), "--model", str(tmp_path / "nowhere"), "a film"]
    assert main(argv) == 2
    assert "--model applies to adapter directories only" in capsys.readouterr().err
    weights = merged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy: a traceback, exit 1
    assert main(["evaluate", "--adapter", str(merged), "--data", str(toy_tsv)]) == 2
    err = capsys.readouterr().err
    assert "not a valid safetensors file" in err and "Traceback" not in err


def test_a_peft_adalora_adapter_warns_once_about_an_ignored_option(
    tiny_bert: Path, tmp_path: Path
) -> None:
    # the adapter config was read twice (base lookup, then load_adapter): the warning twice
    import warnings

    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert))
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, use_rslora=True,
                           target_modules=["query"], task_type="SEQ_CLS")  # fmt: skip
    get_peft_model(base, config).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_trained(tmp_path)
    ignored = [w for w in caught if "AdaLoRA ignores use_rslora" in str(w.message)]
    assert len(ignored) == 1, [str(w.message) for w in ignored]


def test_a_model_directory_without_a_trained_head_for_its_labels_is_refused(
    tiny_bert: Path, tmp_path: Path
) -> None:
    # a random head was initialized: predictions changed from run to run (37.5% then 46.9%)
    import shutil

    from transformers import AutoConfig, BertModel

    from rankwise.errors import AdapterFormatError
    from rankwise.train.inference import TASK_FILE

    base = tmp_path / "base"
    BertModel(AutoConfig.from_pretrained(tiny_bert)).save_pretrained(base)
    shutil.copy(tiny_bert / "tokenizer.json", base)
    with pytest.raises(AdapterFormatError, match="without a trained classification head"):
        load_trained(base)
    three = tmp_path / "three"
    shutil.copytree(tiny_bert, three)
    (three / TASK_FILE).write_text(json.dumps({"task": "classification",
                                               "label_names": ["a", "b", "c"]}))  # fmt: skip
    with pytest.raises(AdapterFormatError, match="head has 2 labels, the recorded labels are 3"):
        load_trained(three)
    assert load_trained(tiny_bert).task == "classification"  # a trained two-label head
    # a config without architectures: judged by the head weights in model.safetensors
    bare = tmp_path / "bare"
    shutil.copytree(tiny_bert, bare)
    config = json.loads((bare / "config.json").read_text())
    config.pop("architectures", None)
    (bare / "config.json").write_text(json.dumps(config))
    assert load_trained(bare).task == "classification"  # it was refused
    (base / "config.json").write_text(
        json.dumps(
            {
                k: v
                for k, v in json.loads((base / "config.json").read_text()).items()
                if k != "architectures"
            }
        )  # fmt: skip
    )
    with pytest.raises(AdapterFormatError, match="without a trained classification head"):
        load_trained(base)


def test_predict_prints_one_line_per_text_whatever_it_holds(run_dir: Path, capsys) -> None:
    # a text with a newline was printed as two lines, the second looking like a row of its own
    texts = ["first line\nsecond\tfield", "C:\\new\\table.txt", "plain"]
    assert main(["predict", "--adapter", str(run_dir / "adapter"), *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.count("\t") == 2 for line in lines)
    shown = [line.split("\t")[2] for line in lines]
    assert shown == ["first line\\nsecond\\tfield", "C:\\new\\table.txt", "plain"]  # as given


def test_predict_checks_its_options_before_reading_stdin(tmp_path: Path, monkeypatch) -> None:
    # with no TEXT at a terminal, a bad --adapter or --max-length 0 waited for input first
    class Untouched(io.StringIO):
        def read(self, *args: object) -> str:
            raise AssertionError("stdin read before the options were checked")

    monkeypatch.setattr("sys.stdin", Untouched())
    assert main(["predict", "--adapter", str(tmp_path / "missing")]) == 2
    assert main(["predict", "--adapter", str(tmp_path), "--max-length", "0"]) == 2


def test_the_head_check_also_reads_a_hub_id_base_config(
    tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    """The check ran for local directories only: a (cached) hub id base without a trained
    head still gave a random head at every load. Its config is read as from_pretrained reads
    it (here: stood in for the hub's, no network)."""
    from transformers import AutoConfig, BertModel

    import rankwise.train.inference as inference
    from rankwise.io import save_adapter
    from rankwise.lora import LoraConfig, inject

    config = AutoConfig.from_pretrained(tiny_bert)
    config.architectures = ["BertModel"]
    adapter = save_adapter(
        inject(BertModel(config), LoraConfig(r=2, target_modules=["query"]), generator=0),
        tmp_path / "adapter",
    )
    task = {"task": "classification", "label_names": ["0", "1"], "base_model": "someone/bert"}
    (adapter / "rankwise_task.json").write_text(json.dumps(task))
    monkeypatch.setattr(inference, "load_config", lambda source, **_: config)
    with pytest.raises(AdapterFormatError, match=r"saves no classification head.*someone/bert"):
        load_trained(adapter)


def test_json_nested_too_deeply_is_named_or_skipped(tmp_path: Path) -> None:
    """The parser's RecursionError escaped a model's config.json (predict on a model
    directory) and a metrics.jsonl line (a hand-edited or hostile file)."""
    from rankwise.errors import ConfigError
    from rankwise.train.inference import _model_config
    from rankwise.train.metrics import read_metrics

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(nested too deeply\)"):
        _model_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        _model_config(str(tmp_path))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5}\n' + deep + '\n{"step": 2, "loss": 0.4}\n')
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
