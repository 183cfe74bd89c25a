"""Native NVFP4 matmul for Blackwell (sm100+): the activation is quantized to NVFP4 per call (one Triton pass plus
its amax), the weight is used as stored, and one block-scaled FP4 GEMM runs through `torch._scaled_mm` (cuBLASLt);
the two global scales and the bias are applied to its output.

No Blackwell GPU was available while this was written, so nothing here is trusted unchecked: the first call on a
device runs `self_check`, a small random problem against the dequantized float32 product. When it does not match,
or the GEMM refuses, the path is disabled for that device with a logged reason and the layer takes its FP8 path.
The nibble order inside a byte needs no check: activation and weight are packed alike, and swapping the two
elements of every byte in both operands permutes K inside a 16-element scale block, which leaves every dot product
unchanged.
"""
from __future__ import annotations

import functools
import logging

import torch

from . import quant_formats as qf

log = logging.getLogger("wantalk")

SELF_CHECK_TOLERANCE = 1e-2   # relative error against the float32 product of the same NVFP4 operands


def unsupported(device: torch.device) -> str | None:
    """Why this torch/GPU cannot run a native NVFP4 GEMM at all (None when it may)."""
    if device.type != "cuda":
        return "native FP4 needs a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (10, 0):
        return "native FP4 matmuls need a Blackwell GPU (compute capability 10.0+)"
    if not hasattr(torch, "float4_e2m1fn_x2"):
        return "this torch has no float4_e2m1fn_x2 dtype"
    return None


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x [M, K]` -> (packed `[M, K/2]` uint8, E4M3 block scales `[M, K/16]`, fp32 global scale) as
    `quant_formats.nvfp4_quantize` computes them (its global scale: amax / (448 * 6))."""
    g = qf.nvfp4_global_scale(torch.linalg.vector_norm(x, float("inf")).reshape(1))
    if x.is_cuda:
        from .quant_triton import nvfp4_quantize_rows
        packed, scales = nvfp4_quantize_rows(x, g)
        return packed, scales, g
    packed, scales, _ = qf.nvfp4_quantize(x)    # the reference (CPU, tests): the same global scale by construction
    return packed[:x.shape[0]], scales[:x.shape[0]], g


def linear(x: torch.Tensor, weight: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """`x [M, K]` @ NVFP4 weight (`[N, K/2]` packed, E4M3 `[N, K/16]` row-major block scales)^T + bias through one
    block-scaled FP4 GEMM."""
    n = block_scales.shape[0]
    xq, xs, xg = quantize_activation(x)
    y = torch._scaled_mm(xq.view(torch.float4_e2m1fn_x2), weight.view(torch.float4_e2m1fn_x2).t(),
                         scale_a=qf.to_blocked(xs), scale_b=qf.to_blocked(block_scales[:n]), out_dtype=x.dtype)
    y = y * (xg * global_scale.float()).to(y.dtype)
    return y if bias is None else y.add_(bias.to(y.dtype))


def self_check(device: torch.device, m: int = 200, k: int = 256, n: int = 128) -> str | None:
    """None when the native GEMM reproduces the float32 product of the same NVFP4 operands on a small random
    problem, else what went wrong."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, device=device, generator=gen) / k ** 0.5
    packed, scales, g = qf.nvfp4_quantize(w)
    xq, xs, xg = qf.nvfp4_quantize(x)
    ref = qf.nvfp4_dequantize(xq, xs, xg, (m, k), torch.float32) @ \
        qf.nvfp4_dequantize(packed, scales, g, (n, k), torch.float32).T
    try:
        out = linear(x, packed, scales, g, None).float()
    except (RuntimeError, TypeError, ValueError) as exc:
        return f"torch._scaled_mm refused NVFP4 operands ({type(exc).__name__}: {str(exc)[:160]})"
    err = ((out - ref).norm() / ref.norm()).item()
    return None if err < SELF_CHECK_TOLERANCE else f"relative error {err:.3g} against the reference"


@functools.lru_cache(maxsize=None)
def available(device: torch.device) -> bool:
    """Whether the native GEMM runs, and was checked, on `device` (a failed check is logged once)."""
    if unsupported(device) is not None:
        return False
    failure = self_check(device)
    if failure is not None:
        log.warning("wantalk: native FP4 self-check failed (%s); fp4_scaled_fast uses the FP8 path", failure)
        return False
    log.info("wantalk: native NVFP4 matmul enabled on %s", torch.cuda.get_device_name(device))
    return True
