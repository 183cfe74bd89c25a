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
