"""The one denoising loop shared by InfiniteTalk, MultiTalk and HuMo.

Model-specific conditioning arrives as a `Conditioning` (what each guidance pass drops is looked up in
`guidance.PASS_DROPS`); the loop runs only the passes the guidance plan needs, one after another (bounded
memory), pins clean motion latents before and after every step, and reports each step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import guidance


@dataclass
class Conditioning:
    """Inputs of the DiT for the full pass, plus what replaces them when a pass drops text, audio or image."""
    context: torch.Tensor                       # [1, Lt, text_dim]
    negative_context: torch.Tensor | None = None
    clip_fea: torch.Tensor | None = None        # [1, 257, 1280]
    y: torch.Tensor | None = None               # [1, 20, F, h, w]
    y_null: torch.Tensor | None = None          # HuMo: conditioning without the reference image
    audio: Any = None                           # add-on conditioning object
    audio_null: Any = None                      # zero-audio conditioning

    def for_pass(self, name: str) -> dict:
        drops = guidance.PASS_DROPS[name]
        if "text" in drops and self.negative_context is None:
            raise ValueError(f"guidance pass '{name}' needs a negative prompt; connect the negative conditioning")
        return {"context": self.negative_context if "text" in drops else self.context,
                "clip_fea": self.clip_fea,
                "y": self.y_null if "image" in drops and self.y_null is not None else self.y,
                "audio": self.audio_null if "audio" in drops else self.audio}


@dataclass(frozen=True)
class Guidance:
    mode: str = "infinitetalk"
    scale: float = 5.0
    text_scale: float = 5.0
    audio_scale: float = 4.0

    def passes(self, timestep: float) -> tuple[str, ...]:
        return guidance.plan_passes(self.mode, scale=self.scale, text_scale=self.text_scale,
                                    audio_scale=self.audio_scale, timestep=timestep)

    def combine(self, preds: dict, timestep: float) -> torch.Tensor:
        return guidance.combine(self.mode, preds, scale=self.scale, text_scale=self.text_scale,
                                audio_scale=self.audio_scale, timestep=timestep)


def run_passes(model, latent: torch.Tensor, timestep: torch.Tensor, passes: dict[str, dict]) -> dict:
    """The predictions of one step's guidance passes (`{name: cond.for_pass(name)}`): one after another, or all at
    once when the model runs them itself (`run_passes`: the multi-GPU pack of wanvideo.parallel)."""
    at_once = getattr(model, "run_passes", None)
    if at_once is not None:
        return at_once(latent, timestep, passes)
    return {name: model.forward_batched(latent, timestep, args["context"], args["clip_fea"], args["y"],
                                        audio=args["audio"])
            for name, args in passes.items()}


def denoise(model, noise: torch.Tensor, scheduler, cond: Conditioning, plan: Guidance, *,
            pinned: torch.Tensor | None = None, on_step: Callable[[int, torch.Tensor], None] | None = None,
            start_index: int = 0) -> torch.Tensor:
    """Run `scheduler` from `start_index` on `noise` `[B, 16, F, h, w]`; `pinned` (`[B, 16, n, h, w]`) are clean
    latents written into the first n frames before and after every step (InfiniteTalk motion frames)."""
    latent = noise.float().clone()
    n_pin = 0 if pinned is None else pinned.shape[2]
    for i in range(start_index, len(scheduler)):
        if n_pin:
            latent[:, :, :n_pin] = pinned
        t = scheduler.timesteps[i]
        t_value = float(t)
        timestep = t.reshape(1).expand(latent.shape[0]).to(latent.device)
        preds = run_passes(model, latent, timestep, {name: cond.for_pass(name) for name in plan.passes(t_value)})
        velocity = plan.combine(preds, t_value)
        del preds
        latent = scheduler.step(velocity, i, latent)
        if n_pin:
            latent[:, :, :n_pin] = pinned
        if on_step is not None:
            on_step(i, latent)
    return latent


def i2v_mask(frames: int, lat_h: int, lat_w: int, *, device=None) -> torch.Tensor:
    """The I2V mask `[4, (frames+3)//4, lat_h, lat_w]`: ones on latent frame 0 (the given image), zeros after."""
    if (frames - 1) % 4:
        raise ValueError(f"the number of frames must be 1 + 4k (e.g. 81), got {frames}")
    mask = torch.zeros(4, (frames - 1) // 4 + 1, lat_h, lat_w, device=device)
    mask[:, 0] = 1
    return mask
