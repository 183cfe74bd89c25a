"""8-bit attention in Triton (SageAttention2 recipe): INT8 Q.K^T, FP8 E4M3 P.V, FP32 accumulation.

Why each piece (facts: docs/NOTES.md §5.1, §5.3):
- K is smoothed by subtracting a per-channel mean before INT8 quantization. q.(k - m) = q.k - q.m shifts every
  logit of a query row by the same amount, which softmax ignores: exact for ANY vector m. The mean of an evenly
  strided sample of at most `MEAN_SAMPLES` keys removes the common bias as well as the full mean does, for a
  fraction of a read of K.
- Q and K are multiplied by a Hadamard matrix H (H H^T = D I, so q.k is unchanged up to D) before INT8: it
  spreads outlier channels over all channels, so one large channel no longer coarsens the INT8 step of the
  others (H100, 4 channels x10 in Q and K: 13.7% -> 4.5% relative error).
- Q is quantized per token (the scale, times softmax scale and log2(e), becomes a per-row factor applied after the
  integer dot) and K per block of `KBLK` keys (a scalar per tile), so a tile's row maxima are taken on the
  int32 dot directly and each logit costs one integer add and two float ops on the way to exp2.
- int32 -> float without the slow conversion unit: |q.k| <= D * 127^2 < 2^22, so adding the bits of 1.5 * 2^23
  gives a float equal to 1.5 * 2^23 + dot, exactly.
- P is scaled by 448 (e4m3's largest value) before the FP8 cast, so most of it stays in e4m3's normal range;
  V is FP8 with one scale per `KBLK` keys, folded into the running rescale of the accumulator. FP8 is a float
  format, so a per-block scale loses nothing to channels of very different size (they stay normal down to
  amax / 2^15). Each P.V block product starts from zero and is added to an FP32 accumulator: Hopper's FP8 MMA
  keeps about 22 bits across a long sum.
- Where FP8 dots are unavailable (Ampere, sm80/86) P and V are FP16 instead (the same kernels otherwise).
- One quantization launch per tensor reads it once; the attention kernel reads the 8-bit copies.
On Hopper the same arithmetic runs in a warp-specialized schedule (sage_int8_ws.py) where this Triton has it.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # optional accelerator
    triton = None

KBLK = 128             # keys per K/V scale block (and the padding unit of every internal buffer)
MEAN_SAMPLES = 1024    # keys averaged for the K smoothing vector
HEAD_DIMS = (64, 128)
P_SCALE = 448.0        # e4m3 max: P in [0, 448]
LOG2_P_SCALE = math.log2(P_SCALE)
INT_MAGIC = 0x4B400000  # float bits of 1.5 * 2^23: (int32 s + INT_MAGIC) as float is FLOAT_MAGIC + s for |s| < 2^22
FLOAT_MAGIC = 12582912.0
# the Triton interpreter (CPU checks: TRITON_INTERPRET=1) runs no inline PTX
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
log = logging.getLogger("wantalk")


def unavailable(device: torch.device | None = None) -> str | None:
    """Why the kernel cannot run (None when it can)."""
    if triton is None:
        return "triton not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs GPU capability >= sm80"
    return None


if triton is not None:
    _INTERPRETED = tl.constexpr(INTERPRETED)
    _LOG2_P_SCALE = tl.constexpr(LOG2_P_SCALE)
    _INT_MAGIC = tl.constexpr(INT_MAGIC)
    _FLOAT_MAGIC = tl.constexpr(FLOAT_MAGIC)

    @triton.jit
    def _round_to_int8(x):
        """Round half away from zero (Triton's float -> int cast truncates)."""
        return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)

    @triton.jit
    def _mma_key_position(key):
        """Where a key sits in a V tile read by the sm90 kernel: within each 32 keys, key bits (h, i1, q1, q0, i0)
        go to (h, q1, q0, i1, i0), the order in which an FP8 MMA's A operand holds the columns that the
        previous MMA's accumulator gave each thread (see sage_int8_ws._probabilities)."""
        return (key & ~14) | ((key & 6) << 1) | ((key >> 2) & 2)

    @triton.jit
    def _quantize_kernel(x_ptr, out_ptr, scale_ptr, mean_ptr, hadamard_ptr, L, H, stride_b, stride_l, stride_h,
                         out_stride_bh, out_stride_l, out_stride_d, scales_per_bh, factor,
                         D: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr, ROTATE: tl.constexpr,
                         MMA_KEY_ORDER: tl.constexpr = False):
        """One [BLOCK, D] tile of x ([B, L, H, D], last dim contiguous) of head bh -> 8-bit out and its scale.

        MODE 0 (Q): INT8, one scale per token (times `factor`). MODE 1 (K): minus its smoothing mean, INT8, one
        scale per tile. MODE 2 (V): minus its mean, one scale per tile, stored in out's dtype (e4m3 or fp16).
        ROTATE (Q and K): multiply by a Hadamard matrix first, which spreads outlier channels over all channels
        (q.k is unchanged up to the factor D), so the INT8 step shrinks with the largest value.
        Rows past L are written as zeros (the padding the attention kernel reads).
        MMA_KEY_ORDER (V): keys stored in `_mma_key_position` order (the sm90 kernel's P operand order).
        """
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        valid = rows < L
        src = x_ptr + b * stride_b + h * stride_h + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
        x = tl.load(src, mask=valid[:, None], other=0.0).to(tl.float32)
        if MODE != 0:
            mean = tl.load(mean_ptr + bh * D + cols)
            x = tl.where(valid[:, None], x - mean[None, :], 0.0)
        if MODE != 2 and ROTATE:
            rotation = tl.load(hadamard_ptr + tl.arange(0, D)[:, None] * D + cols[None, :])
            x = tl.dot(x.to(tl.bfloat16), rotation)                 # D * (q.k) after both: 1/D is in Q's factor
        if MODE == 0:
            amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-20)
            q = _round_to_int8(x * (127.0 / amax)[:, None])
            tl.store(scale_ptr + bh * scales_per_bh + rows, amax * (factor / 127.0))
        else:
            amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-20)
            if MODE == 1:
                q = _round_to_int8(x * (127.0 / amax))
                tl.store(scale_ptr + bh * scales_per_bh + pid, amax / 127.0)
            else:
                # floor: a block that smoothing made (nearly) zero gets a plain scale, so the ratio of successive
                # V scales in the attention kernel's rescale stays far from fp32 overflow
                amax = tl.maximum(amax, 1e-6)
                q = (x * (448.0 / amax)).to(out_ptr.dtype.element_ty)
                tl.store(scale_ptr + bh * scales_per_bh + pid, amax / 448.0)
        if MMA_KEY_ORDER:
            rows = _mma_key_position(rows)
        dst = out_ptr + bh * out_stride_bh + rows.to(tl.int64)[:, None] * out_stride_l + cols[None, :] * out_stride_d
        tl.store(dst, q)

    @triton.jit
    def _exp2(x):
        """exp2 on the special-function unit with flush-to-zero (skips the denormal fix-up ops of Triton's exp2;
        P is rounded to 8 or 16 bits next anyway)."""
        if _INTERPRETED:
            return tl.math.exp2(x)
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _scores(q, k_desc, k_ptr, bh, start, LKP, D: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
        """int32 [BLOCK_M, BLOCK_N] = q8 . k8^T for the key block at `start` (a block at or past LKP reads zeros)."""
        if USE_TMA:
            k = k_desc.load([bh * LKP + start, 0])
        else:
            keys = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + (bh.to(tl.int64) * LKP + keys)[:, None] * D + tl.arange(0, D)[None, :],
                        mask=(keys < LKP)[:, None], other=0)
        return tl.dot(q, tl.trans(k))

    @triton.jit
    def _softmax_pv(acc, l_i, m_i, c_i, s, q, qs, k_desc, k_ptr, v_desc, v_ptr, ks_ptr, vs_ptr, bh, start, Lk, LKP,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
                    ROWSUM_MMA: tl.constexpr, PIPELINE: tl.constexpr):
        """Online softmax of one key block's scores s and its P.V. acc is kept in units of the V scale c_i.
        Returns the new state and, with PIPELINE, the next block's scores: their Q.K is issued between this
        block's softmax and its P.V, so the tensor cores work while the exps of this block finish (H100: 817 vs
        772 TFLOP/s at 32760 tokens).
        ROWSUM_MMA: l_i is a [BLOCK_M, 16] tile whose first column collects the row sums of the rounded P through
        the tensor cores (P times a ones column) instead of one float add per score (H100: 782 vs 758 TFLOP/s)."""
        keys = start + tl.arange(0, BLOCK_N)
        if USE_TMA:
            vt = v_desc.load([bh * D, start])
        else:
            vt = tl.load(v_ptr + (bh.to(tl.int64) * D + tl.arange(0, D))[:, None] * LKP + keys[None, :])
        if MASKED:
            s = tl.where((keys < Lk)[None, :], s, -(1 << 22))
        ks = tl.load(ks_ptr + bh * (LKP // 128) + start // 128)
        vs = tl.load(vs_ptr + bh * (LKP // 128) + start // 128)
        coef = qs * ks                                               # log2-domain logit per integer step
        m_new = tl.maximum(m_i, tl.max(s, axis=1).to(tl.float32) * coef)
        # (s + magic) as float is 1.5 * 2^23 + s; one FMA takes off the magic and the row max and adds log2(448)
        # (P in [0, 448]). Rounding the per-row constant shifts a whole row by ~1e-7 of its logit range.
        bias = _LOG2_P_SCALE - m_new - _FLOAT_MAGIC * coef
        x = (s + _INT_MAGIC).to(tl.float32, bitcast=True) * coef[:, None] + bias[:, None]
        if MASKED:
            x = tl.where((keys < Lk)[None, :], x, float("-inf"))
        alpha = tl.math.exp2(m_i - m_new)
        p = _exp2(x)
        if not ROWSUM_MMA:
            l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(vt.dtype)
        if PIPELINE:
            s = _scores(q, k_desc, k_ptr, bh, start + BLOCK_N, LKP, D, BLOCK_N, USE_TMA)
        # Each block's P.V starts from zero and is added to the FP32 acc: Hopper's FP8 MMA keeps ~22 bits across a
        # long sum (accumulating inside the MMA instead measured 3.6% error at 32760 keys, 7.2% at 75600).
        acc = acc * (alpha * (c_i / vs))[:, None] + tl.dot(p, tl.trans(vt))
        if ROWSUM_MMA:
            ones = tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, tl.zeros([BLOCK_N, 16], tl.float32)).to(vt.dtype)
            l_i = l_i * alpha[:, None] + tl.dot(p, ones)
        return acc, l_i, m_new, vs, s

    # Lq/Lk are never specialized: Triton 3.6 compiles Lk == 1 (a constant-empty key loop) into a kernel that read
    # shared memory out of bounds with TMA (compute-sanitizer, H100) and returned non-finite FP8 P.V output.
    @triton.jit(do_not_specialize=["Lq", "Lk"])
    def _attention_kernel(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, vmean_ptr, o_ptr, Lq, Lk, H, LQP, LKP, BH, BH_KV,
                          o_stride_b, o_stride_l, o_stride_h, HQ_PER_KV,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          USE_TMA: tl.constexpr, LK_CLASS: tl.constexpr, ROWSUM_MMA: tl.constexpr = True,
                          PIPELINE: tl.constexpr = True):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        bh_kv = bh // HQ_PER_KV
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, D)
        if USE_TMA:
            q_desc = tl.make_tensor_descriptor(q_ptr, shape=[BH * LQP, D],
                                               strides=[D, 1], block_shape=[BLOCK_M, D])
            k_desc = tl.make_tensor_descriptor(k_ptr, shape=[BH_KV * LKP, D],
                                               strides=[D, 1], block_shape=[BLOCK_N, D])
            v_desc = tl.make_tensor_descriptor(v_ptr, shape=[BH_KV * D, LKP],
                                               strides=[LKP, 1], block_shape=[D, BLOCK_N])
            q = q_desc.load([bh * LQP + pid_m * BLOCK_M, 0])
        else:
            k_desc = None
            v_desc = None
            q = tl.load(q_ptr + (bh.to(tl.int64) * LQP + rows)[:, None] * D + cols[None, :])
        qs = tl.load(qs_ptr + bh.to(tl.int64) * LQP + rows)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        if ROWSUM_MMA:
            l_i = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
        else:
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        c_i = tl.full([], 1.0, dtype=tl.float32)
        full_end = (Lk // BLOCK_N) * BLOCK_N
        if PIPELINE:
            s = _scores(q, k_desc, k_ptr, bh_kv, 0, LKP, D, BLOCK_N, USE_TMA)
        for start in tl.range(0, full_end, BLOCK_N):
            if not PIPELINE:
                s = _scores(q, k_desc, k_ptr, bh_kv, start, LKP, D, BLOCK_N, USE_TMA)
            acc, l_i, m_i, c_i, s = _softmax_pv(acc, l_i, m_i, c_i, s, q, qs, k_desc, k_ptr, v_desc, v_ptr, ks_ptr,
                                                vs_ptr, bh_kv, start, Lk, LKP, D, BLOCK_N, False, USE_TMA, ROWSUM_MMA,
                                                PIPELINE)
        if full_end < Lk:
            if not PIPELINE:
                s = _scores(q, k_desc, k_ptr, bh_kv, full_end, LKP, D, BLOCK_N, USE_TMA)
            acc, l_i, m_i, c_i, s = _softmax_pv(acc, l_i, m_i, c_i, s, q, qs, k_desc, k_ptr, v_desc, v_ptr, ks_ptr,
                                                vs_ptr, bh_kv, full_end, Lk, LKP, D, BLOCK_N, True, USE_TMA, ROWSUM_MMA,
                                                False)
        if ROWSUM_MMA:
            l_i = tl.sum(l_i, axis=1)
        out = acc * (c_i / l_i)[:, None] + tl.load(vmean_ptr + bh_kv.to(tl.int64) * D + cols)[None, :]
        b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
        dst = o_ptr + b * o_stride_b + h * o_stride_h + rows.to(tl.int64)[:, None] * o_stride_l + cols[None, :]
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(rows < Lq)[:, None])

    # (BLOCK_M, BLOCK_N, warps, stages, ROWSUM_MMA, PIPELINE): the first is the H100 FP8 P.V best, the second the
    # H100 FP16 P.V best (bench/sage_int8.py); the others cover GPUs with less shared memory or registers.
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "ROWSUM_MMA": r, "PIPELINE": pl}, num_warps=w,
                              num_stages=st)
                for m, n, w, st, r, pl in ((64, 128, 4, 3, True, True), (64, 128, 4, 2, True, False),
                                           (64, 128, 4, 3, False, False), (64, 64, 4, 3, False, False),
                                           (128, 128, 8, 3, True, False))]
    _tuned_attention = triton.autotune(_CONFIGS, key=["D", "LK_CLASS", "USE_TMA"],
                                       cache_results=True)(_attention_kernel)


def _padded(n: int) -> int:
    return -(-n // KBLK) * KBLK


def smoothing_mean(x: torch.Tensor) -> torch.Tensor:
    """[B * H, D] float32 mean of an evenly strided sample of at most ~MEAN_SAMPLES tokens of x ([B, L, H, D])."""
    step = max(1, x.shape[1] // MEAN_SAMPLES)
    return x[:, ::step].float().mean(dim=1).reshape(-1, x.shape[-1]).contiguous()


@functools.lru_cache(maxsize=None)
def hadamard(d: int, device: torch.device) -> torch.Tensor:
    """Sylvester Hadamard matrix (entries +-1, exact in bf16; H H^T = d I) for d a power of two."""
    idx = torch.arange(d)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(torch.bfloat16).to(device)


def _quantize(x, out, scales, mean, mode: int, block: int, factor: float = 1.0, rotate: bool = False,
              mma_key_order: bool = False):
    b, length, heads, d = x.shape
    out_strides = (out.stride(0), out.stride(1), out.stride(2)) if mode < 2 else (out.stride(0), 1, out.stride(1))
    _quantize_kernel[(out.numel() // (b * heads * d * block), b * heads)](
        x, out, scales, mean, hadamard(d, x.device), length, heads, x.stride(0), x.stride(1), x.stride(2),
        *out_strides, scales.shape[1], factor, D=d, BLOCK=block, MODE=mode, ROTATE=rotate,
        MMA_KEY_ORDER=mma_key_order, num_warps=8 if block * d > 8192 else 4)


def quantize_qkv(q, k, v, scale: float, pv_dtype: torch.dtype, rotate: bool = True, mma_key_order: bool = False):
    """8-bit copies of q, k, v ([B, L, H, D]) and their scales, in the layouts the attention kernel reads:
    q8 [B*H, LQP, D] int8 + per-token scales (times scale * log2 e), k8 [B*Hk, LKP, D] int8 (smoothed) + one scale
    per KBLK keys, vt [B*Hk, D, LKP] (transposed: FP8 dots want both operands K-major) + one scale per KBLK keys,
    and V's smoothing mean (added back after the normalised P.V: each row of P sums to one).
    mma_key_order: V's keys permuted within each 32 as the sm90 kernel (sage_int8_ws) reads them.
    """
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    lqp, lkp = _padded(lq), _padded(lk)
    dev = q.device
    q8 = torch.empty(b * h, lqp, d, dtype=torch.int8, device=dev)
    qs = torch.empty(b * h, lqp, dtype=torch.float32, device=dev)
    _quantize(q, q8, qs, qs, 0, 64, scale * math.log2(math.e) / (d if rotate else 1), rotate)
    mean = smoothing_mean(k)
    k8 = torch.empty(b * hk, lkp, d, dtype=torch.int8, device=dev)
    ks = torch.empty(b * hk, lkp // KBLK, dtype=torch.float32, device=dev)
    _quantize(k, k8, ks, mean, 1, KBLK, rotate=rotate)
    vmean = smoothing_mean(v)
    vt = torch.empty(b * hk, d, lkp, dtype=pv_dtype, device=dev)
    vs = torch.empty(b * hk, lkp // KBLK, dtype=torch.float32, device=dev)
    _quantize(v, vt, vs, vmean, 2, KBLK, mma_key_order=mma_key_order)
    return q8, qs, k8, ks, vt, vs, vmean


def attend_quantized(quantized, out: torch.Tensor, lk: int, hk: int, use_tma: bool, config: dict | None):
    """Run the attention kernel on quantize_qkv's output into out ([B, Lq, H, D]): the launch without the device
    checks, so the Triton interpreter can run it on CPU tensors. `config` as in sage_int8_attention."""
    q8, qs, k8, ks, vt, vs, vmean = quantized
    b, lq, h, d = out.shape
    args = (q8, k8, vt, qs, ks, vs, vmean, out, lq, lk, h, q8.shape[1], k8.shape[1], b * h, b * hk,
            out.stride(0), out.stride(1), out.stride(2), h // hk)
    meta = dict(D=d, USE_TMA=use_tma, LK_CLASS=0 if lk <= KBLK else 1 if lk <= 4096 else 2)
    if config is None:
        _tuned_attention[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * h)](*args, **meta)
    else:
        _attention_kernel[(triton.cdiv(lq, config["BLOCK_M"]), b * h)](*args, **meta, **config)


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


_WS_REFUSAL: dict[int, str | None] = {}   # CUDA device index -> why the sm90 schedule cannot run there (None: it can)


def _warp_specialized_refusal(device: torch.device) -> str | None:
    """Why Hopper's warp-specialized schedule (sage_int8_ws) cannot run on this device, asked once per device
    (None: it can). A Hopper GPU that cannot run it is logged once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _WS_REFUSAL:
        from . import sage_int8_ws
        _refuse_warp_specialized(index, sage_int8_ws.unavailable(device))
    return _WS_REFUSAL[index]


def _refuse_warp_specialized(index: int, reason: str | None):
    _WS_REFUSAL[index] = reason
    if reason is not None and torch.cuda.get_device_capability(index)[0] == 9:
        log.warning("int8_triton: the warp-specialized sm90 schedule is unavailable (%s); using the Triton kernel",
                    reason)


def _attend_warp_specialized(quantized, out, lk: int, hk: int) -> bool:
    """Run the sm90 schedule on quantize_qkv(..., mma_key_order=True)'s output; False (recorded, logged once)
    where this Triton's Gluon cannot compile it."""
    from . import sage_int8_ws
    try:
        sage_int8_ws.attend_quantized_ws(quantized, out, lk, hk)
        return True
    except triton.compiler.errors.CompilationError as e:   # a Triton whose Gluon lacks what the kernel uses
        _refuse_warp_specialized(out.device.index, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
        return False


def sage_int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        pv_fp8: bool | None = None, use_tma: bool | None = None, rotate: bool = True,
                        config: dict | None = None) -> torch.Tensor:
    """Softmax(q k^T * scale) v for [B, L, H, D] fp16/bf16 CUDA tensors (last dim contiguous; D in HEAD_DIMS;
    k/v heads divide q heads). Returns [B, Lq, H, D] in q's dtype; inputs are never modified.

    pv_fp8 / use_tma default to what the GPU supports (FP8 dots from sm89, TMA from sm90); on sm90 with FP8 P.V
    and TMA the warp-specialized schedule (sage_int8_ws) runs. `config` pins the Triton kernel with
    {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} and optionally its switches (ROWSUM_MMA, PIPELINE) instead of
    the autotuned choice (benchmarks).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected [B, L, H, D] q, k, v with matching B, D and k == v shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    if d not in HEAD_DIMS or h % hk or lk == 0:
        raise ValueError(f"head dim must be one of {HEAD_DIMS} (got {d}), q heads a multiple of k heads "
                         f"(got {h}, {hk}), and at least one key; pad or route elsewhere")
    if q.dtype not in (torch.float16, torch.bfloat16) or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v must be fp16/bf16 with a contiguous last dim")
    reason = unavailable(q.device)
    if reason is not None or q.device.type != "cuda":
        raise RuntimeError(f"sage_int8_attention cannot run: {reason or 'tensors not on CUDA'}")
    cap = torch.cuda.get_device_capability(q.device)
    pv_fp8 = cap >= (8, 9) if pv_fp8 is None else pv_fp8
    use_tma = cap >= (9, 0) if use_tma is None else use_tma
    scale = d ** -0.5 if scale is None else float(scale)
    out = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device)
    if lq == 0:
        return out
    with torch.cuda.device(q.device):
        # sm90 with FP8 P.V and TMA: the warp-specialized schedule (H200, 32,760 tokens: 891-895 TFLOP/s, the Triton
        # kernel 762-790), whose V tiles hold their keys in MMA operand order
        warp_specialized = config is None and pv_fp8 and use_tma and _warp_specialized_refusal(q.device) is None
        pv_dtype = torch.float8_e4m3fn if pv_fp8 else torch.float16
        quantized = quantize_qkv(q, k, v, scale, pv_dtype, rotate, mma_key_order=warp_specialized)
        if use_tma:
            triton.set_allocator(_tma_allocator)
        if warp_specialized and _attend_warp_specialized(quantized, out, lk, hk):
            return out
        if warp_specialized:   # refused at compile time: V again, in key order
            quantized = quantize_qkv(q, k, v, scale, pv_dtype, rotate)
        attend_quantized(quantized, out, lk, hk, use_tma, config)
    return out
