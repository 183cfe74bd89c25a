"""Triton kernels for quantized linear layers (imported lazily; `available()` says whether they can run).

- `quantize_rows`: dynamic per-row FP8 quantization of activations in ONE pass over memory (each program
  holds a whole row in registers: amax, scale, cast, store), the input of a row-wise `torch._scaled_mm`.
- `nvfp4_dequantize`: NVFP4 weight -> bf16/fp16/fp32, or -> E4M3 with a per-row scale (to feed FP8 matmuls).
Both have plain-torch references in `quant_formats`.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional accelerator
    triton = None

from .quant_formats import FP8_MAX, NVFP4_BLOCK

MAX_ROW = 1 << 15  # a row must fit one program's registers


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, QMAX: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / QMAX, 1e-12)
        q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _pow2(e):
        """2**e for integer tensors e in the normal float32 range, exact (built from the exponent bits)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _nvfp4_dequant_kernel(q_ptr, bs_ptr, g_ptr, rs_ptr, out_ptr, N, K, stride_q, stride_bs, stride_o,
                              TO_FP8: tl.constexpr, QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        rows = rn[:, None].to(tl.int64)
        byte = tl.load(q_ptr + rows * stride_q + rk[None, :] // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where(rk[None, :] % 2 == 0, byte >> 4, byte & 15)   # even element in the high nibble
        e = (nib >> 1) & 3
        m = (nib & 1).to(tl.float32)
        mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * _pow2(e - 1))
        val = tl.where(nib >= 8, -1.0, 1.0) * mag   # a product keeps code 8 as -0.0 (unary minus is 0 - x)
        sb = tl.load(bs_ptr + rows * stride_bs + rk[None, :] // 16, mask=mask, other=0).to(tl.int32)  # E4M3 bits
        se = (sb >> 3) & 15
        sm = (sb & 7).to(tl.float32)
        s = tl.where(se == 0, sm * 0.001953125, (1.0 + 0.125 * sm) * _pow2(se - 7))
        w = val * s * tl.load(g_ptr)
        if TO_FP8:
            rs = tl.load(rs_ptr + rn, mask=rn < N, other=1.0)
            # IEEE division as in the reference: `/` is approximate in Triton and flips rounding at e4m3 ties
            w = tl.minimum(tl.maximum(tl.div_rn(w, rs[:, None]), -QMAX), QMAX)
        tl.store(out_ptr + rows * stride_o + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [M, K]` (bf16/fp16/fp32, CUDA) -> (codes `[M, K]` fp8, fp32 scale `[M, 1]`), x ~= codes * scale."""
    m, k = x.shape
    if k > MAX_ROW:
        raise ValueError(f"quantize_rows handles rows up to {MAX_ROW} elements, got {k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, device=x.device, dtype=dtype)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    if m:
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), QMAX=FP8_MAX[dtype], BLOCK_K=block,
                                    num_warps=warps)
    return q, s


def nvfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor, g: torch.Tensor, shape: tuple[int, int],
                     dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 (`quant_formats` layout) -> dense `[N, K]` of `dtype`; with `row_scale` and an fp8 `dtype`,
    E4M3 codes such that w ~= codes * row_scale[:, None]."""
    n, k = shape
    to_fp8 = dtype in FP8_MAX
    if to_fp8 and row_scale is None:
        raise ValueError("an fp8 output needs the per-row scale")
    out = torch.empty(n, k, device=packed.device, dtype=dtype)
    bn, bk = 32, 256
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _nvfp4_dequant_kernel[grid](packed, scales.view(torch.uint8), g.reshape(1).float(),
                                row_scale if to_fp8 else g.reshape(1).float(), out, n, k,
                                packed.stride(0), scales.stride(0), out.stride(0), TO_FP8=to_fp8,
                                QMAX=FP8_MAX.get(dtype, 1.0), BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out


assert NVFP4_BLOCK == 16  # the kernel's `rk // 16`
