"""Colour correction: Lab conversion (scikit-image's formulas) and per-frame mean/std transfer."""
import pytest
import torch

from wantalk.multitalk.color_match import lab_to_rgb, match_colors, rgb_to_lab


def test_known_lab_values():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    lab = rgb_to_lab(rgb)
    assert torch.allclose(lab[0], torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64), atol=1e-2)
    assert torch.allclose(lab[1], torch.zeros(3, dtype=torch.float64), atol=1e-6)
    # sRGB red in CIELAB (D65): L 53.24, a 80.09, b 67.20
    assert torch.allclose(lab[2], torch.tensor([53.24, 80.09, 67.20], dtype=torch.float64), atol=5e-2)


def test_round_trip(rng):
    rgb = torch.rand(6, 5, 3, generator=rng, dtype=torch.float64)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-10)


def test_full_strength_transfers_lab_statistics(rng):
    frames = 0.25 + 0.5 * torch.rand(2, 12, 10, 3, generator=rng, dtype=torch.float64)
    ref = 0.3 + 0.4 * torch.rand(9, 8, 3, generator=rng, dtype=torch.float64)
    out = match_colors(frames, ref, 1.0)
    ref_lab = rgb_to_lab(ref).reshape(-1, 3)
    for frame in out:  # in-gamut data: the statistics match up to the final clip
        lab = rgb_to_lab(frame).reshape(-1, 3)
        assert torch.allclose(lab.mean(0), ref_lab.mean(0), atol=0.5)
        assert torch.allclose(lab.std(0, unbiased=False), ref_lab.std(0, unbiased=False), rtol=0.05, atol=0.3)


def test_strength_blends_linearly(rng):
    frames = torch.rand(2, 6, 6, 3, generator=rng, dtype=torch.float64)
    ref = torch.rand(6, 6, 3, generator=rng, dtype=torch.float64)
    full = match_colors(frames, ref, 1.0)
    half = match_colors(frames, ref, 0.5)
    assert torch.allclose(half, 0.5 * frames + 0.5 * full, atol=1e-12)
    assert match_colors(frames, ref, 0.0) is frames
    with pytest.raises(ValueError, match="strength"):
        match_colors(frames, ref, 1.5)
