"""The per-call InfiniteTalk conditioning: projected audio tokens, the speaker count and the speaker masks.

Built once per sampler call (the audio projection is cheap) and handed to `WanModel.forward_batched(audio=...)`;
every block reads it through `BlockInputs.audio`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .audio_proj import latent_audio_windows

MAX_SPEAKERS = 2


def speaker_masks(height: int, width: int, boxes=None, face_scale: float = 0.05) -> torch.Tensor:
    """Float masks `[3, height, width]`: speaker 1, speaker 2, background (1 where no speaker is).

    boxes: two pixel boxes `(left, top, right, bottom)`; None places speaker 1 in the left half and speaker 2
    in the right half, each inset by `face_scale`, as the official default. (The official `bbox` entries
    `[x_min, y_min, x_max, y_max]` index rows with x: official bbox b is our box `(b[1], b[0], b[3], b[2])`.)
    """
    people = [torch.zeros(height, width), torch.zeros(height, width)]
    if boxes is None:
        r0, r1 = int(height * face_scale), int(height * (1 - face_scale))
        half = width // 2
        c0, c1 = int(half * face_scale), int(half * (1 - face_scale))
        people[0][r0:r1, c0:c1] = 1
        people[1][r0:r1, int(half * face_scale + half):int(half * (1 - face_scale) + half)] = 1
    else:
        if len(boxes) != MAX_SPEAKERS:
            raise ValueError(f"speaker_masks needs one box per speaker (2), got {len(boxes)}")
        for mask, (left, top, right, bottom) in zip(people, boxes):
            mask[int(top):int(bottom), int(left):int(right)] = 1
    background = ((people[0] + people[1]) == 0).float()
    return torch.stack([people[0], people[1], background])


@dataclass(eq=False)  # compared by identity: it holds tensors
class AudioConditioning:
    """tokens: float32 `[1 or B, latent frames, context_tokens * speakers, output_dim]` (speaker 1's tokens
    first); masks: `[3, H, W]` (speaker 1, speaker 2, background) at any resolution, or `[2, H, W]` (the
    background is then where neither speaker is); only used with two speakers, None = `speaker_masks` defaults
    drawn at the token grid (pass masks drawn at the image size for parity with the official pipeline)."""
    tokens: torch.Tensor
    speakers: int
    masks: torch.Tensor | None = None
    _mask_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.speakers not in range(1, MAX_SPEAKERS + 1):
            raise ValueError(f"InfiniteTalk/MultiTalk supports one or two speakers, got {self.speakers}")
        if self.masks is not None and (self.masks.dim() != 3 or self.masks.shape[0] not in (2, 3)):
            raise ValueError(f"speaker masks must be [3, H, W] (speaker 1, speaker 2, background) or [2, H, W]; "
                             f"got shape {tuple(self.masks.shape)}")

    @property
    def needs_qk(self) -> bool:
        """Two speakers need each block's self-attention q/k for the reference attention map."""
        return self.speakers == 2

    def tokens_for(self, batch: int, grid) -> torch.Tensor:
        """The tokens for a batch of `batch` videos with latent grid `grid` (frames must match)."""
        frames = grid[0]
        if self.tokens.shape[1] != frames:
            raise ValueError(f"the audio conditioning covers {self.tokens.shape[1]} latent frames but the video has "
                             f"{frames}; give audio windows for {4 * (frames - 1) + 1} video frames.")
        if self.tokens.shape[0] not in (1, batch):
            raise ValueError(f"audio tokens have batch {self.tokens.shape[0]}, the video batch is {batch}")
        return self.tokens.expand(batch, -1, -1, -1)

    def token_masks(self, grid) -> torch.Tensor:
        """Float `[3, h*w]` class masks at the token grid (nearest resize, > 0), as the official model does."""
        _, h, w = grid
        if (h, w) in self._mask_cache:
            return self._mask_cache[(h, w)]
        if self.masks is None:
            masks = speaker_masks(h, w).bool()
        else:
            masks = F.interpolate(self.masks[None].float(), size=(h, w), mode="nearest")[0] > 0
            if masks.shape[0] == 2:
                masks = torch.cat([masks, ~(masks[0] | masks[1])[None]])
        for name, m in zip(("speaker 1", "speaker 2"), masks):
            if not m.any():
                raise ValueError(f"the {name} mask covers no video token at the {h}x{w} token grid; draw a larger "
                                 f"mask (each speaker needs at least one token of the first frame).")
        out = masks.flatten(1).float().to(self.tokens.device)
        self._mask_cache[(h, w)] = out
        return out


def _projector(model):
    proj = getattr(model, "audio_proj", None)
    acfg = getattr(model.cfg, "audio", None)
    if proj is None or not hasattr(acfg, "audio_window"):  # HuMo's config has audio layers of another layout
        other = " (it is a HuMo model: use the HuMo sampler)" if hasattr(acfg, "bands") else ""
        raise ValueError(f"this model has no InfiniteTalk/MultiTalk audio layers{other}; load the InfiniteTalk "
                         f"weights with the model (extra_weights) or use a combined checkpoint.")
    return proj, acfg


def audio_conditioning(model, windows: torch.Tensor, masks: torch.Tensor | None = None) -> AudioConditioning:
    """Conditioning from per-speaker wav2vec2 windows `[speakers, frames, window, layers, channels]`
    (`[frames, window, layers, channels]` for one speaker), frames = 4n+1, through `model.audio_proj`."""
    proj, acfg = _projector(model)
    if windows.dim() == 4:
        windows = windows[None]
    expect = (acfg.audio_window, acfg.audio_layers, acfg.audio_channels)
    if windows.dim() != 5 or tuple(windows.shape[2:]) != expect:
        raise ValueError(f"audio windows must be [speakers, frames, {', '.join(map(str, expect))}] (wav2vec2-base "
                         f"hidden states of {acfg.audio_window}-frame windows); got shape {tuple(windows.shape)}")
    if not windows.isfinite().all():
        raise ValueError("audio windows contain NaN or inf; check the audio input and the encoder")
    speakers = windows.shape[0]
    if speakers > MAX_SPEAKERS:
        raise ValueError(f"InfiniteTalk/MultiTalk supports one or two speakers, got {speakers}")
    first, later = latent_audio_windows(windows.to(proj.proj1.weight.device), acfg.vae_scale)
    tokens = proj(first, later)  # [speakers, latent frames, tokens, dim]
    return AudioConditioning(torch.cat(list(tokens), dim=1)[None], speakers, masks)


def zero_audio_conditioning(model, frames: int) -> AudioConditioning:
    """The 'no audio' input of audio guidance: one speaker of zero windows, still through `audio_proj`."""
    _, acfg = _projector(model)
    zeros = torch.zeros(1, frames, acfg.audio_window, acfg.audio_layers, acfg.audio_channels)
    return audio_conditioning(model, zeros)
