"""The wrapper registry: parametrization -> layer kind -> wrapper class.

Rows: ``"vanilla"`` (:mod:`~rankwise.lora.layers`, :mod:`~rankwise.lora.embedding`,
:mod:`~rankwise.lora.conv`), ``"dora"`` (:mod:`~rankwise.lora.dora`) and ``"adalora"``
(:mod:`~rankwise.lora.adalora`); the kind of a module is
:func:`~rankwise.lora.layers.wrapper_kind`'s. A variant adds one row here.
"""

from __future__ import annotations

from rankwise.lora.adalora import AdaLoraConv, AdaLoraLinear
from rankwise.lora.conv import LoraConv
from rankwise.lora.dora import DORA_WRAPPERS
from rankwise.lora.embedding import LoraEmbedding
from rankwise.lora.layers import LoraLayer, LoraLinear

WRAPPERS: dict[str, dict[str, type[LoraLayer]]] = {
    "vanilla": {"linear": LoraLinear, "embedding": LoraEmbedding, "conv": LoraConv},
    "dora": DORA_WRAPPERS,
    "adalora": {"linear": AdaLoraLinear, "conv": AdaLoraConv},
}
