"""The CLIP image input of the official InfiniteTalk pipeline, and encoding it with ComfyUI's CLIP vision model.

Official `CLIPModel.visual`: the bucket-cropped conditioning frame (in [-1, 1]) is resized straight to 224 x 224
(bicubic, no antialiasing, no crop, so the whole frame is seen squashed), mapped to [0, 1] and normalised with the
CLIP mean/std; nothing is clamped or rounded. ComfyUI's `encode_image(crop=False)` differs (antialiased bicubic,
clamped and rounded to 8 bits), so we hand the prepared pixels to its model directly.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("wantalk")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def official_unit_pixels(frame: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """`[3, H, W]` frame in [-1, 1] -> the official CLIP resize `[1, 3, size, size]` in about [0, 1] (float32)."""
    pixels = F.interpolate(frame[None].float(), size=(size, size), mode="bicubic", align_corners=False)
    return pixels * 0.5 + 0.5


def official_clip_pixels(frame: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """`[3, H, W]` frame in [-1, 1] -> the normalised CLIP input `[1, 3, size, size]` (float32)."""
    pixels = official_unit_pixels(frame, size)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def encode_official(clip_vision, frame: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer CLIP features `[1, 257, 1280]` of `frame` (`[3, H, W]`, [-1, 1]) as the official code
    computes them, with ComfyUI's CLIP_VISION model (its `model` on our pixels, after ComfyUI loads it)."""
    size = getattr(clip_vision, "image_size", CLIP_SIZE)
    model = getattr(clip_vision, "model", None)
    if model is None or not hasattr(clip_vision, "patcher"):
        log.warning("wantalk: this CLIP vision object has no ComfyUI model inside; using its encode_image, which "
                    "rounds the pixels to 8 bits (close to, not exactly, the official features)")
        unit = official_unit_pixels(frame, size)
        return clip_vision.encode_image(unit.permute(0, 2, 3, 1), crop=False)["penultimate_hidden_states"][:1]
    pixels = official_clip_pixels(frame, size)
    try:  # a model with a patcher comes from ComfyUI, which moves it to its device on request
        import comfy.model_management as model_management  # type: ignore
        model_management.load_model_gpu(clip_vision.patcher)
    except ImportError:
        pass
    device = getattr(clip_vision, "load_device", pixels.device)
    out = model(pixel_values=pixels.to(device), intermediate_output=-2)
    return out[1][:1].float().cpu()
