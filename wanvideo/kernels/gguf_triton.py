"""Triton dequantization of GGUF blocks on CUDA: one pass, every output weight computed from its block's bytes.

The torch reference (`gguf_dequant.dequantize_blocks`, bit-exact with the `gguf` package) runs a dozen
elementwise launches over float32 temporaries; a layer call at M = 32,760 tokens cannot afford that. Here each
program writes `ELEMENTS` consecutive weights straight in the output dtype, gathering its codes, sub-scales and
fp16 scales from the (L1/L2-resident) block bytes. Same formulas as the reference, same float32 operations;
the compiler may fuse a product and a difference into one FMA, so results agree to float32 rounding
(tests/test_gguf.py). Imported lazily; absent Triton or a CPU tensor -> `supports` is False and the torch path
runs.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional accelerator
    triton = None

from .gguf_dequant import BLOCK_FORMATS

_CODES = {name: i for i, name in enumerate(BLOCK_FORMATS)}
ELEMENTS = 1024


def supports(qtype: str, device: torch.device) -> bool:
    return triton is not None and device.type == "cuda" and qtype in _CODES


if triton is not None:
    @triton.jit
    def _byte(ptr, offs):
        return tl.load(ptr + offs).to(tl.int32)

    @triton.jit
    def _k_scale_min(u8, base, j):
        """Q4_K/Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at base + 4."""
        s = base + 4
        lo = j < 4
        a = _byte(u8, s + j)
        b = _byte(u8, s + j + 4)
        c = _byte(u8, s + tl.where(lo, j, j - 4))
        sc = tl.where(lo, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _dequant_kernel(u8, f16, i8, out, total, QTYPE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                        ELEMENTS: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * ELEMENTS + tl.arange(0, ELEMENTS)
        mask = idx < total
        idx = tl.where(mask, idx, 0)
        blk = idx // BS
        e = (idx % BS).to(tl.int32)
        base = blk * TS
        if QTYPE == 0:  # Q4_0: d, 16 bytes of nibbles (weights 0-15 low, 16-31 high)
            nib = (_byte(u8, base + 2 + e % 16) >> (4 * (e // 16))) & 15
            y = tl.load(f16 + base // 2).to(tl.float32) * (nib - 8).to(tl.float32)
        elif QTYPE == 1:  # Q4_1: d, m, nibbles
            nib = (_byte(u8, base + 4 + e % 16) >> (4 * (e // 16))) & 15
            y = tl.load(f16 + base // 2).to(tl.float32) * nib.to(tl.float32) + tl.load(f16 + base // 2 + 1).to(tl.float32)
        elif QTYPE == 2:  # Q5_0: d, 32 high bits, nibbles
            nib = (_byte(u8, base + 6 + e % 16) >> (4 * (e // 16))) & 15
            hb = (_byte(u8, base + 2 + e // 8) >> (e % 8)) & 1
            y = tl.load(f16 + base // 2).to(tl.float32) * ((nib | (hb << 4)) - 16).to(tl.float32)
        elif QTYPE == 3:  # Q5_1: d, m, 32 high bits, nibbles
            nib = (_byte(u8, base + 8 + e % 16) >> (4 * (e // 16))) & 15
            hb = (_byte(u8, base + 4 + e // 8) >> (e % 8)) & 1
            y = tl.load(f16 + base // 2).to(tl.float32) * (nib | (hb << 4)).to(tl.float32) + \
                tl.load(f16 + base // 2 + 1).to(tl.float32)
        elif QTYPE == 4:  # Q8_0: d, 32 int8 codes
            y = tl.load(i8 + base + 2 + e).to(tl.float32) * tl.load(f16 + base // 2).to(tl.float32)
        elif QTYPE == 5:  # Q2_K: 16 scale/min bytes, 64 bytes of 2-bit codes, d, dmin
            q = (_byte(u8, base + 16 + (e // 128) * 32 + e % 32) >> (2 * ((e % 128) // 32))) & 3
            sc = _byte(u8, base + e // 16)
            dl = tl.load(f16 + base // 2 + 40).to(tl.float32) * (sc & 15).to(tl.float32)
            ml = tl.load(f16 + base // 2 + 41).to(tl.float32) * (sc >> 4).to(tl.float32)
            y = dl * q.to(tl.float32) - ml
        elif QTYPE == 6:  # Q3_K: 32 high-bit bytes, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales, d
            ql = (_byte(u8, base + 32 + (e // 128) * 32 + e % 32) >> (2 * ((e % 128) // 32))) & 3
            hb = (_byte(u8, base + e % 32) >> (e // 32)) & 1
            i = e // 16
            low = (_byte(u8, base + 96 + i % 8) >> (4 * (i // 8))) & 15
            high = (_byte(u8, base + 104 + i % 4) >> (2 * (i // 4))) & 3
            scale = ((low | (high << 4)) - 32).to(tl.float32)
            dl = tl.load(f16 + base // 2 + 54).to(tl.float32) * scale
            y = dl * (ql - 4 * (1 - hb)).to(tl.float32)
        elif QTYPE == 7 or QTYPE == 8:  # Q4_K / Q5_K: d, dmin, 12 scale bytes, (Q5_K: 32 high-bit bytes), nibbles
            j = e // 32
            sc, mn = _k_scale_min(u8, base, j)
            q = (_byte(u8, base + 16 + 32 * (QTYPE - 7) + (j // 2) * 32 + e % 32) >> (4 * (j % 2))) & 15
            if QTYPE == 8:
                q = q | (((_byte(u8, base + 16 + e % 32) >> j) & 1) << 4)
            d = tl.load(f16 + base // 2).to(tl.float32) * sc
            dm = tl.load(f16 + base // 2 + 1).to(tl.float32) * mn
            y = d * q.to(tl.float32) - dm
        else:  # Q6_K: 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d
            h = e // 128
            r = e % 128
            ql = (_byte(u8, base + h * 64 + r % 64) >> (4 * (r // 64))) & 15
            qh = (_byte(u8, base + 128 + h * 32 + r % 32) >> (2 * (r // 32))) & 3
            d = tl.load(f16 + base // 2 + 104).to(tl.float32) * tl.load(i8 + base + 192 + e // 16).to(tl.float32)
            y = d * ((ql | (qh << 4)) - 32).to(tl.float32)
        tl.store(out + idx, y.to(out.dtype.element_ty), mask=mask)


def dequantize(data: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """GGUF blocks (CUDA, contiguous bytes) -> `dtype` tensor of logical `shape`, in one launch."""
    block, size = BLOCK_FORMATS[qtype]
    u8 = data.contiguous().reshape(-1)
    total = u8.numel() // size * block
    out = torch.empty(shape, device=data.device, dtype=dtype)
    grid = (triton.cdiv(total, ELEMENTS),)
    _dequant_kernel[grid](u8, u8.view(torch.float16), u8.view(torch.int8), out, total, QTYPE=_CODES[qtype], BS=block,
                          TS=size, ELEMENTS=ELEMENTS)
    return out
