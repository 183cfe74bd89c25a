"""Audio preparation for the InfiniteTalk audio encoder: mono, 16 kHz, loudness (docs/NOTES.md §3.4).

The official pipeline reads audio with `librosa.load(path, sr=16000)` (channel mean, then band-limited
resampling) and normalises it to -23 LUFS with pyloudnorm (ITU-R BS.1770-4; skipped when |loudness| > 100,
e.g. silence). Both are re-implemented here with torch only (no librosa / torchaudio / scipy):

- resampling: Kaiser-windowed sinc, evaluated per polyphase phase, so any pair of integer rates works;
  the pass band is flat to 0.95 of the lower Nyquist frequency and aliases are attenuated by about 100 dB.
- loudness: pyloudnorm's K-weighting (two RBJ biquads computed for the actual sample rate: high shelf
  +4 dB at 1500 Hz, Q 1/sqrt(2); high pass 38 Hz, Q 0.5), 400 ms blocks with 75 % overlap, absolute gate
  -70 LUFS, relative gate -10 LU, with pyloudnorm's block boundaries and gate comparisons.
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F

from ..wanvideo.checkpoint import nonfinite_count

TARGET_RATE = 16000
TARGET_LOUDNESS = -23.0
BLOCK_SECONDS = 0.4          # BS.1770 gating block
CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)   # L, R, C, Ls, Rs

# Resampling filter: zero crossings of the sinc on each side, pass-band edge relative to the lower Nyquist
# frequency, Kaiser beta (~ -90 dB side lobes). Polyphase banks larger than _MAX_BANK taps (rates with a tiny
# common divisor, e.g. 44101 Hz) are applied by gathering taps per output sample instead of one convolution.
_ZERO_CROSSINGS = 48
_ROLLOFF = 0.95
_KAISER_BETA = 8.6
_MAX_BANK = 1 << 22
_GATHER_CHUNK = 8192
MIN_SAMPLE_RATE = 1000     # below any real audio format's rate (telephony is 8 kHz)


class AudioInputError(ValueError):
    """Audio that cannot be used, with a message naming the input and what to do."""


# ----------------------------------------------------------------------------------------------
# Validation and mono / 16 kHz conversion
# ----------------------------------------------------------------------------------------------

def _as_rate(sample_rate, name: str) -> int:
    """A sample rate as a positive int (numpy integers and integral floats accepted)."""
    try:
        rate = operator.index(sample_rate)
    except TypeError:
        rate = int(sample_rate) if isinstance(sample_rate, float) and sample_rate.is_integer() else 0
    if isinstance(sample_rate, bool) or rate <= 0:
        raise AudioInputError(f"{name}: sample rate must be a positive integer number of Hz, got {sample_rate!r}.")
    if rate < MIN_SAMPLE_RATE:  # 8000 samples 'at 1 Hz' would resample to 2 hours of audio
        raise AudioInputError(f"{name}: sample rate {rate} Hz is not an audio rate (at least {MIN_SAMPLE_RATE} Hz, "
                              f"usually 16000-48000); pass the rate the waveform was recorded at.")
    return rate


def check_waveform(waveform: torch.Tensor, sample_rate: int, *, fps: float = 25.0, name: str = "audio") -> None:
    """Reject empty, non-finite or shorter-than-one-video-frame audio with an actionable message."""
    sample_rate = _as_rate(sample_rate, name)
    if waveform.numel() == 0 or waveform.shape[-1] == 0:
        raise AudioInputError(f"{name} is empty (waveform shape {tuple(waveform.shape)}); connect an audio clip "
                              f"that contains sound.")
    bad = nonfinite_count(waveform)  # one reduction, no waveform-sized mask (a dubbing track can be hours)
    if bad:
        raise AudioInputError(f"{name} contains {bad} NaN/inf samples out of {waveform.numel()}; the file is corrupt "
                              f"or an upstream node produced invalid values. Re-export or re-decode the audio.")
    samples = waveform.shape[-1]
    if samples * fps < sample_rate:
        raise AudioInputError(f"{name} lasts {1000 * samples / sample_rate:.1f} ms ({samples} samples at "
                              f"{sample_rate} Hz), shorter than one video frame at {fps:g} fps "
                              f"({1000 / fps:.1f} ms); use a longer clip.")


def _unpack(audio, sample_rate: int | None, name: str) -> tuple[torch.Tensor, int]:
    """Accept a ComfyUI AUDIO dict ({waveform [B, C, T], sample_rate}) or a tensor [T] / [C, T]."""
    if isinstance(audio, dict):
        if "waveform" not in audio or "sample_rate" not in audio:
            raise AudioInputError(f"{name}: expected a ComfyUI AUDIO dict with 'waveform' and 'sample_rate', got keys "
                                  f"{sorted(audio)}.")
        waveform, sample_rate = audio["waveform"], audio["sample_rate"]
        if not isinstance(waveform, torch.Tensor) or waveform.dim() != 3:
            raise AudioInputError(f"{name}: AUDIO waveform must be a [batch, channels, samples] tensor, got "
                                  f"{getattr(waveform, 'shape', type(waveform))}.")
        if waveform.shape[0] != 1:
            raise AudioInputError(f"{name} holds a batch of {waveform.shape[0]} clips; give one clip per input "
                                  f"(split the batch, one speaker per audio input).")
        waveform = waveform[0]
        if waveform.shape[0] > 64 and waveform.shape[0] > waveform.shape[1]:
            raise AudioInputError(f"{name}: the waveform has {waveform.shape[0]} channels of {waveform.shape[1]} "
                                  f"samples; it looks channels last. ComfyUI AUDIO is [batch, channels, samples] "
                                  f"(use waveform.transpose(1, 2)).")
    elif isinstance(audio, torch.Tensor):
        if sample_rate is None:
            raise AudioInputError(f"{name}: a bare waveform tensor needs its sample_rate.")
        if audio.dim() not in (1, 2):
            raise AudioInputError(f"{name}: expected a waveform [samples] or [channels, samples], got shape "
                                  f"{tuple(audio.shape)}.")
        waveform = audio
    else:
        raise AudioInputError(f"{name}: expected a ComfyUI AUDIO dict or a waveform tensor, got {type(audio).__name__}.")
    return waveform, _as_rate(sample_rate, name)


def to_mono_16k(audio, sample_rate: int | None = None, *, fps: float = 25.0, name: str = "audio") -> torch.Tensor:
    """Mono float32 waveform `[T16]` at 16 kHz: channel mean (as librosa), then band-limited resampling."""
    waveform, sample_rate = _unpack(audio, sample_rate, name)
    check_waveform(waveform, sample_rate, fps=fps, name=name)
    mono = waveform.to(torch.float64).reshape(-1, waveform.shape[-1]).mean(0)
    return resample(mono.to(torch.float32), sample_rate, TARGET_RATE)


# ----------------------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------------------

def _kaiser(u: torch.Tensor, beta: float) -> torch.Tensor:
    inside = 1 - u * u
    window = torch.special.i0(beta * inside.clamp(min=0).sqrt()) / torch.special.i0(torch.tensor(beta, dtype=u.dtype))
    return torch.where(inside >= 0, window, torch.zeros_like(u))


def _phase_kernels(up: int, down: int) -> tuple[torch.Tensor, int]:
    """Windowed-sinc taps `[up, 2h]` (float64) for each output phase; tap j of phase p weighs input sample
    floor(c) - h + 1 + j, where c = (m·up + p)·down/up is the output position in input samples.

    Each phase is normalised to unit DC gain so that no phase-dependent gain ripple (a spur) appears."""
    cutoff = 0.5 * _ROLLOFF * min(1.0, up / down)          # cycles per input sample
    half_width = _ZERO_CROSSINGS / (2 * cutoff)            # input samples
    h = math.ceil(half_width)
    taps = torch.arange(-h + 1, h + 1, dtype=torch.float64)
    frac = (torch.arange(up, dtype=torch.int64) * down % up).to(torch.float64) / up
    t = taps[None, :] - frac[:, None]
    kernels = 2 * cutoff * torch.sinc(2 * cutoff * t) * _kaiser(t / half_width, _KAISER_BETA)
    return kernels / kernels.sum(dim=1, keepdim=True), h


def _apply_bank(x: torch.Tensor, kernels: torch.Tensor, h: int, up: int, down: int, n_out: int) -> torch.Tensor:
    """All phases in one strided convolution: phase p's taps sit at offset floor(p·down/up) of a
    (2h + down)-tap kernel, so frame f yields outputs f·up .. f·up + up - 1."""
    bank = x.new_zeros(up, 1, 2 * h + down)
    for p in range(up):
        offset = p * down // up
        bank[p, 0, offset:offset + 2 * h] = kernels[p]
    padded = F.pad(x[:, None, :], (h - 1, h + down))
    frames = F.conv1d(padded, bank, stride=down)            # [N, up, ceil(T / down)]
    return frames.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]


def _apply_gather(x: torch.Tensor, kernels: torch.Tensor, h: int, up: int, down: int, n_out: int) -> torch.Tensor:
    """Same sums as `_apply_bank`, gathering the 2h taps of each output sample (for rates whose bank is huge)."""
    padded = F.pad(x, (h - 1, h))
    taps = torch.arange(2 * h, device=x.device)
    out = x.new_empty(x.shape[0], n_out)
    for start in range(0, n_out, _GATHER_CHUNK):
        n = torch.arange(start, min(start + _GATHER_CHUNK, n_out), device=x.device)
        index = (n * down // up)[:, None] + taps[None, :]
        out[:, start:start + n.numel()] = (padded[:, index] * kernels[n % up]).sum(-1)
    return out


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling of `[..., T]` to `[..., ceil(T·new/orig)]` (librosa's output length), in the
    waveform's dtype. Signals outside [-1, 1] are not clipped."""
    orig_rate, new_rate = _as_rate(orig_rate, "resample"), _as_rate(new_rate, "resample")
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    if up == down:
        return waveform.clone()
    samples = waveform.shape[-1]
    n_out = -(-samples * up // down)
    kernels, h = _phase_kernels(up, down)
    kernels = kernels.to(device=waveform.device, dtype=waveform.dtype)
    flat = waveform.reshape(-1, samples)
    apply = _apply_bank if up * (2 * h + down) <= _MAX_BANK else _apply_gather
    return apply(flat, kernels, h, up, down, n_out).reshape(*waveform.shape[:-1], n_out)


# ----------------------------------------------------------------------------------------------
# Loudness (ITU-R BS.1770-4 as implemented by pyloudnorm)
# ----------------------------------------------------------------------------------------------

def k_weighting_coefficients(sample_rate: int) -> list[tuple[tuple[float, float, float], tuple[float, float, float]]]:
    """pyloudnorm's K-weighting biquads `[(b, a), (b, a)]` (a0 = 1) for this sample rate: RBJ high shelf
    (+4 dB, 1500 Hz, Q 1/sqrt 2) then RBJ high pass (38 Hz, Q 0.5)."""
    gain = 10 ** (4.0 / 40)
    w0 = 2 * math.pi * 1500.0 / sample_rate
    alpha = math.sin(w0) / (2.0 * (1 / math.sqrt(2)))
    cos, root = math.cos(w0), math.sqrt(gain)
    shelf_b = (gain * ((gain + 1) + (gain - 1) * cos + 2 * root * alpha),
               -2 * gain * ((gain - 1) + (gain + 1) * cos),
               gain * ((gain + 1) + (gain - 1) * cos - 2 * root * alpha))
    shelf_a = ((gain + 1) - (gain - 1) * cos + 2 * root * alpha,
               2 * ((gain - 1) - (gain + 1) * cos),
               (gain + 1) - (gain - 1) * cos - 2 * root * alpha)
    w0 = 2 * math.pi * 38.0 / sample_rate
    alpha, cos = math.sin(w0) / (2 * 0.5), math.cos(w0)
    pass_b = ((1 + cos) / 2, -(1 + cos), (1 + cos) / 2)
    pass_a = (1 + alpha, -2 * cos, 1 - alpha)
    return [(tuple(v / a[0] for v in b), tuple(v / a[0] for v in a))
            for b, a in ((shelf_b, shelf_a), (pass_b, pass_a))]


def _impulse_response(b, a, tolerance: float = 1e-20) -> torch.Tensor:
    """Impulse response of a stable biquad, long enough that the dropped tail is below `tolerance`."""
    pole_radius = max(abs(r) for r in _quadratic_roots(a[1], a[2]))
    length = 3 + math.ceil(math.log(tolerance) / math.log(pole_radius)) if pole_radius > 0 else 3
    y1 = y2 = 0.0
    response = []
    for n in range(length):
        x0 = b[n] if n < 3 else 0.0
        y0 = x0 - a[1] * y1 - a[2] * y2
        response.append(y0)
        y1, y2 = y0, y1
    return torch.tensor(response, dtype=torch.float64)


def _quadratic_roots(p: float, q: float) -> tuple[complex, complex]:
    """Roots of z^2 + p z + q."""
    disc = complex(p * p / 4 - q) ** 0.5
    return -p / 2 + disc, -p / 2 - disc


@functools.lru_cache(maxsize=8)
def _k_weighting_response(sample_rate: int) -> torch.Tensor:
    """Impulse response of the two K-weighting biquads in cascade."""
    (b1, a1), (b2, a2) = k_weighting_coefficients(sample_rate)
    return _fft_convolve(_impulse_response(b1, a1), _impulse_response(b2, a2))


def k_weight(x: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """K-weighted `[C, T]` float64 signal, equal to running both biquads from rest (scipy.signal.lfilter):
    a causal FFT convolution with the cascade's impulse response, truncated where it falls below 1e-20."""
    return _fft_convolve(x, _k_weighting_response(sample_rate).to(x.device))[..., :x.shape[-1]]


def _fft_convolve(x: torch.Tensor, h: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Full linear convolution of `[..., T]` with `h`, by overlap-add over chunks (bounded FFT memory)."""
    out = x.new_zeros(*x.shape[:-1], x.shape[-1] + h.numel() - 1)
    chunk = min(chunk, x.shape[-1])
    size = 1 << (chunk + h.numel() - 2).bit_length()
    spectrum = torch.fft.rfft(h, size)
    for start in range(0, x.shape[-1], chunk):
        piece = x[..., start:start + chunk]
        n = piece.shape[-1] + h.numel() - 1
        out[..., start:start + n] += torch.fft.irfft(torch.fft.rfft(piece, size) * spectrum, size)[..., :n]
    return out


def integrated_loudness(x: torch.Tensor, sample_rate: int) -> float:
    """Gated integrated loudness (LUFS) of `[T]` (mono) or `[C, T]` (C <= 5, order L R C Ls Rs); -inf for silence.

    Block j covers samples [int(0.4·0.25·j·sr), int(0.4·(0.25·j + 1)·sr)) and the block count is
    round((T/sr - 0.4) / 0.1) + 1, exactly as pyloudnorm computes them."""
    if x.dim() not in (1, 2) or (x.dim() == 2 and x.shape[0] > len(CHANNEL_WEIGHTS)):
        raise AudioInputError(f"integrated_loudness: expected [samples] or [channels <= 5, samples], got shape "
                              f"{tuple(x.shape)}.")
    signal = x.to(torch.float64).reshape(-1, x.shape[-1])
    samples = signal.shape[-1]
    if samples < BLOCK_SECONDS * sample_rate:
        raise AudioInputError(f"integrated_loudness: {samples} samples at {sample_rate} Hz are shorter than one "
                              f"{BLOCK_SECONDS * 1000:.0f} ms gating block; loudness is undefined for such a clip.")
    if nonfinite_count(signal):
        raise AudioInputError("integrated_loudness: the signal contains NaN/inf samples.")
    weighted = k_weight(signal, sample_rate)
    energy = F.pad(weighted.square().cumsum(-1), (1, 0))        # [C, T + 1]
    step = 1.0 - 0.75
    n_blocks = int(round((samples / sample_rate - BLOCK_SECONDS) / (BLOCK_SECONDS * step))) + 1
    lower = [int(BLOCK_SECONDS * (j * step) * sample_rate) for j in range(n_blocks)]
    upper = [min(int(BLOCK_SECONDS * (j * step + 1) * sample_rate), samples) for j in range(n_blocks)]
    z = (energy[:, upper] - energy[:, lower]) / (BLOCK_SECONDS * sample_rate)   # [C, blocks]
    weights = torch.tensor(CHANNEL_WEIGHTS[: signal.shape[0]], dtype=torch.float64)[:, None]
    block_loudness = -0.691 + 10 * torch.log10((weights * z).sum(0))
    above_absolute = block_loudness >= -70.0
    if not above_absolute.any():
        return float("-inf")
    relative_gate = -0.691 + 10 * math.log10(float((weights[:, 0] * z[:, above_absolute].mean(1)).sum())) - 10.0
    gated = (block_loudness > relative_gate) & (block_loudness > -70.0)
    if not gated.any():
        return float("-inf")
    return -0.691 + 10 * math.log10(float((weights[:, 0] * z[:, gated].mean(1)).sum()))


def normalize_loudness(x: torch.Tensor, sample_rate: int, target: float = TARGET_LOUDNESS) -> torch.Tensor:
    """Scale `x` to `target` LUFS (pyloudnorm.normalize.loudness: a pure gain, no clipping).

    Returned unchanged, as the official code does, when the measured loudness is not finite or |loudness| > 100
    (silence, near-silence); also when the clip is shorter than one 400 ms gating block, where the official
    code would fail instead: such a clip has no defined loudness."""
    if x.shape[-1] < BLOCK_SECONDS * sample_rate:
        return x
    loudness = integrated_loudness(x, sample_rate)
    if not math.isfinite(loudness) or abs(loudness) > 100:
        return x
    gain = 10.0 ** ((target - loudness) / 20.0)
    return (x.to(torch.float64) * gain).to(x.dtype)
