"""Tokenize once, then batch with dynamic padding and length grouping.

Padding every example to a fixed length wastes most of the compute on short texts (SST-2
phrases average 9 words). Here each batch is padded only to its own longest example, and
batches are formed from examples of similar length: the epoch's random permutation is cut
into "mega-batches" of ``group * batch_size`` examples, each sorted by length and cut into
batches, and the batch order is shuffled again (the scheme of transformers'
``LengthGroupedSampler``, Trainer ``group_by_length=True``). Everything is a pure function of
``(seed, epoch)``, so a resumed run sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import hashlib
import warnings
from array import array
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from rankwise.errors import ConfigError
from rankwise.train.data import TextDataset, data_generator

IGNORE_INDEX = -100  # label value skipped by the loss (padding, prompt tokens)
EPOCH_STRIDE = 1_000_003  # seeds of successive epochs: seed + EPOCH_STRIDE * epoch


class Encoded(NamedTuple):
    """Token ids per example and their targets.

    ``targets`` is a class id per example (classification) or a token-level label sequence
    aligned with ``input_ids`` with ``IGNORE_INDEX`` on prompt tokens (causal LM).
    """

    input_ids: tuple[tuple[int, ...], ...]
    targets: tuple[int, ...] | tuple[tuple[int, ...], ...]
    task: str

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def digest(self) -> str:
        """SHA-256 of the task, token ids and targets, in order: the same examples give the same
        digest (a checkpoint records it, so a resume on changed data is refused). Fed example
        by example as int64 bytes, each sequence after its length: ~1 s per 25M tokens, with
        no copy of the whole set."""
        h = hashlib.sha256(self.task.encode())
        for part in (self.input_ids, self.targets):
            h.update(len(part).to_bytes(8, "little"))
            for item in part:
                values = item if isinstance(item, tuple) else (item,)
                h.update(len(values).to_bytes(8, "little"))
                h.update(array("q", values).tobytes())
        return h.hexdigest()


# texts tokenized per call: the tokenizer holds a whole call's encodings (offsets, the part
# truncation cuts off) until they are copied out, so all 2,000 long texts at once cost 173 MiB
# more at peak than calls of 64 did
TOKENIZE_CHUNK = 512


def _token_ids(tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> list[tuple[int, ...]]:
    """Each text's token ids, tokenized :data:`TOKENIZE_CHUNK` texts per call (the same ids
    as one call: nothing is padded)."""
    out: list[tuple[int, ...]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start : start + TOKENIZE_CHUNK])
        out.extend(tuple(x) for x in tokenizer(chunk, **kwargs)["input_ids"])
    return out


def encode(dataset: TextDataset, tokenizer: Any, *, task: str, max_length: int) -> Encoded:
    """Tokenize every example once (truncated to ``max_length`` tokens, not padded).

    Causal LM: ``bos + prompt + response + eos``, cut at ``max_length`` from the end. A pair
    is tokenized as one text, as it reads at generation time (tokenizing the halves apart
    gives a Llama-style tokenizer a spurious space before the response, and a BPE never sees
    a merge across the boundary), and the prompt's tokens are masked out of the loss: as many
    as the prompt alone tokenizes to, or, where a token spans the boundary, those before it.
    ``eos`` is not added to a response that already ends with it. Examples that truncation
    leaves without a scored token are counted in a warning; a dataset with none left is an
    error (a perplexity over no tokens would read 1.0, a perfect model).
    """
    if task == "classification":
        specials = tokenizer.num_special_tokens_to_add()
        if max_length <= specials:  # below them a fast tokenizer does not truncate at all
            raise ConfigError(
                f"--max-length {max_length} leaves no token of text after the tokenizer's "
                f"{specials} special tokens; expected at least {specials + 1}"
            )
        ids = _token_ids(tokenizer, dataset.texts, truncation=True, max_length=max_length)
        return Encoded(tuple(ids), tuple(dataset.labels or ()), task)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if dataset.prompts is not None:
        joined = [p + t for p, t in zip(dataset.prompts, dataset.texts, strict=True)]
        fulls = _token_ids(tokenizer, joined, add_special_tokens=False)
        prompts = _token_ids(tokenizer, dataset.prompts, add_special_tokens=False)
    else:
        fulls = _token_ids(tokenizer, dataset.texts, add_special_tokens=False)
        prompts = [() for _ in fulls]
    all_ids, all_targets, spanning, unscored = [], [], 0, 0
    for prompt, full in zip(prompts, fulls, strict=True):
        full = list(full)
        shared = _common_prefix(prompt, full)
        spanning += shared < len(prompt)
        tail = [] if eos and full and full[-1] == eos[0] else eos
        # The loss never sees the prompt: its positions carry IGNORE_INDEX.
        ids = (bos + full + tail)[:max_length]
        hidden = min(len(bos) + shared, len(ids))
        targets = [IGNORE_INDEX] * hidden + ids[hidden:]
        unscored += all(t == IGNORE_INDEX for t in targets[1:])  # position 0 is never predicted
        all_ids.append(tuple(ids))
        all_targets.append(tuple(targets))
    n = len(all_ids)
    if n and unscored == n:
        raise ConfigError(
            f"{dataset.source!r}: no example keeps a token to score within --max-length "
            f"{max_length} (truncation cuts the end: the prompts fill it); raise --max-length "
            "or shorten the prompts"
        )
    if unscored:
        warnings.warn(
            f"{dataset.source!r}: {unscored} of {n} examples keep no token to score within "
            f"--max-length {max_length} (truncation cuts the end, their response); they add "
            "nothing to the loss",
            RuntimeWarning,
            stacklevel=2,
        )
    if spanning:
        warnings.warn(
            f"{dataset.source!r}: in {spanning} of {n} examples a token spans the prompt's end "
            "and the response's start (say a prompt ending in a space); it is scored as part "
            "of the response",
            RuntimeWarning,
            stacklevel=2,
        )
    return Encoded(tuple(all_ids), tuple(all_targets), task)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's order: a pure function of ``(seed, epoch)``."""
    # modulo 2^64: torch reads a seed as its 64 bits (-5 and 2^64 - 5 seed alike), so this is
    # the same seed as without it wherever that fits, and seeds near 2^64 - 1 do not overflow
    return torch.Generator().manual_seed((int(seed) + EPOCH_STRIDE * int(epoch)) % 2**64)


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    generator: torch.Generator | int | None = None,
    group: int = 50,
) -> list[list[int]]:
    """Batches of indices of similar length, in a random order.

    A random permutation is cut into mega-batches of ``group * batch_size``, each sorted by
    length (longest first) and cut into batches of ``batch_size``; the batches are then
    shuffled. Only the last batch may be smaller. ``group=1`` gives plain random batches.
    ``generator``: a seed or a generator; None is seed 0, not torch's global RNG.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, found {batch_size}")
    gen = data_generator(generator)
    n = len(lengths)
    order = torch.randperm(n, generator=gen).tolist()
    mega = max(1, group) * batch_size
    grouped: list[int] = []
    for start in range(0, n, mega):
        chunk = order[start : start + mega]
        grouped.extend(sorted(chunk, key=lambda i: -lengths[i]))  # stable: ties keep random order
    batches = [grouped[i : i + batch_size] for i in range(0, n, batch_size)]
    full, last = (batches[:-1], batches[-1:]) if n % batch_size else (batches, [])
    shuffle = torch.randperm(len(full), generator=gen).tolist()
    return [full[i] for i in shuffle] + last


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: indices sorted by length (least padding), no randomness."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This process's contiguous share of a global batch (sizes differ by at most one)."""
    n = len(batch)
    start = rank * n // world_size
    stop = (rank + 1) * n // world_size
    return list(batch[start:stop])


def collate(encoded: Encoded, indices: Sequence[int], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the examples at ``indices`` to their longest (right padding) into tensors.

    Returns ``input_ids`` and ``attention_mask`` of shape (batch, longest) and ``labels``:
    (batch,) class ids, or (batch, longest) token targets with ``IGNORE_INDEX`` on padding.
    """
    rows = [encoded.input_ids[i] for i in indices]
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    if encoded.task == "classification":
        labels = torch.tensor([encoded.targets[i] for i in indices], dtype=torch.long)
    else:
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for b, i in enumerate(indices):
            target = encoded.targets[i]
            labels[b, : len(target)] = torch.tensor(target, dtype=torch.long)  # type: ignore[arg-type]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    """How many terms the loss sums over: examples, or predicted (shifted, unmasked) tokens."""
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
