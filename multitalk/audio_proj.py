"""InfiniteTalk's audio projection: per-video-frame wav2vec2 windows -> 32 audio tokens per latent frame.

docs/NOTES.md §3.2. The VAE packs 4 video frames into each latent frame after the first, so latent frame j >= 1
sees the contiguous audio frames 4j-5 .. 4j+2 (8 of them), gathered from the windows of its video frames.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..wanvideo.modules.fused_ops import layer_norm_modulate
from ..wanvideo.modules import cast_ops


def latent_window_index(window: int, vae_scale: int) -> tuple[list[int], list[int]]:
    """(video frame offset within the group, window position) of each of the `window + vae_scale - 1` vectors
    of a later latent frame: first video frame up to the window centre, the middle frames at the centre, the
    last frame from the centre on."""
    mid = window // 2
    frames = [0] * (mid + 1)
    positions = list(range(mid + 1))
    for f in range(1, vae_scale - 1):
        frames.append(f)
        positions.append(mid)
    frames += [vae_scale - 1] * (window - mid)
    positions += list(range(mid, window))
    return frames, positions


def latent_audio_windows(windows: torch.Tensor, vae_scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-video-frame windows `[P, F, W, layers, C]` (F = 1 + vae_scale*n) into the first frame's
    window `[P, 1, W, layers, C]` and the later latent frames' windows `[P, n, W + vae_scale - 1, layers, C]`."""
    if windows.dim() != 5:
        raise ValueError(f"audio windows must be [speakers, frames, window, layers, channels]; got shape "
                         f"{tuple(windows.shape)}")
    p, f, w = windows.shape[:3]
    if f < 1 or (f - 1) % vae_scale:
        raise ValueError(f"InfiniteTalk needs audio windows for {vae_scale}n+1 video frames (e.g. 81); got {f}. "
                         f"Give as many audio frames as video frames.")
    n = (f - 1) // vae_scale
    offsets, positions = latent_window_index(w, vae_scale)
    frame_idx = 1 + vae_scale * torch.arange(n, device=windows.device)[:, None] + torch.tensor(offsets, device=windows.device)
    later = windows[:, frame_idx, torch.tensor(positions, device=windows.device).expand(n, -1)]
    return windows[:, :1], later


class AudioProjModel(nn.Module):
    """`proj1` (first frame) / `proj1_vf` (later frames) -> relu -> `proj2` -> relu -> `proj3` -> tokens,
    then LayerNorm over each token in float32 (the official autocast(float32) region)."""

    def __init__(self, acfg, *, device=None, dtype=None, operations=cast_ops):
        super().__init__()
        feat = acfg.features_per_frame
        self.context_tokens, self.output_dim = acfg.context_tokens, acfg.output_dim
        self.proj1 = operations.Linear(acfg.audio_window * feat, acfg.intermediate_dim, device=device, dtype=dtype)
        self.proj1_vf = operations.Linear(acfg.window_vf * feat, acfg.intermediate_dim, device=device, dtype=dtype)
        self.proj2 = operations.Linear(acfg.intermediate_dim, acfg.intermediate_dim, device=device, dtype=dtype)
        self.proj3 = operations.Linear(acfg.intermediate_dim, acfg.context_tokens * acfg.output_dim,
                                       device=device, dtype=dtype)
        self.norm = (operations.LayerNorm(acfg.output_dim, device=device, dtype=dtype)
                     if acfg.norm_output else None)

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """first `[P, 1, W, layers, C]`, later `[P, n, W', layers, C]` -> float32 `[P, 1 + n, tokens, output_dim]`."""
        a = torch.relu(self.proj1(first.flatten(2)))
        b = torch.relu(self.proj1_vf(later.flatten(2)))
        h = torch.relu(self.proj2(torch.cat([a, b], dim=1)))
        tokens = self.proj3(h).unflatten(-1, (self.context_tokens, self.output_dim))
        if self.norm is None:
            return tokens.float()
        return layer_norm_modulate(tokens, self.norm.eps, self.norm.weight, self.norm.bias)
