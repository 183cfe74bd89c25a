"""Triton kernels for quantized linear layers (imported lazily; `available()` says whether they can run).

- `quantize_rows`: dynamic per-row FP8 quantization of activations in ONE pass over memory (each program
  holds a whole row in registers: amax, scale, cast, store), the input of a row-wise `torch._scaled_mm`. Its two
  steps `fp8_scale` and `fp8_codes` are also called by the fused producers of `wanvideo/modules/fused_ops.py`
  (LayerNorm, GELU).
- `nvfp4_quantize_rows`: activations -> NVFP4 (E2M1 codes, one E4M3 scale per 16, a given global scale) in one
  pass, bit for bit `quant_formats.nvfp4_quantize`; the input of the native FP4 matmul on Blackwell.
- `nvfp4_dequantize` / `nvfp4_to_fp8`: NVFP4 weight -> bf16/fp16/fp32, or -> E4M3 codes plus the per-row scale
  (computed in the same launch) to feed FP8 matmuls. Bandwidth-bound: whole rows per program, 16-byte loads of
  packed words and 16-byte stores of output words, no per-element division (docs/nvfp4_dequant_notes.md).
All have plain-torch references in `quant_formats`.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional accelerator
    triton = None

from .quant_formats import E2M1_MAX, E4M3_MAX, FP8_MAX, NVFP4_BLOCK

MAX_ROW = 1 << 15  # a row must fit one program's registers


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:
    @triton.jit
    def fp8_scale(amax, QMAX: tl.constexpr):
        """A row's scale from its largest magnitude (all-zero rows: a tiny scale, no division by zero)."""
        return tl.maximum(amax / QMAX, 1e-12)

    @triton.jit
    def fp8_codes(x, scale, QMAX: tl.constexpr):
        """float32 values -> values clamped to +-QMAX in units of the row's scale (cast to fp8 on store)."""
        return tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)

    @triton.jit
    def fp8_row(x, QMAX: tl.constexpr):
        """One row's float32 values (masked lanes 0) -> (codes before the cast, scale): THE per-row quantization
        step (with `fp8_scale`, `fp8_codes`), shared by every kernel that emits `quantize_rows` output so that
        fused producers round exactly as the stand-alone pass."""
        scale = fp8_scale(tl.max(tl.abs(x), axis=0), QMAX)
        return fp8_codes(x, scale, QMAX), scale

    @triton.jit
    def _quantize_rows_kernel(x_ptr, y_ptr, q_ptr, s_ptr, K, stride_x, stride_y, stride_q, QMAX: tl.constexpr,
                              HAS_SUM: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row of x (or of x + y, added in float32 and rounded to x's dtype as torch adds two tensors)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_SUM:
            y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
        q, scale = fp8_row(x.to(tl.float32), QMAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _nvfp4_quantize_rows_kernel(x_ptr, q_ptr, s_ptr, g_ptr, K, stride_x, stride_q, stride_s,
                                    BLOCK_K: tl.constexpr):
        """One row: block amax -> E4M3 scale (amax / 6 / g, RNE) -> codes of x / (scale * g) (IEEE division,
        nearest with ties to even, as `quant_formats.e2m1_encode`) -> two codes per byte, the even one high.
        Bit for bit `quant_formats.nvfp4_quantize` run on a CUDA tensor."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        g = tl.load(g_ptr)
        blocks = tl.reshape(x, [BLOCK_K // 16, 16])
        amax = tl.max(tl.abs(blocks), axis=1)
        # amax / 6 as torch computes a tensor / python-scalar on CUDA: times the fp32 reciprocal (a tie of two E4M3
        # scales can hinge on that last bit)
        scale8 = tl.minimum(tl.div_rn(amax * 0.1666666716337204, g), 448.0).to(tl.float8e4nv)
        total = scale8.to(tl.float32) * g
        safe = tl.where(total > 0, total, 1.0)
        v = tl.where(total[:, None] > 0, tl.div_rn(blocks, safe[:, None]), 0.0)
        v = tl.minimum(tl.maximum(v, -6.0), 6.0)
        a = tl.abs(v)
        # boundaries between E2M1 magnitudes; those below a tie that rounds up to the even code are nudged down
        code = ((a > 0.25).to(tl.int32) + (a > 0.7499999403953552).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a > 1.7499998807907104).to(tl.int32) + (a > 2.5).to(tl.int32)
                + (a > 3.4999997615814209).to(tl.int32) + (a > 5.0).to(tl.int32))
        code = code | tl.where(v < 0, 8, 0)
        even, odd = tl.split(tl.reshape(code, [BLOCK_K // 2, 2]))
        packed = (even << 4) | odd
        half = tl.arange(0, BLOCK_K // 2)
        tl.store(q_ptr + row * stride_q + half, packed.to(tl.uint8), mask=half < K // 2)
        sixteenth = tl.arange(0, BLOCK_K // 16)
        tl.store(s_ptr + row * stride_s + sixteenth, scale8, mask=sixteenth < K // 16)

    @triton.jit
    def _e2m1_value(nib):
        """E2M1 code (int32, 0..15) -> its exact float32 value, built from bits: s ee m -> sign, 2**(ee-1), m/2."""
        e = (nib >> 1) & 3
        m = nib & 1
        mag = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22))   # e == 0: 0 or 0.5
        return (((nib & 8) << 28) | mag).to(tl.float32, bitcast=True)          # code 8 stays -0.0

    @triton.jit
    def _e4m3_value(b):
        """E4M3 bits (int32, 0..255) -> exact float32 (NaN codes are not expected in block scales)."""
        e = (b >> 3) & 15
        m = b & 7
        normal = (((b & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        return tl.where(e == 0, tl.where(b >= 128, -1.0, 1.0) * m.to(tl.float32) * 0.001953125, normal)

    @triton.jit
    def _element(word, SHIFT: tl.constexpr, sg, g, inv, TO_FP8: tl.constexpr, QMAX: tl.constexpr):
        """The nibble at bit SHIFT of each packed word -> its fp32 value: the reference's products in its order,
        then for the E4M3 form the multiply by the row's reciprocal scale and the clamp."""
        v = _e2m1_value((word >> SHIFT) & 15) * sg * g
        if TO_FP8:
            v = tl.minimum(tl.maximum(v * inv, -QMAX), QMAX)
        return v

    @triton.jit
    def _pair(a, b, OUT: tl.constexpr, UINT: tl.constexpr, ES: tl.constexpr):
        """Two fp32 values -> OUT (RNE, as torch casts), their bits side by side in an int32, `a` in the low bits."""
        lo = a.to(OUT).to(UINT, bitcast=True).to(tl.int32) & ((1 << (8 * ES)) - 1)
        hi = b.to(OUT).to(UINT, bitcast=True).to(tl.int32) & ((1 << (8 * ES)) - 1)
        return lo | (hi << (8 * ES))

    @triton.jit
    def _nvfp4_dequant_kernel(q_ptr, bs_ptr, g_ptr, rs_ptr, out_ptr, N, WORDS, OUT_WORDS, SCALE_COLS,
                              stride_q, stride_bs, stride_o, OUT: tl.constexpr, UINT: tl.constexpr,
                              ES: tl.constexpr, TO_FP8: tl.constexpr, QMAX: tl.constexpr, ROW_FACTOR: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr):
        """BLOCK_N whole rows per program, BLOCK_W packed int32 words (8 elements each, one block scale per 2
        words) a step. Each element lands in its output int32 word by shifts, and `tl.join` lays the words out
        thread-contiguously: 16-byte loads and stores, no byte gathers, no per-element division."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rn[:, None] < N
        rows = rn[:, None].to(tl.int64)
        g = tl.load(g_ptr)
        inv = g
        if TO_FP8:
            # Row scale as `quant_formats.nvfp4_row_scale`: (max block scale * g) * 6/448, 1 for all-zero rows;
            # then ONE IEEE reciprocal per row (the reference does the same).
            top = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c0 in range(0, SCALE_COLS, BLOCK_S):
                cs = c0 + tl.arange(0, BLOCK_S)[None, :]
                sb = tl.load(bs_ptr + rows * stride_bs + cs, mask=rmask & (cs < SCALE_COLS), other=0)
                top = tl.maximum(top, tl.max(_e4m3_value(sb.to(tl.int32)), axis=1))
            top = top * g * ROW_FACTOR
            rs = tl.where(top > 0, top, 1.0)
            tl.store(rs_ptr + rn, rs, mask=rn < N)
            inv = tl.div_rn(tl.full([BLOCK_N], 1.0, tl.float32), rs)[:, None]
        WPW: tl.constexpr = 2 * ES      # output int32 words per packed int32 word (ES: output bytes per element)
        for c0 in range(0, WORDS, BLOCK_W):
            cw = c0 + tl.arange(0, BLOCK_W)[None, :]
            mask = rmask & (cw < WORDS)
            word = tl.load(q_ptr + rows * stride_q + cw, mask=mask, other=0)
            sg = _e4m3_value(tl.load(bs_ptr + rows * stride_bs + cw // 2, mask=mask, other=0).to(tl.int32))
            # element 2i is the HIGH nibble of byte i; little-endian: byte i is bits 8i..8i+7 of the word
            e0 = _element(word, 4, sg, g, inv, TO_FP8, QMAX)
            e1 = _element(word, 0, sg, g, inv, TO_FP8, QMAX)
            e2 = _element(word, 12, sg, g, inv, TO_FP8, QMAX)
            e3 = _element(word, 8, sg, g, inv, TO_FP8, QMAX)
            e4 = _element(word, 20, sg, g, inv, TO_FP8, QMAX)
            e5 = _element(word, 16, sg, g, inv, TO_FP8, QMAX)
            e6 = _element(word, 28, sg, g, inv, TO_FP8, QMAX)
            e7 = _element(word, 24, sg, g, inv, TO_FP8, QMAX)
            # join(a, b) appends a last axis [a, b]; the nesting below flattens to words 0, 1, 2, ... in order
            if ES == 1:
                words = tl.join(_pair(e0, e1, OUT, UINT, ES) | (_pair(e2, e3, OUT, UINT, ES) << 16),
                                _pair(e4, e5, OUT, UINT, ES) | (_pair(e6, e7, OUT, UINT, ES) << 16))
            elif ES == 2:
                words = tl.join(tl.join(_pair(e0, e1, OUT, UINT, ES), _pair(e4, e5, OUT, UINT, ES)),
                                tl.join(_pair(e2, e3, OUT, UINT, ES), _pair(e6, e7, OUT, UINT, ES)))
            else:
                words = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)),
                                tl.join(tl.join(e1, e5), tl.join(e3, e7))).to(tl.int32, bitcast=True)
            words = tl.reshape(words, [BLOCK_N, BLOCK_W * WPW])
            co = c0 * WPW + tl.arange(0, BLOCK_W * WPW)[None, :]
            tl.store(out_ptr + rows * stride_o + co, words, mask=rmask & (co < OUT_WORDS))


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                  plus: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [M, K]` (bf16/fp16/fp32, CUDA) -> (codes `[M, K]` fp8, fp32 scale `[M, 1]`), x ~= codes * scale. With
    `plus` (x's shape and dtype): the rows of `x + plus`, read in the same pass."""
    m, k = x.shape
    if k > MAX_ROW:
        raise ValueError(f"quantize_rows handles rows up to {MAX_ROW} elements, got {k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if plus is not None and plus.stride(1) != 1:
        plus = plus.contiguous()
    q = torch.empty(m, k, device=x.device, dtype=dtype)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    y = x if plus is None else plus
    if m:
        _quantize_rows_kernel[(m,)](x, y, q, s, k, x.stride(0), y.stride(0), q.stride(0), QMAX=FP8_MAX[dtype],
                                    HAS_SUM=plus is not None, BLOCK_K=block, num_warps=row_warps(block))
    return q, s


def row_warps(block: int) -> int:
    """Warps of a one-row-per-program kernel over `block` (a power of two) elements."""
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def nvfp4_quantize_rows(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [M, K]` (K a multiple of 16) with global scale `g` -> (packed `[M, K/2]` uint8, E4M3 block scales
    `[M, K/16]`), as `quant_formats.nvfp4_quantize` packs weights."""
    m, k = x.shape
    if k % NVFP4_BLOCK or k > MAX_ROW:
        raise ValueError(f"nvfp4_quantize_rows needs rows of a multiple of 16 up to {MAX_ROW} elements, got {k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k // 2, device=x.device, dtype=torch.uint8)
    s = torch.empty(m, k // NVFP4_BLOCK, device=x.device, dtype=torch.float8_e4m3fn)
    block = max(triton.next_power_of_2(k), 32)
    if m:
        _nvfp4_quantize_rows_kernel[(m,)](x, q, s, g.reshape(1).float(), k, x.stride(0), q.stride(0), s.stride(0),
                                          BLOCK_K=block,
                                          num_warps=row_warps(block))
    return q, s


# output dtype -> (its Triton dtype, the unsigned integer of its width)
_OUT_TYPES = {torch.float32: ("float32", "uint32"), torch.bfloat16: ("bfloat16", "uint16"),
              torch.float16: ("float16", "uint16"), torch.float8_e4m3fn: ("float8e4nv", "uint8"),
              torch.float8_e5m2: ("float8e5", "uint8")}
# [4, 128] packed int32 words a step: one 16-byte load per thread with 4 warps; the fastest of the six launch
# configurations `bench/nvfp4_dequant.py --sweep` timed on H100 (docs/nvfp4_dequant_notes.md)
ROWS_PER_PROGRAM = 4
WORDS_PER_STEP = 128
WARPS = 4


def _nvfp4_launch(packed, scales, g, shape, dtype, row_scale):
    n, k = shape
    if dtype not in _OUT_TYPES:
        raise ValueError(f"NVFP4 dequantization writes one of {sorted(map(str, _OUT_TYPES))}, not {dtype}")
    if packed.shape[1] * 2 < k or packed.shape[1] % 8 or scales.shape[0] < n or scales.shape[1] * 16 < k:
        raise ValueError(f"NVFP4 weight of {tuple(packed.shape)} bytes / {tuple(scales.shape)} scales cannot hold "
                         f"a ({n}, {k}) weight (rows of K/2 bytes, K a multiple of 16)")
    packed_words = packed.contiguous().view(torch.int32)
    scales = scales.contiguous().view(torch.uint8)
    kp = -(-k // 8) * 8                        # whole packed words; a ragged K gets spare columns, sliced off
    out = torch.empty(n, kp, device=packed.device, dtype=dtype)
    out_words = out.view(torch.int32)
    g32 = g.reshape(1).float()
    if n:
        _nvfp4_dequant_kernel[(triton.cdiv(n, ROWS_PER_PROGRAM),)](
            packed_words, scales, g32, g32 if row_scale is None else row_scale, out_words,
            n, kp // 8, out_words.shape[1], scales.shape[1], packed_words.stride(0), scales.stride(0),
            out_words.stride(0), OUT=getattr(tl, _OUT_TYPES[dtype][0]), UINT=getattr(tl, _OUT_TYPES[dtype][1]),
            ES=dtype.itemsize, TO_FP8=row_scale is not None, QMAX=FP8_MAX.get(dtype, 1.0),
            ROW_FACTOR=E2M1_MAX / E4M3_MAX, BLOCK_N=ROWS_PER_PROGRAM, BLOCK_W=WORDS_PER_STEP, BLOCK_S=256,
            num_warps=WARPS)
    return out[:, :k] if kp != k else out


def nvfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor, g: torch.Tensor, shape: tuple[int, int],
                     dtype: torch.dtype) -> torch.Tensor:
    """NVFP4 (`quant_formats` layout) -> dense `[N, K]` of `dtype`, bit for bit `quant_formats.nvfp4_dequantize`."""
    if dtype in FP8_MAX:
        raise ValueError("an fp8 form needs a row scale: use nvfp4_to_fp8")
    return _nvfp4_launch(packed, scales, g, shape, dtype, None)


def nvfp4_to_fp8(packed: torch.Tensor, scales: torch.Tensor, g: torch.Tensor,
                 shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 -> (E4M3 codes `[N, K]`, fp32 row scale `[N]`) in one launch, w ~= codes * row_scale[:, None];
    bit for bit `quant_formats.nvfp4_to_fp8`."""
    row_scale = torch.empty(shape[0], device=packed.device, dtype=torch.float32)
    return _nvfp4_launch(packed, scales, g, shape, torch.float8_e4m3fn, row_scale), row_scale


assert NVFP4_BLOCK == 16  # the kernel's `cw // 2`: one block scale per 2 packed int32 words
