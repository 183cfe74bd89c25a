"""InfiniteTalk / MultiTalk long-video generation: overlapping windows of any count in bounded memory, resumable.

Each window of `frame_window` frames (81) is denoised with its own audio; its first `motion_frames` frames are
the last frames of the video so far. The audio advances by `frame_window - motion_frames` per window. Two ways
to continue a window (`LongVideoSettings.continuation`, REFERENCE.md 5.6):
- "infinitetalk": `y` always holds the start image; the motion frames (9) are VAE-encoded and pinned clean
  before and after every step (also the image latent in the first window).
- "multitalk": `y` holds the motion frames (official 25) with the I2V mask over them; their latents are
  written into the latent noised to the current level, `(1 - sigma) x + sigma eps`, before the first step and
  after every update (clean only after the last); the first window is plain I2V.
Finished frames are kept on the CPU as uint8, and the next window's motion frames are always taken from those
stored frames, so a run resumed from saved windows produces exactly the frames of an uninterrupted run with the
same seed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..wanvideo import memory_plan
from ..wanvideo.block_swap import release_vram
from ..wanvideo.sampling import Conditioning, Guidance, denoise, i2v_mask
from ..wanvideo.schedulers import make_scheduler
from .color_match import match_colors
from .conditioning import audio_conditioning, zero_audio_conditioning

log = logging.getLogger("wantalk")

CONTINUATIONS = ("infinitetalk", "multitalk")


@dataclass(frozen=True)
class LongVideoSettings:
    frame_window: int = 81
    motion_frames: int = 9
    steps: int = 40
    shift: float = 7.0
    scheduler: str = "infinitetalk_euler"
    text_scale: float = 5.0
    audio_scale: float = 4.0
    seed: int = 42
    color_correction: float = 1.0
    max_frames: int = 0            # 0: the whole audio
    audio_scale_embeds: float = 1.0
    vae_tile: int = 0              # spatial VAE tile size in pixels (0: untiled); bounds decode memory at 720p
    continuation: str = "infinitetalk"   # how a window continues the previous one: one of CONTINUATIONS

    def validate(self):
        if self.continuation not in CONTINUATIONS:
            raise ValueError(f"continuation must be one of {CONTINUATIONS}, got {self.continuation!r}")
        if (self.frame_window - 1) % 4 or self.frame_window < 5:
            raise ValueError(f"frame_window must be 1 + 4k (e.g. 81), got {self.frame_window}")
        if not 1 <= self.motion_frames < self.frame_window or (self.motion_frames - 1) % 4:
            raise ValueError(f"motion_frames must be 1 + 4k and smaller than frame_window (e.g. 9), "
                             f"got {self.motion_frames}")


@dataclass
class TalkAudio:
    """Per-speaker wav2vec2 features at 25 fps, `[frames, 12, 768]` each, and optional speaker masks `[3, H, W]`."""
    features: list
    masks: torch.Tensor | None = None

    @property
    def num_frames(self) -> int:
        return min(f.shape[0] for f in self.features)


def window_starts(total_frames: int, frame_window: int, motion_frames: int) -> list[int]:
    """First video frame of each window: 0, then steps of frame_window - motion_frames until the end is covered."""
    starts = [0]
    while starts[-1] + frame_window < total_frames:
        starts.append(starts[-1] + frame_window - motion_frames)
    return starts


def extend_audio(features: torch.Tensor, end: int) -> torch.Tensor:
    """Make `features` reach `end` frames: the official end-of-audio padding appends a time-flipped copy of the
    last `end - len + 3` frames (repeated for audio shorter than that)."""
    while features.shape[0] < end:
        miss = min(end - features.shape[0] + 3, features.shape[0])
        features = torch.cat([features, features[-miss:].flip(0)], dim=0)
    return features


def frame_windows(features: torch.Tensor, start: int, count: int, half: int = 2) -> torch.Tensor:
    """`[count, 2*half+1, ...]`: for video frame i in [start, start+count) the features of i-half..i+half, clamped."""
    idx = torch.arange(start, start + count)[:, None] + torch.arange(-half, half + 1)[None, :]
    return features[idx.clamp(0, features.shape[0] - 1)]


def _last_frames(chunks: list[torch.Tensor], count: int) -> torch.Tensor:
    """The last `count` frames of the video so far, touching only the chunks needed (no growing concatenation)."""
    needed, have = [], 0
    for chunk in reversed(chunks):
        needed.append(chunk)
        have += len(chunk)
        if have >= count:
            break
    return torch.cat(needed[::-1])[-count:]


def video_to_unit(frames_m1: torch.Tensor) -> torch.Tensor:
    """`[1, 3, F, H, W]` in [-1, 1] -> `[F, H, W, 3]` in [0, 1], float32 on the CPU."""
    return ((frames_m1[0].float().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu()


def to_uint8(frames01: torch.Tensor) -> torch.Tensor:
    return (frames01 * 255).round().clamp(0, 255).to(torch.uint8)


class NoisedMotion:
    """MultiTalk's continuation around a scheduler: after every update the first latent frames are replaced by the
    motion latents noised to the level the latent has reached, `(1 - sigma) x + sigma eps` with fresh noise from
    `generator` (the official `add_noise` at the next time; clean after the last step, where sigma is 0)."""

    def __init__(self, scheduler, motion: torch.Tensor, generator: torch.Generator):
        self.scheduler, self.motion, self.generator = scheduler, motion.float(), generator
        self.timesteps = scheduler.timesteps

    def __len__(self) -> int:
        return len(self.scheduler)

    def inject(self, latent: torch.Tensor, index: int) -> torch.Tensor:
        """Write the motion latents at noise level `sigmas[index]` into the first frames of `latent` (in place)."""
        sigma = self.scheduler.sigmas[index].to(self.motion.device)
        eps = torch.randn(self.motion.shape, generator=self.generator).to(self.motion.device)
        latent[:, :, :self.motion.shape[2]] = ((1 - sigma) * self.motion + sigma * eps).to(latent.dtype)
        return latent

    def step(self, velocity: torch.Tensor, index: int, latent: torch.Tensor) -> torch.Tensor:
        return self.inject(self.scheduler.step(velocity, index, latent), index + 1)


def motion_mask(frames: int, motion_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The I2V mask `[4, latent frames, lat_h, lat_w]` with ones over the latent frames of the first
    `motion_frames` pixel frames (1 + (motion_frames - 1) // 4 of them; 1 for a single start image)."""
    mask = i2v_mask(frames, lat_h, lat_w)
    mask[:, :1 + (motion_frames - 1) // 4] = 1
    return mask


def model_identity(model, samples: int = 64) -> str:
    """A cheap digest of the weights (a fixed strided sample of every tensor, as stored), so that windows saved
    with other weights (another checkpoint, LoRA or quantization) are never resumed."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
        h.update(name.encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(settings, *tensors, extra: str = "") -> str:
    """Identity of a run's inputs (settings dataclass + tensors + extra text)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(extra.encode())
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class WindowStore:
    """Finished windows on disk (`window_0003.safetensors`), valid only for the run with the same fingerprint."""

    def __init__(self, folder: str | None, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        if folder:
            os.makedirs(folder, exist_ok=True)

    def _path(self, index: int) -> str:
        return os.path.join(self.folder, f"window_{index:04d}.safetensors")

    def load(self, index: int) -> torch.Tensor | None:
        if not self.folder or not os.path.isfile(self._path(index)):
            return None
        from safetensors import safe_open
        with safe_open(self._path(index), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != self.fingerprint:
                return None
        return load_file(self._path(index))["frames"]

    def save(self, index: int, frames: torch.Tensor) -> None:
        if self.folder:
            tmp = self._path(index) + ".tmp"
            save_file({"frames": frames.contiguous()}, tmp, metadata={"fingerprint": self.fingerprint})
            os.replace(tmp, self._path(index))


def generate_long_video(model, vae, image: torch.Tensor, audio: TalkAudio, text: Conditioning,
                        settings: LongVideoSettings = LongVideoSettings(), *, resume_dir: str | None = None,
                        encode_clip: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        on_step: Callable[[int, int, int, int], None] | None = None,
                        on_window: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Talking video for the whole audio: uint8 frames `[N, H, W, 3]`, N = audio frames (or max_frames).

    image: the reference frame `[3, H, W]` in [-1, 1] (H, W multiples of 16). text: contexts and CLIP features
    (its `y`/`audio` fields are filled here). encode_clip (multitalk continuation only): `[3, H, W]` frame in
    [-1, 1] -> CLIP features, for the official re-encoding of each window's last motion frame; without it the
    start image's features are kept. on_step(window, windows, step, steps) is called after every step (raise
    there to stop; finished windows stay saved); on_window(index, uint8 frames) after each window.
    """
    settings.validate()
    _, height, width = image.shape
    if height % 16 or width % 16:
        raise ValueError(f"the image size must be a multiple of 16 in both directions, got {width}x{height}")
    device = next(model.parameters()).device
    n_audio = audio.num_frames
    total = min(n_audio, settings.max_frames) if settings.max_frames > 0 else n_audio
    if total < 1:
        raise ValueError("the audio is shorter than one video frame (1/25 s)")
    multitalk = settings.continuation == "multitalk"
    if multitalk and encode_clip is None:
        log.info("wantalk: multitalk continuation without a CLIP vision model: every window keeps the start "
                 "image's CLIP features (the official code re-encodes each window's last motion frame)")
    starts = window_starts(total, settings.frame_window, settings.motion_frames)
    end = starts[-1] + settings.frame_window
    features = [extend_audio(f[:n_audio].float() * settings.audio_scale_embeds, end) for f in audio.features]
    clip_mode = "reencode_clip" if multitalk and encode_clip is not None else ""
    store = WindowStore(resume_dir, fingerprint(settings, image, text.context, text.negative_context, text.clip_fea,
                                                *audio.features, audio.masks,
                                                extra=(model_identity(model) if resume_dir else "") + clip_mode))
    lat_h, lat_w, lat_f = height // 8, width // 8, (settings.frame_window - 1) // 4 + 1
    plan = Guidance("infinitetalk", text_scale=settings.text_scale, audio_scale=settings.audio_scale)
    reference01 = video_to_unit(image[None, :, None])[0]
    tiles = {"tile_size": settings.vae_tile} if settings.vae_tile else {}

    def vae_encode(video):
        release_vram(model)  # block-swapped models hand their resident GPU copies back while the VAE runs
        return vae.encode(video.to(vae.dtype), **tiles)

    def vae_decode(latent):
        release_vram(model)
        return vae.decode(latent.to(vae.dtype), **tiles)

    def condition_on(frames):
        """`y` for a window that starts with `frames` `[3, m, H, W]` (zeros after them), and their latents."""
        m = frames.shape[1]
        latent = vae_encode(torch.cat([frames, frames.new_zeros(3, settings.frame_window - m, height, width)], 1)[None])
        mask = motion_mask(settings.frame_window, m, lat_h, lat_w)[None].to(latent)
        return torch.cat([mask, latent], 1).to(device), latent[:, :, :1 + (m - 1) // 4]

    memory_plan.check_before_sampling(
        model, memory_plan.RunSettings(lat_f * (lat_h // 2) * (lat_w // 2), two_speakers=len(audio.features) == 2),
        memory_plan.DecodeSettings(settings.frame_window, height, width, settings.vae_tile or None,
                                   dtype_bytes=vae.dtype.itemsize))
    with torch.no_grad():
        image_y, image_latent = condition_on(image[:, None])  # causal VAE: the first latent is the image alone
        null_audio = zero_audio_conditioning(model, settings.frame_window)
        frames: list[torch.Tensor] = []
        for w, start in enumerate(starts):
            stored = store.load(w)
            if stored is None:
                generator = torch.Generator().manual_seed(settings.seed + w)
                noise = torch.randn(1, 16, lat_f, lat_h, lat_w, generator=generator).to(device)
                scheduler = make_scheduler(settings.scheduler, settings.steps, settings.shift)
                y, clip_fea, pinned = image_y, text.clip_fea, None if multitalk else image_latent.to(device).float()
                if w > 0:
                    previous = _last_frames(frames, settings.motion_frames).float() / 255 * 2 - 1
                    previous = previous.permute(3, 0, 1, 2)  # [3, m, H, W]
                    if multitalk:
                        y, motion = condition_on(previous)
                        if encode_clip is not None:
                            clip_fea = encode_clip(previous[:, -1]).to(device)
                        scheduler = NoisedMotion(scheduler, motion.to(device), generator)
                        noise = scheduler.inject(noise, 0)
                    else:
                        pinned = vae_encode(previous[None]).to(device).float()
                windows = torch.stack([frame_windows(f, start, settings.frame_window) for f in features])
                cond = Conditioning(text.context, text.negative_context, clip_fea, y,
                                    audio=audio_conditioning(model, windows.to(device), audio.masks),
                                    audio_null=null_audio)
                step_cb = None if on_step is None else (lambda i, _lat, w=w: on_step(w, len(starts), i + 1, len(scheduler)))
                try:
                    latent = denoise(model, noise, scheduler, cond, plan, pinned=pinned, on_step=step_cb)
                    decoded = video_to_unit(vae_decode(latent))
                except torch.cuda.OutOfMemoryError:
                    raise memory_plan.MemoryPlanError(
                        f"wantalk: out of GPU memory in window {w + 1} of {len(starts)}"
                        f"{' (finished windows are saved; the next run resumes)' if resume_dir else ''}. Change one "
                        f"of: block swap (WanTalk Block Swap, blocks_to_swap -1), fp8/fp4 quantization, vae_tile 256, "
                        f"a smaller frame_window or resolution.") from None
                del latent, cond
                decoded = match_colors(decoded, reference01, settings.color_correction)
                stored = to_uint8(decoded if w == 0 else decoded[settings.motion_frames:])
                store.save(w, stored)
            frames.append(stored)
            if on_window is not None:
                on_window(w, stored)
            log.info("wantalk: window %d/%d done (%d frames so far)", w + 1, len(starts), sum(map(len, frames)))
    return torch.cat(frames)[:total]
