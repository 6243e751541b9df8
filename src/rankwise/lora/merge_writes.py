"""Merging an adapter into its base weight and back, as a layer does it: plan the new weight
(validated, nothing changed yet), then write it. :class:`MergeWrites` holds these methods for
:class:`~rankwise.lora.layers.LoraLayer`; a wrapper supplies ``base_weight``, ``merged``,
``disabled``, ``kind``, ``base_layer``, ``merge_dtype()`` and the parametrization's
``merged_weight`` / ``unmerged_weight``, and may allow an in-place write
(``_in_place_is_safe`` / ``_in_place_write``, as ``LoraLinear`` does)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rankwise.errors import MergeError


class MergeWrites:
    """merge / unmerge of one wrapper (see the module docstring)."""

    base_weight: Any
    merged: bool
    disabled: bool
    kind: str
    base_layer: Any

    def merge(self) -> None:
        """Add ``s B A`` into the base weight, computed in float32 at least (:meth:`merge_dtype`);
        refuses non-finite results."""
        self.write_weight(self.plan_write("merge"), "merge")

    def unmerge(self) -> None:
        """Subtract ``s B A`` from the merged base weight (:meth:`merge_dtype`); the inverse of
        merge."""
        self.write_weight(self.plan_write("unmerge"), "unmerge")

    def plan_write(self, what: str) -> Tensor | None:
        """:meth:`planned_weight`, or None where :meth:`write_weight` can update the weight in
        place and a bound proves the result finite (:meth:`_in_place_is_safe`): nothing
        weight-sized is formed or kept until the write. Validates without mutating.

        No merge while the adapters are disabled (inside
        :func:`~rankwise.lora.disable_adapters`): the block promises the base model's output,
        and a merged weight would carry the adapter into it."""
        if what == "merge" and self.disabled:
            raise MergeError(
                f"{type(self).__name__}: adapters are disabled (inside disable_adapters()); "
                "merge after the block"
            )
        refusal = self.merge_refusal() if what == "merge" else None
        if refusal is not None:
            raise MergeError(f"{type(self).__name__}: {refusal}")
        return None if self._in_place_is_safe(what) else self.planned_weight(what)

    def merge_refusal(self) -> str | None:
        """Why this layer's adapter can never be merged exactly, or None: an embedding with
        ``max_norm``, whose unmerged lookup renormalizes rows of ``W0`` and of ``Aᵀ`` apart and
        a merged one rows of ``W0 + ΔW`` (in place: unmerge would then subtract ``ΔW`` from
        other values)."""
        max_norm = getattr(self.base_layer, "max_norm", None) if self.kind == "embedding" else None
        if max_norm is None:
            return None
        return (
            f"the embedding has max_norm={max_norm}, which renormalizes the rows it looks up: "
            "the merged weight would not give the unmerged output (and unmerge would not "
            "restore the base weight). Keep this adapter unmerged"
        )

    def _in_place_is_safe(self, what: str) -> bool:
        """Whether ``merge``/``unmerge`` may write ``W ± s·B A`` in place: plain LoRA on a
        float32 or float64 linear weight with factors of its dtype, in the right state, and
        ``max|W| + |s|·r·max|A|·max|B|`` (a bound on every result entry) far below the dtype's
        largest value, so the result is finite without being formed first (NaN/inf anywhere
        fails the bound: the exact check then runs and names the layer)."""
        return False

    def _in_place_write(self, what: str) -> None:
        raise NotImplementedError  # only where _in_place_is_safe can say True

    def planned_weight(self, what: str) -> Tensor:
        """The base weight ``merge``/``unmerge`` would write, in the base weight's dtype.

        Validates without mutating: MergeError if the state is wrong (already merged / not
        merged), the weight is on the meta device (no values to merge into), or the result is
        not finite *after* the cast to the base dtype (float32 ``W + s B A`` may overflow fp16).
        """
        name = type(self).__name__
        if what == "merge" and self.merged:
            raise MergeError(f"{name}: already merged")
        if what == "unmerge" and not self.merged:
            raise MergeError(f"{name}: not merged, nothing to unmerge")
        weight = self.base_weight
        if weight.is_meta:
            raise MergeError(
                f"{name}: the base weight is on the meta device (shape {tuple(weight.shape)}, "
                f"no values); materialize the model (to_empty + load) before {what}"
            )
        new = self._formed_weight(what)
        if not torch.isfinite(new).all():
            raise MergeError(
                f"{name}: {what} would give non-finite weights in {weight.dtype} "
                "(the adapter or base weight holds inf/nan or overflows); weights left unchanged"
            )
        return new

    def _formed_weight(self, what: str) -> Tensor:
        """``merge``/``unmerge``'s new base weight, formed in :meth:`merge_dtype` and rounded
        to the base weight's dtype once (not checked: :meth:`planned_weight` checks it)."""
        rule = self.merged_weight if what == "merge" else self.unmerged_weight
        return rule(self.base_weight.detach().to(self.merge_dtype())).to(self.base_weight.dtype)

    def write_weight(self, new: Tensor | None, what: str) -> None:
        """Write a weight from :meth:`plan_write` (``what`` the same; None: in place) and flip
        ``merged``."""
        with torch.no_grad():
            if new is None:
                self._in_place_write(what)
            else:
                self.base_weight.copy_(new)
        self.merged = what == "merge"
