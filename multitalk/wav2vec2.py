"""wav2vec2 audio encoder for InfiniteTalk / MultiTalk (TencentGameMate/chinese-wav2vec2-base), no `transformers`.

The module tree mirrors HF `Wav2Vec2Model` in its "base" layout (feat_extract_norm="group",
do_stable_layer_norm=False), so the published state dict loads by name:

    feature_extractor.conv_layers.0.conv.weight            (512, 1, 10)   GroupNorm(512 groups) on this conv only
    feature_extractor.conv_layers.0.layer_norm.{weight,bias} (512,)
    feature_extractor.conv_layers.{1-4}.conv.weight        (512, 512, 3)  no conv bias (conv_bias=false)
    feature_extractor.conv_layers.{5,6}.conv.weight        (512, 512, 2)  strides 5,2,2,2,2,2,2 -> 320 samples/frame
    feature_projection.layer_norm.{weight,bias} (512,), feature_projection.projection.{weight (768, 512), bias}
    encoder.pos_conv_embed.conv.{weight_g (1, 1, 128), weight_v (768, 48, 128), bias (768,)}  kernel 128, groups 16
    encoder.layer_norm.{weight,bias} (768,)                applied BEFORE the layers (post-LN "base" style)
    encoder.layers.N.attention.{q,k,v,out}_proj.{weight (768, 768), bias}   N = 0..11, 12 heads
    encoder.layers.N.layer_norm, encoder.layers.N.final_layer_norm .{weight,bias} (768,)
    encoder.layers.N.feed_forward.intermediate_dense (3072, 768), .output_dense (768, 3072) .{weight,bias}

Files may prefix every key with `wav2vec2.` (the published Wav2Vec2ForPreTraining checkpoint does) and may store
the weight norm as `parametrizations.weight.original0/1` (newer torch); heads such as `quantizer.*`,
`project_hid.*`, `project_q.*`, `lm_head.*` and the training-only SpecAugment vector `masked_spec_embed` are
ignored. GELU is the exact (erf) one, all LayerNorm/GroupNorm eps are 1e-5.

InfiniteTalk use (docs/NOTES.md §3.4): the CNN features (50 per second) are linearly interpolated
(align_corners=True) to the video frame count int(T / 16000 · fps) BEFORE feature_projection and the
transformer, and the outputs of the 12 layers (HF hidden_states[1:]) are kept.

Waveform normalisation: chinese-wav2vec2-base's preprocessor_config.json has do_normalize=false, so the official
pipeline feeds the loudness-normalised waveform unchanged. Evidence: ComfyUI core configures its base wav2vec2
with do_normalize=False ("chinese-wav2vec2-base has this False"); ComfyUI-WanVideoWrapper hard-codes the 6-key
extractor config {do_normalize: false, feature_size: 1, padding_side: right, padding_value: 0.0,
return_attention_mask: false, sampling_rate: 16000}, which serialised with indent 2 is exactly the published
file's 160 bytes; fairseq base models train with task.normalize=false. `do_normalize=True` exists for other
checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..wanvideo.checkpoint import CheckpointError, CheckpointReader, checked_tensor, describe_foreign, nonfinite_count
from ..wanvideo.modules.attention import attention

SAMPLE_RATE = 16000
HEAD_DIM = 64     # every published wav2vec2 (base 768/12, large 1024/16); heads cannot be read from shapes


@dataclass(frozen=True)
class Wav2Vec2Config:
    conv_dims: tuple[int, ...] = (512,) * 7
    conv_kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    eps: float = 1e-5

    @property
    def receptive_field(self) -> int:
        """Fewest input samples that give one CNN frame."""
        field, jump = 1, 1
        for kernel, stride in zip(self.conv_kernels, self.conv_strides):
            field += (kernel - 1) * jump
            jump *= stride
        return field


CHINESE_WAV2VEC2_BASE = Wav2Vec2Config()


# ----------------------------------------------------------------------------------------------
# Modules (names follow HF Wav2Vec2Model so state dicts load by name)
# ----------------------------------------------------------------------------------------------

class _ConvLayer(nn.Module):
    """Feature-extractor conv + GELU; with feat_extract_norm="group" only the first has a GroupNorm with one
    group per channel, i.e. each channel is normalised over the whole clip."""

    def __init__(self, c_in, c_out, kernel, stride, bias, group_norm, eps, *, device, dtype, operations):
        super().__init__()
        self.conv = operations.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias, device=device, dtype=dtype)
        self.layer_norm = (operations.GroupNorm(c_out, c_out, eps=eps, affine=True, device=device, dtype=dtype)
                           if group_norm else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return F.gelu(x)


class _FeatureExtractor(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, **kw):
        super().__init__()
        c_in = [1, *cfg.conv_dims[:-1]]
        self.conv_layers = nn.ModuleList(
            _ConvLayer(c_in[i], cfg.conv_dims[i], cfg.conv_kernels[i], cfg.conv_strides[i], cfg.conv_bias,
                       i == 0, cfg.eps, **kw) for i in range(len(cfg.conv_dims)))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform[:, None, :]
        for layer in self.conv_layers:
            x = layer(x)
        return x                                          # [B, C, frames]


class _FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, *, device, dtype, operations):
        super().__init__()
        self.layer_norm = operations.LayerNorm(cfg.conv_dims[-1], eps=cfg.eps, device=device, dtype=dtype)
        self.projection = operations.Linear(cfg.conv_dims[-1], cfg.hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class _WeightNormConv(nn.Module):
    """Grouped 'same' conv whose weight is g · v / ||v||, the norm taken over (out, in) per kernel tap
    (torch weight_norm with dim=2); g and v are kept so the published weight_g / weight_v load by name."""

    def __init__(self, channels, kernel, groups, *, device, dtype):
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel, device=device, dtype=dtype))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight_v
        weight = v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=v.shape[-1] // 2, groups=self.groups)


class _PositionalConvEmbedding(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, *, device, dtype, operations):
        super().__init__()
        self.conv = _WeightNormConv(cfg.hidden_size, cfg.pos_conv_kernel, cfg.pos_conv_groups,
                                    device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[1]
        y = self.conv(x.transpose(1, 2))[..., :frames]    # an even kernel yields one extra frame: drop the last
        return F.gelu(y).transpose(1, 2)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, *, device, dtype, operations):
        super().__init__()
        dim = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = operations.Linear(dim, dim, device=device, dtype=dtype)
        self.k_proj = operations.Linear(dim, dim, device=device, dtype=dtype)
        self.v_proj = operations.Linear(dim, dim, device=device, dtype=dtype)
        self.out_proj = operations.Linear(dim, dim, device=device, dtype=dtype)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        return self.k_proj(x).view(b, n, self.num_heads, -1), self.v_proj(x).view(b, n, self.num_heads, -1)

    def attend(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output for the positions `rows` (some or all of the sequence) over every key."""
        b, n, _ = rows.shape
        q = self.q_proj(rows).view(b, n, self.num_heads, -1)
        return self.out_proj(attention(q, k, v).reshape(b, n, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x, *self.keys_values(x))


class _FeedForward(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, *, device, dtype, operations):
        super().__init__()
        self.intermediate_dense = operations.Linear(cfg.hidden_size, cfg.intermediate_size, device=device, dtype=dtype)
        self.output_dense = operations.Linear(cfg.intermediate_size, cfg.hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class _EncoderLayer(nn.Module):
    """Post-LN layer: x = LN(x + attn(x)); x = LN'(x + ffn(x))."""

    def __init__(self, cfg: Wav2Vec2Config, **kw):
        super().__init__()
        ln = dict(eps=cfg.eps, device=kw["device"], dtype=kw["dtype"])
        self.attention = _SelfAttention(cfg, **kw)
        self.layer_norm = kw["operations"].LayerNorm(cfg.hidden_size, **ln)
        self.feed_forward = _FeedForward(cfg, **kw)
        self.final_layer_norm = kw["operations"].LayerNorm(cfg.hidden_size, **ln)

    def forward_rows(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer's output at the positions `rows`, given the keys and values of the whole sequence."""
        x = self.layer_norm(rows + self.attention.attend(rows, k, v))
        return self.final_layer_norm(x + self.feed_forward(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rows(x, *self.attention.keys_values(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config, **kw):
        super().__init__()
        self.pos_conv_embed = _PositionalConvEmbedding(cfg, **kw)
        self.layer_norm = kw["operations"].LayerNorm(cfg.hidden_size, eps=cfg.eps, device=kw["device"],
                                                     dtype=kw["dtype"])
        self.layers = nn.ModuleList(_EncoderLayer(cfg, **kw) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(x + self.pos_conv_embed(x))
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return torch.stack(outputs, dim=1)                # [B, layers, frames, hidden]


class Wav2Vec2Encoder(nn.Module):
    """HF Wav2Vec2Model ("base" layout) for inference: waveform `[B, T]` at 16 kHz -> every layer's output."""

    def __init__(self, config: Wav2Vec2Config = CHINESE_WAV2VEC2_BASE, *, device=None, dtype=torch.float32,
                 operations=nn):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype, operations=operations)
        self.feature_extractor = _FeatureExtractor(config, **kw)
        self.feature_projection = _FeatureProjection(config, **kw)
        self.encoder = _Transformer(config, **kw)

    def cnn_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Convolutional features `[B, frames, conv_dims[-1]]` (one per 320 samples for the base layout)."""
        if waveform.shape[-1] < self.config.receptive_field:
            raise ValueError(f"wav2vec2 needs at least {self.config.receptive_field} samples "
                             f"({1000 * self.config.receptive_field / SAMPLE_RATE:.0f} ms at 16 kHz) for one frame; "
                             f"got {waveform.shape[-1]}. Use a longer clip.")
        return self.feature_extractor(waveform).transpose(1, 2)

    def layer_outputs(self, features: torch.Tensor) -> torch.Tensor:
        """Outputs of every transformer layer `[B, layers, frames, hidden]` from CNN features `[B, frames, C]`."""
        return self.encoder(self.feature_projection(features))

    def forward(self, waveform: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """`[B, layers, frames, hidden]`; with `num_frames`, the CNN features are first linearly interpolated
        (align_corners=True) to that many frames with F.interpolate, as InfiniteTalk does (same float32 source
        positions, which differ from exact positions by ~3e-5 relative)."""
        features = self.cnn_features(waveform)
        if num_frames is not None:
            features = to_video_frames(features, num_frames)
        return self.layer_outputs(features)


def to_video_frames(features: torch.Tensor, num_frames: int) -> torch.Tensor:
    """CNN features `[B, frames, C]` linearly interpolated (align_corners=True) to `num_frames`, as InfiniteTalk."""
    return F.interpolate(features.transpose(1, 2), size=num_frames, mode="linear", align_corners=True).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Long clips: overlapping chunks
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunking:
    """How a long clip is encoded, in pieces that bound memory and give progress and Stop points.

    - The CNN in chunks of `cnn_frames` output frames: exact (the convolutions are local; the first layer's
      per-channel GroupNorm takes its statistics over the whole clip in a first pass).
    - Up to `one_pass` video frames (80 s): the whole clip in one pass, exactly as before.
    - Up to `exact` frames (10 min): the transformer layer by layer over the whole clip, its attention in blocks
      of `block` queries against every key. Exact (float rounding only), memory linear in the length, time still
      quadratic: 10 minutes of audio is 15,000 frames.
    - Longer: overlapping windows keeping `window` frames (5 min) with `context` frames (1 min) of audio on either
      side, each encoded as above. The only approximation: a frame's attention sees its window (7 min), not the
      whole clip, so the cost grows linearly. With random weights, whose attention spreads over everything, the
      error follows how much a window's content differs from the whole clip's (docs/BENCHMARKS.md); trained
      heads attend more locally. The 1 min context is 12x the span of the positional convolution (128 frames)."""
    one_pass: int = 2000
    exact: int = 15000
    block: int = 2000
    window: int = 7500
    context: int = 1500
    cnn_frames: int = 1500

    def __post_init__(self):
        if min(self.block, self.window, self.cnn_frames) < 1 or self.context < 0 or self.one_pass > self.exact:
            raise ValueError(f"Chunking needs block, window and cnn_frames >= 1, context >= 0 and one_pass <= "
                             f"exact, got {self}")

    def windows(self, frames: int) -> list[tuple[int, int, int, int]]:
        """(lo, hi, start, end): encode frames [lo, hi), keep [start, end). One window up to `exact` frames."""
        if frames <= self.exact:
            return [(0, frames, 0, frames)]
        return [(max(0, s - self.context), min(frames, s + self.window + self.context), s,
                 min(frames, s + self.window)) for s in range(0, frames, self.window)]

    def steps(self, frames: int, layers: int) -> int:
        """Progress steps of the transformer: one per block of queries per layer per window."""
        return sum(layers * -(-(hi - lo) // self.block) for lo, hi, _, _ in self.windows(frames))


# Bound on the worst-layer relative error (norm of the difference over the norm of the one-pass output) of clips
# longer than Chunking.exact; measured <= 1.7e-2 on 20 min clips with random-weight encoders (bench/long_audio.py,
# docs/BENCHMARKS.md). Shorter clips match the one pass within 1e-5 (float rounding).
WINDOW_TOLERANCE = 0.1

Progress = Callable[[int, int], None]   # (chunks done, chunks in all); may raise to stop (ComfyUI's Stop)


def _cnn_chunks(encoder: "Wav2Vec2Encoder", samples: int, chunk: int) -> list[tuple[int, int]]:
    cfg = encoder.config
    hop = math.prod(cfg.conv_strides)
    frames = (samples - cfg.receptive_field) // hop + 1
    return [(a, min(frames, a + chunk)) for a in range(0, frames, chunk)]


def _first_conv_chunks(encoder: "Wav2Vec2Encoder", samples: int, chunk: int) -> list[tuple[int, int]]:
    """Output frames of the first conv in chunks covering as many samples as `chunk` CNN frames."""
    cfg = encoder.config
    kernel, stride = cfg.conv_kernels[0], cfg.conv_strides[0]
    outputs = (samples - kernel) // stride + 1
    step = max(1, chunk * math.prod(cfg.conv_strides) // stride)
    return [(a, min(outputs, a + step)) for a in range(0, outputs, step)]


def _first_conv_stats(encoder: "Wav2Vec2Encoder", waveform: torch.Tensor, chunk: int, tick):
    """Per-channel mean and variance of the first conv's output over the whole clip (its GroupNorm's
    statistics), accumulated chunk by chunk in float64."""
    first = encoder.feature_extractor.conv_layers[0]
    kernel, stride = encoder.config.conv_kernels[0], encoder.config.conv_strides[0]
    total = total_sq = None
    chunks = _first_conv_chunks(encoder, waveform.shape[-1], chunk)
    for a, b in chunks:
        y = first.conv(waveform[:, None, a * stride:(b - 1) * stride + kernel]).double()
        part, part_sq = y.sum(dim=-1), (y * y).sum(dim=-1)
        total, total_sq = (part, part_sq) if total is None else (total + part, total_sq + part_sq)
        tick()
    outputs = chunks[-1][1]
    mean = total / outputs
    return mean, (total_sq / outputs - mean * mean).clamp_min(0)


def cnn_features_chunked(encoder: "Wav2Vec2Encoder", waveform: torch.Tensor, chunking: Chunking,
                         tick=lambda: None) -> torch.Tensor:
    """`Wav2Vec2Encoder.cnn_features` computed in chunks of `chunking.cnn_frames` output frames; equal to the
    one-pass result up to float rounding. Memory: one chunk's activations plus the `[B, frames, C]` output."""
    cfg = encoder.config
    hop, field = math.prod(cfg.conv_strides), cfg.receptive_field
    layers = encoder.feature_extractor.conv_layers
    norm = layers[0].layer_norm
    mean, var = _first_conv_stats(encoder, waveform, chunking.cnn_frames, tick)
    scale = norm.weight.double() / torch.sqrt(var + norm.eps)
    shift = norm.bias.double() - mean * scale
    out = []
    for a, b in _cnn_chunks(encoder, waveform.shape[-1], chunking.cnn_frames):
        x = layers[0].conv(waveform[:, None, a * hop:(b - 1) * hop + field])
        x = F.gelu((x * scale[..., None].to(x.dtype) + shift[..., None].to(x.dtype)))
        for layer in layers[1:]:
            x = layer(x)
        out.append(x.transpose(1, 2))
        tick()
    return torch.cat(out, dim=1)


def _layer_in_query_blocks(layer: "_EncoderLayer", x: torch.Tensor, block: int, tick) -> torch.Tensor:
    """`_EncoderLayer.forward` with the attention computed for `block` queries at a time against all keys: the
    same numbers, without one call over the whole clip."""
    k, v = layer.attention.keys_values(x)
    out = torch.empty_like(x)
    for a in range(0, x.shape[1], block):
        out[:, a:a + block] = layer.forward_rows(x[:, a:a + block], k, v)
        tick()
    return out


def layer_outputs_chunked(encoder: "Wav2Vec2Encoder", features: torch.Tensor, chunking: Chunking,
                          tick=lambda: None) -> torch.Tensor:
    """`Wav2Vec2Encoder.layer_outputs` for `[1, frames, C]` features, window by window and layer by layer
    (`Chunking`), as `[frames, layers, hidden]` float32 on the CPU (an hour at 25 fps is 3.3 GB: not for VRAM)."""
    frames = features.shape[1]
    cfg, transformer = encoder.config, encoder.encoder
    out = torch.empty(frames, cfg.num_layers, cfg.hidden_size, dtype=torch.float32)
    for lo, hi, start, end in chunking.windows(frames):
        x = encoder.feature_projection(features[:, lo:hi])
        x = transformer.layer_norm(x + transformer.pos_conv_embed(x))
        for index, layer in enumerate(transformer.layers):
            x = _layer_in_query_blocks(layer, x, chunking.block, tick)
            out[start:end, index] = x[0, start - lo:end - lo].float().cpu()
    return out


# ----------------------------------------------------------------------------------------------
# InfiniteTalk embedding and per-frame windows
# ----------------------------------------------------------------------------------------------

def encode_for_infinitetalk(encoder: Wav2Vec2Encoder, waveform_16k_mono: torch.Tensor, fps: float = 25,
                            *, do_normalize: bool = False, chunking: Chunking = Chunking(),
                            progress: Progress | None = None) -> torch.Tensor:
    """Audio embedding `[n_frames, layers, hidden]` with n_frames = int(T / 16000 · fps) (docs/NOTES.md §3.4).

    `waveform_16k_mono` is the (loudness-normalised) 16 kHz mono clip `[T]`. `do_normalize` applies the HF
    feature extractor's zero-mean unit-variance normalisation; chinese-wav2vec2-base does not use it.
    Clips longer than `chunking.one_pass` frames are encoded in pieces (`Chunking`; float32 on the CPU), calling
    `progress(done, total)` after each piece: it may raise to stop within one piece."""
    wav = waveform_16k_mono
    if wav.dim() != 1:
        raise ValueError(f"encode_for_infinitetalk: expected a mono 16 kHz waveform [samples], got shape "
                         f"{tuple(wav.shape)}; convert it with audio_processing.to_mono_16k first.")
    if wav.numel() == 0 or nonfinite_count(wav):
        raise ValueError("encode_for_infinitetalk: the waveform is empty or contains NaN/inf samples.")
    n_frames = int(wav.shape[0] / SAMPLE_RATE * fps)
    if n_frames < 1:
        raise ValueError(f"encode_for_infinitetalk: {wav.shape[0]} samples ({1000 * wav.shape[0] / SAMPLE_RATE:.1f} ms)"
                         f" are shorter than one video frame at {fps:g} fps; use a longer clip.")
    weight = encoder.feature_projection.projection.weight
    x = wav.to(device=weight.device, dtype=torch.float32)
    if do_normalize:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    x = x.to(weight.dtype)[None]
    if n_frames <= chunking.one_pass:
        with torch.no_grad():
            hidden = encoder(x, num_frames=n_frames)
        if progress is not None:
            progress(1, 1)
        return hidden[0].transpose(0, 1)
    if x.shape[-1] < encoder.config.receptive_field:
        encoder.cnn_features(x)  # raises the short-clip message
    total = (len(_first_conv_chunks(encoder, x.shape[-1], chunking.cnn_frames))
             + len(_cnn_chunks(encoder, x.shape[-1], chunking.cnn_frames))
             + chunking.steps(n_frames, encoder.config.num_layers))
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    with torch.no_grad():
        features = to_video_frames(cnn_features_chunked(encoder, x, chunking, tick), n_frames)
        return layer_outputs_chunked(encoder, features, chunking, tick)


def audio_windows(features: torch.Tensor, start: int, count: int, window: int = 5) -> torch.Tensor:
    """Per video frame i in [start, start + count): features of frames i - w//2 .. i + w//2, clamped to the clip
    (`[n, ...]` -> `[count, window, ...]`), as InfiniteTalk gathers them for each clip."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"audio_windows: window must be a positive odd number, got {window}.")
    if features.shape[0] == 0:
        raise ValueError("audio_windows: the audio embedding has no frames.")
    if count < 0:
        raise ValueError(f"audio_windows: count must be >= 0, got {count}.")
    offsets = torch.arange(window, device=features.device) - window // 2
    frames = torch.arange(start, start + count, device=features.device)
    index = (frames[:, None] + offsets[None, :]).clamp(0, features.shape[0] - 1)
    return features[index]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

_MODEL_ROOTS = ("feature_extractor.", "feature_projection.", "encoder.")    # anything else is ignored
_WEIGHT_NORM_ALIASES = {"parametrizations.weight.original0": "weight_g",
                        "parametrizations.weight.original1": "weight_v"}


def _model_prefix(keys) -> str | None:
    keys = set(keys)
    for prefix in ("wav2vec2.", ""):
        if {prefix + "feature_extractor.conv_layers.0.conv.weight",
                prefix + "feature_projection.projection.weight"} <= keys:
            return prefix
    return None


def _canonical(name: str) -> str:
    for alias, canonical in _WEIGHT_NORM_ALIASES.items():
        name = name.replace(alias, canonical)
    return name


def _count(shapes: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def infer_wav2vec2_config(shapes: dict[str, tuple[int, ...]], source: str = "state dict") -> Wav2Vec2Config:
    """Config from un-prefixed key shapes. Not in the shapes, so taken from the wav2vec2 family: conv strides
    (kernel // 2 for the first conv, 2 after), head size 64, eps 1e-5."""
    def need(key):
        if key not in shapes:
            raise CheckpointError(f"{source}: wav2vec2 key '{key}' is missing; the file is incomplete or not a "
                                  f"HF-format wav2vec2 model.")
        return shapes[key]

    n_conv = _count(shapes, "feature_extractor.conv_layers.{}.conv.weight")
    if "feature_extractor.conv_layers.0.layer_norm.weight" not in shapes or any(
            f"feature_extractor.conv_layers.{i}.layer_norm.weight" in shapes for i in range(1, n_conv)):
        raise CheckpointError(f"{source}: the feature extractor is not the 'group norm on the first conv' layout of "
                              f"wav2vec2-base (a wav2vec2-large / stable-layer-norm model?). InfiniteTalk needs "
                              f"TencentGameMate/chinese-wav2vec2-base.")
    conv_shapes = [need(f"feature_extractor.conv_layers.{i}.conv.weight") for i in range(n_conv)]
    hidden, conv_out = need("feature_projection.projection.weight")
    pos_v = need("encoder.pos_conv_embed.conv.weight_v")
    num_layers = _count(shapes, "encoder.layers.{}.attention.q_proj.weight")
    if hidden % HEAD_DIM or num_layers == 0 or conv_out != conv_shapes[-1][0]:
        raise CheckpointError(f"{source}: unexpected wav2vec2 shapes (hidden {hidden}, {num_layers} layers, "
                              f"conv output {conv_shapes[-1][0]} vs projection input {conv_out}).")
    return Wav2Vec2Config(
        conv_dims=tuple(s[0] for s in conv_shapes),
        conv_kernels=tuple(s[2] for s in conv_shapes),
        conv_strides=(conv_shapes[0][2] // 2,) + (2,) * (n_conv - 1),
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in shapes,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=hidden // HEAD_DIM,
        intermediate_size=need("encoder.layers.0.feed_forward.intermediate_dense.weight")[0],
        pos_conv_kernel=pos_v[2],
        pos_conv_groups=hidden // pos_v[1],
    )


def load_wav2vec2(path: str, *, device="cpu", dtype=torch.float32, operations=nn) -> Wav2Vec2Encoder:
    """Wav2Vec2Encoder from a HF-format wav2vec2-base file (.safetensors, or .bin/.pt read with weights_only)."""
    reader = CheckpointReader(path)
    keys = reader.keys()
    prefix = _model_prefix(keys)
    if prefix is None:
        found = describe_foreign(keys) or "no wav2vec2 keys"
        raise CheckpointError(
            f"'{path}' is not a wav2vec2 audio encoder: it looks like {found} ({len(keys)} tensors, e.g. "
            f"{sorted(keys)[:3]}). InfiniteTalk needs TencentGameMate/chinese-wav2vec2-base in HF format "
            f"(model.safetensors or pytorch_model.bin, keys like 'wav2vec2.feature_extractor.conv_layers.0.conv.weight').")
    names = {_canonical(k[len(prefix):]): k for k in keys
             if k.startswith(prefix) and k[len(prefix):].startswith(_MODEL_ROOTS)}
    shapes = {name: reader.shape(key) for name, key in names.items()}
    config = infer_wav2vec2_config(shapes, source=f"'{path}'")
    model = Wav2Vec2Encoder(config, device="meta", dtype=dtype, operations=operations)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != tuple(shapes[k]))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"'{path}' does not match the wav2vec2-base layout inferred from it: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {[(k, shapes[k], expected[k]) for k in wrong[:5]]}.")
    state = {name: checked_tensor(reader.get(names[name]), names[name], f"'{path}'", device).to(dtype=dtype)
             for name in expected}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
