"""HuMo-1.7B's way of seeing the reference image: its latents replace the last frames of the noisy latents in the
passes that show it (zeros in the others), instead of entering through `y` (docs/NOTES.md §4.3,
generate_1_7B.py). Plugged into the shared loop as a model wrapper, a conditioning and a guidance plan.

Guidance TIA (4 passes): `v = s_i (tia - ta) + s_a (ta - t) + s_t (t - neg) + neg`, where ta/t/neg see zero
reference latents; TA (3 passes) drops the first term. Official scales: s_i 4.0, s_a 7.5, s_t 7.5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# pass name -> (positive text, reference image, audio); "cond" and "drop_audio" serve the generic plans too.
PASSES = {"cond": (True, True, True), "drop_audio": (True, True, False), "ta": (True, False, True),
          "t": (True, False, False), "neg": (False, False, False)}


def takes_reference_in_latents(model) -> bool:
    """True for HuMo-1.7B-shaped models (no `y` channels)."""
    return model.cfg.in_dim == model.cfg.out_dim


class ReferenceInLatents:
    """Wraps the DiT for the shared loop: the pass's `y` (reference or zero latents `[B, 16, n_ref, h, w]`) is
    written over the last n_ref frames of x, and the model runs without `y`."""

    def __init__(self, model):
        self.model = model

    def forward_batched(self, x, t, context, clip_fea, y, audio=None):
        x = torch.cat([x[:, :, :x.shape[2] - y.shape[2]], y.to(x)], dim=2)
        return self.model.forward_batched(x, t, context, clip_fea, None, audio=audio)


@dataclass
class LatentReferenceConditioning:
    context: torch.Tensor
    negative_context: torch.Tensor
    reference: torch.Tensor         # [1, 16, n_ref, h, w]
    audio: Any
    audio_null: Any

    def for_pass(self, name: str) -> dict:
        text, image, audio = PASSES[name]
        return {"context": self.context if text else self.negative_context, "clip_fea": None,
                "y": self.reference if image else torch.zeros_like(self.reference),
                "audio": self.audio if audio else self.audio_null}


@dataclass(frozen=True)
class LatentReferenceGuidance:
    """HuMo-1.7B TIA (with_image) or TA guidance."""
    image_scale: float
    audio_scale: float
    text_scale: float
    with_image: bool = True

    def passes(self, timestep: float) -> tuple[str, ...]:
        return ("cond", "ta", "t", "neg") if self.with_image else ("ta", "t", "neg")

    def combine(self, preds: dict, timestep: float) -> torch.Tensor:
        ta, t, neg = preds["ta"], preds["t"], preds["neg"]
        v = self.audio_scale * (ta - t) + self.text_scale * (t - neg) + neg
        if self.with_image:
            v = v + self.image_scale * (preds["cond"] - ta)
        return v
