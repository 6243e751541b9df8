"""``rankwise analyze budget``: equal-budget runs of the fine-tuning engine on a tiny BERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankwise.cli import main  # noqa: E402

WORDS = ["good", "bad", "great", "awful", "fine", "poor", "nice", "dull", "film", "plot"]


def _tiny_model_dir(root: Path) -> Path:
    directory = root / "tiny"
    directory.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(directory)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=len(vocab),
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def test_budget_runs_each_set_at_its_equal_budget_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _tiny_model_dir(tmp_path)
    rows = ["label\tsentence"] + [
        f"{i % 2}\t{WORDS[i % 10]} {WORDS[(3 * i) % 10]}" for i in range(24)
    ]
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(rows) + "\n")
    argv = ["analyze", "budget", "--model", str(model), "--data", str(data), "--sets", "q,qv"]
    argv += ["--types", "q=attention.self.query,v=attention.self.value"]
    argv += [
        "--rank",
        "2",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--output",
        str(tmp_path / "runs"),
    ]
    code = main([*argv, "--plot", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("{")}
    assert table["{q}"][1:4] == ["2", "2", str(2 * 2 * 64)]
    assert table["{q,v}"][1:4] == ["1", "4", str(1 * 4 * 64)]
    assert all(0.0 <= float(row[4]) <= 100.0 for row in table.values())
    assert (tmp_path / "runs" / "qv" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "plots" / "budget.png").is_file()
    import json

    summary = json.loads((tmp_path / "runs" / "budget.json").read_text())
    assert [(r["types"], r["rank"], r["params"]) for r in summary] == [
        (["q"], 2, 256),
        (["q", "v"], 1, 256),
    ]
    from safetensors import safe_open

    with safe_open(
        str(tmp_path / "runs" / "qv" / "adapter" / "adapter_model.safetensors"), "pt"
    ) as f:
        lora = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1]
                   for k in f.keys() if "lora_" in k)  # fmt: skip
    assert lora == 256


def test_budget_checks_every_run_directory_before_training(tmp_path: Path) -> None:
    model = _tiny_model_dir(tmp_path)
    data = tmp_path / "train.tsv"
    data.write_text("label\tsentence\n" + "\n".join(f"{i % 2}\tgood film" for i in range(12)))
    (tmp_path / "runs" / "v").mkdir(parents=True)
    (tmp_path / "runs" / "v" / "keep.txt").write_text("mine")
    argv = ["analyze", "budget", "--model", str(model), "--data", str(data), "--rank", "1",
            "--max-steps", "1", "--output", str(tmp_path / "runs")]  # fmt: skip
    assert main([*argv, "--sets", "q,v"]) == 2  # v's directory is taken: nothing runs
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["v"]
    # another comparison's table: a second --sets into the same --output replaced it
    (tmp_path / "runs" / "budget.json").write_text("[]")
    assert main([*argv, "--sets", "q"]) == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["budget.json", "v"]
    (tmp_path / "runs" / "budget.json").unlink()
    for sets in ("q,q", "qv,vq", "qq,q"):  # a set given twice, in any order, or a type twice
        with pytest.raises(SystemExit) as usage:  # argparse: a usage error naming --sets
            main([*argv, "--sets", sets])
        assert usage.value.code == 2
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["v"]


def test_budget_zero_is_refused_as_a_budget(tmp_path: Path, capsys) -> None:
    model = _tiny_model_dir(tmp_path)
    argv = ["analyze", "budget", "--model", str(model), "--data", "x.tsv", "--budget", "0",
            "--output", str(tmp_path / "runs")]  # fmt: skip
    assert main(argv) == 2
    assert "budget must be a positive integer; found 0" in capsys.readouterr().err


def test_budget_type_names_are_single_letters(tmp_path: Path, capsys) -> None:
    # --types qq=query was accepted, but --sets reads "qq" as q twice: no set could name it
    argv = ["analyze", "budget", "--data", "x.tsv", "--output", str(tmp_path / "runs"),
            "--types", "qq=attention.self.query,v=attention.self.value", "--sets", "v"]  # fmt: skip
    with pytest.raises(SystemExit) as usage:
        main(argv)
    assert usage.value.code == 2
    assert "expected one-letter type names" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_types_without_sets_name_where_the_missing_type_comes_from(tmp_path: Path, capsys) -> None:
    # "weight types ['k']: unknown ['k']" after loading the model: the user never named k
    argv = ["analyze", "budget", "--data", "x.tsv", "--output", str(tmp_path / "runs"),
            "--types", "q=attention.self.query,v=attention.self.value"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--types: no type k, o, which the default --sets (q,k,v,o,qk,qv,qkvo) use" in err
    assert not (tmp_path / "runs").exists()
