"""Video dubbing and chained samplers on tiny weights: the reference frame of each window (by time, any fps),
a one-frame video is image-to-video bit for bit, sampler A then sampler B equals one sampler on the whole audio
(both continuations, float or uint8 previous frames), and clear errors for a previous video that cannot be
continued."""
import numpy as np
import pytest
import torch

from wantalk.multitalk.long_video import CONTINUATIONS, LongVideoSettings, generate_long_video, reference_frame_index
from wantalk.wanvideo.sampling import Conditioning
from wantalk.wanvideo.windows import WindowGeometry
from talk_inputs import stand_in_clip, talk_inputs, tiny_talk_parts

# 13-frame windows, 5 motion frames: windows start every 8 frames; 29 frames = windows at 0, 8, 16
SETTINGS = LongVideoSettings(frame_window=13, motion_frames=5, steps=2, shift=7.0, text_scale=2.0, audio_scale=3.0,
                             seed=3, color_correction=0.5)


@pytest.fixture(scope="module")
def parts():
    return tiny_talk_parts(4)


def _inputs(frames, rng, video_frames=1):
    return (*talk_inputs(frames, rng, video_frames), stand_in_clip(rng))


def test_reference_frame_index_is_the_frame_shown_at_the_window_start():
    """Independent: the last frame whose timestamp i / fps is not after start / 25; the last frame past the end."""
    for fps in (25.0, 30.0, 24.0, 30000 / 1001, 50.0, 12.5, 60.0, 1.0):
        for count in (1, 2, 40, 500):
            stamps = np.arange(count) / fps
            for start in range(0, 600, 7):
                expect = int(np.searchsorted(stamps, start / 25 + 1e-9, side="right")) - 1
                assert reference_frame_index(start, fps, count) == expect, (fps, count, start)


def test_one_frame_video_is_image_to_video_bit_for_bit(parts, rng):
    model, vae = parts
    video, audio, text, encode_clip = _inputs(21, rng)
    image = generate_long_video(model, vae, video[0], audio, text, SETTINGS)
    assert torch.equal(generate_long_video(model, vae, video, audio, text, SETTINGS), image)
    # a "video" repeating the image, with CLIP encoded per window, is still the same video
    still = video.expand(40, -1, -1, -1)
    repeated = generate_long_video(model, vae, still, audio, Conditioning(text.context, text.negative_context), SETTINGS,
                                   encode_clip=encode_clip)
    single = generate_long_video(model, vae, video[0], audio, Conditioning(text.context, text.negative_context),
                                 SETTINGS, encode_clip=encode_clip)
    assert torch.equal(repeated, single)


def test_dubbing_reads_each_window_reference_frame(parts, rng, monkeypatch):
    """Windows at 0, 8, 16 of a 30 fps video of 12 frames: frames 0, 9 and (past the end) 11 are encoded, once
    each, for y's first latent and the CLIP features; the colour reference stays frame 0."""
    model, vae = parts
    video, audio, text, encode_clip = _inputs(29, rng, video_frames=12)
    clip_inputs, single_frame_encodes = [], []
    encode = vae.encode

    def spy(x, **kw):
        if x.shape[2] == 1:
            single_frame_encodes.append(x[0, :, 0].clone())
        return encode(x, **kw)
    monkeypatch.setattr(vae, "encode", spy)
    generate_long_video(model, vae, video, audio, Conditioning(text.context, text.negative_context), SETTINGS,
                        fps=30.0, encode_clip=lambda f: (clip_inputs.append(f.clone()), encode_clip(f))[1])
    expected = [min(int(np.floor(s / 25 * 30 + 1e-9)), 11) for s in (0, 8, 16)]
    assert expected == [0, 9, 11]
    assert len(clip_inputs) == len(single_frame_encodes) == 3
    for got, index in zip(clip_inputs, expected):
        assert torch.equal(got, video[index])
    for got, index in zip(single_frame_encodes, expected):
        assert torch.equal(got.float(), video[index])


@pytest.mark.parametrize("continuation", CONTINUATIONS)
@pytest.mark.parametrize("as_uint8", [False, True])
def test_chained_samplers_equal_one_sampler(parts, rng, continuation, as_uint8):
    """A stops at frame 21 (the end of its window at 8), B continues on the same audio from A's frames: B's first
    window is the single run's third window (start 16, same noise, same motion frames)."""
    model, vae = parts
    video, audio, text, encode_clip = _inputs(29, rng)
    settings = LongVideoSettings(**{**SETTINGS.__dict__, "continuation": continuation})
    whole = generate_long_video(model, vae, video, audio, text, settings, encode_clip=encode_clip)
    first = generate_long_video(model, vae, video, audio, text,
                                LongVideoSettings(**{**settings.__dict__, "max_frames": 21}), encode_clip=encode_clip)
    assert first.shape[0] == 21
    previous = (first * 255).round().to(torch.uint8) if as_uint8 else first
    windows = []
    second = generate_long_video(model, vae, video, audio, text, settings, previous_frames=previous,
                                 encode_clip=encode_clip, on_window=lambda i, f: windows.append(len(f)))
    assert second.shape[0] == 8 and windows == [8]
    assert torch.equal(torch.cat([first, second]), whole)


def test_continuation_geometry():
    g = WindowGeometry(81, 9, total=400, previous=153)
    assert g.starts == [144, 216, 288, 360] and g.output_frames == 247 and g.noise_index(0) == 2
    assert WindowGeometry(81, 9, total=81).starts == [0]


def test_previous_frames_that_cannot_be_continued(parts, rng):
    model, vae = parts
    video, audio, text, _ = _inputs(29, rng)
    good = torch.rand(12, 32, 32, 3, generator=rng)
    with pytest.raises(ValueError, match="at least motion_frames = 5"):
        generate_long_video(model, vae, video, audio, text, SETTINGS, previous_frames=good[:4])
    with pytest.raises(ValueError, match="16x32 but this video is 32x32"):
        generate_long_video(model, vae, video, audio, text, SETTINGS, previous_frames=good[:, :, :16])
    with pytest.raises(ValueError, match=r"IMAGE batch \[frames, height, width, 3\]"):
        generate_long_video(model, vae, video, audio, text, SETTINGS, previous_frames=good[0])
    bad = good.clone()
    bad[-1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        generate_long_video(model, vae, video, audio, text, SETTINGS, previous_frames=bad)
    with pytest.raises(ValueError, match="ends before the previous video"):
        generate_long_video(model, vae, video, audio, text, SETTINGS, previous_frames=torch.rand(29, 32, 32, 3))
    with pytest.raises(ValueError, match="frame rate"):
        generate_long_video(model, vae, video, audio, text, SETTINGS, fps=0.0)
    with pytest.raises(ValueError, match="no frames"):
        generate_long_video(model, vae, video[:0], audio, text, SETTINGS)
    with pytest.raises(ValueError, match="dubbing needs continuation 'infinitetalk'"):
        generate_long_video(model, vae, video.expand(3, -1, -1, -1), audio, text,
                            LongVideoSettings(**{**SETTINGS.__dict__, "continuation": "multitalk"}))
