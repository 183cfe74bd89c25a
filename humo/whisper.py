"""Whisper-large-v3 audio ENCODER, its log-mel front end and its loader, without `transformers`.

HuMo conditions on all 33 hidden states of HF `WhisperModel.encoder(..., output_hidden_states=True)`
(docs/NOTES.md §4.2). Numerics follow HF: the hidden states are the embedding output, the outputs of
layers 0..30, and the output of layer 31 AFTER the final `layer_norm` (HF appends the normed state last;
ComfyUI's whisper encoder does the same). The log-mel follows HF `WhisperFeatureExtractor` (torch path):
periodic Hann STFT (centered, reflect padding), last frame dropped, Slaney mel filters, log10 clamped to
max - 8, then (x + 4) / 4.

Layouts: audio `[T]` mono at 16 kHz; mel `[B, n_mels, 2 * num_positions]`; hidden states `[B, P, d]`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..wanvideo.checkpoint import CheckpointReader, checked_tensor
from ..wanvideo.modules.attention import attention, attention_policy

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
MEL_F_MAX = 8000.0
SAMPLES_PER_VIDEO_FRAME = SAMPLE_RATE // 25   # 640: HuMo keeps 2 * (len // 640) frames at 50 fps
WHISPER_HEAD_DIM = 64                         # every published Whisper size uses 64-dim heads


@dataclass(frozen=True)
class WhisperEncoderConfig:
    n_mels: int = 128
    d_model: int = 1280
    num_layers: int = 32
    num_heads: int = 20
    ffn_dim: int = 5120
    num_positions: int = 1500
    eps: float = 1e-5

    @property
    def mel_frames(self) -> int:
        """Mel frames per encoder call (conv2 has stride 2): 3000 = 30 s for large-v3."""
        return 2 * self.num_positions

    @property
    def chunk_samples(self) -> int:
        """16 kHz samples per encoder call: 480000 for large-v3."""
        return self.mel_frames * HOP_LENGTH


WHISPER_LARGE_V3 = WhisperEncoderConfig()


# ----------------------------------------------------------------------------------------------
# Log-mel front end (HF WhisperFeatureExtractor)
# ----------------------------------------------------------------------------------------------

_SLANEY_LOG_HZ = 1000.0           # start of the log region
_SLANEY_LOG_MEL = 15.0            # = 3 * 1000 / 200
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(freq: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    freq = torch.as_tensor(freq, dtype=torch.float64)
    log_part = _SLANEY_LOG_MEL + torch.log(freq.clamp(min=_SLANEY_LOG_HZ) / _SLANEY_LOG_HZ) / _SLANEY_LOG_STEP
    return torch.where(freq >= _SLANEY_LOG_HZ, log_part, 3.0 * freq / 200.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of `hz_to_mel`."""
    mel = torch.as_tensor(mel, dtype=torch.float64)
    log_part = _SLANEY_LOG_HZ * torch.exp(_SLANEY_LOG_STEP * (mel.clamp(min=_SLANEY_LOG_MEL) - _SLANEY_LOG_MEL))
    return torch.where(mel >= _SLANEY_LOG_MEL, log_part, 200.0 * mel / 3.0)


def mel_filterbank(n_mels: int, *, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                   f_max: float = MEL_F_MAX) -> torch.Tensor:
    """float64 `[n_mels, n_fft // 2 + 1]` triangular filters on the Slaney mel scale with Slaney area
    normalisation (librosa / HF `mel_filter_bank(norm="slaney", mel_scale="slaney")`), from 0 Hz to f_max."""
    fft_freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(torch.tensor(f_max))), n_mels + 2, dtype=torch.float64))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_freqs - lower) / (center - lower)
    falling = (upper - fft_freqs) / (upper - center)
    return torch.minimum(rising, falling).clamp(min=0.0) * (2.0 / (upper - lower))


def log_mel_spectrogram(audio_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """float32 `[n_mels, T // 160]` Whisper log-mel of mono 16 kHz audio `[T]`, on the audio's device.

    The max - 8 floor is taken over the whole input, as HF does per (padded) 30 s chunk.
    """
    audio = _mono_1d(audio_16k).float()
    if audio.shape[0] <= N_FFT // 2:
        raise ValueError(f"log_mel_spectrogram needs more than {N_FFT // 2} samples, got {audio.shape[0]}")
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = stft[:, :-1].abs() ** 2
    mel = mel_filterbank(n_mels).to(device=audio.device, dtype=torch.float32) @ power
    log_mel = mel.clamp(min=1e-10).log10()
    log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
    return (log_mel + 4.0) / 4.0


def _mono_1d(audio: torch.Tensor) -> torch.Tensor:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 1:
        shape = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
        raise ValueError(f"expected mono 16 kHz audio as a 1-D tensor [T], got {shape}; average the channels "
                         "and resample to 16 kHz first")
    return audio


# ----------------------------------------------------------------------------------------------
# Encoder (HF WhisperEncoder layout and numerics)
# ----------------------------------------------------------------------------------------------

class WhisperSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, *, device, dtype, operations):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = operations.Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = operations.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        self.v_proj = operations.Linear(d_model, d_model, device=device, dtype=dtype)
        self.out_proj = operations.Linear(d_model, d_model, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # exact whatever the running forward's policy: the audio features feed every later block
        return self.out_proj(attention(q, k, v, policy=attention_policy().exact()).reshape(b, n, -1))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, cfg: WhisperEncoderConfig, *, device, dtype, operations):
        super().__init__()
        self.self_attn = WhisperSelfAttention(cfg.d_model, cfg.num_heads, device=device, dtype=dtype,
                                              operations=operations)
        self.self_attn_layer_norm = operations.LayerNorm(cfg.d_model, eps=cfg.eps, device=device, dtype=dtype)
        self.fc1 = operations.Linear(cfg.d_model, cfg.ffn_dim, device=device, dtype=dtype)
        self.fc2 = operations.Linear(cfg.ffn_dim, cfg.d_model, device=device, dtype=dtype)
        self.final_layer_norm = operations.LayerNorm(cfg.d_model, eps=cfg.eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Whisper audio encoder; `state_dict()` keys are HF's without the `encoder.` prefix."""

    def __init__(self, cfg: WhisperEncoderConfig = WHISPER_LARGE_V3, *, device=None, dtype=torch.float32,
                 operations=nn):
        super().__init__()
        self.config = cfg
        self.conv1 = operations.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1, device=device, dtype=dtype)
        self.conv2 = operations.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1,
                                       device=device, dtype=dtype)
        self.embed_positions = nn.Embedding(cfg.num_positions, cfg.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(cfg, device=device, dtype=dtype, operations=operations)
            for _ in range(cfg.num_layers))
        self.layer_norm = operations.LayerNorm(cfg.d_model, eps=cfg.eps, device=device, dtype=dtype)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All `num_layers + 1` hidden states `[B, P, d]` of log-mel `[B, n_mels, 2P]`, the last one normed."""
        cfg = self.config
        if mel.dim() != 3 or mel.shape[1] != cfg.n_mels or mel.shape[2] != cfg.mel_frames:
            raise ValueError(f"Whisper encoder expects log-mel [B, {cfg.n_mels}, {cfg.mel_frames}] "
                             f"(pad audio to {cfg.chunk_samples} samples), got {tuple(mel.shape)}")
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight.to(x.dtype)
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        states[-1] = self.layer_norm(x)
        return tuple(states)


def hidden_frames(samples: int) -> int:
    """Hidden-state frames (50 fps) HuMo keeps of `samples` at 16 kHz: two per whole 25 fps video frame."""
    return 2 * (samples // SAMPLES_PER_VIDEO_FRAME)


@torch.no_grad()
def whisper_window_states(encoder: WhisperEncoder, audio_16k: torch.Tensor, progress=None):
    """Yield the hidden states `[P, num_layers + 1, d]` of each encoder window in order, HuMo's way
    (audio_processor_whisper.py): chunks of `chunk_samples` (30 s), each zero-padded and log-mel'd on its own,
    encoded, states stacked; the last one cut so that the windows hold `hidden_frames(len)` frames in all.
    On the encoder's device and dtype. One window at a time, so a consumer that reduces each one holds no more.
    `progress(done, total)` is called after each chunk (it may raise to stop, as ComfyUI's Stop does)."""
    audio = _mono_1d(audio_16k)
    n = audio.shape[0]
    frames = hidden_frames(n)
    if frames == 0:
        raise ValueError(f"audio has {n} samples at 16 kHz; HuMo needs at least {SAMPLES_PER_VIDEO_FRAME} "
                         "(one video frame at 25 fps)")
    cfg, device = encoder.config, encoder.conv1.weight.device
    starts = range(0, n, cfg.chunk_samples)
    for done, start in enumerate(starts, 1):
        chunk = audio[start:start + cfg.chunk_samples].to(device)
        chunk = F.pad(chunk, (0, cfg.chunk_samples - chunk.shape[0]))
        states = encoder(log_mel_spectrogram(chunk, cfg.n_mels)[None])
        first = (done - 1) * cfg.num_positions
        window = torch.stack(states, dim=2)[0, :max(frames - first, 0)]
        if progress is not None:
            progress(done, len(starts))
        if window.shape[0]:
            yield window


def whisper_hidden_states(encoder: WhisperEncoder, audio_16k: torch.Tensor, progress=None) -> torch.Tensor:
    """`[hidden_frames(len), num_layers + 1, d]`: all windows of `whisper_window_states` concatenated."""
    return torch.cat(list(whisper_window_states(encoder, audio_16k, progress)))


def hidden_states_from_comfy(output: dict, batch_index: int = 0) -> torch.Tensor:
    """`[T50, L, d]` from ComfyUI's native `AUDIO_ENCODER_OUTPUT` of its Whisper loader.

    That dict holds `encoded_audio_all_layers` (a tuple of L tensors `[B, 1500, d]`, the same states as
    HF's, last one normed) and `audio_samples` (16 kHz sample count). It is truncated to `2 * (samples // 640)`
    as ComfyUI's HuMo node does. ComfyUI encodes only the first 30 s of audio; longer audio keeps 1500 frames.
    """
    if not isinstance(output, dict) or "encoded_audio_all_layers" not in output:
        raise ValueError("expected ComfyUI AUDIO_ENCODER_OUTPUT with 'encoded_audio_all_layers' "
                         "(from the Whisper audio encoder loader)")
    layers = output["encoded_audio_all_layers"]
    if not layers or any(not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape != layers[0].shape
                         for t in layers):
        raise ValueError("'encoded_audio_all_layers' must be a sequence of equally shaped [B, T, C] tensors")
    hidden = torch.stack([t[batch_index] for t in layers], dim=1)
    if "audio_samples" in output:
        hidden = hidden[:2 * (int(output["audio_samples"]) // SAMPLES_PER_VIDEO_FRAME)]
    return hidden


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

_LAYER_KEY = re.compile(r"layers\.(\d+)\.")


def whisper_config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> WhisperEncoderConfig:
    """Infer the encoder config from tensor shapes (keys without the `encoder.` prefix).

    Head count is not visible in shapes; Whisper uses 64-dim heads, so it defaults to `d_model // 64`.
    """
    missing = [k for k in ("conv1.weight", "embed_positions.weight", "layers.0.fc1.weight") if k not in sd]
    if missing:
        raise ValueError(f"Whisper encoder tensors missing: {['encoder.' + k for k in missing]}")
    d_model, n_mels, _ = sd["conv1.weight"].shape
    return WhisperEncoderConfig(
        n_mels=n_mels, d_model=d_model,
        num_layers=1 + max(int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))),
        num_heads=num_heads or max(1, d_model // WHISPER_HEAD_DIM),
        ffn_dim=sd["layers.0.fc1.weight"].shape[0],
        num_positions=sd["embed_positions.weight"].shape[0])


def whisper_encoder_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder tensors of an HF-layout Whisper checkpoint (optional `model.` prefix), prefix removed;
    decoder and head tensors are dropped."""
    for prefix in ("model.encoder.", "encoder."):
        if prefix + "conv1.weight" in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    hint = ""
    if any(k.startswith(("encoder.blocks.", "blocks.")) for k in sd):
        hint = " It looks like an openai-whisper checkpoint; use the Hugging Face (safetensors) release instead."
    raise ValueError("not a Whisper checkpoint in the Hugging Face layout: expected 'model.encoder.conv1.weight' "
                     f"or 'encoder.conv1.weight' (e.g. openai/whisper-large-v3 model.safetensors).{hint}")


def load_whisper_encoder(path: str, *, device="cpu", dtype=torch.float32,
                         num_heads: int | None = None) -> WhisperEncoder:
    """Whisper encoder from an HF-layout `.safetensors` / `.bin` file, in `dtype` on `device`, eval mode."""
    reader = CheckpointReader(path)  # the pack's one reader: safetensors, or .bin/.pt with weights_only
    sd = whisper_encoder_state_dict({k: reader.get(k) for k in reader.keys()})
    sd = {k: checked_tensor(v, k, f"'{path}'") for k, v in sd.items()}
    cfg = whisper_config_from_state_dict(sd, num_heads)
    with torch.device("meta"):
        encoder = WhisperEncoder(cfg, dtype=dtype)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: Whisper encoder tensors do not match the inferred config {cfg}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    encoder.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    return encoder.eval()
