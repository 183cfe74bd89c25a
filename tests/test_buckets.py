"""The official size buckets and the official resize + centre crop of the conditioning frames."""
import pytest
import torch

from wantalk.multitalk.buckets import BUCKETS, closest_bucket, cover_size, crop_offsets, fit_frames

# (source height, width) -> the official bucket (height, width) at 480 and at 720, worked out by hand from the
# official ASPECT_RATIO_627 / ASPECT_RATIO_960 tables (nearest ratio key to height / width).
OFFICIAL = [
    ((1080, 1920), (448, 896), (704, 1280)),     # 0.5625: 0.50 / 0.55
    ((1920, 1080), (832, 448), (1280, 704)),     # 1.778: 1.86 / 1.82
    ((512, 512), (640, 640), (960, 960)),        # 1.0
    ((1080, 1440), (576, 704), (832, 1088)),     # 0.75: 0.82 (0.07 < 0.08 to 0.67) / 0.76
    ((1440, 1080), (704, 576), (1088, 832)),     # 1.333: 1.22 / 1.31
    ((400, 1600), (320, 1216), (448, 2048)),     # 0.25: 0.26 / 0.22
    ((3000, 1000), (1088, 384), (1664, 576)),    # 3.0: 2.83 / 2.89
    ((1000, 1080), (640, 640), (896, 1024)),     # 0.926: 1.00 / 0.88
    ((2160, 4096), (448, 896), (704, 1280)),     # 0.527: 0.50 / 0.55
    ((850, 400), (896, 448), (1408, 640)),       # 2.125: 2.00 / 2.20
]


@pytest.mark.parametrize("source, at480, at720", OFFICIAL)
def test_closest_bucket_matches_the_official_tables(source, at480, at720):
    assert closest_bucket("infinitetalk-480", *source) == at480
    assert closest_bucket("infinitetalk-720", *source) == at720


def test_tables_are_official_sizes():
    for table in BUCKETS.values():
        for key, (h, w) in table.items():
            assert h % 16 == 0 and w % 16 == 0 and abs(h / w - float(key)) < 0.06


def test_cover_size_keeps_the_official_float_ceil():
    # 832 / 391 * 391 is 832.0000000000001 in floats: the official ceil gives 833 x 639, cropped to 832 x 448
    # from offsets round(1 / 2) = 0 and round(191 / 2) = 96.
    assert cover_size(391, 300, 832, 448) == (833, 639)
    assert crop_offsets(833, 639, 832, 448) == (0, 96)
    assert crop_offsets(451, 455, 448, 448) == (2, 4)      # round(1.5) = 2, round(3.5) = 4 (halves to even)
    assert crop_offsets(453, 449, 448, 448) == (2, 0)      # round(2.5) = 2, round(0.5) = 0


def test_fit_frames_crops_where_torchvision_does(rng):
    frames = torch.rand(2, 3, 10, 23, generator=rng)
    out = fit_frames(frames, 10, 18, mask=True)             # scale 1: no resize, crop 5 columns
    left = int(round(5 / 2))                                # 2: the half goes to the even number
    assert left == 2
    torch.testing.assert_close(out, frames[..., :, left:left + 18])


def test_fit_frames_bilinear_is_8_bit_and_follows_pil(rng):
    image = (torch.rand(1, 3, 37, 53, generator=rng) * 255).round() / 255
    out = fit_frames(image, 16, 32)
    assert out.shape == (1, 3, 16, 32)
    torch.testing.assert_close(out * 255, (out * 255).round())
    PIL = pytest.importorskip("PIL.Image")
    import numpy as np
    h, w = cover_size(37, 53, 16, 32)
    pil = PIL.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy()).resize((w, h), PIL.BILINEAR)
    top, left = crop_offsets(h, w, 16, 32)
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[:, top:top + 16, left:left + 32].float()
    assert (out[0] * 255 - reference).abs().max() <= 1      # PIL's fixed-point arithmetic: at most one level
