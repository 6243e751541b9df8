"""Adapters inside ``transformers.Trainer``: trains only the adapter (and head), saves, reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_testkit import logits, tiny_bert_cls

from rankwise.io import load_adapter, save_adapter
from rankwise.lora import LoraConfig, inject


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 99, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.slow
def test_trainer_trains_only_adapters_and_round_trips(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model = inject(
        tiny_bert_cls(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
        generator=0,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(32))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(".lora_B." in n for n in changed)
    assert all(".lora_" in n or n.startswith("classifier.") for n in changed)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(tiny_bert_cls(), tmp_path / "adapter")
    torch.testing.assert_close(logits(again, "bert"), logits(model, "bert"), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_save_adapter_callback_writes_peft_adapters_into_checkpoints(tmp_path: Path) -> None:
    """Trainer saves a model that is not a PeftModel whole (wrapped keys in model.safetensors),
    which neither load_adapter nor PeftModel.from_pretrained reads: the callback adds the
    adapter files to every checkpoint folder and to output_dir."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from peft import PeftModel

    from rankwise.train import SaveAdapterCallback

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = inject(tiny_bert_cls(), config, generator=0)
    out = tmp_path / "run"
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        seed=0,
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Data(32), callbacks=[SaveAdapterCallback()]
    )
    trainer.train()
    model.eval()
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out):
        assert (folder / "adapter_model.safetensors").is_file(), folder
        assert (folder / "adapter_config.json").is_file(), folder
    assert (out / "checkpoint-4" / "optimizer.pt").is_file()  # Trainer's own files are kept
    want = logits(model, "bert")
    for folder in (out / "checkpoint-4", out):
        again = load_adapter(tiny_bert_cls(), folder)
        torch.testing.assert_close(logits(again, "bert"), want, rtol=0, atol=1e-6)
    peft_model = PeftModel.from_pretrained(tiny_bert_cls(), str(out)).eval()
    torch.testing.assert_close(logits(peft_model, "bert"), want, rtol=0, atol=1e-5)
    early = load_adapter(tiny_bert_cls(), out / "checkpoint-2")
    assert not torch.allclose(logits(early, "bert"), want)  # the step-2 adapter, not the last


@pytest.mark.slow
@pytest.mark.parametrize("init", ["lora_ga", "pissa"])
def test_save_adapter_callback_writes_residual_adapters_for_the_original_base(
    tmp_path: Path, init: str
) -> None:
    """LoRA-GA's plain save is refused, so the callback crashed Trainer at its first checkpoint;
    a randomized-PiSSA checkpoint loaded in PEFT (which draws its own residual) predicted
    1.5e-2 off. By default both are written for the unmodified base, which PEFT and rankwise
    load to the trained model's logits."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from peft import PeftModel

    from rankwise.lora import lora_ga_init
    from rankwise.train import SaveAdapterCallback

    kwargs = {"init_lora_weights": "pissa"} if init == "pissa" else {}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                        **kwargs)  # fmt: skip
    data = _Data(32)
    if init == "lora_ga":
        batch = {"input_ids": data.ids[:8], "labels": data.labels[:8]}
        model = lora_ga_init(tiny_bert_cls(), config, [batch], generator=0)
    else:
        model = inject(tiny_bert_cls(), config, generator=0)
    out = tmp_path / "run"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0,
        logging_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[SaveAdapterCallback()]
    )
    trainer.train()
    model.eval()
    want = logits(model, "bert")
    for folder in (out / "checkpoint-2", out):
        peft_model = PeftModel.from_pretrained(tiny_bert_cls(), str(folder)).eval()
        torch.testing.assert_close(logits(peft_model, "bert"), want, rtol=0, atol=1e-5)
        again = load_adapter(tiny_bert_cls(), folder)
        torch.testing.assert_close(logits(again, "bert"), want, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="for_original_base: expected None, True or False"):
        SaveAdapterCallback(for_original_base="yes")  # type: ignore[arg-type]
