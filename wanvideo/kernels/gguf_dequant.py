"""GGUF (ggml) block formats -> float weights, in plain torch (any device), plus a Triton path on CUDA.

A quantized GGUF tensor is a row-major sequence of blocks; each block holds `block_size` weights in `type_size`
bytes: fp16 scale(s) and packed integer codes (ggml's layouts, the same bytes llama.cpp and city96's files
hold). `dequantize_blocks` turns `uint8 [n_blocks, type_size]` into `float32 [n_blocks, block_size]` with the
same float32 operations, in the same order, as the `gguf` package's reference dequantization, so the result
is bit-identical to it (tests/test_gguf.py checks every type on random blocks, on CPU and on CUDA).
`dequantize` reshapes to the logical weight shape and casts; on CUDA it uses `gguf_triton` where that has
the type (one pass over the blocks instead of a dozen elementwise launches).
"""
from __future__ import annotations

import math

import torch

QK_K = 256  # weights per super-block of the K-quants

# name -> (weights per block, bytes per block)
BLOCK_FORMATS = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210),
}
# Byte offsets of each block format's fp16 scale fields, and the largest |code x sub-scale| of its codes.
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
CODE_RANGE = {"Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31, "Q8_0": 127, "Q2_K": 45, "Q3_K": 128, "Q4_K": 945,
              "Q5_K": 1953, "Q6_K": 4096}
# Unquantized GGUF tensor types and the torch dtype their bytes are.
PLAIN_FORMATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 at byte `start` of each block, as float32 `[n, 1]`."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifted(codes: torch.Tensor, shifts: tuple[int, ...], mask: int, group: int) -> torch.Tensor:
    """Bit fields of packed codes: `codes [n, g*group]` -> `[n, g, len(shifts), group]` of `(c >> s) & mask`."""
    c = codes.reshape(codes.shape[0], -1, 1, group)
    s = torch.tensor(shifts, dtype=torch.uint8, device=codes.device).reshape(1, 1, -1, 1)
    return (c >> s) & mask


def _legacy_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: the 32-bit high-bit word (4 little-endian bytes) -> bit j for weight j, `[n, 32]` uint8."""
    s = torch.arange(8, dtype=torch.uint8, device=qh.device).reshape(1, 1, 8)
    return ((qh.reshape(qh.shape[0], 4, 1) >> s) & 1).reshape(qh.shape[0], 32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Legacy 32-weight blocks: 16 bytes -> low nibbles (weights 0-15) then high nibbles (16-31), `[n, 32]`."""
    return _shifted(qs, (0, 4), 0x0F, 16).reshape(qs.shape[0], 32)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_0(b):
    q = (_nibbles(b[:, 6:]) | (_legacy_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return _f16(b, 0) * q.float()


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_legacy_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins per super-block (ggml's packing)."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b, 80) * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _shifted(qs, (0, 2, 4, 6), 3, 32).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = _shifted(packed[:, :8], (0, 4), 0x0F, 8).reshape(n, 16)
    high = _shifted(packed[:, 8:], (0, 2, 4, 6), 0x03, 4).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = _shifted(qs, (0, 2, 4, 6), 3, 32).reshape(n, 16, 16)
    qh = _shifted(hmask, tuple(range(8)), 1, 32).reshape(n, 16, 16) ^ 1  # a set bit means no -4 offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_affine(b, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: `d * scale * q - dmin * min` per 32 weights, codes `q [n, 8, 32]`."""
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    return (d * q.float() - dm).reshape(n, QK_K)


def _q4_k(b):
    return _k_affine(b, _shifted(b[:, 16:], (0, 4), 0x0F, 32).reshape(b.shape[0], 8, 32))


def _q5_k(b):
    n = b.shape[0]
    ql = _shifted(b[:, 48:], (0, 4), 0x0F, 32).reshape(n, 8, 32)
    qh = _shifted(b[:, 16:48], tuple(range(8)), 1, 32).reshape(n, 8, 32)
    return _k_affine(b, ql | (qh << 4))


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_f16(b, 208) * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _shifted(ql, (0, 4), 0x0F, 64).reshape(n, 8, 32)
    high = _shifted(qh, (0, 2, 4, 6), 0x03, 32).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


_DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
                 "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
assert set(_DEQUANTIZERS) == set(BLOCK_FORMATS)


def packed_row_bytes(qtype: str, row_length: int) -> int:
    """Bytes of one row of `row_length` weights stored as `qtype`."""
    block, size = BLOCK_FORMATS[qtype]
    if row_length % block:
        raise ValueError(f"a {qtype} row holds whole blocks of {block} weights; {row_length} is not a multiple")
    return row_length // block * size


def dequantize_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """`uint8 [n_blocks, type_size]` -> float32 `[n_blocks, block_size]` (bit-exact with `gguf`'s reference)."""
    return _DEQUANTIZERS[qtype](blocks)


def dequantize(data: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor's bytes (any shape whose last dim is bytes) -> `dtype` tensor of logical `shape`."""
    if qtype in PLAIN_FORMATS:
        return data.reshape(-1).view(torch.uint8).view(PLAIN_FORMATS[qtype]).reshape(shape).to(dtype)
    from . import gguf_triton
    if gguf_triton.supports(qtype, data.device):
        return gguf_triton.dequantize(data, qtype, shape, dtype)
    _, size = BLOCK_FORMATS[qtype]
    blocks = data.reshape(-1, size)
    return dequantize_blocks(blocks, qtype).reshape(shape).to(dtype)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """float weights `[N, K]` (K a multiple of 32) -> Q8_0 blocks `uint8 [N, K/32*34]`, as ggml rounds them
    (scale amax/127, codes rounded half away from zero): for weights changed at load (a merged LoRA), which
    cannot go back into the coarser type they came in without a second search."""
    n = w.shape[0]
    x = w.float().reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = x * inv
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)
    blocks = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=1)
    return blocks.reshape(n, -1)


def nonfinite_scales(data: torch.Tensor, qtype: str) -> int:
    """How many fp16 block scales of a GGUF tensor are NaN/inf (a few bytes per block are read)."""
    blocks = data.reshape(-1, BLOCK_FORMATS[qtype][1])
    return sum(int((~torch.isfinite(_f16(blocks, offset))).sum()) for offset in FP16_FIELDS[qtype])


def random_blocks(qtype: str, n: int, amp: float, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """`n` blocks of random codes and sub-scales whose weights are about `amp` in size (finite fp16 scales):
    stand-ins for quantized weights in tests and benches (llama.cpp's K-quant search has no Python port)."""
    _, size = BLOCK_FORMATS[qtype]
    blocks = torch.randint(0, 256, (n, size), dtype=torch.uint8, device=device, generator=generator)
    for offset in FP16_FIELDS[qtype]:
        jitter = 0.5 + torch.rand(n, 1, device=device, generator=generator)
        scale = (amp / CODE_RANGE[qtype] * jitter).to(torch.float16)
        blocks[:, offset:offset + 2] = scale.view(torch.uint8)
    return blocks


def stored_bytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` occupies stored as `qtype`."""
    if qtype in PLAIN_FORMATS:
        return math.prod(shape) * PLAIN_FORMATS[qtype].itemsize
    block, size = BLOCK_FORMATS[qtype]
    return math.prod(shape) // block * size
