"""HuMo's audio conditioning tensors from Whisper hidden states (docs/NOTES.md §4.2).

`humo_bands`: 33 hidden states at 50 fps -> 5 bands at 25 fps (HuMo `audio_emb_enc`).
`humo_audio_windows`: one 8-frame window of bands per latent frame (HuMo `get_audio_emb_window`),
plus zero windows for the reference latent frames appended at the end (generate.py:533-535).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BAND_LAYERS = ((0, 8), (8, 16), (16, 24), (24, 32), (32, 33))   # mean over each range; the last is hs 32
WINDOW = 8
AUDIO_SHIFT = 2


def resample_50_to_25(features: torch.Tensor) -> torch.Tensor:
    """`[T, C]` at 50 fps -> `[int(T / 50 * 25), C]`, linear with align_corners=True.

    The length is computed exactly as HuMo does (`int(T / 50.0 * 25)`), float rounding included:
    T = 58 gives 28, not 29.
    """
    out_len = int(features.shape[0] / 50.0 * 25)
    if out_len < 1:
        raise ValueError(f"need at least 2 audio frames at 50 fps (40 ms) to make one at 25 fps, got {features.shape[0]}")
    return F.interpolate(features.T[None], size=out_len, mode="linear", align_corners=True)[0].T


def humo_bands(hidden: torch.Tensor) -> torch.Tensor:
    """`[T25, 5, C]` bands from Whisper hidden states `[T50, 33, C]`: means of layers 0-7, 8-15, 16-23,
    24-31 and layer 32, each resampled 50 -> 25 fps."""
    if hidden.dim() != 3 or hidden.shape[1] != BAND_LAYERS[-1][1]:
        raise ValueError(f"expected Whisper-large-v3 hidden states [T50, 33, C], got {tuple(hidden.shape)}")
    return torch.stack([resample_50_to_25(hidden[:, a:b].mean(dim=1)) for a, b in BAND_LAYERS], dim=1)


def humo_window_indices(n_latent_frames: int, start: int = 0) -> torch.Tensor:
    """`[n_latent_frames, 8]` 25-fps frame index per window slot; -1 marks a forced zero slot.

    Latent 0 covers `[zero x3, start-2 .. start+2]`; latent i >= 1 covers `start+4i-5 .. start+4i+2`.
    A continuation window (long video) starts at `start + 4 * (n_latent_frames - 1) + 1`.
    """
    if n_latent_frames < 1:
        raise ValueError(f"n_latent_frames must be >= 1, got {n_latent_frames}")
    slots = torch.arange(WINDOW)
    first = torch.where(slots < 3, -1, start + slots - 5)
    rest = start + 4 * torch.arange(1, n_latent_frames)[:, None] - 5 + slots
    return torch.cat([first[None], rest])


def humo_audio_windows(bands: torch.Tensor, n_latent_frames: int, n_ref_frames: int = 0, *,
                       start: int = 0) -> torch.Tensor:
    """`[n_latent_frames + n_ref_frames, 8, 5, C]` windows of `bands` `[T25, 5, C]`.

    Frames outside `[0, T25)` are zero vectors (not clamped), as in HuMo; the reference latent frames,
    which sit at the end of the latent sequence, get all-zero windows.
    """
    if bands.dim() != 3:
        raise ValueError(f"expected bands [T25, 5, C], got {tuple(bands.shape)}")
    if n_ref_frames < 0:
        raise ValueError(f"n_ref_frames must be >= 0, got {n_ref_frames}")
    t = bands.shape[0]
    idx = humo_window_indices(n_latent_frames, start).to(bands.device)
    idx = torch.where((idx >= 0) & (idx < t), idx, t)        # row t of the padded table is zeros
    table = torch.cat([bands, bands.new_zeros(1, *bands.shape[1:])])
    windows = table[idx]
    return torch.cat([windows, bands.new_zeros(n_ref_frames, *windows.shape[1:])])
