"""Length-grouped batches, dynamic padding, prompt masking and sharding."""

from __future__ import annotations

import pytest
import torch

from rankwise.train.batching import (
    IGNORE_INDEX,
    Encoded,
    collate,
    count_targets,
    encode,
    length_grouped_batches,
    shard,
    sorted_batches,
)
from rankwise.train.data import TextDataset


def _lengths(n: int = 500, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 60, (n,), generator=g).tolist()


def test_batches_partition_the_data_and_are_seeded() -> None:
    lengths = _lengths()
    a = length_grouped_batches(lengths, 16, generator=3)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert all(len(b) == 16 for b in a[:-1]) and 0 < len(a[-1]) <= 16
    assert a == length_grouped_batches(lengths, 16, generator=3)
    assert a != length_grouped_batches(lengths, 16, generator=4)


def test_length_grouping_cuts_padding() -> None:
    lengths = _lengths(2000)

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = padded(length_grouped_batches(lengths, 16, generator=0))
    plain = padded(length_grouped_batches(lengths, 16, generator=0, group=1))
    assert grouped < 0.75 * plain
    assert sum(lengths) <= grouped


def test_collate_pads_to_the_longest_and_masks() -> None:
    enc = Encoded(((5, 6, 7), (8,), (9, 10)), (1, 0, 2), "classification")
    batch = collate(enc, [1, 0], pad_id=0)
    assert batch["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]
    assert sorted_batches(enc.lengths(), 2) == [[1, 2], [0]]


def test_causal_targets_mask_prompt_and_padding(tiny_gpt2) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    ds = TextDataset(("the answer is yes", "no"), None, (), ("a question ?", "why"), "t")
    enc = encode(ds, tok, task="causal-lm", max_length=32)
    prompt_len = len(tok("a question ?", add_special_tokens=False)["input_ids"])
    first = enc.targets[0]
    assert all(t == IGNORE_INDEX for t in first[:prompt_len])
    assert list(first[prompt_len:]) == list(enc.input_ids[0][prompt_len:])
    batch = collate(enc, [0, 1], pad_id=tok.pad_token_id)
    short = len(enc.input_ids[1])
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    answer_tokens = (len(enc.input_ids[0]) - prompt_len) + (short - 1)
    assert count_targets(batch, "causal-lm") == answer_tokens


def test_truncation_to_max_length(tiny_bert) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ds = TextDataset(("word " * 100,), (0,), ("a",), None, "t")
    assert len(encode(ds, tok, task="classification", max_length=12).input_ids[0]) == 12


@pytest.mark.parametrize("n", [16, 15, 1])
def test_shards_split_a_global_batch(n: int) -> None:
    batch = list(range(100, 100 + n))
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts[0] + parts[1] == batch
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_epoch_seeds_near_the_top_of_the_range_do_not_overflow() -> None:
    # seed 2^64 - 1 passed the option check, then epoch 2 failed: "Overflow when unpacking"
    from rankwise.train.batching import EPOCH_STRIDE, epoch_generator

    top = 2**64 - 1
    assert epoch_generator(top, 3).initial_seed() == (top + 3 * EPOCH_STRIDE) % 2**64
    same = [epoch_generator(s, 1).initial_seed() for s in (7, -5)]
    assert same == [7 + EPOCH_STRIDE, (EPOCH_STRIDE - 5) % 2**64]  # unchanged where it fit


def test_a_pair_is_tokenized_as_one_text_with_the_prompt_masked(tiny_gpt2) -> None:
    # the halves were tokenized apart: "play" + "ing" trained on [play, ##ing]-like pieces
    # that the joint text never tokenizes to (and Llama-style tokenizers got a spurious space
    # before every response); now the sequence is the joint text's tokens
    from transformers import AutoTokenizer

    tok = _with_bos_eos(AutoTokenizer.from_pretrained(tiny_gpt2))
    ds = TextDataset(("ing", " is fun"), None, (), ("play", "play"), "pairs.jsonl")
    with pytest.warns(RuntimeWarning, match=r"in 1 of 2 examples a token spans the prompt"):
        enc = encode(ds, tok, task="causal-lm", max_length=32)
    bos, eos = [tok.bos_token_id], [tok.eos_token_id]
    for ids, (prompt, response) in zip(enc.input_ids, [("play", "ing"), ("play", " is fun")]):
        assert (
            list(ids) == bos + tok(prompt + response, add_special_tokens=False)["input_ids"] + eos
        )
    # "playing" is one token spanning the boundary: it is scored (as the response), not masked
    assert enc.targets[0] == (IGNORE_INDEX, *enc.input_ids[0][1:])
    prompt_len = len(tok("play", add_special_tokens=False)["input_ids"])
    assert enc.targets[1][: 1 + prompt_len] == (IGNORE_INDEX,) * (1 + prompt_len)
    assert enc.targets[1][1 + prompt_len :] == enc.input_ids[1][1 + prompt_len :]


def test_a_response_ending_in_eos_gets_no_second_one(tiny_gpt2) -> None:
    from transformers import AutoTokenizer

    tok = _with_bos_eos(AutoTokenizer.from_pretrained(tiny_gpt2))
    ds = TextDataset((f"four {tok.eos_token}", "four"), None, (), ("q :", "q :"), "t")
    enc = encode(ds, tok, task="causal-lm", max_length=32)
    assert enc.input_ids[0] == enc.input_ids[1]
    assert enc.input_ids[0].count(tok.eos_token_id) == 1


def test_truncation_that_leaves_nothing_to_score_is_counted_or_refused(tiny_gpt2) -> None:
    # every response cut away reported perplexity 1.000 (loss 0 over no tokens) and trained on
    # nothing, exit 0
    from transformers import AutoTokenizer

    from rankwise.errors import ConfigError
    from rankwise.train.evaluate import evaluate

    tok = _with_bos_eos(AutoTokenizer.from_pretrained(tiny_gpt2))
    long_prompt = "a very long question " * 4
    ds = TextDataset(("yes", "no"), None, (), (long_prompt, long_prompt), "long.jsonl")
    with pytest.raises(ConfigError, match="'long.jsonl': no example keeps a token.*--max-length 8"):
        encode(ds, tok, task="causal-lm", max_length=8)
    mixed = TextDataset(("yes", "no"), None, (), (long_prompt, "q"), "mixed.jsonl")
    with pytest.warns(RuntimeWarning, match=r"'mixed.jsonl': 1 of 2 examples keep no token"):
        encode(mixed, tok, task="causal-lm", max_length=8)
    masked = Encoded(((1, 2, 3),), ((IGNORE_INDEX,) * 3,), "causal-lm")
    with pytest.raises(ValueError, match="perplexity of no tokens"):
        evaluate(_UniformLM(), masked)


def _with_bos_eos(tok):  # the MiniLM tokenizer of the tiny models has neither
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    return tok


class _UniformLM(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 8))


def test_the_training_data_digest_tells_examples_apart() -> None:
    from rankwise.train.batching import Encoded

    base = Encoded(((1, 2), (3,)), (0, 1), "classification")
    assert base.digest() == Encoded(((1, 2), (3,)), (0, 1), "classification").digest()
    others = [
        Encoded(((1,), (2, 3)), (0, 1), "classification"),  # same tokens, other boundaries
        Encoded(((1, 2), (3,)), (1, 0), "classification"),  # other labels
        Encoded(((1, 2), (3,), (4,)), (0, 1, 1), "classification"),  # a row appended
        Encoded(((1, 2), (3,)), ((1, 2), (3,)), "causal-lm"),
    ]
    assert len({base.digest(), *(e.digest() for e in others)}) == 5


def test_causal_lm_evaluation_bounds_the_logits_of_one_forward(tiny_gpt2, monkeypatch) -> None:
    """64 texts per forward at the model's full context held (rows, length, vocab) logits and
    two copies (6 GB for 16 texts of 1,100 tokens over 30k tokens): a batch is split where its
    logits would pass EVAL_LOGITS_BYTES, with the same loss."""
    from transformers import AutoModelForCausalLM

    from rankwise.train import evaluate as ev

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 90, (int(n),), generator=g).tolist() for n in (7, 12, 30, 31, 9)]
    enc = Encoded(tuple(tuple(r) for r in rows), tuple(tuple(r) for r in rows), "causal-lm")
    whole = ev.evaluate(model, enc, batch_size=64)
    shapes: list[tuple[int, ...]] = []
    model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(tuple(out.logits.shape)),
                                with_kwargs=True)  # fmt: skip
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(ev, "EVAL_LOGITS_BYTES", 4 * 31 * vocab * 2)  # two rows of 31 tokens
    split = ev.evaluate(model, enc, batch_size=64)
    assert max(s[0] for s in shapes) <= 2 and len(shapes) == 3  # sorted: 7, 9 | 12, 30 | 31
    assert split.loss == pytest.approx(whole.loss, rel=1e-6)
    assert split.perplexity == pytest.approx(whole.perplexity, rel=1e-6)


def test_encoding_in_chunks_gives_the_ids_of_one_call(tiny_gpt2, tiny_bert, monkeypatch) -> None:
    # every text was tokenized in one call, whose encodings the tokenizer holds at once
    from transformers import AutoTokenizer

    from rankwise.train import batching

    texts = tuple(f"text number {i} " * (i % 5 + 1) for i in range(11))
    prompts = tuple(f"q{i}?" for i in range(11))
    cases = [
        (AutoTokenizer.from_pretrained(tiny_bert), TextDataset(texts, (0, 1) * 5 + (0,), ("a", "b"), None, "d"), "classification"),
        (AutoTokenizer.from_pretrained(tiny_gpt2), TextDataset(texts, None, (), prompts, "d"), "causal-lm"),
    ]  # fmt: skip
    for tok, data, task in cases:
        whole = encode(data, tok, task=task, max_length=16)
        monkeypatch.setattr(batching, "TOKENIZE_CHUNK", 3)
        assert encode(data, tok, task=task, max_length=16) == whole
        monkeypatch.undo()
