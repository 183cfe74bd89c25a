"""The one window engine for long videos (InfiniteTalk, MultiTalk, HuMo): windows on the audio's timeline, motion
frames, the resume store, VRAM release around the VAE, out-of-memory advice, progress and interrupt.

A model brings a small continuation strategy (`Continuation`): what one window's noise, conditioning, scheduler
and pinned latents are, given its start on the timeline and the motion frames it continues from, and how its
latent becomes frames. The engine runs the windows in order: each window's first `motion_frames` frames are the
last frames of the window before, as decoded (the official loops' `videos[:, :, -motion_frames:]`), kept as the
stored uint8 frames (so a run resumed from saved windows, or a video continued from an earlier sampler's output,
gives exactly the frames of an uninterrupted run). A stored window holds all its decoded frames; its new ones go
straight into the one preallocated float32 output; only the last motion frames are kept between windows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import host_memory
from .block_swap import release_vram
from .checkpoint import nonfinite_count
from .memory_plan import MemoryPlanError
from .resume import WindowStore
from .sampling import denoise

log = logging.getLogger("wantalk")

NoiseProvider = Callable[[int, tuple], torch.Tensor]


def window_starts(total_frames: int, frame_window: int, motion_frames: int, first: int = 0) -> list[int]:
    """Timeline frame where each window starts: `first`, then steps of frame_window - motion_frames until
    `total_frames` is covered (the official loop's `audio_start_idx`)."""
    starts = [first]
    while starts[-1] + frame_window < total_frames:
        starts.append(starts[-1] + frame_window - motion_frames)
    return starts


@dataclass(frozen=True)
class WindowGeometry:
    """Where the windows sit on the audio's timeline. `previous` frames of an earlier video come first (0: a new
    video); a continuation's first window starts `motion_frames` before their end and only new frames are
    returned, `total - previous` of them."""
    frame_window: int
    motion_frames: int
    total: int
    previous: int = 0

    @property
    def continuing(self) -> bool:
        return self.previous > 0

    @property
    def starts(self) -> list[int]:
        first = self.previous - self.motion_frames if self.continuing else 0
        return window_starts(self.total, self.frame_window, self.motion_frames, first)

    @property
    def output_frames(self) -> int:
        return self.total - self.previous

    def stored_shape(self, height: int, width: int) -> tuple:
        """A stored window: every frame it decoded, uint8."""
        return (self.frame_window, height, width, 3)

    def noise_index(self, index: int) -> int:
        """The window's index on the timeline (its start over the window stride): a continuation's windows draw
        the noise that the same windows of one longer run draw."""
        return self.starts[index] // (self.frame_window - self.motion_frames)


class SeededNoise:
    """The default noise: window i draws from `torch.Generator().manual_seed(seed + i)`; later draws of the same
    window (MultiTalk's noised motion) continue that generator."""

    def __init__(self, seed: int):
        self.seed, self._index, self._generator = seed, None, None

    def __call__(self, index: int, shape: tuple) -> torch.Tensor:
        if index != self._index:
            self._index, self._generator = index, torch.Generator().manual_seed(self.seed + index)
        return torch.randn(shape, generator=self._generator)


@dataclass
class Window:
    """What `denoise` needs for one window."""
    runner: Any                                  # the model, or a wrapper (HuMo-1.7B's reference in the latents)
    noise: torch.Tensor
    scheduler: Any
    cond: Any
    plan: Any
    pinned: torch.Tensor | None = None


class Continuation:
    """A model's way to make one window. `prepare(index, start, motion, draw)` -> Window, where `motion` is None
    (the first window of a new video) or the motion frames `[3, m, H, W]` in [-1, 1], and `draw(shape)` gives this
    window's noise; `finish(latent)` -> frames `[F, H, W, 3]` float32 in [0, 1] on the CPU."""

    def prepare(self, index: int, start: int, motion: torch.Tensor | None, draw) -> Window:
        raise NotImplementedError

    def finish(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class VaeCalls:
    """The VAE as the windows use it: block-swapped models hand their resident GPU copies back first (the VAE's
    working set then has that memory), optional spatial tiles."""

    def __init__(self, vae, model, tile: int = 0):
        self.vae, self.model = vae, model
        self.tiles = {"tile_size": tile} if tile else {}

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        release_vram(self.model)
        return self.vae.encode(video.to(self.vae.device, self.vae.dtype), **self.tiles)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        release_vram(self.model)
        return self.vae.decode(latent.to(self.vae.dtype), **self.tiles)


def video_to_unit(frames_m1: torch.Tensor) -> torch.Tensor:
    """`[1, 3, F, H, W]` in [-1, 1] -> `[F, H, W, 3]` in [0, 1], float32 on the CPU."""
    return ((frames_m1[0].float().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu()


def to_uint8(frames01: torch.Tensor) -> torch.Tensor:
    return (frames01 * 255).round().clamp(0, 255).to(torch.uint8)


def motion_input(tail: torch.Tensor) -> torch.Tensor:
    """Stored uint8 frames `[m, H, W, 3]` -> motion frames `[3, m, H, W]` in [-1, 1], float32."""
    return (tail.float() / 255 * 2 - 1).permute(3, 0, 1, 2)


def out_of_memory_advice(index: int, windows: int, resumable: bool) -> str:
    return (f"wantalk: out of GPU memory in window {index + 1} of {windows}"
            f"{' (finished windows are saved; the next run resumes)' if resumable else ''}. Change one of: block "
            f"swap (WanTalk Block Swap, blocks_to_swap -1), fp8/fp4 quantization, vae_tile 256, a smaller "
            f"frame_window or resolution.")


def run_windows(strategy: Continuation, geometry: WindowGeometry, *, height: int, width: int,
                noise: NoiseProvider, store: WindowStore, previous_tail: torch.Tensor | None = None,
                extra_host_bytes: int = 0, label: str = "window",
                on_step: Callable[[int, int, int, int], None] | None = None,
                on_window: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run every window of `geometry`; returns the new frames `[N, H, W, 3]` float32 in [0, 1] (ComfyUI's IMAGE),
    filled window by window.

    previous_tail: the last `motion_frames` frames (uint8) of the video being continued. on_step(window, windows,
    step, steps) runs after every step (raise there to stop: finished windows stay saved); on_window(index, uint8
    new frames) after each window."""
    starts, m = geometry.starts, geometry.motion_frames
    host_memory.check_host_memory(host_memory.HostPlan(geometry.output_frames, height, width,
                                                       geometry.frame_window, extra_host_bytes))
    out = torch.empty(geometry.output_frames, height, width, 3)
    tail, filled = previous_tail, 0
    with torch.no_grad():
        for w, start in enumerate(starts):
            window = store.load(w)
            if window is None:
                with store.turn():
                    window = store.load(w)   # another run sharing the folder may have written it meanwhile
                    if window is None:
                        window = _compute(strategy, geometry, w, start, tail, noise, store, on_step, len(starts))
                        store.save(w, window)
            frames = window[m:] if w > 0 or geometry.continuing else window
            count = min(len(frames), geometry.output_frames - filled)
            out[filled:filled + count].copy_(frames[:count]).div_(255)
            filled += count
            tail = window[-m:]
            if on_window is not None:
                on_window(w, frames)
            log.info("wantalk: %s %d/%d done (%d frames so far)", label, w + 1, len(starts), filled)
    return out


def _compute(strategy, geometry, w, start, tail, noise, store, on_step, windows) -> torch.Tensor:
    """One window's decoded frames, uint8."""
    index = geometry.noise_index(w)
    motion = None if tail is None else motion_input(tail)
    try:
        job = strategy.prepare(w, start, motion, lambda shape: noise(index, tuple(shape)).float())
        step_cb = None if on_step is None else (
            lambda i, _latent: on_step(w, windows, i + 1, len(job.scheduler)))
        latent = denoise(job.runner, job.noise, job.scheduler, job.cond, job.plan, pinned=job.pinned,
                         on_step=step_cb)
        del job
        if nonfinite_count(latent):  # else a black or noise video with no error (a NaN slipped past every check)
            raise ValueError(f"window {w + 1} of {windows} produced NaN/inf values: a model, LoRA or VAE weight or an "
                             f"input is out of range (e.g. an extreme LoRA alpha or strength); nothing was saved.")
        decoded = strategy.finish(latent)
    except torch.cuda.OutOfMemoryError:
        raise MemoryPlanError(out_of_memory_advice(w, windows, store.folder is not None)) from None
    return to_uint8(decoded)
