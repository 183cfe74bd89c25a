"""The 8-bit attention kernel for Hopper (sm90), warp-specialized in Gluon (Triton's explicit-layout dialect).

The same arithmetic as `sage_int8` (its quantized Q/K/V and scales, INT8 Q.K, FP8 P.V, online softmax, each P.V
product added to an FP32 accumulator); the schedule is what Triton's automatic pipelining cannot express on sm90:
- one producer warp streams K and V by TMA into a ring of shared-memory stages of two 128-key blocks each;
- two consumer warpgroups take 64 query rows each of a 128-row tile and share every stage, so K/V cross from L2
  to the SM once per 128 rows instead of once per 64; each gets 240 registers (the producer gives its own back);
- a consumer step takes both blocks of a stage: one row maximum, one rescale of the accumulator and one barrier
  arrival per 256 keys, the two P.V products summed inside the MMA (256 keys: far below the long sums where
  Hopper's FP8 accumulation loses bits). The two blocks' V scales differ: each P is multiplied by its V scale over
  the larger of the two inside the exp2 (a per-row bias, free), so P stays within e4m3's 448, and the row sums are
  scaled back;
- P goes from the Q.K accumulator registers to the FP8 operand of P.V without leaving its thread: V's keys are
  stored in the order in which the operand holds them (sage_int8._mma_key_position), and four P values are packed
  into each 32-bit register by two conversions (no shuffles, no byte permutes);
- the row sums come from the tensor cores (P times a tile of ones, loaded once by TMA) instead of a float add per
  score. (Written into shared memory by the consumers instead, the ones were not what the MMA read on the H200.)
  The accumulator and the row sums are kept in the larger V scale's unit in log2: no divisions in a step.
  Together: 1,086 -> 758 SASS instructions per 256-key step, 804-819 -> 891-895 TFLOP/s at 32,760 tokens.
Ruled out on the H200 (bench/sage_int8.py --configs ws, docs/BENCHMARKS.md): one block per step with the next
block's Q.K in flight (796 vs 819 TFLOP/s), FlashAttention-3's ping-pong of the two warpgroups (749-778).
Barriers per stage: `k_ready`/`v_ready` complete when the TMA bytes have landed, `kv_empty` after both consumers'
MMAs on the stage are done (two arrivals); `q_bar` holds each consumer's Q and the ones tile.
"""
from __future__ import annotations

import functools

import torch

from . import sage_int8

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:   # optional accelerator: older Triton has no Gluon
    gluon = None

ROWS = 64              # query rows per consumer warpgroup (the wgmma M of one warpgroup)
BLOCK_M = 2 * ROWS     # query rows per program
BLOCK_N = sage_int8.KBLK   # keys per block: one K and one V scale each
STAGES = 2             # stages in flight (64 KB each at D 128: two K and two V blocks; H200: 889-894 TFLOP/s with
                       # two, 816-881 with three over four runs; the shared memory left to L1 is the likely reason)
VALIDATED_TRITON = "3.6."  # Gluon's API moves between releases: other versions take the Triton kernel


def unavailable(device: torch.device | None = None) -> str | None:
    """Why the kernel cannot run (None when it can)."""
    reason = sage_int8.unavailable(device)
    if reason is not None:
        return reason
    if gluon is None:
        return "this Triton has no Gluon"
    if not triton.__version__.startswith(VALIDATED_TRITON):
        return f"Gluon is experimental: built and checked with Triton {VALIDATED_TRITON}, not {triton.__version__}"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "warpgroup MMA schedule is for sm90 (Hopper) only"
    return None


if gluon is not None:
    _ROWS = gl.constexpr(ROWS)
    _BLOCK_M = gl.constexpr(BLOCK_M)
    _LOG2_P_SCALE = gl.constexpr(sage_int8.LOG2_P_SCALE)
    _INT_MAGIC = gl.constexpr(sage_int8.INT_MAGIC)
    _FLOAT_MAGIC = gl.constexpr(sage_int8.FLOAT_MAGIC)

    @gluon.jit
    def _exp2(x):
        """exp2 on the special-function unit with flush-to-zero (P is rounded to 8 bits next)."""
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _log2(x):
        """log2 on the special-function unit (V scales: positive normal floats)."""
        return gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _to_fp8(x):
        """e4m3 (round to nearest, saturating), four values a 32-bit register: the register order of a
        k_width=4 dot operand, so the MMA takes them as they are."""
        return gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
            "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=gl.float8e4nv, is_pure=True, pack=4)

    @gluon.jit
    def _producer(args, ROLE: gl.constexpr):
        """One warp: the K and V blocks of every stage, as the consumers release stages (ROLE: unused, the
        workers' signatures must match)."""
        (q_desc, k_desc, v_desc, ones_desc, q_bufs, k_bufs, v_bufs, ones, q_bar, k_ready, v_ready, kv_empty,
         qs_ptr, ks_ptr, vs_ptr, vmean_ptr, o_ptr, Lq, Lk, H, LQP, LKP, o_stride_b, o_stride_l, o_stride_h,
         pid_m, bh, bh_kv) = args
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        D: gl.constexpr = k_desc.block_type.shape[1]
        n_stages: gl.constexpr = k_ready.type.shape[0]
        mbarrier.expect(q_bar.index(2), ones_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(ones_desc, [0, 0], q_bar.index(2), ones)
        for i in range(gl.cdiv(Lk, 2 * BLOCK_N)):
            stage = i % n_stages
            mbarrier.wait(kv_empty.index(stage), ((i // n_stages) & 1) ^ 1)
            # a second block past the keys reads zeros (or the next head's keys, masked): full boxes either way
            mbarrier.expect(k_ready.index(stage), 2 * k_desc.block_type.nbytes)
            for half in gl.static_range(2):
                tma.async_copy_global_to_shared(k_desc, [bh_kv * LKP + (2 * i + half) * BLOCK_N, 0],
                                                k_ready.index(stage), k_bufs.index(2 * stage + half))
            mbarrier.expect(v_ready.index(stage), 2 * v_desc.block_type.nbytes)
            for half in gl.static_range(2):
                tma.async_copy_global_to_shared(v_desc, [bh_kv * D, (2 * i + half) * BLOCK_N],
                                                v_ready.index(stage), v_bufs.index(2 * stage + half))

    @gluon.jit
    def _probabilities(s, coef, bias, valid, p_layout: gl.constexpr, MASKED: gl.constexpr):
        """P = exp2(s * coef + bias) of int32 scores s: (s + magic) as float is 1.5 * 2^23 + s exactly
        (|s| < 2^22), whose magic part the bias takes off. Returns P in FP8 as the P.V operand with its keys in
        V's stored order: within each 32 columns, bits (h, i1, q, i0) of the accumulator column become (h, q, i1, i0)
        of the operand's k, which is where each thread already holds them (the conversion is asserted trivial).
        MASKED: zero where `valid` ([1, BLOCK_N]) is false."""
        x = gl.fma((s + _INT_MAGIC).to(gl.float32, bitcast=True), coef[:, None], bias[:, None])
        if MASKED:
            x = gl.where(valid, x, float("-inf"))
        p = _exp2(x)
        rows: gl.constexpr = p.shape[0]
        p = p.reshape([rows, p.shape[1] // 32, 2, 2, 4, 2]).permute((0, 1, 2, 4, 3, 5)).reshape([rows, p.shape[1]])
        return _to_fp8(gl.convert_layout(p, p_layout, assert_trivial=True))

    @gluon.jit
    def _step(acc, l_i, m_i, lc_i, qs, q_smem, k_bufs, v_bufs, ones, k_ready, v_ready, kv_empty, ks_ptr, vs_ptr, bh_kv,
              i, Lk, LKP, s_layout: gl.constexpr, o_layout: gl.constexpr, l_layout: gl.constexpr,
              MASKED: gl.constexpr):
        """Key blocks 2i and 2i+1 (one stage): online softmax and P.V. acc and l_i are kept in units of the V scale
        2^lc_i (the output is acc / l_i, no division by a V scale on the way); l_i ([rows, 8], every column alike)
        holds the row sums of the rounded P, taken by the tensor cores (P times a ones tile) instead of one float
        add per score.
        MASKED (the last stage): keys past Lk, and a second block past the end, count for nothing."""
        BLOCK_N: gl.constexpr = k_bufs.type.shape[1]
        n_stages: gl.constexpr = k_ready.type.shape[0]
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=4)
        stage = i % n_stages
        phase = (i // n_stages) & 1
        zero_s = gl.zeros([_ROWS, BLOCK_N], gl.int32, s_layout)
        mbarrier.wait(k_ready.index(stage), phase)
        sa = warpgroup_mma(q_smem, k_bufs.index(2 * stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        sb = warpgroup_mma(q_smem, k_bufs.index(2 * stage + 1).permute((1, 0)), zero_s, use_acc=False,
                           is_async=True)
        sa, sb = warpgroup_mma_wait(0, deps=(sa, sb))
        first = bh_kv * (LKP // BLOCK_N) + 2 * i                  # index of block 2i's K and V scales
        has_b = (2 * i + 1) * BLOCK_N < Lk
        keys = 2 * i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        valid_a = (keys < Lk)[None, :]
        valid_b = (keys + BLOCK_N < Lk)[None, :]
        if MASKED:
            sa = gl.where(valid_a, sa, -(1 << 22))
            sb = gl.where(valid_b, sb, -(1 << 22))
        coef_a = qs * gl.load(ks_ptr + first)                     # log2-domain logit per integer step
        coef_b = qs * gl.load(ks_ptr + first + 1, mask=has_b, other=0.0)
        lv_a = _log2(gl.load(vs_ptr + first))                    # log2 of the blocks' V scales
        lv_b = gl.where(has_b, _log2(gl.load(vs_ptr + first + 1, mask=has_b, other=1.0)), lv_a)
        lc = gl.maximum(lv_a, lv_b)                               # the new unit of acc and l: the larger V scale
        m_new = gl.maximum(m_i, gl.maximum(gl.max(sa, axis=1).to(gl.float32) * coef_a,
                                           gl.max(sb, axis=1).to(gl.float32) * coef_b))
        bias = _LOG2_P_SCALE - m_new                              # P in [0, 448]
        pa = _probabilities(sa, coef_a, bias - _FLOAT_MAGIC * coef_a + (lv_a - lc), valid_a, p_layout, MASKED)
        pb = _probabilities(sb, coef_b, bias - _FLOAT_MAGIC * coef_b + (lv_b - lc), valid_b, p_layout, MASKED)
        rescale = _exp2(m_i - m_new + (lc_i - lc))                # old maximum and unit -> new ones
        mbarrier.wait(v_ready.index(stage), phase)
        zero_o = gl.zeros([_ROWS, acc.shape[1]], gl.float32, o_layout)
        zero_l = gl.zeros([_ROWS, 8], gl.float32, l_layout)
        pv = warpgroup_mma(pa, v_bufs.index(2 * stage).permute((1, 0)), zero_o, use_acc=False, is_async=True)
        pv = warpgroup_mma(pb, v_bufs.index(2 * stage + 1).permute((1, 0)), pv, is_async=True)
        la = warpgroup_mma(gl.convert_layout(pa, pl_layout, assert_trivial=True), ones.permute((1, 0)), zero_l,
                           use_acc=False, is_async=True)
        lb = warpgroup_mma(gl.convert_layout(pb, pl_layout, assert_trivial=True), ones.permute((1, 0)), zero_l,
                           use_acc=False, is_async=True)
        pv, la, lb = warpgroup_mma_wait(0, deps=(pv, la, lb))
        mbarrier.arrive(kv_empty.index(stage), count=1)
        acc = gl.fma(acc, gl.convert_layout(rescale, gl.SliceLayout(1, o_layout))[:, None], pv)
        # P of block a carries 2^(lv_a - lc): its row sums count 2^-lv_a each in units of 2^-lc
        l_i = gl.fma(l_i, gl.convert_layout(rescale, gl.SliceLayout(1, l_layout))[:, None],
                     la * _exp2(-lv_a) + lb * _exp2(-lv_b))
        return acc, l_i, m_new, lc

    @gluon.jit
    def _consumer(args, ROLE: gl.constexpr):
        """One warpgroup (the default partition or a worker): query rows [pid_m * 128 + 64 * ROLE, +64)."""
        (q_desc, k_desc, v_desc, ones_desc, q_bufs, k_bufs, v_bufs, ones, q_bar, k_ready, v_ready, kv_empty,
         qs_ptr, ks_ptr, vs_ptr, vmean_ptr, o_ptr, Lq, Lk, H, LQP, LKP, o_stride_b, o_stride_l, o_stride_h,
         pid_m, bh, bh_kv) = args
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        D: gl.constexpr = k_desc.block_type.shape[1]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 32])
        l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 8, 32])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        row0 = pid_m * _BLOCK_M + ROLE * _ROWS
        q_smem = q_bufs.index(ROLE)
        mbarrier.expect(q_bar.index(ROLE), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [bh * LQP + row0, 0], q_bar.index(ROLE), q_smem)
        qs = gl.load(qs_ptr + bh.to(gl.int64) * LQP + row0 + gl.arange(0, _ROWS, layout=row_s))
        mbarrier.wait(q_bar.index(ROLE), 0)
        mbarrier.wait(q_bar.index(2), 0)

        acc = gl.zeros([_ROWS, D], gl.float32, o_layout)
        l_i = gl.zeros([_ROWS, 8], gl.float32, l_layout)
        m_i = gl.full([_ROWS], float("-inf"), gl.float32, row_s)
        lc_i = 0.0                                                  # any finite value: acc and l_i start at zero
        n_stages_used = gl.cdiv(Lk, 2 * BLOCK_N)
        for i in range(n_stages_used - 1):
            acc, l_i, m_i, lc_i = _step(acc, l_i, m_i, lc_i, qs, q_smem, k_bufs, v_bufs, ones, k_ready, v_ready,
                                       kv_empty, ks_ptr, vs_ptr, bh_kv, i, Lk, LKP, s_layout, o_layout, l_layout,
                                       False)
        acc, l_i, m_i, lc_i = _step(acc, l_i, m_i, lc_i, qs, q_smem, k_bufs, v_bufs, ones, k_ready, v_ready, kv_empty,
                                   ks_ptr, vs_ptr, bh_kv, n_stages_used - 1, Lk, LKP, s_layout, o_layout, l_layout,
                                   True)

        out = acc * gl.convert_layout(1.0 / gl.max(l_i, axis=1), row_o)[:, None]
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        out = out + gl.load(vmean_ptr + bh_kv.to(gl.int64) * D + cols)[None, :]   # V's smoothing mean back
        rows = row0 + gl.arange(0, _ROWS, layout=row_o)
        b, h = (bh // H).to(gl.int64), (bh % H).to(gl.int64)
        dst = o_ptr + b * o_stride_b + h * o_stride_h + rows.to(gl.int64)[:, None] * o_stride_l + cols[None, :]
        gl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(rows < Lq)[:, None])

    @gluon.jit(do_not_specialize=["Lq", "Lk"])
    def _attention_ws_kernel(q_desc, k_desc, v_desc, ones_desc, qs_ptr, ks_ptr, vs_ptr, vmean_ptr, o_ptr, Lq, Lk, H,
                             LQP, LKP, HQ_PER_KV, o_stride_b, o_stride_l, o_stride_h, STAGES: gl.constexpr):
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        bh_kv = bh // HQ_PER_KV
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [2 * STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [2 * STAGES] + v_desc.block_type.shape, v_desc.layout)
        # the B operand of the row sums' MMA: 8 columns of ones ([8, keys], K-major like V^T), loaded by TMA
        ones = gl.allocate_shared_memory(ones_desc.dtype, ones_desc.block_type.shape, ones_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())   # Q of each consumer, ones
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(3):
            mbarrier.init(q_bar.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)
        args = (q_desc, k_desc, v_desc, ones_desc, q_bufs, k_bufs, v_bufs, ones, q_bar, k_ready, v_ready, kv_empty,
                qs_ptr, ks_ptr, vs_ptr, vmean_ptr, o_ptr, Lq, Lk, H, LQP, LKP, o_stride_b, o_stride_l, o_stride_h,
                pid_m, bh, bh_kv)
        gl.warp_specialize([(_consumer, (args, 0)), (_consumer, (args, 1)), (_producer, (args, 1))],
                           [4, 1], [240, 24])


@functools.lru_cache(maxsize=None)
def _ones(device: torch.device) -> torch.Tensor:
    """[8, BLOCK_N] e4m3 ones: the B operand of the row sums' MMA."""
    return torch.ones(8, BLOCK_N, device=device).to(torch.float8_e4m3fn)


def _descriptor(t: torch.Tensor, block: list[int], dtype) -> "TensorDescriptor":
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def attend_quantized_ws(quantized, out: torch.Tensor, lk: int, hk: int, stages: int = STAGES):
    """The warp-specialized kernel on sage_int8.quantize_qkv(..., mma_key_order=True)'s output (FP8 P.V), into out
    ([B, Lq, H, D])."""
    q8, qs, k8, ks, vt, vs, vmean = quantized
    b, lq, h, d = out.shape
    lqp, lkp = q8.shape[1], k8.shape[1]
    q_desc = _descriptor(q8.view(-1, d), [ROWS, d], gl.int8)
    k_desc = _descriptor(k8.view(-1, d), [BLOCK_N, d], gl.int8)
    v_desc = _descriptor(vt.view(-1, lkp), [d, BLOCK_N], gl.float8e4nv)
    ones_desc = _descriptor(_ones(out.device), [8, BLOCK_N], gl.float8e4nv)
    # 4 + 4 + 1 warps, rounded to 12: 168 registers each at launch, then 240 / 240 / 24 per warpgroup
    _attention_ws_kernel[(lqp // BLOCK_M, b * h)](q_desc, k_desc, v_desc, ones_desc, qs, ks, vs, vmean, out, lq, lk,
                                                  h, lqp, lkp, h // hk, out.stride(0), out.stride(1), out.stride(2),
                                                  STAGES=stages, num_warps=4, maxnreg=168)
