"""Quantized linear layers: FP8 (per-output-channel scales) and NVFP4 weights, with fused fast matmuls.

Every layer computes `x @ W^T + b` with W stored quantized and the bias in the base dtype. Paths:
- default: dequantize W to the activation dtype and `F.linear` (any device; the CPU path);
- `fast`: FP8 tensor-core matmul through `torch._scaled_mm` with row-wise scales, the activation quantized
  by ONE fused Triton pass (per-row amax + cast) - no eager amax/divide/cast chain, which eats the gain
  (docs/NOTES.md §6.1). NVFP4 weights take it too, re-expressed as E4M3 by a Triton kernel on the fly; on Blackwell
  they first try a native block-scaled FP4 GEMM (`wanvideo/kernels/nvfp4_native.py`, self-checked per device).
  When FP8 compute or Triton is missing, the layer logs once and takes the default path.
  A producer that already holds the activation row by row (a fused LayerNorm or GELU, `fused_ops`) may hand the
  layer `FP8Rows` instead, quantized exactly as the layer would: it asks `wants_fp8_rows` first, so layers fed
  the same tensor (q, k, v) share one quantization and the layers that cannot take them get plain tensors.
Layers hold no state that changes between calls: CFG passes and batch sizes are independent.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .wanvideo.kernels import gguf_dequant, nvfp4_native
from .wanvideo.kernels import quant_formats as qf

log = logging.getLogger("wantalk")

FAST_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
# Hopper's fast FP8 accumulation: row-wise GEMMs measured 1323 vs 1161 TFLOP/s (docs/NOTES.md §6.1); bench/linear.py
# --exact-accum measures the other setting.
USE_FAST_ACCUM = True
_reported: set[str] = set()
_SCALED_MM_BIAS = {"ok": True}  # capability probe: some torch builds refuse a bias with row-wise scales


def _once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning("wantalk: %s", message)


def _triton():
    try:
        from .wanvideo.kernels import quant_triton
    except ImportError:
        return None
    return quant_triton if quant_triton.triton is not None else None


@functools.lru_cache(maxsize=None)
def fp8_compute_reason(device: torch.device) -> str | None:
    """None when FP8 matmuls with fused activation quantization can run on `device`, else why not."""
    if device.type != "cuda":
        return f"fp8 matmul needs a CUDA GPU (activations are on {device.type})"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "fp8 matmul needs compute capability 8.9+ (Ada/Hopper/Blackwell)"
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    if _triton() is None:
        return "Triton is not installed (needed for the fused activation quantization)"
    return None


@dataclass(frozen=True)
class FP8Rows:
    """An activation already quantized for the fast FP8 matmul, as `quantize_rows` leaves it: E4M3 `codes`
    `[..., K]`, float32 `scales` `[M, 1]` (one per row of the flattened codes), and `dtype`, the compute dtype of
    the tensor it stands for (the matmul writes its output in it)."""
    codes: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


def quantize_activation(x: torch.Tensor) -> FP8Rows:
    """`x [..., K]` bf16/fp16 (CUDA) -> its E4M3 rows: one fused Triton pass."""
    codes, scales = _triton().quantize_rows(x.reshape(-1, x.shape[-1]), torch.float8_e4m3fn)
    return FP8Rows(codes.view(x.shape), scales, x.dtype)


def fp8_rowwise_linear(x: FP8Rows, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """`x` (E4M3 rows) @ (w_fp8 * w_scale[:, None])^T + bias via a row-wise scaled FP8 GEMM -> `[..., N]` in
    x.dtype."""
    xq, xs, dtype = x.codes.reshape(-1, x.shape[-1]), x.scales, x.dtype
    scale_b = w_scale.reshape(1, -1)
    out_shape = (*x.shape[:-1], w_fp8.shape[0])
    if bias is not None and _SCALED_MM_BIAS["ok"]:
        try:
            return torch._scaled_mm(xq, w_fp8.t(), scale_a=xs, scale_b=scale_b, bias=bias.to(dtype),
                                    out_dtype=dtype, use_fast_accum=USE_FAST_ACCUM).view(out_shape)
        except RuntimeError as exc:
            _SCALED_MM_BIAS["ok"] = False
            _once(f"torch._scaled_mm refused a fused bias ({str(exc)[:120]}); adding it separately")
    y = torch._scaled_mm(xq, w_fp8.t(), scale_a=xs, scale_b=scale_b, out_dtype=dtype, use_fast_accum=USE_FAST_ACCUM)
    return (y if bias is None else y.add_(bias.to(y.dtype))).view(out_shape)


def wants_fp8_rows(linears, device: torch.device, dtype: torch.dtype) -> bool:
    """True when every layer in `linears`, fed one activation of `dtype` on `device`, would quantize it to E4M3
    rows itself: then its producer quantizes once for all of them. Plain and LoRA-wrapped layers take tensors."""
    return all(isinstance(layer, QuantizedLinear) and layer.takes_fp8_rows(device, dtype) for layer in linears)


class QuantizedLinear(nn.Module):
    """Common part: shapes, the base-dtype bias, the dispatch between the fast and the dequantizing path."""

    format_name = "?"
    # The dtype forward casts its input to (set by the layer plan for a layer of the model, which keeps the rule of
    # the layer it replaces: wanvideo/modules/cast_ops.py); None: compute in the dtype the input comes in.
    input_dtype: torch.dtype | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, compute_dtype=torch.bfloat16,
                 fast: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.fast = fast
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=compute_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format_name}, fast={self.fast}")

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def fp8_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E4M3 weight `[N, K]`, fp32 per-row scale `[N]`) for the fast path (only called where
        `has_fp8_weight`)."""
        raise NotImplementedError

    def has_native_matmul(self, device: torch.device) -> bool:
        """True where `native_linear` runs on `device` (it takes precedence over the FP8 path)."""
        return False

    def native_linear(self, x: torch.Tensor) -> torch.Tensor:
        """`x [M, K]` through a matmul native to this weight format (only called where `has_native_matmul`)."""
        raise NotImplementedError

    def has_fp8_weight(self) -> bool:
        """True when `fp8_operands` can give an E4M3 weight for the FP8 path."""
        return False

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self.named_buffers() if n != "bias") + \
            sum(p.numel() * p.element_size() for n, p in self.named_parameters() if n != "bias")

    def _fast_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in FAST_ACTIVATION_DTYPES:
            return f"fp8 matmul needs bf16/fp16 activations, got {dtype}"
        if self.in_features % 16 or self.out_features % 16:
            return f"fp8 matmul needs in/out features divisible by 16 ({self.in_features}x{self.out_features})"
        return fp8_compute_reason(device)

    def fast_route(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """The matmul an activation of `dtype` (after the input cast) on `device` takes: "native", "fp8", or None
        for the dequantizing path (logged once when a fast path was asked for but cannot run)."""
        if not self.fast or dtype == torch.float32:
            return None
        reason = self._fast_reason(device, dtype)
        if reason is None and self.has_native_matmul(device):
            return "native"
        if reason is None and self.has_fp8_weight():
            return "fp8"
        _once(f"{self.format_name} fast path unavailable ({reason or 'fp8 matmul needs an e4m3 weight'}); "
              f"using the dequantizing path")
        return None

    def takes_fp8_rows(self, device: torch.device, dtype: torch.dtype) -> bool:
        """True when an activation of `dtype` on `device` would be quantized to E4M3 rows by this layer, unchanged
        by its input cast: then `forward` also takes it as `FP8Rows`."""
        return self.input_dtype in (None, dtype) and self.fast_route(device, dtype) == "fp8"

    def forward(self, x: torch.Tensor | FP8Rows) -> torch.Tensor:
        if isinstance(x, FP8Rows):
            return fp8_rowwise_linear(x, *self.fp8_operands(), self.bias)
        if self.input_dtype is not None:
            x = x.to(self.input_dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        dtype = x.dtype if x.dtype in (torch.float32, *FAST_ACTIVATION_DTYPES) else self.compute_dtype
        route = self.fast_route(x.device, x.dtype) if x2.shape[0] else None
        if route == "native":
            return self.native_linear(x2).reshape(*lead, self.out_features)
        if route == "fp8":
            return fp8_rowwise_linear(quantize_activation(x), *self.fp8_operands(), self.bias)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x2.to(dtype), self.dequantize(dtype), bias).reshape(*lead, self.out_features)


class FP8Linear(QuantizedLinear):
    """Weight as fp8 codes `[N, K]` with an fp32 scale per output channel (all ones when unscaled)."""

    def __init__(self, in_features, out_features, bias=True, *, fp8_dtype=torch.float8_e4m3fn, scaled=True,
                 compute_dtype=torch.bfloat16, fast=False, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, fast=fast, device=device)
        self.scaled = scaled
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=fp8_dtype),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, device=device, dtype=torch.float32))

    @property
    def format_name(self) -> str:
        return f"{str(self.weight.dtype).replace('torch.', '')}{'_scaled' if self.scaled else ''}"

    def set_from_float(self, w: torch.Tensor) -> None:
        q, s = qf.fp8_quantize(w, self.weight.dtype, self.scaled)
        self.set_codes(q, s)

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight_scale = scale.float().reshape(-1).expand(self.out_features).contiguous()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return qf.fp8_dequantize(self.weight, self.weight_scale, dtype)

    def has_fp8_weight(self) -> bool:
        return self.weight.dtype == torch.float8_e4m3fn

    def fp8_operands(self):
        return self.weight, self.weight_scale


class NVFP4Linear(QuantizedLinear):
    """NVFP4 weight: `weight` packed E2M1 `[Np, Kp/2]` uint8, `weight_scale` E4M3 `[Np, Kp/16]` (row-major),
    `weight_scale_2` fp32 per-tensor scale. Dequantized on the fly by a Triton kernel on GPU."""

    format_name = "nvfp4"

    def __init__(self, in_features, out_features, bias=True, *, search=False, compute_dtype=torch.bfloat16,
                 fast=False, device=None):
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, fast=fast, device=device)
        self.search = search
        np_, kp = qf.roundup(out_features, qf.NVFP4_BLOCK), qf.roundup(in_features, qf.NVFP4_BLOCK)
        self.weight = nn.Parameter(torch.empty(np_, kp // 2, device=device, dtype=torch.uint8), requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(np_, kp // qf.NVFP4_BLOCK, device=device,
                                                         dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale_2", torch.empty((), device=device, dtype=torch.float32))

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def set_from_float(self, w: torch.Tensor) -> None:
        self.set_codes(*qf.nvfp4_quantize(w, self.search))

    def set_codes(self, packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor) -> None:
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_scale = block_scales
        self.weight_scale_2 = global_scale.float().reshape(())

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        kernels = _triton()
        if kernels is not None and kernels.available(self.weight.device):
            return kernels.nvfp4_dequantize(self.weight, self.weight_scale, self.weight_scale_2, self.shape, dtype)
        return qf.nvfp4_dequantize(self.weight, self.weight_scale, self.weight_scale_2, self.shape, dtype)

    def has_native_matmul(self, device):
        # Blackwell: one block-scaled FP4 GEMM on the stored weight (cuBLAS wants K a multiple of 32)
        return self.in_features % 32 == 0 and nvfp4_native.available(device)

    def native_linear(self, x):
        return nvfp4_native.linear(x, self.weight, self.weight_scale, self.weight_scale_2, self.bias)

    def has_fp8_weight(self) -> bool:
        return True

    def fp8_operands(self):
        # A transient E4M3 copy per call (half the bf16 bytes, freed after the GEMM): one bandwidth-bound launch.
        return _triton().nvfp4_to_fp8(self.weight, self.weight_scale, self.weight_scale_2, self.shape)


class GGUFLinear(QuantizedLinear):
    """A GGUF (ggml) block-quantized weight kept as its file's blocks: `weight` is `uint8 [N, row_bytes]`,
    `qtype` the block format. Dequantized to the activation dtype on every call (on the GPU by
    `gguf_dequant`), so memory holds the file's bytes, not a bf16 copy."""

    def __init__(self, in_features, out_features, bias=True, *, qtype="Q8_0", compute_dtype=torch.bfloat16,
                 device=None):
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, fast=False, device=device)
        self.qtype = qtype
        row = gguf_dequant.packed_row_bytes(qtype, in_features)
        self.weight = nn.Parameter(torch.empty(out_features, row, device=device, dtype=torch.uint8),
                                   requires_grad=False)

    @property
    def format_name(self) -> str:
        return f"gguf_{self.qtype}"

    def set_codes(self, blocks: torch.Tensor) -> None:
        self.weight = nn.Parameter(blocks.reshape(self.out_features, -1), requires_grad=False)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return gguf_dequant.dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)
