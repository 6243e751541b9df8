"""Adapters under other dtypes: ``model.to(dtype)`` after injection, ``torch.autocast`` and the
rounding of a float32 adapter on a bf16/fp16 base — each against PEFT's own layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.lora import LoraConfig, inject


class _Net(nn.Module):
    """One layer of each kind: Embedding -> Linear -> Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv1d(24, 8, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(ids))  # (b, t, 24)
        return self.conv(h.transpose(1, 2)).float().sum(dim=1)  # (b, t)


def _pair(use_dora: bool = False) -> tuple[nn.Module, nn.Module]:
    """rankwise and PEFT on the same net, the same non-zero adapter weights."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    targets = ["emb", "lin"] if use_dora else ["emb", "lin", "conv"]
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora)
    ours = inject(_Net(), LoraConfig(**kwargs), generator=0)
    theirs = get_peft_model(_Net(), PeftConfig(**kwargs))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(ours.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        peft_params = dict(theirs.base_model.model.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                peft_params[_peft_name(name)].copy_(p)
    return ours, theirs


def _peft_name(name: str) -> str:
    """``lin.lora_A.weight`` -> ``lin.lora_A.default.weight``; ``emb.lora_embedding_A`` ->
    ``emb.lora_embedding_A.default``; magnitude -> ``lin.lora_magnitude_vector.default.weight``."""
    parts = name.split(".")
    if parts[-1] == "lora_magnitude_vector":
        return ".".join([*parts, "default", "weight"])
    if parts[-1].startswith("lora_embedding_"):
        return ".".join([*parts, "default"])
    return ".".join([*parts[:-1], "default", parts[-1]])


IDS = torch.randint(0, 50, (4, 40), generator=torch.Generator().manual_seed(2))  # 160 rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("use_dora", [False, True])
def test_model_to_dtype_after_inject_runs_as_peft(dtype: torch.dtype, use_dora: bool) -> None:
    """The adapter follows ``model.to(dtype)`` (its input cast to the factors' dtype, as
    PEFT): forward in train and eval, backward with finite gradients, PEFT's outputs."""
    ours, theirs = _pair(use_dora)
    ours.to(dtype)
    theirs.to(dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    ours.train()
    out = ours(IDS)
    out.sum().backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        got = ours(IDS)
        tol = 1e-12 if dtype == torch.float64 else 1e-2  # relative, in the norm
        assert (got - theirs(IDS)).norm() <= tol * got.norm()
        assert (got - out.detach()).norm() <= tol * got.norm()


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("rows", [8, 160])  # both routes of the linear layer
def test_autocast_bf16_trains(use_dora: bool, rows: int) -> None:
    """Under ``torch.autocast`` the custom autograd nodes (whose backward runs outside it) are
    not used: forward and backward work at every row count, gradients close to float32's."""
    ours, _ = _pair(use_dora)
    lin = ours.lin  # a float32 input, as from a layer autocast leaves alone
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(4))
    ref = torch.autograd.grad(lin(x).sum(), [lin.lora_A.weight, lin.lora_B.weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    assert lin(x).dtype == torch.float32  # outside autocast: float32 again
    if not use_dora:  # (DoRA's float32 magnitude scale promotes its output back)
        assert out.dtype == torch.bfloat16
    got = torch.autograd.grad(out.float().sum(), [lin.lora_A.weight, lin.lora_B.weight])
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert (g - r).norm() <= 0.05 * r.norm()


def test_float32_adapter_on_a_bf16_base_rounds_once_as_peft() -> None:
    """A float32 adapter on a bf16 base: base output and adapter term added in float32 and
    rounded once to bf16 — PEFT's result bit for bit (before: rounded twice)."""
    ours, theirs = _pair()
    for model in (ours, theirs):
        for name in ("emb", "lin", "conv"):
            layer = model.get_submodule(name)
            getattr(layer, "base_layer", layer).to(torch.bfloat16)
    lin = ours.lin
    assert lin.lora_A.weight.dtype == torch.float32
    x = torch.randn(160, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours.lin(x), theirs.base_model.model.lin(x))
        e = ours.emb(IDS)
        assert e.dtype == torch.bfloat16 and torch.equal(e, theirs.base_model.model.emb(IDS))
        c = e.new_ones(4, 24, 40)
        assert torch.equal(ours.conv(c), theirs.base_model.model.conv(c))


@pytest.mark.slow
def test_trainer_bf16_mixed_precision(tmp_path) -> None:
    """``Trainer(bf16=True)`` (autocast) over batches of 8 × 32 tokens (the custom-node route
    without autocast): trains the adapter to finite values."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from lora_testkit import tiny_bert_cls

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(1, 99, (16, 32), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": (self.ids[i, 0] > 50).long()}

    model = inject(
        tiny_bert_cls(),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
        generator=0,
    )
    before = model.bert.encoder.layer[0].attention.self.query.lora_B.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        bf16=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=Data()).train()
    after = model.bert.encoder.layer[0].attention.self.query.lora_B.weight
    assert after.dtype == torch.float32 and torch.isfinite(after).all()
    assert not torch.equal(after, before)
