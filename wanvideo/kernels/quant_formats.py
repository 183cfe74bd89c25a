"""Quantized weight formats in plain torch: FP8 with per-output-channel scales, and NVFP4.

These are the reference implementations (the CPU path, and what the Triton kernels are tested against).
NVFP4 follows NVIDIA / ComfyUI (comfy-kitchen `TensorCoreNVFP4Layout`): E2M1 codes packed two per byte with
the EVEN element in the HIGH nibble, one E4M3 scale per 16 consecutive input elements, one fp32 scale per
tensor (amax / (448 * 6)), rows and columns padded to multiples of 16. In memory the block scales are kept
row-major `[rows, K/16]`; ComfyUI files store them in cuBLAS' swizzled 128x4 tile layout (`to_blocked`).
"""
from __future__ import annotations

import torch

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_CHUNK_ELEMENTS = 1 << 24  # quantize big weights in row chunks so temporaries stay ~hundreds of MB


def roundup(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------

def fp8_quantize(w: torch.Tensor, dtype: torch.dtype, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [N, K]` -> (fp8 codes `[N, K]`, fp32 scale `[N]`) with w ~= codes * scale[:, None].

    Per channel: each output row's amax maps to the format's max. Otherwise a plain saturating cast (scale 1).
    """
    w32 = w.float()
    if per_channel:
        amax = w32.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / FP8_MAX[dtype], torch.ones_like(amax))
        w32 = w32 / scale[:, None]
    else:
        scale = torch.ones(w.shape[0], device=w.device, dtype=torch.float32)
    return w32.clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale, the scale being one value or one per row (dim 0)."""
    s = scale.to(dtype)
    if s.numel() > 1:
        s = s.reshape(-1, *([1] * (q.dim() - 1)))
    return q.to(dtype) * s


def quantize_rows_reference(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn):
    """Dynamic per-row activation quantization: (codes `[M, K]`, fp32 scale `[M, 1]`); what the fused
    Triton kernel computes in one pass."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX[dtype]).clamp_min(1e-12)
    return (x32 / scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale


# ----------------------------------------------------------------------------------------------
# NVFP4
# ----------------------------------------------------------------------------------------------

def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already scaled into [-6, 6]) to E2M1 codes, nearest with ties to even."""
    # Midpoints between the magnitudes; ties at 0.75, 1.75 and 3.5 go UP (to the even code), hence the
    # boundary just below them: the code is the number of boundaries strictly below |v|.
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32, device=v.device)
    bounds[1::2] = torch.nextafter(bounds[1::2], torch.zeros_like(bounds[1::2]))
    code = torch.bucketize(v.abs(), bounds).to(torch.uint8)
    return code | ((v < 0).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), device=code.device)
    return table[code.long()]


def pack_nibbles(code: torch.Tensor) -> torch.Tensor:
    """`[N, K]` codes -> `[N, K/2]` bytes, even element in the high nibble (ComfyUI order)."""
    return (code[:, 0::2] << 4) | code[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    amax = w.abs().amax().float()
    return torch.where(amax > 0, amax / (E4M3_MAX * E2M1_MAX), torch.ones_like(amax))


def _quantize_blocks(blocks: torch.Tensor, g: torch.Tensor, search: bool):
    """`blocks [R, B, 16]` fp32 -> (codes [R, B, 16] uint8, block scales [R, B] e4m3)."""
    amax = blocks.abs().amax(dim=-1)
    scale = (amax / E2M1_MAX / g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    if search:
        # Try the amax scale and its neighbouring E4M3 values (codes are monotonic in value) and keep, per
        # block, the one with the smallest squared error; the amax choice is among them, so error never grows.
        base = scale.view(torch.uint8).to(torch.int16)
        best_err, best_scale = None, scale
        for step in (0, -1, -2, -3, 1):
            cand = (base + step).clamp(1, 126).to(torch.uint8).view(torch.float8_e4m3fn)
            err = _block_error(blocks, cand, g)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, cand.view(torch.uint8), best_scale.view(torch.uint8)).view(torch.float8_e4m3fn)
        scale = best_scale
    return _encode_with_scale(blocks, scale, g), scale


def _encode_with_scale(blocks, scale, g):
    total = scale.float() * g
    safe = torch.where(total > 0, total, torch.ones_like(total))
    scaled = torch.where(total[..., None] > 0, blocks / safe[..., None], torch.zeros_like(blocks))
    return e2m1_encode(scaled.clamp(-E2M1_MAX, E2M1_MAX))


def _block_error(blocks, scale, g):
    codes = _encode_with_scale(blocks, scale, g)
    return (e2m1_decode(codes) * (scale.float() * g)[..., None] - blocks).square().sum(dim=-1)


def nvfp4_quantize(w: torch.Tensor, search: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`w [N, K]` -> (packed `[Np, Kp/2]` uint8, block scales `[Np, Kp/16]` e4m3, global scale fp32 0-d).

    `search=False` is the standard round-to-nearest recipe (block scale from the block amax);
    `search=True` also tries neighbouring block scales and keeps the lowest-error one (same format).
    """
    n, k = w.shape
    np_, kp = roundup(n, NVFP4_BLOCK), roundup(k, NVFP4_BLOCK)
    g = nvfp4_global_scale(w)
    packed = torch.empty(np_, kp // 2, device=w.device, dtype=torch.uint8)
    scales = torch.empty(np_, kp // NVFP4_BLOCK, device=w.device, dtype=torch.float8_e4m3fn)
    rows = max(1, _CHUNK_ELEMENTS // kp)
    for r0 in range(0, np_, rows):
        r1 = min(np_, r0 + rows)
        chunk = torch.zeros(r1 - r0, kp, device=w.device, dtype=torch.float32)
        if r0 < n:
            chunk[:min(r1, n) - r0, :k] = w[r0:min(r1, n)].float()
        codes, s = _quantize_blocks(chunk.view(r1 - r0, -1, NVFP4_BLOCK), g, search)
        packed[r0:r1] = pack_nibbles(codes.view(r1 - r0, kp))
        scales[r0:r1] = s
    return packed, scales, g


def nvfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor, g: torch.Tensor, shape: tuple[int, int],
                     dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `nvfp4_quantize`, cropped to the logical `shape`."""
    n, k = shape
    vals = e2m1_decode(unpack_nibbles(packed[:n]))[:, :k].float()
    block = scales[:n].float().repeat_interleave(NVFP4_BLOCK, dim=1)[:, :k]
    return (vals * block * g.float()).to(dtype)


def nvfp4_row_scale(scales: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 `[n]` per-row scale that maps each row of an NVFP4 weight into the E4M3 range (for FP8 compute)."""
    top = scales[:n].float().amax(dim=1) * g.float() * (E2M1_MAX / E4M3_MAX)
    return torch.where(top > 0, top, torch.ones_like(top))


def nvfp4_to_fp8(packed, scales, g, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 weight re-expressed as (E4M3 codes `[N, K]`, fp32 `nvfp4_row_scale` `[N]`),
    w ~= codes * row_scale[:, None]."""
    row_scale = nvfp4_row_scale(scales, g, shape[0])
    w = nvfp4_dequantize(packed, scales, g, shape, torch.float32)
    # One IEEE reciprocal per row and a multiply per element (what the Triton kernel does, bit for bit)
    return (w * (1.0 / row_scale)[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), row_scale


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """`[R, C]` block scales -> cuBLAS swizzled 128x4 tile layout, zero padded, shape `[roundup(R,128), roundup(C,4)]`
    (the 2-D form ComfyUI stores as `weight_scale`)."""
    r, c = scales.shape
    rp, cp = roundup(r, 128), roundup(c, 4)
    padded = torch.zeros(rp, cp, dtype=torch.uint8, device=scales.device)
    padded[:r, :c] = scales.view(torch.uint8)
    tiles = padded.view(rp // 128, 128, cp // 4, 4).permute(0, 2, 1, 3)       # [rt, ct, 128, 4]
    tiles = tiles.reshape(-1, 4, 32, 4).transpose(1, 2)                        # row r of a tile -> (r % 32, r // 32)
    return tiles.reshape(rp, cp).view(scales.dtype).contiguous()


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `to_blocked`: the row-major `[rows, cols]` scales."""
    rp, cp = roundup(rows, 128), roundup(cols, 4)
    if blocked.numel() != rp * cp:
        raise ValueError(f"swizzled block scales have {blocked.numel()} entries, expected {rp}x{cp}")
    t = blocked.reshape(-1).view(torch.uint8).reshape(rp // 128, cp // 4, 32, 4, 4).transpose(2, 3)
    t = t.reshape(rp // 128, cp // 4, 128, 4).permute(0, 2, 1, 3).reshape(rp, cp)
    return t[:rows, :cols].contiguous().view(blocked.dtype)
