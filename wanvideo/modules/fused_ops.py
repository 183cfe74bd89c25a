"""Fused elementwise stages of the Wan block, with plain-torch fallbacks that define the numerics.

Unfused, the normalisations, modulation and RoPE of a 14B forward at 32760 tokens move about 2 TB through
memory (1.6 s of 3.8 s on an H100, measured). Each function below reads its input once and writes its output
once on CUDA (Triton), and computes exactly the official formula in the same precision steps; on the CPU, or
without Triton, the torch version runs.

Where the consumer is a fast FP8 linear layer, a stage can hand it `FP8Rows` (E4M3 codes + per-row scales)
instead of the compute-dtype tensor: rounded to the compute dtype first, then quantized by the very step of
`quant_triton.quantize_rows`, so the matmul sees the same bits as if it had quantized the tensor itself, without
the extra pass over memory (and once for q, k and v instead of three times).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...fp8_optimization import FP8Rows, quantize_activation
from ..kernels.quant_formats import FP8_MAX

log = logging.getLogger("wantalk")

try:  # optional accelerator
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice

    from ..kernels.quant_triton import fp8_codes, fp8_scale, quantize_rows
except Exception:  # pragma: no cover - depends on the environment
    triton = None

FP8_CODES = torch.float8_e4m3fn  # the activation format of the fast FP8 matmul
# torch's GELU(tanh) constants, as its CUDA kernel rounds them to float32: sqrt(2) * (2/sqrt(pi)) / 2 and 0.044715
GELU_BETA = 1.41421356237309504880 * 1.12837916709551257390 * 0.5
GELU_KAPPA = 0.044715
# Columns per step of the GELU -> FP8 rows kernel, 16 per thread (GELU_STEP // 512 warps). Its second sweep over a row
# reads it again: cheap only while the rows in flight on an SM stay in its L1.
GELU_STEP = 2048
# ptxas register cap of the LayerNorm kernel, without / with a residual to add (None: ptxas chooses). It changes no
# arithmetic. With a row in one 8192-lane block ptxas took 84-90 registers (two 8-warp rows per SM) and caps paid
# (bench/block_stages.py, 32,760 x 5120 -> FP8 rows: 0.398 -> 0.316 ms at 64; with a residual 0.663 -> 0.545 at 80);
# held as 4096 + 1024 lanes it takes 64 / 60 by itself (four rows per SM), so no cap is set; the bench times 48 / 40.
NORM_MAX_REGISTERS = {"plain": None, "residual": None}


def _use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run on these tensors (tests point it at the Triton interpreter on the CPU)."""
    return triton is not None and all(t.is_cuda for t in tensors)


def _triton_dtype(dtype: torch.dtype):
    return getattr(tl, str(dtype).replace("torch.", ""))


if triton is not None:
    @triton.jit
    def _gated(y_ptr, g_ptr, offs, gate_offs, mask, HAS_GATE: tl.constexpr):
        """The float32 residual `y * gate` (or `y`) of one block of a row."""
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(g_ptr + gate_offs, mask=mask, other=0.0)
        return y


# ----------------------------------------------------------------------------------------------
# [residual add +] LayerNorm (+ affine) + modulation, float32 in, compute dtype (or its E4M3 rows) out
# ----------------------------------------------------------------------------------------------

def layer_norm_modulate_reference(x, eps, weight=None, bias=None, scale=None, shift=None, out_dtype=None):
    """`LN(x) * (1 + scale) + shift` computed in float32 (the official fp32 region), cast to out_dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale[:, None]) + shift[:, None]
    return y if out_dtype is None else y.to(out_dtype)


if triton is not None:
    @triton.jit
    def _row_part(x_ptr, y_ptr, gate_ptr, x_out_ptr, base, gate_base, cols, mask, HAS_RESIDUAL: tl.constexpr,
                  HAS_GATE: tl.constexpr):
        """Columns `cols` of a row as float32, after `+= y * gate` (the sum stored) when there is a residual."""
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x = x + _gated(y_ptr, gate_ptr, base + cols, gate_base + cols, mask, HAS_GATE)
            tl.store(x_out_ptr + base + cols, x, mask=mask)
        return x

    @triton.jit
    def _affine_modulated(y, w_ptr, b_ptr, scale_ptr, shift_ptr, gate_base, cols, mask, HAS_AFFINE: tl.constexpr,
                          HAS_MOD: tl.constexpr):
        """Normalised values of columns `cols` [* weight + bias] [* (1 + scale) + shift]."""
        if HAS_AFFINE:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) \
                + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOD:
            s = tl.load(scale_ptr + gate_base + cols, mask=mask, other=0.0)
            t = tl.load(shift_ptr + gate_base + cols, mask=mask, other=0.0)
            y = y * (1 + s) + t
        return y

    @triton.jit
    def _store_part(out_ptr, base, cols, mask, y, row_scale, FP8_ROWS: tl.constexpr, QMAX: tl.constexpr):
        if FP8_ROWS:
            # 8-byte stores: a 16-byte store would give the part a 16-per-thread layout, and the LayerNorm's sums
            # another order in the FP8 variants than in the bf16 ones
            codes = fp8_codes(y, row_scale, QMAX).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + tl.multiple_of(base + cols, 8), codes, mask=mask)
        else:
            tl.store(out_ptr + base + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rows_kernel(x_ptr, y_ptr, gate_ptr, x_out_ptr, out_ptr, row_scale_ptr, w_ptr, b_ptr, scale_ptr,
                          shift_ptr, rows_per_batch, n_cols, eps, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
                          HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, FP8_ROWS: tl.constexpr,
                          ROUND_TO: tl.constexpr, QMAX: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
        """One row: [x += y * gate, stored] -> LayerNorm [-> affine] [-> modulation] -> stored in out's dtype,
        or rounded to ROUND_TO and stored as an E4M3 row plus its scale. The row is held as two power-of-two parts
        (`row_parts`: 4096 + 1024 for 5120 columns, not 8192 lanes of which 37.5% would be masked), every
        variant alike, so all of them sum in the same order."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * n_cols
        gate_base = (row // rows_per_batch) * n_cols
        cols_a = tl.arange(0, BLOCK_A)
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        mask_a, mask_b = cols_a < n_cols, cols_b < n_cols
        x_a = _row_part(x_ptr, y_ptr, gate_ptr, x_out_ptr, base, gate_base, cols_a, mask_a, HAS_RESIDUAL, HAS_GATE)
        x_b = _row_part(x_ptr, y_ptr, gate_ptr, x_out_ptr, base, gate_base, cols_b, mask_b, HAS_RESIDUAL, HAS_GATE)
        mean = (tl.sum(x_a, axis=0) + tl.sum(x_b, axis=0)) / n_cols
        d_a = tl.where(mask_a, x_a - mean, 0.0)
        d_b = tl.where(mask_b, x_b - mean, 0.0)
        inv = tl.rsqrt((tl.sum(d_a * d_a, axis=0) + tl.sum(d_b * d_b, axis=0)) / n_cols + eps)
        y_a = _affine_modulated(d_a * inv, w_ptr, b_ptr, scale_ptr, shift_ptr, gate_base, cols_a, mask_a, HAS_AFFINE,
                                HAS_MOD)
        y_b = _affine_modulated(d_b * inv, w_ptr, b_ptr, scale_ptr, shift_ptr, gate_base, cols_b, mask_b, HAS_AFFINE,
                                HAS_MOD)
        row_scale = 1.0
        if FP8_ROWS:
            y_a = tl.where(mask_a, y_a.to(ROUND_TO).to(tl.float32), 0.0)
            y_b = tl.where(mask_b, y_b.to(ROUND_TO).to(tl.float32), 0.0)
            row_scale = fp8_scale(tl.maximum(tl.max(tl.abs(y_a), axis=0), tl.max(tl.abs(y_b), axis=0)), QMAX)
            tl.store(row_scale_ptr + row, row_scale)
        _store_part(out_ptr, base, cols_a, mask_a, y_a, row_scale, FP8_ROWS, QMAX)
        _store_part(out_ptr, base, cols_b, mask_b, y_b, row_scale, FP8_ROWS, QMAX)


def row_parts(n_cols: int) -> tuple[int, int]:
    """Two powers of two covering a row with little padding: the largest below n_cols, then the rest rounded up."""
    first = 1 << max((n_cols - 1).bit_length() - 1, 0)
    return first, triton.next_power_of_2(max(n_cols - first, 1))


def _norm_rows(x, y, gate, eps, weight, bias, scale, shift, out_dtype, fp8_rows):
    """Launch `_norm_rows_kernel` on contiguous `[B, L, C]` x (and y): (new x or None, output)."""
    b, l, c = x.shape
    x_out = torch.empty_like(x) if y is not None else None
    out = torch.empty(b, l, c, device=x.device, dtype=FP8_CODES if fp8_rows else out_dtype or torch.float32)
    row_scales = torch.empty(b * l, 1, device=x.device, dtype=torch.float32) if fp8_rows else None
    given = lambda t, fp32=False: x if t is None else (t.float().contiguous() if fp32 else t)
    parts = row_parts(c)
    _norm_rows_kernel[(b * l,)](
        x, given(y), given(gate, True), given(x_out), out, given(row_scales), given(weight), given(bias),
        given(scale, True), given(shift, True), l, c, eps, HAS_RESIDUAL=y is not None, HAS_GATE=gate is not None,
        HAS_AFFINE=weight is not None, HAS_MOD=scale is not None, FP8_ROWS=fp8_rows,
        ROUND_TO=_triton_dtype(out_dtype or torch.float32), QMAX=FP8_MAX[FP8_CODES], BLOCK_A=parts[0],
        BLOCK_B=parts[1], num_warps=8, maxnreg=NORM_MAX_REGISTERS["plain" if y is None else "residual"])
    return x_out, FP8Rows(out, row_scales, out_dtype) if fp8_rows else out


def layer_norm_modulate(x: torch.Tensor, eps: float, weight=None, bias=None, scale=None, shift=None,
                        out_dtype=None, fp8_rows: bool = False) -> torch.Tensor | FP8Rows:
    """x `[B, L, C]` (any leading shape without modulation); scale/shift float32 `[B, C]` or None; weight/bias `[C]`
    or None. Output float32 unless out_dtype; with `fp8_rows` (CUDA, for fast FP8 linears: `wants_fp8_rows`) the
    out_dtype result as `FP8Rows`."""
    if x.dim() != 3:
        if scale is not None or fp8_rows:
            raise ValueError("modulated LayerNorm and FP8 rows need x of shape [B, L, C]")
        flat = layer_norm_modulate(x.reshape(1, -1, x.shape[-1]), eps, weight, bias, out_dtype=out_dtype)
        return flat.reshape(x.shape)
    if not _use_triton(x) or not x.is_contiguous():
        y = layer_norm_modulate_reference(x, eps, weight, bias, scale, shift, out_dtype)
        return quantize_activation(y) if fp8_rows else y
    return _norm_rows(x, None, None, eps, weight, bias, scale, shift, out_dtype, fp8_rows)[1]


def residual_layer_norm_modulate(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, eps: float,
                                 weight=None, bias=None, scale=None, shift=None, out_dtype=None,
                                 fp8_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor | FP8Rows]:
    """`residual_add(x, y, gate)` (none when y is None) then `layer_norm_modulate` of the sum: (new float32 x,
    normalised output). On CUDA one pass reads x, y and writes both, instead of writing x and reading it back."""
    fused = y is not None and _use_triton(x, y) and x.dim() == 3 and x.dtype == torch.float32 \
        and x.is_contiguous() and y.is_contiguous()
    if not fused:
        return residual_then_layer_norm_modulate(x, y, gate, eps, weight, bias, scale, shift, out_dtype, fp8_rows)
    return _norm_rows(x, y, gate, eps, weight, bias, scale, shift, out_dtype, fp8_rows)


def residual_then_layer_norm_modulate(x, y, gate, eps, *norm, **kw):
    """The two passes `residual_layer_norm_modulate` fuses (its path without Triton, and what it must equal)."""
    x = x if y is None else residual_add(x, y, gate)
    return x, layer_norm_modulate(x, eps, *norm, **kw)


@dataclass(frozen=True)
class PendingResidual:
    """The residual stream `x + y * gate` with the add not yet done: a block hands its gated FFN residual to the
    next block, which adds it in the pass of its first LayerNorm (a write and a read of the float32 stream fewer)."""
    x: torch.Tensor
    y: torch.Tensor
    gate: torch.Tensor

    def resolve(self) -> torch.Tensor:
        return residual_add(self.x, self.y, self.gate)


def residual_parts(x: torch.Tensor | PendingResidual) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x, y, gate) of a residual stream that may still owe an add (y None when it does not)."""
    return (x.x, x.y, x.gate) if isinstance(x, PendingResidual) else (x, None, None)


# ----------------------------------------------------------------------------------------------
# Sum of two branch outputs (text + image cross-attention) + its E4M3 rows (the input of a fast FP8 `o`)
# ----------------------------------------------------------------------------------------------

def add_fp8_rows(a: torch.Tensor, b: torch.Tensor) -> FP8Rows:
    """`quantize_activation(a + b)` (same shape and dtype) with the add done in the quantization pass: both read
    once, the sum never written."""
    if not (_use_triton(a, b) and a.shape == b.shape and a.dtype == b.dtype):
        return quantize_activation(a + b)
    k = a.shape[-1]
    codes, scales = quantize_rows(a.reshape(-1, k), FP8_CODES, plus=b.reshape(-1, k))
    return FP8Rows(codes.view(a.shape), scales, a.dtype)


# ----------------------------------------------------------------------------------------------
# GELU(tanh) of the FFN hidden + its E4M3 rows (the input of a fast FP8 ffn[2])
# ----------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _gelu_tanh(h, BETA: tl.constexpr, KAPPA: tl.constexpr):
        """torch's GELU(tanh) of float32 values with its operation order, rounded to h's storage dtype by the
        caller."""
        return 0.5 * h * (1.0 + libdevice.tanh(BETA * (h + KAPPA * (h * h * h))))

    @triton.jit
    def _gelu_tanh_fp8_kernel(h_ptr, q_ptr, s_ptr, N_COLS: tl.constexpr, BETA: tl.constexpr,
                              KAPPA: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr):
        """One row in BLOCK-wide steps (few registers: many rows in flight). The row's scale needs its largest
        |GELU|: GELU increases above -0.75 and stays under 0.171 in magnitude below 0, so for a row whose largest
        input reaches 0.5 (GELU 0.346) it is GELU(max h), found by a max over the inputs alone; other rows take the
        GELU of every element. The second sweep computes, rounds and quantizes (its reads hit the L2)."""
        base = tl.program_id(0).to(tl.int64) * N_COLS
        dt = h_ptr.dtype.element_ty
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        for c0 in range(0, N_COLS, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            h = tl.load(h_ptr + base + cols, mask=cols < N_COLS, other=float("-inf"))
            top = tl.maximum(top, h.to(tl.float32))
        h_max = tl.max(top, axis=0)
        if h_max >= 0.5:
            amax = _gelu_tanh(h_max, BETA, KAPPA).to(dt).to(tl.float32)
        else:
            largest = tl.zeros([BLOCK], tl.float32)
            for c0 in range(0, N_COLS, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                h = tl.load(h_ptr + base + cols, mask=cols < N_COLS, other=0.0).to(tl.float32)
                largest = tl.maximum(largest, tl.abs(_gelu_tanh(h, BETA, KAPPA).to(dt).to(tl.float32)))
            amax = tl.max(largest, axis=0)
        row_scale = fp8_scale(amax, QMAX)
        for c0 in range(0, N_COLS, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < N_COLS
            h = tl.load(h_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            q = fp8_codes(_gelu_tanh(h, BETA, KAPPA).to(dt).to(tl.float32), row_scale, QMAX)
            tl.store(q_ptr + base + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + tl.program_id(0), row_scale)


def gelu_tanh_fp8_rows(h: torch.Tensor) -> FP8Rows:
    """`quantize_activation(F.gelu(h, approximate="tanh"))` (h bf16/fp16, CUDA) in one pass: the FFN hidden is
    read once and its E4M3 rows written, instead of a GELU pass and a quantization pass over 13824-wide rows."""
    if not _use_triton(h) or not h.is_contiguous():
        return quantize_activation(F.gelu(h, approximate="tanh"))
    k = h.shape[-1]
    codes = torch.empty(h.shape, device=h.device, dtype=FP8_CODES)
    row_scales = torch.empty(h.numel() // k, 1, device=h.device, dtype=torch.float32)
    _gelu_tanh_fp8_kernel[(row_scales.shape[0],)](h, codes, row_scales, k, BETA=GELU_BETA, KAPPA=GELU_KAPPA,
                                                  QMAX=FP8_MAX[FP8_CODES], BLOCK=GELU_STEP,
                                                  num_warps=GELU_STEP // 512)
    return FP8Rows(codes, row_scales, h.dtype)


# ----------------------------------------------------------------------------------------------
# RMSNorm over the full dim + interleaved RoPE, per token, output in the attention dtype
# ----------------------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Official WanRMSNorm: float32 normalisation, cast back to x's dtype, then times the weight."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x)
    return y * weight.to(y.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of `x` `[B, L, H, D]` by the `[L', 1, D/2]` tables (float32 out);
    tokens past the table pass through."""
    n = cos.shape[0]
    xr = x[:, :n].float().unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    rot = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    if n == x.shape[1]:
        return rot
    return torch.cat([rot, x[:, n:].float()], dim=1)


if triton is not None:
    @triton.jit
    def _rms_rope_kernel(x_ptr, out_ptr, w_ptr, cos_ptr, sin_ptr, rows_per_batch, eps, N_COLS: tl.constexpr,
                         HALF_HEAD: tl.constexpr, HAS_ROPE: tl.constexpr, CHUNK: tl.constexpr):
        """One token per program, in contiguous chunks (full 16-byte loads, no lanes padded to a power of two): pass 1
        sums the squares, pass 2 reads the row again (cache-resident) and writes it normalised and rotated; the
        (even, odd) pairs are split in registers."""
        row = tl.program_id(0)
        token = row % rows_per_batch
        base = x_ptr + row.to(tl.int64) * N_COLS
        obase = out_ptr + row.to(tl.int64) * N_COLS
        offs = tl.arange(0, CHUNK)
        squares = tl.zeros([CHUNK], dtype=tl.float32)
        for start in range(0, N_COLS, CHUNK):
            x = tl.load(base + start + offs, mask=start + offs < N_COLS, other=0.0).to(tl.float32)
            squares += x * x
        inv = tl.rsqrt(tl.sum(squares, axis=0) / N_COLS + eps)
        pairs = tl.arange(0, CHUNK // 2)
        for start in range(0, N_COLS, CHUNK):
            mask = start + offs < N_COLS
            raw = tl.load(base + start + offs, mask=mask, other=0.0)
            dt = raw.dtype
            # official rounding steps: normalise in fp32, cast to x's dtype, multiply the weight in x's dtype
            w = tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(dt)
            y = ((raw.to(tl.float32) * inv).to(dt) * w).to(tl.float32)
            if HAS_ROPE:
                ye, yo = tl.split(tl.reshape(y, [CHUNK // 2, 2]))
                pair = start // 2 + pairs
                j = pair % HALF_HEAD
                c = tl.load(cos_ptr + token * HALF_HEAD + j, mask=pair < N_COLS // 2, other=0.0)
                s = tl.load(sin_ptr + token * HALF_HEAD + j, mask=pair < N_COLS // 2, other=0.0)
                y = tl.reshape(tl.join(ye * c - yo * s, ye * s + yo * c), [CHUNK])
            tl.store(obase + start + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int,
                            out_dtype: torch.dtype, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
    """`rms_norm_rope` in plain torch: the official steps one after the other."""
    b, l, c = x.shape
    y = rms_norm_reference(x, weight, eps).view(b, l, num_heads, c // num_heads)
    return (rope_reference(y, *rope) if rope is not None else y).to(out_dtype)


RMS_ROPE_CHUNK = 1024   # elements per step: 8 bf16 (16 bytes) per thread of 4 warps; 5 steps at dim 5120


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int, out_dtype: torch.dtype,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RMSNorm over the full dim of x `[B, L, C]`, then (if `rope`) RoPE per head: `[B, L, H, D]` in out_dtype."""
    b, l, c = x.shape
    fits = rope is None or rope[0].shape[0] == l
    if not _use_triton(x) or not x.is_contiguous() or not fits or c % 2:
        return rms_norm_rope_reference(x, weight, eps, num_heads, out_dtype, rope)
    out = torch.empty(b, l, num_heads, c // num_heads, device=x.device, dtype=out_dtype)
    cos, sin = (rope[0].contiguous(), rope[1].contiguous()) if rope is not None else (x, x)
    _rms_rope_kernel[(b * l,)](x, out, weight, cos, sin, l, eps, N_COLS=c, HALF_HEAD=c // num_heads // 2,
                               HAS_ROPE=rope is not None, CHUNK=RMS_ROPE_CHUNK, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# Residual add: x (float32) + y (any float dtype) [* gate], one pass
# ----------------------------------------------------------------------------------------------

def residual_add_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """`x + y * gate[:, None]` (or `x + y`) in float32, as the official fp32 residual regions compute it."""
    return x + y.float() if gate is None else torch.addcmul(x, y.float(), gate[:, None])


if triton is not None:
    @triton.jit
    def _residual_kernel(x_ptr, y_ptr, g_ptr, out_ptr, rows_per_batch, n_cols, HAS_GATE: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        offs = row.to(tl.int64) * n_cols + cols
        y = _gated(y_ptr, g_ptr, offs, (row // rows_per_batch) * n_cols + cols, mask, HAS_GATE)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask, other=0.0) + y, mask=mask)


def residual_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 `[B, L, C]`, y `[B, L, C]`, gate float32 `[B, C]` or None -> new float32 tensor."""
    if not _use_triton(x, y) or not (x.is_contiguous() and y.is_contiguous()) or x.dtype != torch.float32:
        return residual_add_reference(x, y, gate)
    b, l, c = x.shape
    out = torch.empty_like(x)
    block = 1024
    _residual_kernel[(b * l, triton.cdiv(c, block))](
        x, y, gate.float().contiguous() if gate is not None else x, out, l, c, HAS_GATE=gate is not None,
        BLOCK=block, num_warps=4)
    return out
