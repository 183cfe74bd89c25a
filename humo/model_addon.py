"""HuMo as a Wan model add-on: its config, recognition from checkpoint shapes, and the factories the loader uses
to build `audio_proj` and the per-block `audio_cross_attn_wrapper` (docs/NOTES.md §4.1).

HuMo-17B is Wan I2V-14B shaped (36 input channels: the reference image enters through `y`) without the CLIP
branch; HuMo-1.7B is Wan T2V-1.3B shaped (16 channels: the reference latent is written into `x`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..wanvideo.checkpoint import CheckpointError
from ..wanvideo.loader import AddOn
from .audio_attention import HumoBlockAdapter
from .audio_proj import HumoAudioProj
from .conditioning import humo_conditioning

PROJ_KEY = "audio_proj.audio_proj_glob_1.layer.weight"
OFFICIAL_KWARGS = ("audio",)


@dataclass(frozen=True)
class HumoConfig:
    window: int = 8              # 25-fps audio frames per latent frame window
    bands: int = 5               # Whisper layer bands (means of 0-7, 8-15, 16-23, 24-31, and layer 32)
    audio_channels: int = 1280   # Whisper-large-v3 width
    intermediate_dim: int = 512
    output_dim: int = 1536
    context_tokens: int = 16     # audio tokens per latent frame

    @property
    def features_per_frame(self) -> int:
        return self.window * self.bands * self.audio_channels

    def from_official(self, model, kwargs: dict, index: int):
        """Translate the official call (`audio`: a list of `[F, 8, 5, 1280]` windows per sample)."""
        unknown = sorted(set(kwargs) - set(OFFICIAL_KWARGS))
        if unknown:
            raise TypeError(f"unexpected arguments for a HuMo model: {unknown}")
        audio = kwargs.get("audio")
        if audio is None:
            return None
        return humo_conditioning(model, audio[index])

    def random_conditioning(self, model, latent_frames: int, device=None):
        """Conditioning from random windows (benchmarks); `latent_frames` counts reference frames too."""
        windows = torch.randn(latent_frames, self.window, self.bands, self.audio_channels, device=device)
        return humo_conditioning(model, windows)


def make_block_adapter(cfg, *, device=None, dtype=None, operations):
    return HumoBlockAdapter(cfg, device=device, dtype=dtype, operations=operations)


def make_audio_proj(cfg, *, device=None, dtype=None, operations):
    return HumoAudioProj(cfg.audio, device=device, dtype=dtype, operations=operations)


def humo_addon(config: HumoConfig) -> AddOn:
    return AddOn("HuMo", config, make_block_adapter, {"audio_proj": make_audio_proj})


def _shape(shapes: dict, key: str) -> tuple:
    if key not in shapes:
        raise CheckpointError(f"HuMo weights are incomplete: '{key}' is missing.")
    return tuple(shapes[key])


def detect_humo(shapes: dict, cfg) -> AddOn | None:
    """The HuMo add-on when the (prefix-stripped) keys hold HuMo's audio projection, else None.

    Sizes come from the shapes (window 8 and 5 bands are fixed by HuMo's audio features); a file whose audio
    layers do not fit the base model is refused with the reason."""
    if PROJ_KEY not in shapes:
        return None
    inter, features = _shape(shapes, PROJ_KEY)
    output_dim = _shape(shapes, "audio_proj.audio_proj_glob_norm.layer.weight")[0]
    tokens_out = _shape(shapes, "audio_proj.audio_proj_glob_3.layer.weight")[0]
    per_frame = HumoConfig.window * HumoConfig.bands
    if features % per_frame or tokens_out % output_dim:
        raise CheckpointError(f"HuMo audio projection sizes do not fit HuMo's audio windows: input {features} is not "
                              f"a multiple of {per_frame} (8 frames x 5 bands) or output {tokens_out} not of "
                              f"{output_dim}; the file is not a HuMo model.")
    config = HumoConfig(audio_channels=features // per_frame, intermediate_dim=inter, output_dim=output_dim,
                        context_tokens=tokens_out // output_dim)
    if cfg.image_branch:
        raise CheckpointError("HuMo has no CLIP image branch, but these weights hold one (cross_attn.k_img, img_emb): "
                              "the HuMo file was combined with a Wan I2V base model. Load the HuMo checkpoint alone.")
    if cfg.in_dim not in (cfg.out_dim, cfg.out_dim + 4 + cfg.out_dim):
        raise CheckpointError(f"HuMo needs 16 (1.7B) or 36 (17B) input channels; this model has {cfg.in_dim}.")
    prefix = "blocks.0.audio_cross_attn_wrapper."
    expect = {prefix + "audio_cross_attn.q.weight": (cfg.dim, cfg.dim),
              prefix + "audio_cross_attn.k.weight": (cfg.dim, output_dim),
              prefix + "audio_cross_attn.v.weight": (cfg.dim, output_dim),
              prefix + "norm1_audio.weight": (cfg.dim,)}
    for key, shape in expect.items():
        found = _shape(shapes, key)
        if found != shape:
            raise CheckpointError(f"the HuMo audio layers do not fit this model: '{key}' has shape {found}, a Wan "
                                  f"model of dim {cfg.dim} with {output_dim}-wide audio tokens needs {shape}. "
                                  f"Are the files from different models (HuMo-17B: dim 5120, HuMo-1.7B: dim 1536)?")
    return humo_addon(config)
