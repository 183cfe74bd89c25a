"""Building blocks of the Wan 2.1 video VAE (docs/NOTES.md §2), with the official numerics.

The VAE is causal in time and runs chunk by chunk (encoder: first frame, then 4 frames; decoder: one latent
frame). A `CausalCache` carries what each temporal convolution needs from earlier chunks, so that chunked
processing equals running every causal convolution over the whole clip at once, in bounded memory.

Module and `nn.Sequential` layouts (including parameterless placeholders) reproduce the official state-dict
key names exactly (`residual.2`, `resample.1`, `head.2`, ...).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # frames a temporal kernel of size 3 needs from the chunks before


class CausalCache(dict):
    """Per-module state carried from one chunk to the next (keyed by the module object)."""

    def conv(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        """Causal convolution of this chunk as if the whole clip ran at once: time is padded at the front only
        (zeros before the clip starts, else the last CACHE_T input frames of earlier chunks), space symmetrically."""
        previous = self.get(conv)
        kept = x[:, :, -CACHE_T:]
        if kept.shape[2] < CACHE_T and previous is not None:
            kept = torch.cat([previous[:, :, -1:], kept], dim=2)
        self[conv] = kept.clone()  # a copy, so the whole chunk is not kept alive by a view
        front = conv.kernel_size[0] - 1
        if previous is not None:
            x = torch.cat([previous, x], dim=2)
            front -= previous.shape[2]
        ph, pw = conv.kernel_size[1] // 2, conv.kernel_size[2] // 2
        return conv(F.pad(x, (pw, pw, ph, ph, front, 0)))


class RMSNorm(nn.Module):
    """L2 normalisation over channels times sqrt(C) times gamma (not mean-square + eps; pitfall 7)."""

    def __init__(self, dim: int, spatial_dims: int, *, device=None, dtype=None):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim,) + (1,) * spatial_dims, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of a `[B, C, T, H, W]` video."""
    b, c, t, h, w = x.shape
    y = module(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class NearestUpsample2x(nn.Module):
    """Nearest-exact x2 upsampling computed in at least float32 (the official workaround for bfloat16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return F.interpolate(wide, scale_factor=(2.0, 2.0), mode="nearest-exact").to(x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, *, device, dtype, operations):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        # indices 1, 4, 5 are the official SiLU / SiLU / Dropout slots; they keep the key names aligned
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3, **kw), nn.SiLU(), operations.Conv3d(in_dim, out_dim, 3, **kw),
            RMSNorm(out_dim, 3, **kw), nn.SiLU(), nn.Identity(), operations.Conv3d(out_dim, out_dim, 3, **kw))
        self.shortcut = operations.Conv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        r = self.residual
        h = cache.conv(r[2], r[1](r[0](x)))
        h = cache.conv(r[6], r[4](r[3](h)))
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time), residual.

    Calls SDPA directly rather than the pack's attention entry: one head of width C (up to 384) is beyond the
    flash/Sage kernels, and the VAE must also run in float64 for the reference tests."""

    def __init__(self, dim: int, *, device, dtype, operations):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm = RMSNorm(dim, 2, **kw)
        self.to_qkv = operations.Conv2d(dim, dim * 3, 1, **kw)
        self.proj = operations.Conv2d(dim, dim, 1, **kw)

    def _frame_attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return per_frame(self._frame_attention, x) + x


class Resample(nn.Module):
    """Spatial x2 down/up sampling per frame, optionally with the temporal x2 of the causal scheme.

    downsample3d: the first chunk's frames pass through; later chunks are convolved (kernel 3, stride 2, no
    padding) after the last frame of the previous chunk, so frames 0, (0..2), (2..4), ... map to one each.
    upsample3d: the first chunk's frame is not doubled; later frames go through a causal time conv producing
    two frames each (channel halves interleaved in time)."""

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, *, device, dtype, operations):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        kw = dict(device=device, dtype=dtype)
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(NearestUpsample2x(), operations.Conv2d(dim, dim // 2, 3, padding=1, **kw))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), operations.Conv2d(dim, dim, 3, stride=2, **kw))
        if mode == "upsample3d":
            self.time_conv = operations.Conv3d(dim, dim * 2, (3, 1, 1), **kw)
        elif mode == "downsample3d":
            self.time_conv = operations.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        x = per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self not in cache:
            cache[self] = True  # first chunk seen: its frame stays single
            return x
        y = cache.conv(self.time_conv, x)
        b, c2, t, h, w = y.shape
        return y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        previous = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


def _levels(dims: list[int], blocks_per_level: int, resample_modes: list[str], **kw) -> nn.Sequential:
    """Residual blocks from `dims[0]` through the level widths `dims[1:]`; every level with a mode in
    `resample_modes` ends in that Resample (downsampling keeps the channels, upsampling halves them)."""
    blocks, channels = [], dims[0]
    for level, level_dim in enumerate(dims[1:]):
        for _ in range(blocks_per_level):
            blocks.append(ResidualBlock(channels, level_dim, **kw))
            channels = level_dim
        if level < len(resample_modes):
            mode = resample_modes[level]
            blocks.append(Resample(level_dim, mode, **kw))
            channels = level_dim // 2 if mode.startswith("up") else level_dim
    return nn.Sequential(*blocks)


def _middle(dim: int, **kw) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, **kw), AttentionBlock(dim, **kw), ResidualBlock(dim, dim, **kw))


def _head(dim: int, out_dim: int, *, device, dtype, operations) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, 3, device=device, dtype=dtype), nn.SiLU(),
                         operations.Conv3d(dim, out_dim, 3, device=device, dtype=dtype))


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    return cache.conv(head[2], head[1](head[0](x)))


class Encoder3d(nn.Module):
    """Video `[B, 3, T, H, W]` chunk -> `out_dim` channels at 1/8 size (time /4 across chunks)."""

    def __init__(self, dim: int, out_dim: int, dim_mult, num_res_blocks: int, temporal_downsample, *,
                 device, dtype, operations):
        super().__init__()
        kw = dict(device=device, dtype=dtype, operations=operations)
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = operations.Conv3d(3, dims[0], 3, device=device, dtype=dtype)
        modes = ["downsample3d" if temporal else "downsample2d" for temporal in temporal_downsample]
        self.downsamples = _levels(dims, num_res_blocks, modes, **kw)
        self.middle = _middle(dims[-1], **kw)
        self.head = _head(dims[-1], out_dim, **kw)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """Latent `[B, z_dim, T, h, w]` chunk -> video at 8x size (a latent frame gives 1 frame first, then 4)."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal_upsample, *,
                 device, dtype, operations):
        super().__init__()
        kw = dict(device=device, dtype=dtype, operations=operations)
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = operations.Conv3d(z_dim, dims[0], 3, device=device, dtype=dtype)
        self.middle = _middle(dims[0], **kw)
        modes = ["upsample3d" if temporal else "upsample2d" for temporal in temporal_upsample]
        self.upsamples = _levels(dims, num_res_blocks + 1, modes, **kw)
        self.head = _head(dims[-1], 3, **kw)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        return _run_head(self.head, x, cache)
