"""HuMo generation: reference images, the zero-video latent, guidance plans and the (long-audio) window loop.

Official HuMo (generate.py, docs/NOTES.md §4.3): reference images are fitted into the frame on white,
VAE-encoded one by one and appended as the LAST latent frames, with the 4-channel mask 1 there; `y` holds the
zero-video latent before them (`y_null` holds it everywhere); every frame gets an audio window, the reference
frames zero windows. TIA guidance runs 3 passes per step; UniPC 50 steps, shift 5, 97 frames at 25 fps.

HuMo-1.7B (16 input channels) takes the reference latents inside the noisy latents instead (`latent_reference`).

Audio longer than one window runs through the shared window engine (`wanvideo.windows`: window arithmetic,
resumable store, VRAM release, out-of-memory advice): each later window pins the VAE latents of the last
`motion_frames` finished frames into its first latent frames, the reference latents staying at the end. That
continuation is this pack's extension; the official HuMo makes one window only.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..wanvideo import memory_plan
from ..wanvideo.resume import WindowStore, model_identity, run_key, vae_identity
from ..wanvideo.sampling import Conditioning, Guidance
from ..wanvideo.schedulers import make_scheduler
from ..wanvideo.windows import Continuation, SeededNoise, VaeCalls, Window, WindowGeometry, run_windows, video_to_unit
from .audio_features import humo_audio_windows
from .conditioning import humo_conditioning, zero_humo_conditioning
from .latent_reference import (LatentReferenceConditioning, LatentReferenceGuidance, ReferenceInLatents,
                               takes_reference_in_latents)

log = logging.getLogger("wantalk")

FPS = 25
GUIDANCE_MODES = ("tia", "ta", "audio_cfg", "none")


@dataclass(frozen=True)
class HumoSettings:
    """guidance: 'tia' (text, reference image and audio; 3 passes, the official default), 'ta' (no reference image;
    3 passes), 'audio_cfg' (2 passes: `ti + audio_scale * (tia - ti)`, HuMo's formula with text_scale 1, for
    distilled models), 'none' (1 pass, for distilled models at scale 1)."""
    frames: int = 97               # frames per window (1 + 4k)
    motion_frames: int = 9         # frames shared by consecutive windows (long audio only)
    steps: int = 50
    shift: float = 5.0
    scheduler: str = "unipc"
    guidance: str = "tia"
    text_scale: float = 5.0
    audio_scale: float = 5.5
    image_scale: float = 4.0       # HuMo-1.7B TIA only (its reference image has its own guidance term)
    seed: int = 42
    max_frames: int = 0            # 0: the whole audio

    def validate(self):
        if self.frames < 5 or (self.frames - 1) % 4:
            raise ValueError(f"frames must be 1 + 4k (e.g. 97), got {self.frames}")
        if not 1 <= self.motion_frames < self.frames or (self.motion_frames - 1) % 4:
            raise ValueError(f"motion_frames must be 1 + 4k and smaller than frames (e.g. 9), got {self.motion_frames}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"unknown HuMo guidance {self.guidance!r}; choose one of {GUIDANCE_MODES}")

    def plan(self, latent_reference: bool = False):
        """The shared loop's guidance for this mode (the 2- and 1-pass forms reuse the generic modes);
        latent_reference: HuMo-1.7B's own TIA / TA."""
        if latent_reference and self.guidance in ("tia", "ta"):
            return LatentReferenceGuidance(self.image_scale, self.audio_scale, self.text_scale, self.guidance == "tia")
        if self.guidance in ("tia", "ta"):
            return Guidance(f"humo_{self.guidance}", text_scale=self.text_scale, audio_scale=self.audio_scale)
        if self.guidance == "audio_cfg":
            return Guidance("infinitetalk", text_scale=1.0, audio_scale=self.audio_scale)
        return Guidance("cfg", scale=1.0)


# Official defaults, and a cheap form for step-distilled models (e.g. lightx2v LoRAs).
HUMO_DEFAULTS = HumoSettings()
HUMO_1_7B_DEFAULTS = HumoSettings(text_scale=7.5, audio_scale=7.5, image_scale=4.0)
HUMO_DISTILLED = HumoSettings(steps=6, shift=5.0, scheduler="unipc", guidance="audio_cfg", text_scale=1.0,
                              audio_scale=2.0)


# ---------------------------------------------------------------------------------------------- reference images

def fit_reference(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[3, h, w]` in [-1, 1] -> `[3, height, width]`: scaled to fit (aspect kept, sizes truncated as HuMo does)
    and centred on white. Antialiased bicubic stands in for HuMo's PIL LANCZOS."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"a reference image must be [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
    h0, w0 = image.shape[1:]
    ratio = w0 / h0
    if ratio > width / height:
        new_w, new_h = width, int(width / ratio)
    else:
        new_w, new_h = int(height * ratio), height
    new_w, new_h = max(new_w, 1), max(new_h, 1)
    resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bicubic", antialias=True,
                            align_corners=False)[0].clamp(-1, 1)
    out = torch.ones(3, height, width, dtype=resized.dtype, device=resized.device)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[:, top:top + new_h, left:left + new_w] = resized
    return out


def encode_references(vae, images, height: int, width: int) -> torch.Tensor:
    """`[1, 16, n_ref, height/8, width/8]`: each image fitted and encoded as a one-frame video. No image gives
    HuMo's stand-in, one all-zero latent frame."""
    if not images:
        return torch.zeros(1, vae.config.z_dim, 1, height // 8, width // 8, device=vae.device,
                           dtype=vae.output_dtype)
    latents = [vae.encode(fit_reference(img, height, width)[None, :, None].to(vae.device, vae.dtype)) for img in images]
    return torch.cat(latents, dim=2)


_ZERO_LATENTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def zero_video_latent(vae, height: int, width: int, latent_frames: int) -> torch.Tensor:
    """The VAE latent of an all-zero (grey) video, `[1, 16, latent_frames, height/8, width/8]`, cached per VAE and
    size. HuMo ships it precomputed (`zero_vae_*.pt`); the causal VAE makes the first n latent frames of a longer
    encode equal to a shorter encode, so one cached encode serves every shorter request."""
    sizes = _ZERO_LATENTS.setdefault(vae, {})
    cached = sizes.get((height, width))
    if cached is None or cached.shape[2] < latent_frames:
        video = torch.zeros(1, 3, 4 * (latent_frames - 1) + 1, height, width, device=vae.device, dtype=vae.dtype)
        cached = sizes[(height, width)] = vae.encode(video)
    return cached[:, :, :latent_frames]


def humo_y(zero_latent: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y with the reference, y_null) `[1, 20, T, h, w]` from the zero-video latent `[1, 16, T, h, w]` and the
    reference latents `[1, 16, n_ref, h, w]`; both carry the mask (ones on the last n_ref frames)."""
    if reference.shape[3:] != zero_latent.shape[3:]:
        raise ValueError(f"the reference latents are {tuple(reference.shape[3:])} (h, w) but the video latents are "
                         f"{tuple(zero_latent.shape[3:])}; encode the reference images at the video size.")
    frames, n_ref = zero_latent.shape[2], reference.shape[2]
    if n_ref >= frames:
        raise ValueError(f"{n_ref} reference frames leave no video frame in {frames} latent frames")
    mask = torch.zeros(1, 4, frames, *zero_latent.shape[3:], device=zero_latent.device, dtype=zero_latent.dtype)
    mask[:, :, frames - n_ref:] = 1
    with_ref = torch.cat([zero_latent[:, :, :frames - n_ref], reference.to(zero_latent)], dim=2)
    return torch.cat([mask, with_ref], dim=1), torch.cat([mask, zero_latent], dim=1)


# ---------------------------------------------------------------------------------------------- generation

def window_frames(total: int, frames: int) -> int:
    """Frames per window: `frames`, or the shortest 1 + 4k covering `total` when the audio is shorter."""
    return min(frames, 4 * math.ceil(max(total - 1, 1) / 4) + 1)


class HumoContinuation(Continuation):
    """HuMo windows: the reference latents stay at the end of every window (in `y`, or in the latents for
    HuMo-1.7B); a later window pins its motion latents into its first latent frames."""

    def __init__(self, model, vae: VaeCalls, bands: torch.Tensor, settings: HumoSettings, n_lat: int, n_ref: int,
                 make_cond, runner, height: int, width: int):
        self.model, self.vae, self.bands, self.settings = model, vae, bands.float(), settings
        self.n_lat, self.n_ref, self.make_cond, self.runner = n_lat, n_ref, make_cond, runner
        self.plan = settings.plan(latent_reference=takes_reference_in_latents(model))
        self.device = next(model.parameters()).device
        self.shape = (1, 16, n_lat + n_ref, height // 8, width // 8)

    def prepare(self, index: int, start: int, motion, draw) -> Window:
        pinned = None if motion is None else self.vae.encode(motion[None]).to(self.device).float()
        windows = humo_audio_windows(self.bands, self.n_lat, self.n_ref, start=start)
        cond = self.make_cond(humo_conditioning(self.model, windows.to(self.device)))
        scheduler = make_scheduler(self.settings.scheduler, self.settings.steps, self.settings.shift)
        return Window(self.runner, draw(self.shape).to(self.device), scheduler, cond, self.plan, pinned)

    def finish(self, latent: torch.Tensor) -> torch.Tensor:
        return video_to_unit(self.vae.decode(latent[:, :, :self.n_lat]))


def generate_humo_video(model, vae, text: Conditioning, bands: torch.Tensor, references=None, *, height: int,
                        width: int, settings: HumoSettings = HUMO_DEFAULTS, resume_dir: str | None = None,
                        on_step: Callable[[int, int, int, int], None] | None = None) -> torch.Tensor:
    """Video for the whole audio: float32 frames `[N, height, width, 3]` in [0, 1] (ComfyUI's IMAGE), N = audio
    frames at 25 fps (or max_frames).

    text: `context` / `negative_context` (its other fields are filled here). bands: HuMo Whisper bands
    `[T25, 5, C]` (`humo.audio_features.humo_bands`). references: reference images `[3, H, W]` in [-1, 1] (any
    size, fitted on white), or None. resume_dir: root folder of saved windows (a sub-folder per run key).
    on_step(window, windows, step, steps) runs after every step (raise there to stop; finished windows stay saved)."""
    settings.validate()
    if height % 16 or width % 16:
        raise ValueError(f"the video size must be a multiple of 16 in both directions, got {width}x{height}")
    if bands.dim() != 3 or bands.shape[1:] != (model.cfg.audio.bands, model.cfg.audio.audio_channels):
        raise ValueError(f"HuMo audio bands must be [frames, {model.cfg.audio.bands}, {model.cfg.audio.audio_channels}]"
                         f" (humo_bands of Whisper-large-v3 states); got {tuple(bands.shape)}")
    device = next(model.parameters()).device
    total = min(bands.shape[0], settings.max_frames) if settings.max_frames > 0 else bands.shape[0]
    if total < 1:
        raise ValueError("the audio is shorter than one video frame (1/25 s)")
    frames = window_frames(total, settings.frames)
    geometry = WindowGeometry(frames, settings.motion_frames, total)
    key = ""
    if resume_dir:
        key = run_key(settings, bands, text.context, text.negative_context, *(references or []),
                      text=f"{height}x{width}|references={len(references or [])}|{model_identity(model)}|"
                           f"{vae_identity(vae)}")
    store = WindowStore(resume_dir, key, geometry.stored_shape(height, width))
    lat_frames = (frames - 1) // 4 + 1 + (1 if references is not None else 0)
    memory_plan.check_before_sampling(model, memory_plan.RunSettings(lat_frames * (height // 16) * (width // 16)),
                                      memory_plan.DecodeSettings(frames, height, width, dtype_bytes=vae.dtype.itemsize))
    with torch.no_grad():
        reference = encode_references(vae, references, height, width)
        n_lat, n_ref = (frames - 1) // 4 + 1, reference.shape[2]
        null_audio = zero_humo_conditioning(model, n_lat + n_ref)
        if takes_reference_in_latents(model):
            runner = ReferenceInLatents(model)
            make_cond = lambda audio: LatentReferenceConditioning(text.context, text.negative_context,
                                                                  reference.to(device).float(), audio, null_audio)
        else:
            y, y_null = (t.to(device) for t in humo_y(zero_video_latent(vae, height, width, n_lat + n_ref), reference))
            y = y_null if settings.guidance == "ta" else y
            runner = model
            make_cond = lambda audio: Conditioning(text.context, text.negative_context, None, y, y_null, audio=audio,
                                                   audio_null=null_audio)
        strategy = HumoContinuation(model, VaeCalls(vae, model), bands, settings, n_lat, n_ref, make_cond, runner,
                                    height, width)
        return run_windows(strategy, geometry, height=height, width=width, noise=SeededNoise(settings.seed),
                           store=store, label="HuMo window", on_step=on_step)
