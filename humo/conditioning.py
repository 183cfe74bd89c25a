"""The per-call HuMo audio conditioning: 16 projected audio tokens per latent frame (reference frames included).

Built once per window (the projection is cheap) and handed to `WanModel.forward_batched(audio=...)`; every block
reads it through `BlockInputs.audio`. "No audio" is HuMo's zero windows through the projection (generate.py:
`audio_emb_neg = zeros_like(audio_emb)`), not zero tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)  # compared by identity: it holds tensors
class HumoAudioConditioning:
    """tokens: float32 `[1 or B, latent frames (video + reference), 16, output_dim]`."""
    tokens: torch.Tensor

    needs_qk = False  # HuMo's audio attention does not look at the self-attention

    def tokens_for(self, batch: int, grid) -> torch.Tensor:
        frames = grid[0]
        if self.tokens.shape[1] != frames:
            raise ValueError(f"the HuMo audio conditioning covers {self.tokens.shape[1]} latent frames but the video "
                             f"has {frames} (video latent frames + reference frames); build the windows with "
                             f"humo_audio_windows(bands, video_latent_frames, reference_frames).")
        if self.tokens.shape[0] not in (1, batch):
            raise ValueError(f"audio tokens have batch {self.tokens.shape[0]}, the video batch is {batch}")
        return self.tokens.expand(batch, -1, -1, -1)


def _projector(model):
    proj = getattr(model, "audio_proj", None)
    acfg = getattr(model.cfg, "audio", None)
    if proj is None or not hasattr(acfg, "bands"):
        other = " (it is an InfiniteTalk/MultiTalk model: use that sampler)" if hasattr(acfg, "audio_window") else ""
        raise ValueError(f"this model has no HuMo audio layers{other}; load a HuMo checkpoint (HuMo-17B or "
                         f"HuMo-1.7B).")
    return proj, acfg


def humo_conditioning(model, windows: torch.Tensor) -> HumoAudioConditioning:
    """Conditioning from HuMo windows `[F, 8, 5, C]` (or `[B, F, 8, 5, C]`), F = video + reference latent
    frames, as `humo.audio_features.humo_audio_windows` builds them, through `model.audio_proj`."""
    proj, acfg = _projector(model)
    if windows.dim() == 4:
        windows = windows[None]
    expect = (acfg.window, acfg.bands, acfg.audio_channels)
    if windows.dim() != 5 or tuple(windows.shape[2:]) != expect:
        raise ValueError(f"HuMo audio windows must be [latent frames, {', '.join(map(str, expect))}] (Whisper bands "
                         f"in {acfg.window}-frame windows); got shape {tuple(windows.shape)}")
    if not windows.isfinite().all():
        raise ValueError("HuMo audio windows contain NaN or inf; check the audio input and the Whisper encoder")
    weight = proj.audio_proj_glob_1.layer.weight
    return HumoAudioConditioning(proj(windows.to(weight.device)))


def zero_humo_conditioning(model, latent_frames: int) -> HumoAudioConditioning:
    """HuMo's 'no audio': zero windows for every latent frame, through the projection."""
    _, acfg = _projector(model)
    return humo_conditioning(model, torch.zeros(latent_frames, acfg.window, acfg.bands, acfg.audio_channels))
