"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d``: the wrapper :class:`LoraConv` (the ``"conv"`` kind).

``lora_A`` is a convolution of the base layer's kernel, stride and padding onto ``r``
channels and ``lora_B`` a 1×1 convolution back (PEFT 0.21.2's layout), so the adapter is the
matrix pair ``A: (r, in·prod(k))``, ``B: (out, r)`` of :class:`~rankwise.lora.layers.LoraLayer`.
"""

from __future__ import annotations

from torch import Tensor, nn

from rankwise.lora.layers import LoraFactors, LoraLayer


class ConvMatrix:
    """The matrix view of a convolution's kernel ``(out, in, *k)``: ``(out, in·prod(k))``
    (a LoRA or AdaLoRA wrapper's :meth:`~rankwise.lora.layers.LoraLayer.base_matrix`)."""

    base_weight: Tensor

    def base_matrix(self) -> Tensor:
        return self.base_weight.flatten(1)  # (out, in * prod(k))

    def _from_matrix(self, delta: Tensor) -> Tensor:
        return delta.reshape(self.base_weight.shape)


class LoraConv(ConvMatrix, LoraLayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` (``groups = dilation = 1``):
    ``h = conv(x) + s · conv_B(conv_A(dropout(x)))`` with ``conv_A`` of the base layer's kernel,
    stride and padding and ``conv_B`` 1×1; ``ΔW = s · (B A)`` reshaped to ``(out, in, *k)``."""

    kind = "conv"

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        lora_alpha: float,
        scaling: float,
        lora_dropout: float,
    ) -> None:
        super().__init__(
            base_layer, r=r, lora_alpha=lora_alpha, scaling=scaling, lora_dropout=lora_dropout
        )
        conv = type(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        kw = {"bias": False, "device": self.base_weight.device, "dtype": self._dtype}
        ones = (1,) * len(base_layer.kernel_size)
        self.lora_A = conv(
            self.in_features, r, base_layer.kernel_size, base_layer.stride, base_layer.padding, **kw
        )
        self.lora_B = conv(r, self.out_features, ones, ones, **kw)

    @classmethod
    def factor_shapes(cls, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        k = tuple(int(s) for s in base.kernel_size)
        ones = (1,) * len(k)
        return {
            "lora_A.weight": (r, int(base.in_channels), *k),
            "lora_B.weight": (int(base.out_channels), r, *ones),
        }

    def factors(self) -> LoraFactors:
        # A: (r, in * prod(k)); B: (out, r) — views of the conv kernels
        return LoraFactors(self.lora_A.weight.flatten(1), self.lora_B.weight.flatten(1))

    def adapted_forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # (N, out, *spatial)
        h = x if x.dtype == self._dtype else x.to(self._dtype)  # then dropout, as PEFT
        h = h if self.dropout is None else self.dropout(h)
        h = self.lora_A(h) * self.scaling  # (N, r, *spatial): the scale on the r-channel map
        up = self.lora_B(h)
        if up.dtype != result.dtype:  # add in the adapter's dtype, round once (as PEFT)
            return (result.to(up.dtype) + up).to(result.dtype)
        return result + up
