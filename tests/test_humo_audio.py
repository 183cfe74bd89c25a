"""HuMo band features and per-latent audio windows (humo/audio_features.py), checked element by element
against the formulas of docs/NOTES.md §4.2 written out as plain loops."""
import math

import pytest
import torch

from wantalk.humo.audio_features import humo_audio_windows, humo_bands, humo_window_indices, resample_50_to_25


def ref_resample(x, out_len):
    """Linear interpolation with align_corners=True: output j samples input position j * (T-1) / (out_len-1)."""
    t = x.shape[0]
    out = []
    for j in range(out_len):
        pos = j * (t - 1) / (out_len - 1) if out_len > 1 else 0.0
        lo = int(math.floor(pos))
        hi = min(lo + 1, t - 1)
        frac = pos - lo
        out.append((1 - frac) * x[lo] + frac * x[hi])
    return torch.stack(out)


def ref_windows(bands, frame_num_latents, start):
    """HuMo get_audio_emb_window as loops (audio_shift 2); returns windows and the next start (ed - shift)."""
    t = bands.shape[0]
    zero = torch.zeros_like(bands[0])
    pick = lambda i: bands[i] if 0 <= i < t else zero
    windows = []
    for lt in range(frame_num_latents):
        if lt == 0:
            st, ed = start - 2, start + 3
            win = [zero] * 3 + [pick(i) for i in range(st, ed)]
        else:
            st, ed = start + 1 + 4 * (lt - 1) - 2, start + 1 + 4 * lt + 2
            win = [pick(i) for i in range(st, ed)]
        assert len(win) == 8
        windows.append(torch.stack(win))
    return torch.stack(windows), ed - 2


def test_resample_length_follows_humo_float_rounding(rng):
    assert resample_50_to_25(torch.randn(100, 3, generator=rng)).shape == (50, 3)
    assert resample_50_to_25(torch.randn(101, 3, generator=rng)).shape == (50, 3)
    assert resample_50_to_25(torch.randn(58, 3, generator=rng)).shape == (28, 3)   # int(58 / 50.0 * 25) == 28
    assert resample_50_to_25(torch.randn(3, 3, generator=rng)).shape == (1, 3)
    with pytest.raises(ValueError, match="at least 2"):
        resample_50_to_25(torch.randn(1, 3, generator=rng))


@pytest.mark.parametrize("t50", [3, 58, 77, 200])
def test_bands_match_layer_means_resampled_elementwise(rng, t50):
    hidden = torch.randn(t50, 33, 6, generator=rng, dtype=torch.float64)
    bands = humo_bands(hidden)
    out_len = int(t50 / 50.0 * 25)
    assert bands.shape == (out_len, 5, 6)
    groups = [range(0, 8), range(8, 16), range(16, 24), range(24, 32), range(32, 33)]
    for b, layers in enumerate(groups):
        mean = sum(hidden[:, layer] for layer in layers) / len(layers)
        assert torch.allclose(bands[:, b], ref_resample(mean, out_len), rtol=1e-12, atol=1e-12), b


def test_bands_reject_wrong_layer_count(rng):
    with pytest.raises(ValueError, match="33"):
        humo_bands(torch.randn(10, 32, 4, generator=rng))


@pytest.mark.parametrize("t25,n_lat,n_ref,start", [(10, 5, 0, 0), (30, 6, 1, 0), (12, 4, 2, 3), (40, 1, 0, 17),
                                                   (9, 3, 1, 8)])
def test_windows_match_reference_loops(rng, t25, n_lat, n_ref, start):
    bands = torch.randn(t25, 5, 4, generator=rng, dtype=torch.float64) + 3.0   # no accidental zeros
    got = humo_audio_windows(bands, n_lat, n_ref, start=start)
    want, next_start = ref_windows(bands, n_lat, start)
    assert got.shape == (n_lat + n_ref, 8, 5, 4)
    for i in range(n_lat):
        for s in range(8):
            assert torch.equal(got[i, s], want[i, s]), (i, s)
    assert torch.count_nonzero(got[n_lat:]) == 0
    assert next_start == start + 4 * (n_lat - 1) + 1        # continuation start documented in the module


def test_first_window_pads_with_zeros_not_clamped(rng):
    bands = torch.randn(20, 5, 4, generator=rng) + 3.0
    win = humo_audio_windows(bands, 2)
    assert torch.count_nonzero(win[0, :5]) == 0              # 3 forced zeros, then frames -2 and -1
    assert torch.equal(win[0, 5:], bands[0:3])
    assert torch.count_nonzero(win[1, :1]) == 0               # latent 1 covers frames -1 .. 6
    assert torch.equal(win[1, 1:], bands[0:7])
    idx = humo_window_indices(2)
    assert idx.tolist() == [[-1, -1, -1, -2, -1, 0, 1, 2], [-1, 0, 1, 2, 3, 4, 5, 6]]


def test_windows_reject_bad_arguments(rng):
    bands = torch.randn(10, 5, 4, generator=rng)
    with pytest.raises(ValueError, match="n_latent_frames"):
        humo_audio_windows(bands, 0)
    with pytest.raises(ValueError, match="n_ref_frames"):
        humo_audio_windows(bands, 2, -1)
    with pytest.raises(ValueError, match="bands"):
        humo_audio_windows(bands[:, 0], 2)
