"""Every LoRA variant the engine offers trains, merges exactly, reloads to the same metrics and
resumes bit-identically (tiny BERT built from a config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise.train import TrainConfig, train
from rankwise.train.inference import evaluate_file, load_trained
from rankwise.train.methods import AVAILABLE


def _quiet(_: str) -> None:
    pass


def _config(model: Path, data: Path, out: Path, method: str, **changes) -> TrainConfig:
    options = {"model": str(model), "data": str(data), "eval_data": str(data),
               "output": str(out), "method": method, "batch_size": 8, "lr": 5e-3,
               "max_steps": 4, "save_every": 2, "dropout": 0.0}  # fmt: skip
    return TrainConfig(**{**options, **changes})


# rslora, loraplus and adalora (resumed mid-schedule): test_train_hook_methods.py
@pytest.mark.parametrize(
    "method", [m for m in AVAILABLE if m not in ("lora", "full", "rslora", "loraplus", "adalora")]
)
def test_variant_trains_merges_reloads_and_resumes(
    method: str, tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    whole = train(_config(tiny_bert, toy_tsv, tmp_path / "whole", method), echo=_quiet)
    assert whole.merge_check is not None and whole.merge_check.identical
    assert 0 < whole.trainable < whole.total
    reloaded = evaluate_file(load_trained(tmp_path / "whole" / "adapter"), str(toy_tsv))
    assert whole.after is not None
    assert reloaded.predictions == whole.after.predictions
    assert reloaded.loss == pytest.approx(whole.after.loss, rel=1e-5)

    train(_config(tiny_bert, toy_tsv, tmp_path / "cut", method), echo=_quiet, stop_after=3)
    train(_config(tiny_bert, toy_tsv, tmp_path / "cut", method, resume=True), echo=_quiet)
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if method == "lora-fa":  # A never moves from its initialization, whatever the lr; B does
        other = train(
            _config(tiny_bert, toy_tsv, tmp_path / "lr2", method, lr=2e-2), echo=_quiet
        ).saved
        c = load_file(str(other / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)
        assert any(not torch.equal(a[k], c[k]) for k in a if ".lora_B." in k)


def test_lora_ga_gradient_batches_do_not_depend_on_the_batch_split(tiny_bert: Path) -> None:
    # the batches were cut at the per-process batch size: 2 processes x 8 and 1 x 16 built
    # different initializations (adapters 0.67 apart) and a resume with another split was
    # refused ("LoRA-GA's initialization differs")
    from transformers import AutoTokenizer

    from rankwise.train.batching import encode
    from rankwise.train.config import resolve
    from rankwise.train.data import TextDataset
    from rankwise.train.hooks import gradient_batches

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = tuple(f"film {'very ' * (i % 7)}good {i}" for i in range(50))
    ds = TextDataset(texts, tuple(i % 2 for i in range(50)), ("0", "1"), None, "t")
    enc = encode(ds, tok, task="classification", max_length=32)

    def chunks(batch: int, accum: int, world: int) -> list[dict[str, torch.Tensor]]:
        config = resolve(TrainConfig(method="lora-ga", data="x", batch_size=batch,
                                     grad_accum=accum, ga_batches=3))  # fmt: skip
        return gradient_batches(enc, config, pad_id=0, world_size=world)

    want = chunks(16, 1, 1)
    assert sum(len(c["labels"]) for c in want) == 48  # 3 global batches of 16
    # each chunk's weight: (#chunks / #batches) / examples per batch, so the mean of
    # weight x summed loss over the chunks is the mean over batches of their mean loss
    assert all(float(c["ga_weight"]) == pytest.approx(len(want) / 3 / 16) for c in want)
    for split in ((8, 1, 2), (8, 2, 1), (4, 2, 2), (2, 4, 2)):
        got = chunks(*split)
        assert len(got) == len(want), split
        for a, b in zip(got, want):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), split


def test_lora_ga_resumes_with_another_batch_split(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    options = {"ga_batches": 2, "model_dropout": 0.0}  # dropout off: no draws to differ
    whole = _config(tiny_bert, toy_tsv, tmp_path / "whole", "lora-ga", **options)
    train(whole, echo=_quiet)
    cut = _config(tiny_bert, toy_tsv, tmp_path / "cut", "lora-ga", **options)
    train(cut, echo=_quiet, stop_after=2)
    split = _config(tiny_bert, toy_tsv, tmp_path / "cut", "lora-ga", resume=True, batch_size=4,
                    grad_accum=2, **options)  # fmt: skip
    train(split, echo=_quiet)
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for key in a:  # the same optimization, summed in another order
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_olora_on_gpt2_saves_an_adapter_peft_loads(
    tiny_gpt2: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # PEFT's OLoRA ignores Conv1D's transposed weight: the plain save of a GPT-2 OLoRA run
    # failed in PeftModel.from_pretrained (size mismatch); the run now saves the plain rank-2r
    # LoRA for the unmodified base, as for LoRA-GA
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = _config(tiny_gpt2, toy_tsv, tmp_path / "run", "olora", task="causal-lm",
                     targets=("c_attn", "c_proj"), max_steps=2, save_every=0)  # fmt: skip
    result = train(config, echo=_quiet)
    trained = load_trained(result.saved)
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2),
                                       str(result.saved)).eval()  # fmt: skip
    with torch.no_grad():
        want = trained.model(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert result.after is not None and result.merge_check is not None
