"""InfiniteTalk long video on tiny weights: window arithmetic, frame count = audio length, overlap by the motion
frames, bounded memory across windows, and resume after an interrupted window."""
import pytest
import torch

from wantalk.multitalk.long_video import (LongVideoSettings, TalkAudio, extend_audio, frame_windows,
                                          generate_long_video, window_starts)
from wantalk.wanvideo.sampling import Conditioning
from tiny_models import tiny_infinitetalk, tiny_vae

SETTINGS = LongVideoSettings(frame_window=9, motion_frames=5, steps=2, shift=7.0, text_scale=2.0, audio_scale=3.0,
                             seed=7, color_correction=0.5)


def test_window_starts_cover_the_audio():
    assert window_starts(81, 81, 9) == [0]
    assert window_starts(82, 81, 9) == [0, 72]
    assert window_starts(297, 81, 9) == [0, 72, 144, 216]
    assert window_starts(298, 81, 9) == [0, 72, 144, 216, 288]
    for total in range(1, 400, 7):
        s = window_starts(total, 81, 9)
        assert s[-1] + 81 >= total and (len(s) == 1 or s[-2] + 81 < total)


def test_extend_audio_flips_the_tail():
    f = torch.arange(10.0)[:, None]
    ext = extend_audio(f, 12)
    # official: append flip(last end - len + 3 = 5 frames)
    assert ext[:, 0].tolist() == list(range(10)) + [9, 8, 7, 6, 5]
    assert extend_audio(torch.arange(2.0)[:, None], 9).shape[0] >= 9


def test_frame_windows_clamp_at_both_ends():
    f = torch.arange(6.0)
    w = frame_windows(f, 0, 6)
    assert w[0].tolist() == [0, 0, 0, 1, 2] and w[5].tolist() == [3, 4, 5, 5, 5]


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator().manual_seed(3)
    model, _ = tiny_infinitetalk(g)
    vae, _ = tiny_vae(g)
    return model, vae


def _inputs(frames: int, rng):
    image = torch.rand(3, 32, 32, generator=rng) * 2 - 1
    audio = TalkAudio([torch.randn(frames, 2, 16, generator=rng)])
    text = Conditioning(torch.randn(1, 5, 64, generator=rng), torch.randn(1, 3, 64, generator=rng),
                        torch.randn(1, 257, 32, generator=rng))
    return image, audio, text


def test_three_windows_match_the_audio_length_and_overlap(parts, rng):
    model, vae = parts
    image, audio, text = _inputs(17, rng)  # windows at 0, 4, 8 (9 frames each, 5 motion frames)
    windows = []
    out = generate_long_video(model, vae, image, audio, text, SETTINGS, on_window=lambda i, f: windows.append(f))
    assert out.dtype == torch.uint8 and out.shape == (17, 32, 32, 3)
    assert [len(w) for w in windows] == [9, 4, 4]


def test_memory_does_not_grow_with_windows(parts, rng):
    import tracemalloc
    model, vae = parts
    image, audio, text = _inputs(21, rng)
    peaks = []

    def on_window(i, frames):
        peaks.append(tracemalloc.get_traced_memory()[0])
    tracemalloc.start()
    generate_long_video(model, vae, image, audio, text, SETTINGS, on_window=on_window)
    tracemalloc.stop()
    # python-side allocations stay flat; tensors are freed window by window
    assert max(peaks[2:]) - min(peaks[2:]) < 2 * 2**20


def test_resume_after_interrupt_gives_the_same_frames(parts, rng, tmp_path):
    model, vae = parts
    image, audio, text = _inputs(17, rng)
    full = generate_long_video(model, vae, image, audio, text, SETTINGS)

    class Stop(Exception):
        pass

    def interrupt(window, windows, step, steps):
        if window == 2 and step == 1:
            raise Stop

    with pytest.raises(Stop):
        generate_long_video(model, vae, image, audio, text, SETTINGS, resume_dir=str(tmp_path), on_step=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["window_0000.safetensors", "window_0001.safetensors"]
    steps_run = []
    resumed = generate_long_video(model, vae, image, audio, text, SETTINGS, resume_dir=str(tmp_path),
                                  on_step=lambda w, *_: steps_run.append(w))
    assert set(steps_run) == {2}  # only the unfinished window ran again
    assert torch.equal(resumed, full)
    # other weights do not reuse the stored windows
    with torch.no_grad():
        model.head.head.weight.mul_(1.5)
    try:
        changed = generate_long_video(model, vae, image, audio, text, SETTINGS, resume_dir=str(tmp_path))
    finally:
        with torch.no_grad():
            model.head.head.weight.div_(1.5)
    assert not torch.equal(changed, full)
    # another seed does not reuse the stored windows
    other = generate_long_video(model, vae, image, audio, text,
                                LongVideoSettings(**{**SETTINGS.__dict__, "seed": 8}), resume_dir=str(tmp_path))
    assert not torch.equal(other, full)


def test_short_audio_and_bad_sizes(parts, rng):
    model, vae = parts
    image, audio, text = _inputs(3, rng)
    assert generate_long_video(model, vae, image, audio, text, SETTINGS).shape[0] == 3
    with pytest.raises(ValueError, match="multiple of 16"):
        generate_long_video(model, vae, image[:, :24], audio, text, SETTINGS)
    with pytest.raises(ValueError, match="frame_window"):
        generate_long_video(model, vae, image, audio, text, LongVideoSettings(frame_window=10))
