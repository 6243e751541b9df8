"""A trained run used again: evaluate, predict and merge from its adapter directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rankwise.cli import main
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
