"""The quantization policy: which parameter is stored and computed how. Decided in exactly one place.

`plan_layers` decides, before any tensor is read, every linear layer's storage and compute path (`LayerPlan`)
from the stored format of its weight (file headers: dtype, the scale tensors beside it, GGUF block type), the
mode, `params_to_keep` and the compute device; `apply_plan` gives each layer its module once, on the meta device;
`load_param` then materialises each streamed checkpoint tensor into the planned layer on the load device,
adopting pre-quantized bytes unchanged (fp8 with `scale_weight`/`weight_scale`, ComfyUI `comfy_quant` fp8 and
nvfp4, GGUF blocks) or quantizing there; nothing is swapped while loading. `save_quantized` writes the result
back as safetensors with ComfyUI `comfy_quant` metadata where ComfyUI has the format.

Stored format vs requested mode: a pre-quantized weight is kept as stored (never re-quantized, so it stays
bit-exact) unless the requested format is smaller (an fp8 or Q8_0 file loaded with an fp4 mode becomes fp4;
Q8_0 with an fp8 mode becomes fp8; coarser GGUF types refuse a mode). With `disabled`, quantized weights of a
file keep their stored format (ComfyUI-like autoselect); kept layers (`params_to_keep`) are dequantized to the
base dtype.
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
from .modules.cast_ops import input_dtype_of

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


class QuantizationModeError(CheckpointError):
    """A `quantization` mode the file's stored formats refuse (the node reports it against that input)."""


@dataclass(frozen=True)
class ModeSpec:
    """What a mode means for a quantized linear layer."""
    kind: str | None                 # "fp8", "fp4" or None (disabled)
    fp8_dtype: torch.dtype | None = None
    scaled: bool = False             # fp8: per-output-channel scales; fp4: error-minimising block scales
    fast: bool = False               # fp8 tensor-core matmul with fused activation quantization

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
    storage: dict[str, int] = field(default_factory=dict)  # quantized linear layers per storage format

    def summary(self) -> str:
        formats = ", ".join(f"{name} {count}" for name, count in sorted(self.storage.items()))
        return (f"{self.mode}: {len(self.quantized)} linear layers quantized ({formats + '; ' if formats else ''}"
                f"{self.quantized_bytes / 2**30:.2f} GiB), "
                f"{len(self.kept)} parameters kept in high precision ({self.kept_bytes / 2**30:.2f} GiB)")

    def details(self) -> str:
        """Summary plus the linear layers that were kept (for a node output)."""
        kept = "\n".join(f"  {n}" for n in self.kept_linears) or "  (none)"
        return f"{self.summary()}\nlinear layers kept in high precision:\n{kept}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ----------------------------------------------------------------------------------------------
# The layer plan: every linear layer's storage and compute path, decided once from the file headers
# ----------------------------------------------------------------------------------------------

DENSE = "dense"
FP8_STORAGE = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "torch.float8_e4m3fn": "float8_e4m3fn",
               "torch.float8_e5m2": "float8_e5m2"}  # header dtype names -> fp8 storage


@dataclass(frozen=True)
class LayerPlan:
    """How one linear layer is held and computed. storage: "dense", "float8_e4m3fn", "float8_e5m2", "nvfp4" or a
    GGUF block type ("Q4_K"); origin: "file" (the file's bytes as stored), "load" (quantized while loading) or
    "dequantized" (a kept layer the file stores quantized); compute: the matmul on the compute device."""
    storage: str
    origin: str
    compute: str
    fast: bool = False
    scaled: bool = True

    @property
    def quantized(self) -> bool:
        return self.storage != DENSE

    def weight_bytes(self, n: int, k: int, base_dtype: torch.dtype) -> int:
        if self.storage == DENSE:
            return n * k * base_dtype.itemsize
        if self.storage in gguf_dequant.BLOCK_FORMATS:
            return gguf_dequant.stored_bytes(self.storage, (n, k))
        return ModeSpec("fp8" if self.storage.startswith("float8") else "fp4").weight_bytes(n, k)

    def make_layer(self, linear: nn.Module, base_dtype: torch.dtype) -> nn.Module:
        """The (meta) module that holds this storage; `linear` itself when dense. A quantized layer casts its input
        as `linear` would have (its compute dtype: the base dtype, or float32 for a float32 layer)."""
        if self.storage == DENSE:
            return linear
        layer = self._quantized_layer(linear, base_dtype)
        layer.input_dtype = input_dtype_of(linear, base_dtype)
        return layer

    def _quantized_layer(self, linear: nn.Module, base_dtype: torch.dtype) -> nn.Module:
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        device = linear.weight.device
        if self.storage in gguf_dequant.BLOCK_FORMATS:
            return GGUFLinear(*args, qtype=self.storage, compute_dtype=base_dtype, device=device)
        if self.storage == "nvfp4":
            return NVFP4Linear(*args, search=self.scaled, compute_dtype=base_dtype, fast=self.fast, device=device)
        return FP8Linear(*args, fp8_dtype=getattr(torch, self.storage), scaled=self.scaled, compute_dtype=base_dtype,
                         fast=self.fast, device=device)


def stored_storage(dtype_name: str, aux_names: Iterable[str]) -> str:
    """A checkpoint weight's storage, from its header alone: the dtype name (`F8_E4M3`, a GGUF type `Q4_K`, ...)
    and the names of the tensors stored beside it."""
    if dtype_name in gguf_dequant.BLOCK_FORMATS:
        return dtype_name
    if "weight_scale_2" in aux_names:
        return "nvfp4"
    return FP8_STORAGE.get(dtype_name, DENSE)


DEQUANTIZE = "dequantize + matmul"
PER_CALL = "fast where the activations allow (device not planned)"


def _compute_path(storage: str, fast: bool, device: torch.device | None) -> tuple[str, str | None]:
    """(the matmul path of a layer on `device`, why a requested fast path is not available there)."""
    from ..fp8_optimization import fp8_compute_reason
    from .kernels import nvfp4_native
    if storage == DENSE:
        return "dense matmul", None
    if storage in gguf_dequant.BLOCK_FORMATS or not fast:
        return DEQUANTIZE, None
    if device is None:
        return PER_CALL, None
    if storage == "nvfp4" and device.type == "cuda" and nvfp4_native.available(device):
        return "native FP4 GEMM", None
    if storage == "float8_e5m2":
        return DEQUANTIZE, "fp8 matmul needs an e4m3 weight (this one is e5m2)"
    reason = fp8_compute_reason(device)
    return ("FP8 GEMM", None) if reason is None else (DEQUANTIZE, reason)


def _planned_storage(stored: str, spec: ModeSpec) -> tuple[str, str]:
    """(storage, origin) of a layer the mode quantizes: a pre-quantized weight keeps its format unless the mode's
    is smaller (fp8 or Q8_0 under an fp4 mode; Q8_0 under an fp8 mode); dense weights take the mode's format."""
    target = "nvfp4" if spec.kind == "fp4" else str(spec.fp8_dtype).replace("torch.", "")
    if stored == DENSE or stored in gguf_dequant.BLOCK_FORMATS or (spec.kind == "fp4" and stored != "nvfp4"):
        return target, "load"
    return stored, "file"


def plan_layers(model: nn.Module, mode: str, params_to_keep: Iterable[str], stored: dict[str, str] | None = None,
                compute_device: torch.device | str | None = None) -> dict[str, LayerPlan]:
    """The plan of every Linear of `model` (built on meta, not yet planned) from the requested mode,
    `params_to_keep`, the stored format of each weight (`stored`: weight key -> `stored_storage`; absent: dense)
    and the device the layers will run on. No tensor is read."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization mode '{mode}'; expected one of {', '.join(QUANTIZATION_MODES)}")
    keep, spec, stored = tuple(params_to_keep), MODE_SPECS[mode], stored or {}
    coarse = sorted({s for s in stored.values() if s in gguf_dequant.BLOCK_FORMATS and s not in GGUF_REQUANTIZABLE})
    if spec.kind is not None and coarse:  # re-quantizing would round twice, for no memory gain
        raise QuantizationModeError(f"quantization '{mode}' cannot be applied to GGUF weights stored as "
                                    f"{', '.join(coarse)}: they are already smaller than {mode} and would be rounded "
                                    f"twice. Choose quantization 'disabled' (the GGUF blocks are used as they are); "
                                    f"only {', '.join(GGUF_REQUANTIZABLE)} files can be re-quantized at load.")
    device = torch.device(compute_device) if compute_device is not None else None
    plan, slow = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        file_storage = stored.get(f"{name}.weight", DENSE)
        if keeps(f"{name}.weight", keep):
            storage, origin = DENSE, "dequantized" if file_storage != DENSE else "file"
        elif spec.kind is None:
            storage, origin = file_storage, "file"
        else:
            storage, origin = _planned_storage(file_storage, spec)
        requested = spec.fast and storage != DENSE and storage not in gguf_dequant.BLOCK_FORMATS
        scaled = spec.scaled if origin == "load" else True
        if origin == "file" and storage.startswith("float8") and spec.kind == "fp8" and getattr(torch, storage) != spec.fp8_dtype:
            log.info("wantalk: %s is stored as %s; keeping the stored format (no re-quantization)", name, storage)
        compute, unavailable = _compute_path(storage, requested, device)
        if unavailable:
            slow.setdefault(unavailable, name)
        plan[name] = LayerPlan(storage, origin, compute, requested and compute != DEQUANTIZE, scaled)
    for reason, example in slow.items():
        log.warning("wantalk: %s asks for fast matmuls but %s (e.g. %s); those layers dequantize per call",
                    mode, reason, example)
    return plan


def apply_plan(model: nn.Module, plan: dict[str, LayerPlan], mode: str, *, base_dtype: torch.dtype) -> QuantReport:
    """Give every planned layer its module (on the meta device, before any tensor is read) and report. The report
    is also `model.quant_report`: the one record of how the model is quantized (LoRA modes, saving, resume)."""
    report = QuantReport(mode)
    quantized = set()
    for name, entry in plan.items():
        linear = model.get_submodule(name)
        if not entry.quantized:
            report.kept_linears.append(name)
            continue
        _set_submodule(model, name, entry.make_layer(linear, base_dtype))
        quantized.add(name)
        report.quantized.append(name)
        report.storage[entry.storage] = report.storage.get(entry.storage, 0) + 1
        report.quantized_bytes += entry.weight_bytes(linear.out_features, linear.in_features, base_dtype)
    for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
        module_name, _, leaf = pname.rpartition(".")
        if module_name in quantized and leaf != "bias":
            continue
        report.kept.append(pname)
        report.kept_bytes += p.numel() * (base_dtype.itemsize if p.dtype.is_floating_point else p.element_size())
    model.quant_report = report
    return report


def apply_policy(model: nn.Module, mode: str, params_to_keep: Iterable[str], *, base_dtype: torch.dtype) -> QuantReport:
    """Plan (all weights dense) and apply in one call: swap Linear layers for quantized ones per the mode."""
    keep = tuple(params_to_keep)
    return apply_plan(model, plan_layers(model, mode, keep), mode, base_dtype=base_dtype)


def check_scaled_fp8(path: str, fp8_weights: Iterable[str], aux: dict[str, Iterable[str]]) -> None:
    """A file with the `scaled_fp8` marker must carry a scale for every fp8 weight: read with scale 1, a weight
    is off by its scale (often 1000x). Refuse, naming the layers, before any tensor is read."""
    missing = sorted(w for w in fp8_weights if not {"scale_weight", "weight_scale"} & set(aux.get(w, ())))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"'{path}' is a scaled fp8 file (it has the 'scaled_fp8' marker) but {len(missing)} fp8 "
                              f"weight(s) have no 'scale_weight': {shown}. Read with scale 1 they would be far off "
                              f"(a silently wrong video); the file is incomplete or was edited. Download it again or "
                              f"use the bf16 file.")


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


def decode_stored(name: str, tensor: torch.Tensor, aux: dict[str, torch.Tensor], shape: tuple[int, ...]) -> Stored:
    """Recognise how checkpoint weight `name` is stored (KJ `scale_weight`, ComfyUI `comfy_quant`, GGUF blocks,
    plain)."""
    if TYPE_MARKER in aux:
        qtype = marker_qtype(aux)
        bad = gguf_dequant.nonfinite_scales(tensor, qtype)
        if bad:
            raise CheckpointError(f"GGUF tensor '{name}' ({qtype}) has {bad} non-finite (NaN/inf) block scales: its "
                                  f"weights would be NaN and the video black. The file is damaged; download it again.")
        return Stored("gguf", tensor, qtype=qtype)
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


MERGED_GGUF = "Q8_0"  # GGUF weights a LoRA changes while loading go back into blocks of this type


def merged_storage(stored: dict[str, str], changed: Iterable[str]) -> dict[str, str]:
    """The stored formats once the weights in `changed` are merged with a LoRA (for the plan): GGUF blocks
    become `MERGED_GGUF`, every other format dense."""
    out = dict(stored)
    for key in changed:
        if key in out:
            out[key] = MERGED_GGUF if out[key] in gguf_dequant.BLOCK_FORMATS else DENSE
    return out


def restored(changed: torch.Tensor, planned: LayerPlan | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A weight changed at load (a merged LoRA) as it streams on: into `MERGED_GGUF` blocks when its layer is
    planned so (a GGUF layer: finer than any type it came in, about half the bytes of bf16, so a LoRA does not turn
    a 4-bit model into a bf16 one); dense otherwise (the planned layer quantizes it next)."""
    if planned is not None and planned.storage == MERGED_GGUF:
        return gguf_dequant.quantize_q8_0(changed), {TYPE_MARKER: torch.tensor(SUPPORTED_TYPES.index(MERGED_GGUF))}
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

_PLANNED_FORMAT = {FP8Linear: "fp8", NVFP4Linear: "nvfp4", GGUFLinear: "gguf"}


def _load_linear_weight(layer: QuantizedLinear, stored: Stored, device) -> None:
    """Put a weight into its planned layer: adopt the stored bytes when they are the layer's format, else
    quantize the (dequantized) weight into it on `device`. The plan chose the layer; nothing is swapped here."""
    shape = (layer.out_features, layer.in_features)
    stored = stored.to(device)
    planned = _PLANNED_FORMAT[type(layer)]
    same_format = stored.fmt == planned and (planned != "fp8" or stored.data.dtype == layer.weight.dtype) and \
        (planned != "gguf" or stored.qtype == layer.qtype)
    if not same_format:
        if planned == "gguf":
            raise CheckpointError(f"internal: a GGUF layer was planned for a {stored.fmt} weight ({shape})")
        layer.set_from_float(stored.dense(shape, torch.float32) if stored.fmt != "dense" else stored.data)
    elif planned == "fp8":
        layer.set_codes(stored.data, stored.scale)
    elif planned == "nvfp4":
        layer.set_codes(stored.data, stored.scale, stored.global_scale)
    else:
        layer.set_codes(stored.data)


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
    if is_weight and isinstance(module, QuantizedLinear):
        _load_linear_weight(module, stored, device)
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
    report = getattr(model, "quant_report", None)
    if report is not None:
        meta.setdefault("wantalk_quantization", report.mode)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "num_heads"):
        meta.setdefault("config", json.dumps({"num_heads": cfg.num_heads, "text_len": cfg.text_len, "eps": cfg.eps}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    return path
