"""InfiniteTalk / MultiTalk as a Wan model add-on: its config, recognition from checkpoint shapes, and the
factories the loader uses to build `audio_proj` and the per-block audio layers (docs/NOTES.md §3.1).

Single (InfiniteTalk single / MultiTalk one speaker) and multi (two speakers) files have the same keys and
shapes, so one model serves both; the speaker count is chosen per call by the conditioning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..wanvideo.checkpoint import CheckpointError
from ..wanvideo.loader import AddOn
from .audio_attention import InfiniteTalkBlockAdapter
from .audio_proj import AudioProjModel
from .conditioning import audio_conditioning

AUDIO_PROJ_NAMES = ("audio_proj.", "multitalk_audio_proj.")  # the second is ComfyUI-WanVideoWrapper's naming
OFFICIAL_KWARGS = ("audio", "ref_target_masks")


@dataclass(frozen=True)
class InfiniteTalkConfig:
    audio_window: int = 5          # wav2vec2 frames per video frame window
    vae_scale: int = 4             # video frames per latent frame (after the first)
    audio_layers: int = 12         # wav2vec2-base hidden states kept
    audio_channels: int = 768
    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32       # audio tokens per latent frame and speaker
    norm_output: bool = True       # `audio_proj.norm` present
    speaker_ranges: tuple = ((0, 4), (20, 24))  # 1-D RoPE position ranges of speaker 1 and 2
    background_position: float = 12

    @property
    def window_vf(self) -> int:
        return self.audio_window + self.vae_scale - 1

    @property
    def features_per_frame(self) -> int:
        return self.audio_layers * self.audio_channels

    def from_official(self, model, kwargs: dict, index: int):
        """Translate the official call (`audio` `[speakers, frames, 5, 12, 768]`, `ref_target_masks`
        `[3, lat_h, lat_w]`) into an `AudioConditioning`; the same audio serves every batch item."""
        unknown = sorted(set(kwargs) - set(OFFICIAL_KWARGS))
        if unknown:
            raise TypeError(f"unexpected arguments for an InfiniteTalk model: {unknown}")
        if kwargs.get("audio") is None:
            return None
        return audio_conditioning(model, kwargs["audio"], kwargs.get("ref_target_masks"))

    def random_conditioning(self, model, latent_frames: int, device=None, speakers: int = 1):
        """Conditioning from random audio windows (benchmarks): `speakers` speakers, default masks."""
        frames = self.vae_scale * (latent_frames - 1) + 1
        windows = torch.randn(speakers, frames, self.audio_window, self.audio_layers, self.audio_channels, device=device)
        return audio_conditioning(model, windows)


def make_block_adapter(cfg, *, device=None, dtype=None, operations):
    return InfiniteTalkBlockAdapter(cfg, device=device, dtype=dtype, operations=operations)


def make_audio_proj(cfg, *, device=None, dtype=None, operations):
    return AudioProjModel(cfg.audio, device=device, dtype=dtype, operations=operations)


def infinitetalk_addon(config: InfiniteTalkConfig, key_prefix: str = "audio_proj.") -> AddOn:
    addon = AddOn("InfiniteTalk", config, make_block_adapter, {"audio_proj": make_audio_proj})
    # Checkpoint key prefixes to rename before matching the model's keys (wired in the loader).
    addon.key_renames = {key_prefix: "audio_proj."} if key_prefix != "audio_proj." else {}
    return addon


def _shape(shapes: dict, key: str, source: str) -> tuple:
    if key not in shapes:
        raise CheckpointError(f"InfiniteTalk weights are incomplete: '{key}' is missing ({source}).")
    return tuple(shapes[key])


def detect_infinitetalk(shapes: dict, cfg) -> AddOn | None:
    """The InfiniteTalk add-on when the (prefix-stripped) keys hold its audio projection, else None.

    Every size comes from the shapes; a file made for another base model is refused with the reason."""
    prefix = next((p for p in AUDIO_PROJ_NAMES if p + "proj1.weight" in shapes), None)
    if prefix is None:
        return None
    src = f"{prefix}* keys"
    inter, first_in = _shape(shapes, prefix + "proj1.weight", src)
    _, later_in = _shape(shapes, prefix + "proj1_vf.weight", src)
    out_in = _shape(shapes, prefix + "proj3.weight", src)
    kv = _shape(shapes, "blocks.0.audio_cross_attn.kv_linear.weight", "per-block audio layers")
    vae_scale = InfiniteTalkConfig.vae_scale
    feat, rem = divmod(later_in - first_in, vae_scale - 1)
    if rem or feat <= 0 or first_in % feat:
        raise CheckpointError(f"{prefix}proj1 / proj1_vf input sizes {first_in} / {later_in} do not fit "
                              f"InfiniteTalk's audio windows; the file is not an InfiniteTalk/MultiTalk model.")
    output_dim = kv[1]
    layers = InfiniteTalkConfig.audio_layers if feat % InfiniteTalkConfig.audio_layers == 0 else 1
    config = InfiniteTalkConfig(audio_window=first_in // feat, audio_layers=layers, audio_channels=feat // layers,
                                intermediate_dim=inter, output_dim=output_dim,
                                context_tokens=out_in[0] // output_dim, norm_output=prefix + "norm.weight" in shapes)
    if cfg.model_type != "i2v":
        raise CheckpointError(f"InfiniteTalk/MultiTalk weights need the Wan 2.1 I2V base model (36 input channels); "
                              f"the base model here is {cfg.model_type.upper()} (dim {cfg.dim}).")
    expect = {"blocks.0.audio_cross_attn.q_linear.weight": (cfg.dim, cfg.dim),
              "blocks.0.audio_cross_attn.kv_linear.weight": (2 * cfg.dim, output_dim),
              "blocks.0.norm_x.weight": (cfg.dim,)}
    for key, shape in expect.items():
        found = _shape(shapes, key, "per-block audio layers")
        if found != shape:
            raise CheckpointError(f"the InfiniteTalk weights do not fit this base model: '{key}' has shape {found}, "
                                  f"a Wan model of dim {cfg.dim} needs {shape}. Use the base model the add-on was "
                                  f"made for (InfiniteTalk/MultiTalk: Wan 2.1 I2V 14B, dim 5120).")
    return infinitetalk_addon(config, prefix)
