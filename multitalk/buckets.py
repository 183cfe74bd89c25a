"""The official InfiniteTalk video sizes: the size buckets and the resize + centre crop of the conditioning frames.

The official `generate_infinitetalk.py --size infinitetalk-480|infinitetalk-720` picks, from a table of
(height, width) buckets keyed by their height/width ratio, the bucket whose key is closest to the input's ratio,
then scales the frame (PIL bilinear, 8-bit) so that it covers the bucket and centre-crops it (torchvision's
`center_crop`, whose offsets are `round()`ed). Doing the same here gives the official video size and pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Ratio key (height / width, as the official tables spell it) -> (height, width).
BUCKETS = {
    "infinitetalk-480": {
        "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768), "0.82": (576, 704),
        "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512), "1.86": (832, 448), "2.00": (896, 448),
        "2.50": (960, 384), "2.83": (1088, 384), "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
    },
    "infinitetalk-720": {
        "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408), "0.55": (704, 1280),
        "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024), "1.00": (960, 960), "1.14": (1024, 896),
        "1.31": (1088, 832), "1.50": (1152, 768), "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704),
        "2.20": (1408, 640), "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
        "3.75": (1920, 512),
    },
}
CUSTOM = "custom"
SIZES = (*BUCKETS, CUSTOM)
OFFICIAL_SHIFT = {"infinitetalk-480": 7.0, "infinitetalk-720": 11.0}


def closest_bucket(size: str, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the `size` bucket whose ratio key is nearest to height / width (first one on a tie, as
    the official stable sort)."""
    table = BUCKETS[size]
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]


def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The size a (height, width) frame is scaled to before the crop: the smallest that covers the target
    (official `resize_and_centercrop`: ceil of the larger scale times each side)."""
    scale = max(target_h / height, target_w / width)
    return math.ceil(scale * height), math.ceil(scale * width)


def crop_offsets(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Top and left of torchvision's centre crop (Python's round: halves go to the even number)."""
    return int(round((height - target_h) / 2.0)), int(round((width - target_w) / 2.0))


def fit_frames(frames: torch.Tensor, target_h: int, target_w: int, *, mask: bool = False) -> torch.Tensor:
    """`[N, C, h, w]` scaled to cover `target_h` x `target_w` and centre-cropped, as the official code prepares
    the conditioning frames (bilinear with PIL's antialiasing, rounded to 8 bits like PIL's uint8 output) or the
    speaker masks (`mask=True`: nearest, unrounded)."""
    size = cover_size(*frames.shape[-2:], target_h, target_w)
    if mask:
        scaled = F.interpolate(frames.float(), size=size, mode="nearest")
    else:
        scaled = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        scaled = (scaled.clamp(0, 1) * 255).round() / 255
    top, left = crop_offsets(*size, target_h, target_w)
    return scaled[..., top:top + target_h, left:left + target_w]
