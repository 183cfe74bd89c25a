"""The quantization policy: which parameter is stored and computed how. Applied in exactly one place.

`apply_policy` swaps the model's Linear modules (still on the meta device) for quantized ones according to
the mode and `params_to_keep`; `load_param` then materialises each streamed checkpoint tensor into the
model on the load device, quantizing there, or adopting pre-quantized bytes unchanged (fp8 with
`scale_weight`/`weight_scale`, ComfyUI `comfy_quant` fp8 and nvfp4). `save_quantized` writes the result
back as safetensors with ComfyUI `comfy_quant` metadata where ComfyUI has the format.

Stored format vs requested mode: a pre-quantized weight is kept as stored (never re-quantized, so it stays
bit-exact) unless the requested format is smaller (an fp8 file loaded with an fp4 mode becomes fp4). With
`disabled`, quantized weights of a file keep their stored format (ComfyUI-like autoselect); kept layers
(`params_to_keep`) are dequantized to the base dtype.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

from ..fp8_optimization import FP8Linear, GGUFLinear, NVFP4Linear, QuantizedLinear
from .checkpoint import CheckpointError
from .gguf import SUPPORTED_TYPES, TYPE_MARKER, marker_qtype
from .kernels import gguf_dequant
from .kernels import quant_formats as qf

log = logging.getLogger("wantalk")

QUANTIZATION_MODES = ("disabled", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e4m3fn_scaled", "fp8_e4m3fn_scaled_fast",
                      "fp8_e5m2", "fp8_e5m2_scaled", "fp4", "fp4_scaled", "fp4_scaled_fast")

DEFAULT_PARAMS_TO_KEEP = ("norm", "bias", "time_in", "patch_embedding", "time_", "img_emb", "modulation",
                          "text_embedding", "adapter", "add", "ref_conv", "audio_proj", "multitalk_audio_proj", "head")

# Checkpoint keys that travel beside a weight and describe how it is stored.
AUX_SUFFIXES = ("scale_weight", "weight_scale", "weight_scale_2", "comfy_quant", "input_scale", "scale_input")
# GGUF block formats a `quantization` mode may re-quantize at load (no coarser than the mode's own format);
# the coarser ones keep their blocks and need `disabled`.
GGUF_REQUANTIZABLE = ("Q8_0",)
GLOBAL_MARKERS = ("scaled_fp8",)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
COMFY_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class ModeSpec:
    """What a mode means for a quantized linear layer."""
    kind: str | None                 # "fp8", "fp4" or None (disabled)
    fp8_dtype: torch.dtype | None = None
    scaled: bool = False             # fp8: per-output-channel scales; fp4: error-minimising block scales
    fast: bool = False               # fp8 tensor-core matmul with fused activation quantization

    def make_layer(self, linear: nn.Module, compute_dtype: torch.dtype, device) -> QuantizedLinear:
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        if self.kind == "fp8":
            return FP8Linear(*args, fp8_dtype=self.fp8_dtype, scaled=self.scaled, compute_dtype=compute_dtype,
                             fast=self.fast, device=device)
        return NVFP4Linear(*args, search=self.scaled, compute_dtype=compute_dtype, fast=self.fast, device=device)

    def weight_bytes(self, n: int, k: int) -> int:
        if self.kind == "fp8":
            return n * k + 4 * n
        np_, kp = qf.roundup(n, qf.NVFP4_BLOCK), qf.roundup(k, qf.NVFP4_BLOCK)
        return np_ * kp // 2 + np_ * kp // qf.NVFP4_BLOCK + 4


MODE_SPECS = {
    "disabled": ModeSpec(None),
    "fp8_e4m3fn": ModeSpec("fp8", torch.float8_e4m3fn),
    "fp8_e4m3fn_fast": ModeSpec("fp8", torch.float8_e4m3fn, fast=True),
    "fp8_e4m3fn_scaled": ModeSpec("fp8", torch.float8_e4m3fn, scaled=True),
    "fp8_e4m3fn_scaled_fast": ModeSpec("fp8", torch.float8_e4m3fn, scaled=True, fast=True),
    "fp8_e5m2": ModeSpec("fp8", torch.float8_e5m2),
    "fp8_e5m2_scaled": ModeSpec("fp8", torch.float8_e5m2, scaled=True),
    "fp4": ModeSpec("fp4"),
    "fp4_scaled": ModeSpec("fp4", scaled=True),
    "fp4_scaled_fast": ModeSpec("fp4", scaled=True, fast=True),
}
assert tuple(MODE_SPECS) == QUANTIZATION_MODES


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
    quantized: list[str] = field(default_factory=list)      # linear layers stored quantized
    kept: list[str] = field(default_factory=list)           # parameters kept in the base dtype
    kept_linears: list[str] = field(default_factory=list)   # linear layers kept in the base dtype
    quantized_bytes: int = 0
    kept_bytes: int = 0

    def summary(self) -> str:
        return (f"{self.mode}: {len(self.quantized)} linear layers quantized ({self.quantized_bytes / 2**30:.2f} GiB), "
                f"{len(self.kept)} parameters kept in high precision ({self.kept_bytes / 2**30:.2f} GiB)")

    def details(self) -> str:
        """Summary plus the linear layers that were kept (for a node output)."""
        kept = "\n".join(f"  {n}" for n in self.kept_linears) or "  (none)"
        return f"{self.summary()}\nlinear layers kept in high precision:\n{kept}"


@dataclass(frozen=True)
class Policy:
    mode: str
    params_to_keep: tuple[str, ...]
    base_dtype: torch.dtype


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_policy(model: nn.Module, mode: str, params_to_keep: Iterable[str], *, base_dtype: torch.dtype) -> QuantReport:
    """Swap Linear layers for quantized ones per the policy (the model is still on the meta device)."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization mode '{mode}'; expected one of {', '.join(QUANTIZATION_MODES)}")
    keep = tuple(params_to_keep)
    spec = MODE_SPECS[mode]
    report = QuantReport(mode)
    swapped = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if spec.kind is None or keeps(f"{name}.weight", keep):
            report.kept_linears.append(name)
            continue
        layer = spec.make_layer(module, base_dtype, module.weight.device)
        _set_submodule(model, name, layer)
        swapped.add(name)
        report.quantized.append(name)
        report.quantized_bytes += spec.weight_bytes(module.out_features, module.in_features)
    for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
        module_name, _, leaf = pname.rpartition(".")
        if module_name in swapped and leaf != "bias":
            continue
        report.kept.append(pname)
        report.kept_bytes += p.numel() * (base_dtype.itemsize if p.dtype.is_floating_point else p.element_size())
    model.quant_policy = Policy(mode, keep, base_dtype)
    return report


# ----------------------------------------------------------------------------------------------
# Stored formats
# ----------------------------------------------------------------------------------------------

@dataclass
class Stored:
    """A checkpoint weight as stored: dense, fp8 codes + per-row scale, NVFP4 (row-major block scales) or GGUF
    blocks."""
    fmt: str                                   # "dense", "fp8", "nvfp4", "gguf"
    data: torch.Tensor
    scale: torch.Tensor | None = None          # fp8: fp32 [N]; nvfp4: E4M3 [Np, Kp/16]
    global_scale: torch.Tensor | None = None   # nvfp4: fp32 0-d
    qtype: str | None = None                   # gguf: the block format ("Q4_K", ...)

    def to(self, device) -> "Stored":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Stored(self.fmt, move(self.data), move(self.scale), move(self.global_scale), self.qtype)

    def dense(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.fmt == "gguf":
            return gguf_dequant.dequantize(self.data, self.qtype, shape, dtype)
        if self.fmt == "fp8":
            return qf.fp8_dequantize(self.data, self.scale, dtype)
        if self.fmt == "nvfp4":
            return qf.nvfp4_dequantize(self.data, self.scale, self.global_scale, shape, dtype)
        return self.data.to(dtype)


def comfy_quant_config(name: str, tensor: torch.Tensor) -> dict:
    """The JSON a ComfyUI `comfy_quant` tensor (uint8 bytes) holds."""
    try:
        conf = json.loads(tensor.cpu().to(torch.uint8).numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"'{name}.comfy_quant' is not valid ComfyUI quantization metadata ({exc}); the file "
                              f"is corrupt, re-download or re-save it.") from None
    if not isinstance(conf, dict) or "format" not in conf:
        raise CheckpointError(f"'{name}.comfy_quant' holds {conf!r}, expected a JSON object with a 'format'.")
    return conf


def _fp8_scale(name: str, scale: torch.Tensor | None, rows: int) -> torch.Tensor:
    """A stored fp8 scale (scalar or one per output row) as fp32 `[rows]`, validated."""
    if scale is None:
        return torch.ones(rows)
    if not (scale.numel() == 1 or tuple(scale.shape) in ((rows,), (rows, 1))):
        raise CheckpointError(f"the fp8 scale of '{name}' has shape {tuple(scale.shape)}; expected a scalar or one "
                              f"per output channel ({rows},). The scale does not belong to this weight: the file is "
                              f"corrupt or mixes two models.")
    scale = scale.float().reshape(-1)
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise CheckpointError(f"the fp8 scale of '{name}' holds non-finite or non-positive values; the file is corrupt.")
    return scale.expand(rows).contiguous()


def _nvfp4(name: str, tensor: torch.Tensor, aux: dict, shape: tuple[int, int]) -> Stored:
    n, k = shape
    np_, kp = qf.roundup(n, qf.NVFP4_BLOCK), qf.roundup(k, qf.NVFP4_BLOCK)
    blocked, global_scale = aux.get("weight_scale"), aux.get("weight_scale_2")
    if blocked is None or global_scale is None:
        raise CheckpointError(f"'{name}' is nvfp4 but lacks its 'weight_scale' (block scales) or 'weight_scale_2' "
                              f"(per-tensor scale); the file is incomplete.")
    if tensor.element_size() != 1 or tuple(tensor.shape) != (np_, kp // 2):
        raise CheckpointError(f"'{name}' is nvfp4 with shape {tuple(tensor.shape)} ({tensor.dtype}); a ({n}, {k}) "
                              f"layer needs packed uint8 of shape ({np_}, {kp // 2}).")
    rows_p, cols_p = qf.roundup(np_, 128), qf.roundup(kp // qf.NVFP4_BLOCK, 4)
    if blocked.element_size() != 1 or blocked.numel() != rows_p * cols_p:
        raise CheckpointError(f"the nvfp4 block scales of '{name}' have shape {tuple(blocked.shape)} "
                              f"({blocked.dtype}); expected {rows_p * cols_p} E4M3 values (swizzled {rows_p}x{cols_p}).")
    if global_scale.numel() != 1 or not bool(torch.isfinite(global_scale.float()).all()) or float(global_scale) <= 0:
        raise CheckpointError(f"the nvfp4 per-tensor scale 'weight_scale_2' of '{name}' is "
                              f"{tuple(global_scale.shape)}-shaped or not a positive finite number; the file is corrupt.")
    scales = qf.from_blocked(blocked.view(torch.uint8), np_, kp // qf.NVFP4_BLOCK).view(torch.float8_e4m3fn)
    return Stored("nvfp4", tensor.view(torch.uint8), scales, global_scale.float().reshape(()))


def check_gguf_quantization(gguf_types: dict[str, str], mode: str) -> None:
    """Refuse, before any tensor is read, a mode that would re-quantize GGUF blocks coarser than Q8_0 (a second
    rounding on top of the first, for no memory gain)."""
    if mode == "disabled":
        return
    coarse = sorted({q for q in gguf_types.values() if q not in GGUF_REQUANTIZABLE})
    if coarse:
        raise CheckpointError(f"quantization '{mode}' cannot be applied to GGUF weights stored as "
                              f"{', '.join(coarse)}: they are already smaller than {mode} and would be rounded "
                              f"twice. Choose quantization 'disabled' (the GGUF blocks are used as they are); "
                              f"only {', '.join(GGUF_REQUANTIZABLE)} files can be re-quantized at load.")


def decode_stored(name: str, tensor: torch.Tensor, aux: dict[str, torch.Tensor], shape: tuple[int, ...]) -> Stored:
    """Recognise how checkpoint weight `name` is stored (KJ `scale_weight`, ComfyUI `comfy_quant`, GGUF blocks,
    plain)."""
    if TYPE_MARKER in aux:
        return Stored("gguf", tensor, qtype=marker_qtype(aux))
    if "comfy_quant" in aux:
        fmt = comfy_quant_config(name, aux["comfy_quant"])["format"]
        if fmt in COMFY_FP8_FORMATS:
            data = tensor.view(COMFY_FP8_FORMATS[fmt]) if tensor.element_size() == 1 else None
            if data is None or tuple(data.shape) != tuple(shape):
                raise CheckpointError(f"'{name}' is marked {fmt} but is {tensor.dtype} of shape {tuple(tensor.shape)}.")
            return Stored("fp8", data, _fp8_scale(name, aux.get("weight_scale"), shape[0]))
        if fmt == "nvfp4":
            return _nvfp4(name, tensor, aux, tuple(shape))
        raise CheckpointError(f"'{name}' uses ComfyUI quantization format '{fmt}', which wantalk does not read "
                              f"(supported: float8_e4m3fn, float8_e5m2, nvfp4). Use a bf16, fp8 or nvfp4 file.")
    if tensor.dtype in FP8_DTYPES:
        scale = aux.get("scale_weight", aux.get("weight_scale"))
        return Stored("fp8", tensor, _fp8_scale(name, scale, tensor.shape[0] if tensor.dim() == 2 else 1))
    return Stored("dense", tensor)


def restored(original: Stored, changed: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A weight changed at load (a merged LoRA) as it streams on: GGUF-quantized linears go back into blocks
    (Q8_0: finer than any type they came in, about half the bytes of bf16) so a LoRA does not turn a 4-bit model
    into a bf16 one; every other weight stays dense (the mode quantizes it next)."""
    if original.fmt == "gguf" and changed.dim() == 2 and changed.shape[1] % 32 == 0:
        return gguf_dequant.quantize_q8_0(changed), {TYPE_MARKER: torch.tensor(SUPPORTED_TYPES.index("Q8_0"))}
    return changed, {}


def logical_shape(stored_shape: tuple[int, ...], aux_names) -> tuple[int, ...]:
    """The `[N, K]` shape of a weight as the model sees it. NVFP4 weights (recognised by their per-tensor
    `weight_scale_2`) are stored packed two per byte as `[N, K/2]`; every other shape is unchanged."""
    if "weight_scale_2" in aux_names and len(stored_shape) == 2:
        return stored_shape[0], 2 * stored_shape[1]
    return tuple(stored_shape)


# ----------------------------------------------------------------------------------------------
# Materialising parameters
# ----------------------------------------------------------------------------------------------

_FORMAT_BITS = {"fp8": 8, "nvfp4": 4, "gguf": 16}  # a GGUF layer a mode targets is re-quantized from Q8_0


def _layer_for_stored(layer: nn.Module, stored: Stored, base_dtype: torch.dtype) -> QuantizedLinear:
    """The quantized layer that holds `stored` as is, carrying over the bias and the fast flag."""
    fast = getattr(layer, "fast", False)
    args = (layer.in_features, layer.out_features, layer.bias is not None)
    if stored.fmt == "gguf":
        new = GGUFLinear(*args, qtype=stored.qtype, compute_dtype=base_dtype, device="meta")
    elif stored.fmt == "fp8":
        new = FP8Linear(*args, fp8_dtype=stored.data.dtype, scaled=True, compute_dtype=base_dtype, fast=fast,
                        device="meta")
    else:
        new = NVFP4Linear(*args, compute_dtype=base_dtype, fast=fast, device="meta")
    new.bias = layer.bias
    return new


def _load_linear_weight(model, module_name, layer, stored: Stored, device, base_dtype) -> None:
    """Put a weight into a quantized layer: quantize dense weights on `device`, adopt pre-quantized bytes."""
    shape = (layer.out_features, layer.in_features)
    stored = stored.to(device)
    if isinstance(layer, GGUFLinear):
        layer.set_codes(stored.data)
        return
    target = "fp8" if isinstance(layer, FP8Linear) else "nvfp4"
    if stored.fmt == "dense" or _FORMAT_BITS[target] < _FORMAT_BITS[stored.fmt]:
        layer.set_from_float(stored.dense(shape, torch.float32) if stored.fmt != "dense" else stored.data)
        return
    if stored.fmt != target or (target == "fp8" and stored.data.dtype != layer.weight.dtype):
        log.info("wantalk: %s is stored as %s; keeping the stored format (no re-quantization)", module_name,
                 str(stored.data.dtype).replace("torch.", "") if stored.fmt == "fp8" else stored.fmt)
        layer = _layer_for_stored(layer, stored, base_dtype)
        _set_submodule(model, module_name, layer)
    if stored.fmt == "fp8":
        layer.set_codes(stored.data, stored.scale)
    else:
        layer.set_codes(stored.data, stored.scale, stored.global_scale)


def load_param(model: nn.Module, name: str, tensor: torch.Tensor, *, aux: dict[str, torch.Tensor] | None = None,
               device: torch.device | str = "cpu", base_dtype: torch.dtype = torch.bfloat16) -> None:
    """Materialise checkpoint tensor `name` (+ its aux tensors) into `model` on `device`.

    The tensor is moved to `device` first and quantized there, so a bf16 model never exists whole anywhere.
    """
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = getattr(module, param_name)
    aux = aux or {}
    is_weight = param_name == "weight" and isinstance(module, (nn.Linear, QuantizedLinear))
    shape = (module.out_features, module.in_features) if is_weight else tuple(current.shape)
    stored = decode_stored(name, tensor, aux, shape) if (aux or tensor.dtype in FP8_DTYPES) else Stored("dense", tensor)
    if is_weight and isinstance(module, nn.Linear) and stored.fmt != "dense":
        policy = getattr(model, "quant_policy", None)
        if policy is not None and policy.mode == "disabled" and not keeps(name, policy.params_to_keep):
            module = _layer_for_stored(module, stored, base_dtype)
            _set_submodule(model, module_name, module)
    if is_weight and isinstance(module, QuantizedLinear):
        _load_linear_weight(model, module_name, module, stored, device, base_dtype)
        return
    dtype = base_dtype if current.dtype.is_floating_point or stored.fmt != "dense" else current.dtype
    value = stored.to(device).dense(shape, dtype)
    if isinstance(current, nn.Parameter):
        setattr(module, param_name, nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, param_name, value)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def _comfy_quant(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def export_layer(prefix: str, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    """A quantized layer's tensors in checkpoint form (ComfyUI `comfy_quant` where ComfyUI has the format)."""
    out = {} if layer.bias is None else {f"{prefix}bias": layer.bias.detach().cpu()}
    if isinstance(layer, NVFP4Linear):
        blocked = qf.to_blocked(layer.weight_scale.detach().cpu())
        out.update({f"{prefix}weight": layer.weight.detach().cpu(), f"{prefix}weight_scale": blocked,
                    f"{prefix}weight_scale_2": layer.weight_scale_2.detach().cpu().float(),
                    f"{prefix}comfy_quant": _comfy_quant({"format": "nvfp4"})})
        return out
    scale = layer.weight_scale.detach().cpu()
    out[f"{prefix}weight"] = layer.weight.detach().cpu()
    if bool((scale == scale[0]).all()):  # per-tensor: ComfyUI's TensorCoreFP8 layout
        fmt = str(layer.weight.dtype).replace("torch.", "")
        out[f"{prefix}weight_scale"] = scale[0].clone()
        out[f"{prefix}comfy_quant"] = _comfy_quant({"format": fmt})
    else:  # per-channel: legacy scaled-fp8 key, shaped [N, 1] so `weight * scale_weight` broadcasts per row
        out[f"{prefix}scale_weight"] = scale.reshape(-1, 1).clone()
    return out


def save_quantized(model: nn.Module, path: str, metadata: dict[str, str] | None = None) -> str:
    """Write `model` (quantized layers in their stored form) as one safetensors file that `load_wan_model`
    reads back bit-exactly, so a model is quantized once."""
    from safetensors.torch import save_file
    tensors: dict[str, torch.Tensor] = {}
    owned = set()
    per_channel_fp8 = None
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            part = export_layer(f"{name}.", module)
            tensors.update(part)
            owned.update(f"{name}.{leaf}" for leaf, _ in module.named_parameters(recurse=False))
            owned.update(f"{name}.{leaf}" for leaf, _ in module.named_buffers(recurse=False))
            if f"{name}.scale_weight" in part:
                per_channel_fp8 = module.weight.dtype
    for key, value in model.state_dict().items():
        if key not in owned:
            tensors[key] = value.detach().cpu()
    if per_channel_fp8 is not None:
        tensors["scaled_fp8"] = torch.empty(0, dtype=per_channel_fp8)  # marker read by KJ / legacy ComfyUI
    meta = dict(metadata or {})
    policy = getattr(model, "quant_policy", None)
    if policy is not None:
        meta.setdefault("wantalk_quantization", policy.mode)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "num_heads"):
        meta.setdefault("config", json.dumps({"num_heads": cfg.num_heads, "text_len": cfg.text_len, "eps": cfg.eps}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    return path
