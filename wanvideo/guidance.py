"""Classifier-free guidance: which DiT passes a step needs, and how their velocities combine.

The sampling loop asks `plan_passes` which passes to run (only those), runs each with the conditioning that
`PASS_DROPS` names, and hands the predictions to `combine`. Formulas are the official ones, term by term:
Wan 2.1 CFG, InfiniteTalk's 3-pass text/audio CFG (IT wan/multitalk.py), HuMo TIA/TA (HuMo generate.py)."""
import math
from typing import Mapping

import torch

# What each pass leaves out: text -> negative prompt, audio -> zero audio, image -> HuMo's null reference latent.
PASS_DROPS = {
    "cond": frozenset(),
    "drop_text": frozenset({"text"}),
    "drop_audio": frozenset({"audio"}),
    "uncond": frozenset({"text", "audio"}),
    "drop_all": frozenset({"text", "audio", "image"}),
}
MODES = ("cfg", "infinitetalk", "humo_tia", "humo_ta")
HUMO_STEP_CHANGE = 980  # HuMo keeps the reference image in its negative pass only while t > 980


def cfg(cond, uncond, scale: float):
    return uncond + scale * (cond - uncond)


def infinitetalk_cfg(cond, drop_text, uncond, text_scale: float, audio_scale: float):
    return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)


def humo_cfg(full, without_audio, negative, audio_scale: float, text_scale: float):
    return audio_scale * (full - without_audio) + text_scale * (without_audio - negative) + negative


def humo_tia_cfg(full, without_audio, negative, audio_scale: float, text_scale: float, timestep: float):
    """HuMo TIA: the negative pass has the reference image while t > 980, and then the text weight is s_t; after
    that the negative pass also drops the image and the text weight becomes s_t - 2."""
    if float(timestep) <= HUMO_STEP_CHANGE:
        text_scale = text_scale - 2.0
    return humo_cfg(full, without_audio, negative, audio_scale, text_scale)


def _is_one(scale: float) -> bool:
    return math.isclose(scale, 1.0)


def plan_passes(mode: str, *, scale: float = 1.0, text_scale: float = 1.0, audio_scale: float = 1.0,
                timestep: float | None = None) -> tuple[str, ...]:
    """Names of the passes (keys of PASS_DROPS) a step needs, "cond" first. Scales of 1 save passes:
    cfg 1 -> cond only; InfiniteTalk text 1 -> cond + drop_audio (official 2-pass form), audio 1 -> cond +
    drop_text, both 1 -> cond only. HuMo TIA needs `timestep` (the value the DiT receives)."""
    if mode == "cfg":
        return ("cond",) if _is_one(scale) else ("cond", "uncond")
    if mode == "infinitetalk":
        if _is_one(text_scale):
            return ("cond",) if _is_one(audio_scale) else ("cond", "drop_audio")
        return ("cond", "drop_text") if _is_one(audio_scale) else ("cond", "drop_text", "uncond")
    if mode == "humo_tia":
        if timestep is None:
            raise ValueError("humo_tia guidance depends on the timestep: pass timestep=<DiT timestep>")
        return ("cond", "drop_audio", "uncond" if float(timestep) > HUMO_STEP_CHANGE else "drop_all")
    if mode == "humo_ta":
        return ("cond", "drop_audio", "uncond")
    raise ValueError(f"unknown guidance mode {mode!r}; choose one of {MODES}")


def combine(mode: str, preds: Mapping[str, torch.Tensor], *, scale: float = 1.0, text_scale: float = 1.0,
            audio_scale: float = 1.0, timestep: float | None = None) -> torch.Tensor:
    """The guided velocity from the predictions of exactly the passes `plan_passes` named (same arguments)."""
    passes = plan_passes(mode, scale=scale, text_scale=text_scale, audio_scale=audio_scale, timestep=timestep)
    missing = [name for name in passes if name not in preds]
    if missing:
        raise ValueError(f"{mode} guidance needs the passes {passes}; missing {missing} (run plan_passes first)")
    p = [preds[name] for name in passes]
    if len(p) == 1:
        return p[0]
    if mode == "cfg":
        return cfg(p[0], p[1], scale)
    if mode == "infinitetalk":
        if len(p) == 3:
            return infinitetalk_cfg(*p, text_scale, audio_scale)
        return cfg(p[0], p[1], audio_scale if passes[1] == "drop_audio" else text_scale)
    if mode == "humo_tia":
        return humo_tia_cfg(*p, audio_scale, text_scale, timestep)
    return humo_cfg(*p, audio_scale, text_scale)


# ---- APG: adaptive projected guidance (official InfiniteTalk --use_apg, https://arxiv.org/abs/2410.02416) ----

APG_MOMENTUM = -0.75       # official --apg_momentum default
APG_NORM_THRESHOLD = 55.0  # official --apg_norm_threshold default


def _over_sample(x: torch.Tensor) -> tuple[int, ...]:
    """The dims one sample spans ([C, F, H, W] of a [B, C, F, H, W] latent), as the official norms take them."""
    return tuple(range(-min(x.dim(), 4), 0))


def projected_update(diff: torch.Tensor, pred_cond: torch.Tensor, norm_threshold: float) -> torch.Tensor:
    """One APG guidance direction: `diff` shrunk to at most `norm_threshold` in L2 norm (per sample), less (in
    float64) its part along `pred_cond` (eta 0, the official default: none of that part is kept)."""
    dims = _over_sample(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    d, c = diff.double(), pred_cond.double()
    unit = c / c.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
    return (d - parallel).to(diff.dtype)


class AdaptiveProjectedGuidance:
    """InfiniteTalk's text/audio guidance with APG, a drop-in for `sampling.Guidance` (`passes`, `combine`).

    Each guidance difference (text: cond - drop_text; audio: drop_text - uncond, or cond - drop_audio when the
    text scale is 1) is accumulated with momentum (`avg = diff + momentum * avg`, negative momentum damps it),
    shrunk and stripped of its component along the conditional prediction; the velocity is
    `cond + (s_text - 1) * text_direction + (s_audio - 1) * audio_direction`. The momentum lives for one window:
    make a new object per window, as the official loop does."""

    def __init__(self, text_scale: float, audio_scale: float, momentum: float = APG_MOMENTUM,
                 norm_threshold: float = APG_NORM_THRESHOLD):
        self.text_scale, self.audio_scale = text_scale, audio_scale
        self.momentum, self.norm_threshold = momentum, norm_threshold
        self._running = {"text": None, "audio": None}

    def passes(self, timestep: float) -> tuple[str, ...]:
        return plan_passes("infinitetalk", text_scale=self.text_scale, audio_scale=self.audio_scale)

    def _direction(self, kind: str, diff: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor:
        previous = self._running[kind]
        running = diff if previous is None else diff + self.momentum * previous
        self._running[kind] = running
        return projected_update(running, pred_cond, self.norm_threshold)

    def combine(self, preds: Mapping[str, torch.Tensor], timestep: float) -> torch.Tensor:
        passes = self.passes(timestep)
        missing = [name for name in passes if name not in preds]
        if missing:
            raise ValueError(f"APG guidance needs the passes {passes}; missing {missing}")
        cond = preds["cond"]
        velocity = cond
        if "drop_audio" in passes:
            return velocity + (self.audio_scale - 1) * self._direction("audio", cond - preds["drop_audio"], cond)
        if "drop_text" in passes:
            velocity = velocity + (self.text_scale - 1) * self._direction("text", cond - preds["drop_text"], cond)
        if "uncond" in passes:
            velocity = velocity + (self.audio_scale - 1) * self._direction(
                "audio", preds["drop_text"] - preds["uncond"], cond)
        return velocity
