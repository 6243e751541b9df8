"""The loss the trainer sums, and held-out evaluation (accuracy / perplexity).

Losses are *sums* over the batch's terms (examples, or predicted tokens for causal LM);
the trainer divides by the number of terms in the whole optimizer step across
micro-batches and processes, so gradient accumulation and data parallelism give exactly the
gradient of the mean over the global batch.

* classification: ``sum_i CE(logits_i, y_i)``;
* causal LM: ``sum_{i,t} CE(logits_{i,t}, x_{i,t+1})`` over positions whose target is not
  ``IGNORE_INDEX`` (padding and prompt tokens); perplexity ``= exp(mean token loss)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from rankwise.train import distributed as dist_
from rankwise.train.batching import IGNORE_INDEX, Encoded, collate, sorted_batches


class EvalResult(NamedTuple):
    examples: int
    loss: float  # mean over examples (classification) or predicted tokens (causal LM)
    accuracy: float | None  # classification only
    perplexity: float | None  # causal LM only
    predictions: tuple[int, ...] | None  # predicted class per example, in dataset order
    logits: torch.Tensor | None  # (examples, classes), in dataset order; classification only

    def as_metrics(self) -> dict[str, float]:
        out = {"eval_loss": self.loss}
        if self.accuracy is not None:
            out["eval_accuracy"] = self.accuracy
        if self.perplexity is not None:
            out["eval_perplexity"] = self.perplexity
        return out


def loss_sum(
    model: Any, batch: dict[str, torch.Tensor], task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed loss, logits)`` of one padded batch (see the module docstring)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits
    if task == "classification":
        # logits: (batch, classes); labels: (batch,)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), logits
    # logits: (batch, seq, vocab) predict token t+1 from positions <= t
    shifted = logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, logits


# A causal LM's logits are (rows, length, vocab) floats, and the loss takes two more copies:
# an evaluation batch is split so that one forward's logits stay within this many bytes (64
# texts of 1,024 tokens over GPT-2's 50,257-token vocabulary are 13 GB of logits)
EVAL_LOGITS_BYTES = 1 << 29


def _vocab_size(model: Any) -> int | None:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except (AttributeError, TypeError, NotImplementedError):
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return size if isinstance(size, int) and size > 0 else None


def _logits_bounded(
    batches: list[list[int]], lengths: list[int], vocab: int | None
) -> list[list[int]]:
    """``batches`` (sorted by length) split so each forward's float32 logits fit
    :data:`EVAL_LOGITS_BYTES` (one text at least); the loss sums are the same."""
    if vocab is None:
        return batches
    out = []
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        rows = max(1, EVAL_LOGITS_BYTES // (4 * longest * vocab))
        out.extend(batch[k : k + rows] for k in range(0, len(batch), rows))
    return out


@torch.no_grad()
def evaluate(
    model: Any,
    encoded: Encoded,
    *,
    batch_size: int = 64,
    pad_id: int = 0,
    info: dist_.DistInfo | None = None,
) -> EvalResult:
    """Mean loss and accuracy (or perplexity) of ``model`` on ``encoded``, in eval mode.

    The model's train/eval mode is restored afterwards. Batches are sorted by length, so the
    result does not depend on ``batch_size`` beyond float rounding; a causal LM's are split
    further where their logits would pass :data:`EVAL_LOGITS_BYTES`.

    ``info``: under torchrun, call it on every process: each evaluates every
    ``world_size``-th of the sorted batches, and the loss sums, counts and logits are added
    up over the processes, so each returns the whole set's result (the same as one process
    gives, up to the float rounding of the loss sum) in about ``1 / world_size`` of the time.
    """
    shared = info if info is not None and info.world_size > 1 else None  # the batches split
    rank, world = (0, 1) if shared is None else (shared.rank, shared.world_size)
    was_training = model.training
    model.eval()
    n = len(encoded.input_ids)
    total, terms, correct = 0.0, 0, 0
    rows: dict[int, torch.Tensor] = {}
    lengths = encoded.lengths()
    batches = sorted_batches(lengths, batch_size)[rank::world]
    if encoded.task != "classification":  # logits of (rows, length, vocab): bounded
        batches = _logits_bounded(batches, lengths, _vocab_size(model))
    try:
        for indices in batches:
            batch = collate(encoded, indices, pad_id=pad_id)
            loss, logits = loss_sum(model, batch, encoded.task)
            total += float(loss)
            if encoded.task == "classification":
                predicted = logits.argmax(dim=-1)  # (batch,)
                correct += int((predicted == batch["labels"]).sum())
                terms += len(indices)
                for i, row in zip(indices, logits.float()):
                    rows[i] = row
            else:
                terms += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if shared is not None:
        total, terms_f, correct_f = dist_.sum_floats([total, terms, correct], shared)
        terms, correct = int(terms_f), int(correct_f)
    if encoded.task != "classification" and n and terms == 0:  # exp(0 / 1) would read 1.0
        raise ValueError("perplexity of no tokens: every example's tokens are masked or cut")
    mean = total / max(terms, 1)
    if encoded.task == "classification":
        if shared is not None:
            # (n, classes): each process fills its own rows, zeros elsewhere; x + 0 is exact
            width = dist_.max_int(next(iter(rows.values())).numel() if rows else 0, shared)
            stacked = torch.zeros(n, width)
            for i, row in rows.items():
                stacked[i] = row
            dist_.sum_tensor(stacked, shared)
        else:
            stacked = torch.stack([rows[i] for i in range(n)])
        return EvalResult(
            n, mean, correct / max(n, 1), None, tuple(stacked.argmax(-1).tolist()), stacked
        )
    return EvalResult(n, mean, None, math.exp(min(mean, 700.0)), None, None)
