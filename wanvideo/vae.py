"""The Wan 2.1 video VAE: loading, encode and decode with the official numerics (docs/NOTES.md §2).

Video `[B, 3, F, H, W]` in [-1, 1] with F = 1 + 4k and H, W multiples of 8 <-> normalised latents
`[B, 16, 1 + (F - 1) // 4, H / 8, W / 8]`. The encoder sees the first frame alone, then chunks of 4 frames;
the decoder one latent frame at a time; a causal cache links the chunks. Optional spatial tiling bounds
memory at large sizes, and a progress callback runs once per latent frame (it may raise to interrupt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .checkpoint import CheckpointReader, checked_tensor
from .modules.vae_blocks import CausalCache, Decoder3d, Encoder3d
from .modules.vae_tiling import count_tiles, run_tiled

# Published latent statistics of the Wan 2.1 VAE (16 channels): z = (mu - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

KEY_PREFIXES = ("", "vae.", "first_stage_model.")

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class WanVAEConfig:
    """Wan 2.1 values; only `dim` and `z_dim` vary (read from a checkpoint's shapes, so small test VAEs load)."""
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def space_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


class _Progress:
    def __init__(self, total: int, callback: ProgressCallback | None):
        self.done, self.total, self.callback = 0, total, callback

    def step(self):
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


class WanVAE(nn.Module):
    """State-dict keys equal the official `WanVAE_` (`encoder.*`, `conv1`, `conv2`, `decoder.*`)."""

    def __init__(self, config: WanVAEConfig = WanVAEConfig(), *, device=None, dtype=torch.float32, operations=nn):
        super().__init__()
        self.config = config
        c, kw = config, dict(device=device, dtype=dtype, operations=operations)
        self.encoder = Encoder3d(c.dim, 2 * c.z_dim, c.dim_mult, c.num_res_blocks, c.temporal_downsample, **kw)
        self.conv1 = operations.Conv3d(2 * c.z_dim, 2 * c.z_dim, 1, device=device, dtype=dtype)
        self.conv2 = operations.Conv3d(c.z_dim, c.z_dim, 1, device=device, dtype=dtype)
        self.decoder = Decoder3d(c.dim, c.z_dim, c.dim_mult, c.num_res_blocks, c.temporal_downsample[::-1], **kw)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @classmethod
    def from_state_dict(cls, state_dict: dict, *, device="cpu", dtype=torch.float32) -> "WanVAE":
        return _build(_DictSource(state_dict), "the given state dict", device, dtype)

    # -- latent statistics (official formulas, with scale = 1 / std) ------------------------------------------

    @property
    def output_dtype(self) -> torch.dtype:
        """Latents, statistics and decoded video: float32, or float64 for a float64 (reference) VAE."""
        return torch.promote_types(self.dtype, torch.float32)

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(dtype=self.output_dtype, device=self.device)
        shape = (1, self.config.z_dim, 1, 1, 1)
        return torch.tensor(LATENT_MEAN, **kw).view(shape), 1.0 / torch.tensor(LATENT_STD, **kw).view(shape)

    # -- encode -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int = 64,
               on_progress: ProgressCallback | None = None) -> torch.Tensor:
        """`[B, 3, F, H, W]` in [-1, 1] -> latents `(mu - mean) / std`, `[B, 16, 1 + (F-1)//4, H/8, W/8]`, in
        `output_dtype`.

        tile_size / tile_overlap (pixels, multiples of 8): encode in overlapping spatial tiles, blended."""
        self._check_video(video)
        s, t = self.config.space_factor, self.config.time_factor
        return self._run_tiles(self._encode_clip, video.to(device=self.device, dtype=self.dtype),
                               grid=(video.shape[3] // s, video.shape[4] // s), frames=1 + (video.shape[2] - 1) // t,
                               tile_size=tile_size, tile_overlap=tile_overlap, on_progress=on_progress,
                               in_scale=s, out_scale=1)

    def _encode_clip(self, x: torch.Tensor, progress: _Progress) -> torch.Tensor:
        t = self.config.time_factor
        chunks = [x[:, :, :1]] + [x[:, :, i:i + t] for i in range(1, x.shape[2], t)]
        cache, features = CausalCache(), []
        for chunk in chunks:
            features.append(self.encoder(chunk, cache))
            progress.step()
        mu = self.conv1(torch.cat(features, dim=2))[:, :self.config.z_dim]
        mean, inv_std = self._stats()
        return (mu.to(self.output_dtype) - mean) * inv_std

    # -- decode -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int = 64,
               on_progress: ProgressCallback | None = None) -> torch.Tensor:
        """Normalised latents `[B, 16, T, h, w]` -> video `[B, 3, 1 + 4(T-1), 8h, 8w]` clamped to [-1, 1], in
        `output_dtype`.

        tile_size / tile_overlap (pixels, multiples of 8): decode in overlapping spatial tiles, blended."""
        self._check_latents(latents)
        video = self._run_tiles(self._decode_clip, latents.to(device=self.device), grid=tuple(latents.shape[3:]),
                                frames=latents.shape[2], tile_size=tile_size, tile_overlap=tile_overlap,
                                on_progress=on_progress, in_scale=1, out_scale=self.config.space_factor)
        return video.clamp_(-1.0, 1.0)

    def _decode_clip(self, z: torch.Tensor, progress: _Progress) -> torch.Tensor:
        mean, inv_std = self._stats()
        x = self.conv2((z.to(self.output_dtype) / inv_std + mean).to(self.dtype))
        cache, frames = CausalCache(), []
        for i in range(x.shape[2]):
            frames.append(self.decoder(x[:, :, i:i + 1], cache).to(self.output_dtype))
            progress.step()
        return torch.cat(frames, dim=2)

    # -- tiles, progress and input checks -------------------------------------------------------------------

    def _check_video(self, video: torch.Tensor):
        s, t = self.config.space_factor, self.config.time_factor
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"VAE encode expects a video tensor [B, 3, F, H, W] in [-1, 1], got {got}.")
        f, h, w = video.shape[2:]
        if f < 1:
            raise ValueError("VAE encode got a video with no frames.")
        if (f - 1) % t != 0:
            shorter, longer = 1 + (f - 1) // t * t, 1 + -(-(f - 1) // t) * t
            raise ValueError(f"VAE encode needs 1 + {t}k frames (1, 5, 9, ..., 81), got {f}; "
                             f"trim the clip to {shorter} frames or pad it to {longer}.")
        if h % s or w % s:
            raise ValueError(f"VAE encode needs height and width that are multiples of {s}, got {h}x{w}; "
                             f"resize or crop to {h // s * s}x{w // s * s}.")

    def _check_latents(self, latents: torch.Tensor):
        z = self.config.z_dim
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != z:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"VAE decode expects latents [B, {z}, T, h, w], got {got}.")

    def _run_tiles(self, clip_fn, x: torch.Tensor, *, grid: tuple[int, int], frames: int, tile_size: int | None,
                   tile_overlap: int, on_progress: ProgressCallback | None, in_scale: int, out_scale: int):
        """Run `clip_fn(tile, progress)` over each spatial tile through the whole clip, and blend."""
        tile, overlap = self._tile_cells(tile_size, tile_overlap, grid)
        progress = _Progress(frames * count_tiles(grid, tile, overlap), on_progress)
        return run_tiled(lambda part: clip_fn(part, progress), x, grid=grid, tile=tile, overlap=overlap,
                         in_scale=in_scale, out_scale=out_scale)

    def _tile_cells(self, tile_size: int | None, tile_overlap: int, grid: tuple[int, int]) -> tuple[int, int]:
        """Tile size and overlap in latent cells (no tiling: one tile covering the grid)."""
        if tile_size is None:
            return max(grid), 0
        s = self.config.space_factor
        if tile_size % s or tile_overlap % s or tile_size <= 0 or not 0 <= tile_overlap < tile_size:
            raise ValueError(f"VAE tiling needs tile_size and tile_overlap in pixels, multiples of {s}, with "
                             f"0 <= tile_overlap < tile_size; got tile_size={tile_size}, "
                             f"tile_overlap={tile_overlap}.")
        return tile_size // s, tile_overlap // s


# -- loading ---------------------------------------------------------------------------------------------------


class _DictSource:
    """A state dict behind the same small interface as `CheckpointReader` (keys, shape, get)."""

    def __init__(self, state_dict: dict):
        self._sd = state_dict

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]


def _find_prefix(keys: list[str], name: str) -> str:
    for prefix in KEY_PREFIXES:
        if prefix + "encoder.conv1.weight" in keys:
            return prefix
    if any(k.endswith("patch_embedding.weight") or ".blocks.0." in k or k.startswith("blocks.0.") for k in keys):
        what = "a Wan diffusion model (DiT); load it with the model loader, and choose the VAE file here"
    else:
        what = f"something else (keys like {sorted(keys)[:3]})"
    raise ValueError(f"{name} is not a Wan 2.1 VAE: it has no 'encoder.conv1.weight' (optionally prefixed 'vae.' "
                     f"or 'first_stage_model.'). It looks like {what}. Expected e.g. 'Wan2.1_VAE.pth' or "
                     f"'wan_2.1_vae.safetensors'.")


def _config_from_shapes(source, prefix: str, name: str) -> WanVAEConfig:
    conv_in = source.shape(prefix + "encoder.conv1.weight")
    if len(conv_in) != 5 or conv_in[1] != 3:
        raise ValueError(f"{name}: 'encoder.conv1.weight' has shape {conv_in}, expected (dim, 3, 3, 3, 3) for the "
                         f"Wan 2.1 VAE (the Wan 2.2 VAE, with 12 input channels, is not supported).")
    if prefix + "conv2.weight" not in source.keys():
        raise ValueError(f"{name} is missing '{prefix}conv2.weight'; the Wan 2.1 VAE file is incomplete.")
    z_dim = source.shape(prefix + "conv2.weight")[0]
    if z_dim != len(LATENT_MEAN):
        raise ValueError(f"{name} has {z_dim} latent channels; the Wan 2.1 VAE (and its published latent "
                         f"statistics) has {len(LATENT_MEAN)}.")
    return WanVAEConfig(dim=conv_in[0], z_dim=z_dim)


def _check_keys(expected: dict[str, torch.Size], source, prefix: str, name: str):
    found = {k[len(prefix):] for k in source.keys() if k.startswith(prefix)}
    problems = []
    missing = sorted(set(expected) - found)
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
    unexpected = sorted(found - set(expected))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    wrong = [(k, tuple(v), source.shape(prefix + k)) for k, v in expected.items()
             if k in found and tuple(v) != tuple(source.shape(prefix + k))]
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. '{wrong[0][0]}': expected {wrong[0][1]}, "
                        f"found {wrong[0][2]})")
    if problems:
        raise ValueError(f"{name} does not match the Wan 2.1 VAE layout: {'; '.join(problems)}. The file is "
                         f"incomplete or a different VAE; use the official Wan 2.1 VAE.")


def _build(source, name: str, device, dtype: torch.dtype) -> WanVAE:
    keys = source.keys()
    prefix = _find_prefix(keys, name)
    config = _config_from_shapes(source, prefix, name)
    model = WanVAE(config, device="meta", dtype=dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(expected, source, prefix, name)
    weights = {k: checked_tensor(source.get(prefix + k), prefix + k, name, device).to(dtype=dtype) for k in expected}
    model.load_state_dict(weights, assign=True)
    return model.eval().requires_grad_(False)


def load_wan_vae(path: str, *, device="cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """Load the Wan 2.1 VAE from `.safetensors` (read tensor by tensor) or `.pth` (weights only).

    Keys may carry a `vae.` or `first_stage_model.` prefix. Raises ValueError naming the file when it is not a
    Wan 2.1 VAE or is incomplete."""
    return _build(CheckpointReader(path), f"'{path}'", device, dtype)
