"""The operations the Wan model and its audio adapters are built from (the `operations` seam).

Linear layers cast their own input to their compute dtype, as ComfyUI's manual_cast ops do, so every call site is
a plain `layer(x)`. The compute dtype is read from the weight at call time (block swap and loaders move and
re-point weights), except for layers the model runs in float32 as the official autocast(float32) regions do
(head, time embedding): those are `Float32Linear`. The layer plan keeps the rule when it swaps a layer for a
quantized one (`input_dtype`), and run-time LoRA wrappers keep it too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import Conv3d, LayerNorm  # noqa: F401  (the seam's other operations: patch embedding, norms)


def activation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype activations meet a weight stored as `dtype` in: itself for a float of 16+ bits, else bfloat16."""
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.bfloat16


class CastLinear(nn.Linear):
    """nn.Linear that feeds itself its compute dtype: the weight's (`fixed_dtype` when the layer pins one)."""

    fixed_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.fixed_dtype or activation_dtype(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)


class Float32Linear(CastLinear):
    """A layer of an official float32 region: input, weight and bias meet in float32 whatever the base dtype."""

    fixed_dtype = torch.float32


Linear = CastLinear


def input_dtype_of(layer: nn.Module, stored_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a layer replacing `layer` must cast its input to, its weight now being held as `stored_dtype`;
    None for a layer built outside this seam (it computes in whatever dtype it is fed)."""
    if not isinstance(layer, CastLinear):
        return None
    return layer.fixed_dtype or activation_dtype(stored_dtype)
