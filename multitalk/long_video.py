"""InfiniteTalk / MultiTalk long video: their continuation strategy for the window engine (`wanvideo.windows`),
video dubbing, and continuing an earlier sampler's video.

Each window of `frame_window` frames (81) is denoised with its own audio; its first `motion_frames` frames are
the last frames of the video so far. The audio advances by `frame_window - motion_frames` per window. Two ways
to continue a window (`LongVideoSettings.continuation`, docs/NOTES.md §3.5):
- "infinitetalk": `y` holds the window's reference frame; the motion frames (9) are VAE-encoded and pinned clean
  before and after every step (in the first window the reference frame's own latent, encoded alone).
- "multitalk": `y` holds the motion frames (official 25) with the I2V mask over them; their latents are
  written into the latent noised to the current level, `(1 - sigma) x + sigma eps`, before the first step and
  after every update (clean only after the last); the first window is plain I2V.

Video dubbing (official `generate_infinitetalk`, the `cond_video` path): the conditioning is a video; each
window's reference frame (the first-frame latent in `y` and the CLIP features) is the video's frame at that
window's audio start index (25 fps; a video at another rate is indexed by time; past its end, its last frame);
the colour reference stays the video's first frame. A one-frame video is image-to-video.

Continuing an earlier video (`previous_frames`, ComfyUI's WanInfiniteTalkToVideo convention): the audio covers the
whole timeline, the previous video's P frames and then the new part; the first window starts at P - motion_frames
with the previous video's last motion frames as its motion frames, exactly like the next window of one longer
run (same audio indices, same noise: window noise is seeded by the window's place on the timeline). Only the new
frames (P onwards) are returned. Chaining A (max_frames P) then B on the same audio equals one run when P is a
window end (81 + 72k with the defaults).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..wanvideo import memory_plan
from ..wanvideo.guidance import AdaptiveProjectedGuidance
from ..wanvideo.resume import WindowStore, model_identity, run_key, vae_identity
from ..wanvideo.sampling import Conditioning, Guidance, i2v_mask
from ..wanvideo.schedulers import make_scheduler
from ..wanvideo.windows import (Continuation, NoiseProvider, SeededNoise, VaeCalls, Window, WindowGeometry,
                                run_windows, to_uint8, video_to_unit)
from .color_match import match_colors
from .conditioning import audio_conditioning, zero_audio_conditioning

log = logging.getLogger("wantalk")

CONTINUATIONS = ("infinitetalk", "multitalk")
AUDIO_FPS = 25


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
    max_frames: int = 0            # 0: the whole audio; else the timeline ends here (previous frames included)
    audio_scale_embeds: float = 1.0
    vae_tile: int = 0              # spatial VAE tile size in pixels (0: untiled); bounds decode memory at 720p
    continuation: str = "infinitetalk"   # how a window continues the previous one: one of CONTINUATIONS
    apg: bool = False              # adaptive projected guidance (official --use_apg), fresh momentum per window
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0

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


def extend_audio(features: torch.Tensor, end: int) -> torch.Tensor:
    """Features for windows that end at frame `end`: the official end-of-audio padding, when the last window
    reaches the audio's end (`end >= len`), appends a time-flipped copy of the last `end - len + 3` frames, so the
    last frames' +-2 context is mirrored audio (repeated for audio shorter than that)."""
    if features.shape[0] > end:
        return features
    while features.shape[0] < end + 3:
        miss = min(end - features.shape[0] + 3, features.shape[0])
        features = torch.cat([features, features[-miss:].flip(0)], dim=0)
    return features


def frame_windows(features: torch.Tensor, start: int, count: int, half: int = 2) -> torch.Tensor:
    """`[count, 2*half+1, ...]`: for video frame i in [start, start+count) the features of i-half..i+half, clamped."""
    idx = torch.arange(start, start + count)[:, None] + torch.arange(-half, half + 1)[None, :]
    return features[idx.clamp(0, features.shape[0] - 1)]


def reference_frame_index(start: int, fps: float, count: int) -> int:
    """The conditioning video's frame for a window starting at timeline frame `start` (25 fps): the frame shown at
    time start / 25 (frame i covers [i / fps, (i + 1) / fps)), its last frame past its end."""
    return min(math.floor(start * fps / AUDIO_FPS + 1e-9), count - 1)


def motion_mask(frames: int, motion_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The I2V mask `[4, latent frames, lat_h, lat_w]` with ones over the latent frames of the first
    `motion_frames` pixel frames (1 + (motion_frames - 1) // 4 of them; 1 for a single start image)."""
    mask = i2v_mask(frames, lat_h, lat_w)
    mask[:, :1 + (motion_frames - 1) // 4] = 1
    return mask


class NoisedMotion:
    """MultiTalk's continuation around a scheduler: after every update the first latent frames are replaced by the
    motion latents noised to the level the latent has reached, `(1 - sigma) x + sigma eps` with fresh noise from
    `draw(shape)` (the official `add_noise` at the next time; clean after the last step, where sigma is 0)."""

    def __init__(self, scheduler, motion: torch.Tensor, draw: Callable[[tuple], torch.Tensor]):
        self.scheduler, self.motion, self.draw = scheduler, motion.float(), draw
        self.timesteps = scheduler.timesteps

    def __len__(self) -> int:
        return len(self.scheduler)

    def inject(self, latent: torch.Tensor, index: int) -> torch.Tensor:
        """Write the motion latents at noise level `sigmas[index]` into the first frames of `latent` (in place)."""
        sigma = self.scheduler.sigmas[index].to(self.motion.device)
        eps = self.draw(tuple(self.motion.shape)).to(self.motion.device)
        latent[:, :, :self.motion.shape[2]] = ((1 - sigma) * self.motion + sigma * eps).to(latent.dtype)
        return latent

    def step(self, velocity: torch.Tensor, index: int, latent: torch.Tensor) -> torch.Tensor:
        return self.inject(self.scheduler.step(velocity, index, latent), index + 1)


def _as_frames(frames) -> tuple:
    """`[3, H, W]`, `[F, 3, H, W]` or a sequence of `[3, H, W]` -> (sequence, count, height, width)."""
    if isinstance(frames, torch.Tensor) and frames.dim() == 3:
        frames = frames[None]
    count = len(frames)
    if count < 1:
        raise ValueError("the conditioning video has no frames")
    first = frames[0]
    if first.dim() != 3 or first.shape[0] != 3:
        raise ValueError(f"conditioning frames must be [3, H, W] in [-1, 1], got {tuple(first.shape)}")
    return frames, count, first.shape[1], first.shape[2]


def previous_motion(previous: torch.Tensor, motion_frames: int, height: int, width: int) -> torch.Tensor:
    """The last `motion_frames` frames of an earlier video `[P, H, W, 3]` (float in [0, 1] or uint8) as uint8,
    the form the window loop keeps its own motion frames in."""
    if not isinstance(previous, torch.Tensor) or previous.dim() != 4 or previous.shape[-1] < 3:
        raise ValueError(f"previous_frames must be an IMAGE batch [frames, height, width, 3], got "
                         f"{tuple(getattr(previous, 'shape', ()))}")
    if previous.shape[0] < motion_frames:
        raise ValueError(f"previous_frames has {previous.shape[0]} frames but the continuation needs at least "
                         f"motion_frames = {motion_frames}; connect the whole earlier video or lower motion_frames")
    if tuple(previous.shape[1:3]) != (height, width):
        raise ValueError(f"previous_frames are {previous.shape[2]}x{previous.shape[1]} but this video is "
                         f"{width}x{height}; use the width and height of the sampler that made them")
    tail = previous[-motion_frames:, :, :, :3].cpu()
    if tail.dtype == torch.uint8:
        return tail.clone()
    tail = tail.float()
    if not tail.isfinite().all():
        raise ValueError("previous_frames contain NaN or inf values")
    return to_uint8(tail.clamp(0, 1))


class TalkContinuation(Continuation):
    """InfiniteTalk / MultiTalk windows, with a per-window reference frame for dubbing."""

    def __init__(self, model, vae: VaeCalls, frames, fps: float, text: Conditioning, features: list,
                 masks, settings: LongVideoSettings, encode_clip):
        self.model, self.vae, self.frames, self.fps, self.text = model, vae, frames, fps, text
        self.features, self.masks, self.settings, self.encode_clip = features, masks, settings, encode_clip
        self.device = next(model.parameters()).device
        self.count, self.height, self.width = len(frames), frames[0].shape[1], frames[0].shape[2]
        self.lat_shape = (1, 16, (settings.frame_window - 1) // 4 + 1, self.height // 8, self.width // 8)
        self.multitalk = settings.continuation == "multitalk"
        self.colour_reference = video_to_unit(frames[0][None, :, None].float())[0]
        self.null_audio = zero_audio_conditioning(model, settings.frame_window)
        self._cached = (None, None)

    def clip_features(self, frame: torch.Tensor):
        """CLIP features of `frame` (encode_clip), or the given ones without an encoder."""
        return self.text.clip_fea if self.encode_clip is None else self.encode_clip(frame).to(self.device)

    def condition_on(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`y` for a window that starts with `frames` `[3, m, H, W]` (zeros after them), and their latents."""
        m, fw = frames.shape[1], self.settings.frame_window
        padded = torch.cat([frames.float(), frames.new_zeros(3, fw - m, self.height, self.width).float()], 1)
        latent = self.vae.encode(padded[None])
        mask = motion_mask(fw, m, self.lat_shape[3], self.lat_shape[4])[None].to(latent)
        return torch.cat([mask, latent], 1).to(self.device), latent[:, :, :1 + (m - 1) // 4]

    def reference(self, start: int) -> tuple:
        """(y, the frame's own latent or None, CLIP features) of the reference frame for a window at `start`;
        encoded once per distinct frame. Precomputed CLIP features (`text.clip_fea`) serve a single image."""
        index = reference_frame_index(start, self.fps, self.count)
        if self._cached[0] != index:
            frame = self.frames[index].float()
            y, _ = self.condition_on(frame[:, None])
            own = None if self.multitalk else self.vae.encode(frame[None, :, None]).to(self.device).float()
            one_image_features = self.count == 1 and self.text.clip_fea is not None
            clip_fea = self.text.clip_fea if one_image_features else self.clip_features(frame)
            self._cached = (index, (y, own, clip_fea))
        return self._cached[1]

    def prepare(self, index: int, start: int, motion, draw) -> Window:
        s = self.settings
        noise = draw(self.lat_shape).to(self.device)
        scheduler = make_scheduler(s.scheduler, s.steps, s.shift)
        if self.multitalk and motion is not None:
            y, motion_latent = self.condition_on(motion)
            clip_fea = self.clip_features(motion[:, -1])
            scheduler = NoisedMotion(scheduler, motion_latent.to(self.device), draw)
            noise = scheduler.inject(noise, 0)
            pinned = None
        else:
            y, own, clip_fea = self.reference(start)
            pinned = own if motion is None else (
                None if self.multitalk else self.vae.encode(motion[None]).to(self.device).float())
        windows = torch.stack([frame_windows(f, start, s.frame_window) for f in self.features])
        cond = Conditioning(self.text.context, self.text.negative_context, clip_fea, y,
                            audio=audio_conditioning(self.model, windows.to(self.device), self.masks),
                            audio_null=self.null_audio)
        return Window(self.model, noise, scheduler, cond, self.guidance(), pinned)

    def guidance(self):
        """The window's guidance; APG's momentum lives for one window, as in the official loop."""
        s = self.settings
        if not s.apg:
            return Guidance("infinitetalk", text_scale=s.text_scale, audio_scale=s.audio_scale)
        return AdaptiveProjectedGuidance(s.text_scale, s.audio_scale, s.apg_momentum, s.apg_norm_threshold)

    def finish(self, latent: torch.Tensor) -> torch.Tensor:
        decoded = video_to_unit(self.vae.decode(latent))
        return match_colors(decoded, self.colour_reference, self.settings.color_correction)


def generate_long_video(model, vae, frames, audio: TalkAudio, text: Conditioning,
                        settings: LongVideoSettings = LongVideoSettings(), *, fps: float = 25.0,
                        previous_frames: torch.Tensor | None = None,
                        encode_clip: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        noise: NoiseProvider | None = None, resume_dir: str | None = None, run_identity: str = "",
                        on_step: Callable[[int, int, int, int], None] | None = None,
                        on_window: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Talking video for the audio: float32 frames `[N, H, W, 3]` in [0, 1] (ComfyUI's IMAGE), N = audio frames
    (or max_frames) minus the frames of `previous_frames`.

    frames: the conditioning image `[3, H, W]` or video `[F, 3, H, W]` in [-1, 1] at the video size (H, W
    multiples of 16), or any sequence of `[3, H, W]` frames (only the windows' reference frames are read). fps:
    the video's frame rate. previous_frames: an earlier video `[P, H, W, 3]` to continue (see the module notes).
    encode_clip: `[3, H, W]` in [-1, 1] -> CLIP features `[1, 257, 1280]`, called for each window's reference
    frame of a video (for a single image only when `text.clip_fea` is None) and, multitalk, each window's last
    motion frame; None: `text.clip_fea` throughout. noise: `(window index on the
    timeline, shape) -> float32 CPU tensor` (default: SeededNoise(settings.seed)); it is called for a window's
    initial noise, then for each MultiTalk motion injection; for resume a custom provider needs a `key` string.
    resume_dir: root folder of saved windows (a sub-folder per run key). run_identity: text folded into the run
    key for what the other inputs do not show (the node: the CLIP encoder in use). on_step(window, windows, step,
    steps) after every step (raise there to stop; finished windows stay saved); on_window(index, uint8 new frames)
    after each.
    """
    settings.validate()
    frames, count, height, width = _as_frames(frames)
    if height % 16 or width % 16:
        raise ValueError(f"the image size must be a multiple of 16 in both directions, got {width}x{height}")
    if not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"the conditioning video's frame rate must be positive, got {fps}")
    multitalk = settings.continuation == "multitalk"
    if multitalk and count > 1:
        raise ValueError("video dubbing needs continuation 'infinitetalk' (the multitalk continuation conditions "
                         "each window on its motion frames, not on the input video)")
    n_audio = audio.num_frames
    total = min(n_audio, settings.max_frames) if settings.max_frames > 0 else n_audio
    if total < 1:
        raise ValueError("the audio is shorter than one video frame (1/25 s)")
    tail, previous = None, 0
    if previous_frames is not None:
        tail = previous_motion(previous_frames, settings.motion_frames, height, width)
        previous = previous_frames.shape[0]
        if total <= previous:
            raise ValueError(f"the audio ({total} frames at 25 fps{', max_frames' if total < n_audio else ''}) ends "
                             f"before the previous video ({previous} frames) does; when continuing, the audio "
                             f"covers the previous video and then the new part (e.g. Audio Concat of both clips)")
    if multitalk and encode_clip is None:
        log.info("wantalk: multitalk continuation without a CLIP vision model: every window keeps the start "
                 "image's CLIP features (the official code re-encodes each window's last motion frame)")
    geometry = WindowGeometry(settings.frame_window, settings.motion_frames, total, previous)
    starts = geometry.starts
    end = starts[-1] + settings.frame_window
    features = [extend_audio(f[:n_audio].float() * settings.audio_scale_embeds, end) for f in audio.features]
    noise, store = _noise_and_store(model, vae, frames, count, fps, audio, text, settings, geometry, tail, noise,
                                    encode_clip, resume_dir, run_identity, height, width)
    lat_h, lat_w, lat_f = height // 8, width // 8, (settings.frame_window - 1) // 4 + 1
    memory_plan.check_before_sampling(
        model, memory_plan.RunSettings(lat_f * (lat_h // 2) * (lat_w // 2), two_speakers=len(audio.features) == 2),
        memory_plan.DecodeSettings(settings.frame_window, height, width, settings.vae_tile or None,
                                   dtype_bytes=vae.dtype.itemsize))
    with torch.no_grad():
        strategy = TalkContinuation(model, VaeCalls(vae, model, settings.vae_tile), frames, fps, text, features,
                                    audio.masks, settings, encode_clip)
        return run_windows(strategy, geometry, height=height, width=width, noise=noise, store=store,
                           previous_tail=tail, extra_host_bytes=sum(f.numel() * 4 for f in features),
                           on_step=on_step, on_window=on_window)


def _noise_and_store(model, vae, frames, count, fps, audio, text, settings, geometry, tail, noise, encode_clip,
                     resume_dir, run_identity, height, width):
    """The noise provider and the window store, whose key covers every input that determines the frames."""
    if noise is None:
        noise, noise_key = SeededNoise(settings.seed), "seeded"
    else:
        noise_key = getattr(noise, "key", None)
        if resume_dir and noise_key is None:
            log.warning("wantalk: a custom noise provider without a `key`: windows are not saved or resumed")
            resume_dir = None
    key = ""
    if resume_dir:
        used = sorted({reference_frame_index(s, fps, count) for s in geometry.starts})
        key = run_key(settings, tail, text.context, text.negative_context, text.clip_fea, *audio.features,
                      audio.masks, *(frames[i] for i in used),
                      text=f"{geometry}|fps={fps}|frames={count}|used={used}|clip={encode_clip is not None}|"
                           f"noise={noise_key}|{model_identity(model)}|{vae_identity(vae)}|{run_identity}")
    store = WindowStore(resume_dir, key, geometry.stored_shape(height, width))
    return noise, store
