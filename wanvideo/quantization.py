"""The quantization policy: which parameter is stored and computed how. Applied in exactly one place.

`apply_policy` swaps the model's Linear modules (still on the meta device) for quantized ones according to
the mode and `params_to_keep`; `load_param` then materialises each streamed checkpoint tensor into the
model, quantizing or dequantizing as the target module requires.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

QUANTIZATION_MODES = ("disabled", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e4m3fn_scaled", "fp8_e4m3fn_scaled_fast",
                      "fp8_e5m2", "fp8_e5m2_scaled", "fp4", "fp4_scaled", "fp4_scaled_fast")

DEFAULT_PARAMS_TO_KEEP = ("norm", "bias", "time_in", "patch_embedding", "time_", "img_emb", "modulation",
                          "text_embedding", "adapter", "add", "ref_conv", "audio_proj", "multitalk_audio_proj", "head")

# Checkpoint keys that travel beside a weight and describe how it is stored.
AUX_SUFFIXES = ("scale_weight", "weight_scale", "weight_scale_2", "comfy_quant", "input_scale", "scale_input")
GLOBAL_MARKERS = ("scaled_fp8",)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def parse_params_to_keep(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Comma-separated string or list -> tuple of name fragments; None -> the default list."""
    if value is None:
        return DEFAULT_PARAMS_TO_KEEP
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in items if s and s.strip())


def keeps(name: str, params_to_keep: Iterable[str]) -> bool:
    """True when a parameter named `name` stays in the base precision."""
    return any(fragment in name for fragment in params_to_keep)


@dataclass
class QuantReport:
    mode: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    quantized_bytes: int = 0
    kept_bytes: int = 0

    def summary(self) -> str:
        return (f"{self.mode}: {len(self.quantized)} linear layers quantized ({self.quantized_bytes / 2**30:.2f} GiB), "
                f"{len(self.kept)} parameters kept in high precision ({self.kept_bytes / 2**30:.2f} GiB)")


def apply_policy(model: nn.Module, mode: str, params_to_keep: Iterable[str], *, base_dtype: torch.dtype) -> QuantReport:
    """Swap Linear layers for quantized ones per the policy (the model is still on the meta device)."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization mode '{mode}'; expected one of {', '.join(QUANTIZATION_MODES)}")
    report = QuantReport(mode)
    if mode != "disabled":
        raise NotImplementedError(f"quantization mode '{mode}' is not available yet")
    return report


def dequantize_stored(tensor: torch.Tensor, aux: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A stored fp8 tensor (with its optional scale) as a `dtype` tensor."""
    if tensor.dtype not in FP8_DTYPES:
        return tensor.to(dtype)
    scale = aux.get("scale_weight", aux.get("weight_scale"))
    out = tensor.to(torch.float32)
    if scale is not None:
        scale = scale.to(torch.float32)
        if scale.numel() > 1:
            scale = scale.reshape(-1, *([1] * (out.dim() - 1)))
        out = out * scale
    return out.to(dtype)


def load_param(model: nn.Module, name: str, tensor: torch.Tensor, *, aux: dict[str, torch.Tensor] | None = None,
               device: torch.device | str = "cpu", base_dtype: torch.dtype = torch.bfloat16) -> None:
    """Materialise checkpoint tensor `name` (+ its aux tensors) into `model` on `device`."""
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = getattr(module, param_name)
    value = dequantize_stored(tensor, aux or {}, base_dtype if current.dtype.is_floating_point else current.dtype)
    value = value.to(device)
    if isinstance(current, nn.Parameter):
        setattr(module, param_name, nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, param_name, value)
