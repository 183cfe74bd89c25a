"""Colour correction of generated frames towards a reference image (InfiniteTalk's Lab mean/std transfer).

Long videos drift in colour from window to window; each frame's L, a, b channel means and standard deviations
are matched to those of the reference frame, then blended with the original by `strength`. The sRGB <-> CIELAB
conversion follows scikit-image's `rgb2lab` / `lab2rgb` (D65, 2 degree observer) so results match the reference
implementation, without the scikit-image dependency.
"""
from __future__ import annotations

import torch

_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """`[..., 3]` sRGB in [0, 1] -> CIELAB, float64."""
    c = rgb.to(torch.float64)
    lin = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = lin @ _RGB_TO_XYZ.T.to(c.device) / _WHITE_D65.to(c.device)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB `[..., 3]` -> sRGB clipped to [0, 1], float64."""
    lab = lab.to(torch.float64)
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([lab[..., 1] / 500 + fy, fy, (fy - lab[..., 2] / 200).clamp_min(0)], dim=-1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787) * _WHITE_D65.to(lab.device)
    lin = xyz @ torch.linalg.inv(_RGB_TO_XYZ).T.to(lab.device)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0) ** (1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0, 1)


def match_colors(frames: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """frames `[F, H, W, 3]` and reference `[H', W', 3]` in [0, 1] -> corrected frames (same dtype)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return frames
    src = frames.clamp(0, 1)
    ref_lab = rgb_to_lab(reference.clamp(0, 1)).reshape(-1, 3)
    ref_mean, ref_std = ref_lab.mean(0), ref_lab.std(0, unbiased=False)
    out = []
    for frame in src:  # frame by frame keeps float64 temporaries small
        lab = rgb_to_lab(frame)
        flat = lab.reshape(-1, 3)
        mean, std = flat.mean(0), flat.std(0, unbiased=False)
        scaled = (lab - mean) * torch.where(std > 0, ref_std / std.clamp_min(1e-30), torch.zeros_like(std)) + ref_mean
        corrected = lab_to_rgb(scaled)
        out.append(((1 - strength) * frame.to(torch.float64) + strength * corrected).to(frames.dtype))
    return torch.stack(out)
