"""LoRA on ``nn.Embedding``: the wrapper :class:`LoraEmbedding` (the ``"embedding"`` kind).

Parameters are bare, with PEFT's on-disk names: ``lora_embedding_A: (r, n)`` and
``lora_embedding_B: (d, r)`` (PEFT 0.21.2, ``peft/tuners/lora/layer.py``), so
``ΔE = s·(B A)ᵀ: (n, d)``. The shared machinery (scaling, merge, inference cache) is
:class:`~rankwise.lora.layers.LoraLayer`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankwise.lora.layers import LoraFactors, LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding(n, d)``: ``h = E[x] + s · (A^T[x]) B^T`` with ``A: (r, n)``,
    ``B: (d, r)``; ``ΔE = s · (B A)^T``. No dropout on token ids (as PEFT)."""

    kind = "embedding"

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        lora_alpha: float,
        scaling: float,
        lora_dropout: float,
    ) -> None:
        super().__init__(base_layer, r=r, lora_alpha=lora_alpha, scaling=scaling, lora_dropout=0.0)
        n, d = self.base_weight.shape
        self.in_features, self.out_features = int(n), int(d)
        kw = {"device": self.base_weight.device, "dtype": self._dtype}
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, n, **kw))
        self.lora_embedding_B = nn.Parameter(torch.zeros(d, r, **kw))

    @property
    def lora_A(self) -> Tensor:  # type: ignore[override]
        return self.lora_embedding_A

    @property
    def lora_B(self) -> Tensor:  # type: ignore[override]
        return self.lora_embedding_B

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        n, d = base.weight.shape
        return {"lora_embedding_A": (r, int(n)), "lora_embedding_B": (int(d), r)}

    def base_matrix(self) -> Tensor:
        return self.base_weight.t()  # (d, n): the map one_hot(token) -> embedding

    def _from_matrix(self, delta: Tensor) -> Tensor:
        return delta.t()

    def factors(self) -> LoraFactors:
        return LoraFactors(self.lora_embedding_A, self.lora_embedding_B)

    def lookup_a(self, x: Tensor) -> Tensor:
        """``(..., r)``: the rows of ``Aᵀ`` (n, r) for the ids ``x``, looked up with the base
        layer's own options (``max_norm`` renormalizes those rows of ``A`` in place, as the
        base lookup does ``W``'s)."""
        base = self.base_layer
        return F.embedding(
            x,
            self.lora_embedding_A.t(),
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=False,  # A is small: a dense gradient (sparse one of a transposed view fails)
        )

    def adapted_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        result = base(x)  # (..., d)
        h = self.lookup_a(x)  # (..., r)
        embed_scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings
        if embed_scale is not None:
            h = h * embed_scale
        return self._project_up(result, h, self.lora_embedding_B)
