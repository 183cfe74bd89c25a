"""HuMo's audio conditioning tensors from Whisper hidden states (docs/NOTES.md §4.2).

`humo_bands`: 33 hidden states at 50 fps -> 5 bands at 25 fps (HuMo `audio_emb_enc`).
`humo_bands_streamed`: the same from Whisper's windows one at a time, holding only the bands (long audio).
`humo_audio_windows`: one 8-frame window of bands per latent frame (HuMo `get_audio_emb_window`),
plus zero windows for the reference latent frames appended at the end (generate.py:533-535).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BAND_LAYERS = ((0, 8), (8, 16), (16, 24), (24, 32), (32, 33))   # mean over each range; the last is hs 32
WINDOW = 8
AUDIO_SHIFT = 2


def _resampled_length(t50: int) -> int:
    out_len = int(t50 / 50.0 * 25)
    if out_len < 1:
        raise ValueError(f"need at least 2 audio frames at 50 fps (40 ms) to make one at 25 fps, got {t50}")
    return out_len


def resample_50_to_25(features: torch.Tensor) -> torch.Tensor:
    """`[T, C]` at 50 fps -> `[int(T / 50 * 25), C]`, linear with align_corners=True.

    The length is computed exactly as HuMo does (`int(T / 50.0 * 25)`), float rounding included:
    T = 58 gives 28, not 29.
    """
    out_len = _resampled_length(features.shape[0])
    return F.interpolate(features.T[None], size=out_len, mode="linear", align_corners=True)[0].T


def _check_hidden(hidden: torch.Tensor) -> None:
    if hidden.dim() != 3 or hidden.shape[1] != BAND_LAYERS[-1][1]:
        raise ValueError(f"expected Whisper-large-v3 hidden states [T50, 33, C], got {tuple(hidden.shape)}")


def humo_bands(hidden: torch.Tensor) -> torch.Tensor:
    """`[T25, 5, C]` bands from Whisper hidden states `[T50, 33, C]`: means of layers 0-7, 8-15, 16-23,
    24-31 and layer 32, each resampled 50 -> 25 fps."""
    _check_hidden(hidden)
    return torch.stack([resample_50_to_25(hidden[:, a:b].mean(dim=1)) for a, b in BAND_LAYERS], dim=1)


def band_means(hidden: torch.Tensor) -> torch.Tensor:
    """`[T50, 5, C]`: the means of `humo_bands` before resampling."""
    _check_hidden(hidden)
    return torch.stack([hidden[:, a:b].mean(dim=1) for a, b in BAND_LAYERS], dim=1)


def _linear_taps(t_in: int, t_out: int, dtype: torch.dtype):
    """Per output frame: the two input frames and their weights of `F.interpolate(mode="linear",
    align_corners=True)`, computed as PyTorch computes them (scale and positions in the input's precision)."""
    # a float64 quotient rounded to float32 is the correctly rounded float32 quotient, as PyTorch's
    scale = torch.tensor((t_in - 1) / (t_out - 1) if t_out > 1 else 0.0, dtype=dtype)
    position = scale * torch.arange(t_out, dtype=dtype)
    lo = position.floor().long().clamp(max=t_in - 1)
    weight_hi = (position - lo).clamp(0.0, 1.0)
    hi = lo + (lo < t_in - 1).long()
    return lo, hi, 1.0 - weight_hi, weight_hi


def humo_bands_streamed(windows, t50: int) -> torch.Tensor:
    """`humo_bands(torch.cat(windows))` for hidden-state windows `[t, 33, C]` (in order, `t50` frames in all),
    reducing each window as it arrives: besides the output `[T25, 5, C]` it holds one window and its band
    means, never the 33 layers of the whole clip (30 GB for an hour of audio).

    Band means are bit-identical; the 50 -> 25 fps blend `lo * w_lo + hi * w_hi` uses F.interpolate's own
    frames and weights and the same fused multiply-add, so on CPU the bands are bit-identical too (measured on
    x86 AVX2, torch 2.13); a build that rounds that sum differently differs by <= 1 float32 ulp of the inputs.
    """
    t_out = _resampled_length(t50)
    out = held = None
    held_from = received = done = 0               # `held`: band means of 50 fps frames held_from .. received-1
    for window in windows:
        means = band_means(window)
        if out is None:
            out = means.new_empty(t_out, *means.shape[1:])
            lo, hi, w_lo, w_hi = _linear_taps(t50, t_out, torch.promote_types(means.dtype, torch.float32))
        held = means if held is None else torch.cat([held, means])
        received += means.shape[0]
        if received > t50:
            raise ValueError(f"hidden-state windows hold more than the {t50} frames announced")
        ready = int(torch.searchsorted(hi, received))          # outputs whose both input frames have arrived
        rows = slice(done, ready)
        low, high = held[lo[rows] - held_from], held[hi[rows] - held_from]
        weight_low, weight_high = (w[rows, None, None].to(means.dtype) for w in (w_lo, w_hi))
        # low * w_lo + high * w_hi with F.interpolate's rounding: its CPU kernel fuses the first product
        torch.addcmul(high * weight_high, low, weight_low, out=out[rows])
        done = ready
        keep = min(int(lo[done]), received) if done < t_out else received
        held, held_from = held[keep - held_from:].clone(), keep
    if received != t50:
        raise ValueError(f"hidden-state windows hold {received} frames, expected {t50}")
    return out


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
