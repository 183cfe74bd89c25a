"""InfiniteTalk long video on tiny weights: window arithmetic, frame count = audio length, overlap by the motion
frames, bounded memory across windows, and resume after an interrupted window; MultiTalk continuation (motion
frames in `y`, their latents injected noised at the scheduler's sigma, CLIP from the last motion frame)."""
import pytest
import torch

from wantalk.multitalk.long_video import (CONTINUATIONS, LongVideoSettings, NoisedMotion, extend_audio,
                                          frame_windows, generate_long_video, motion_mask)
from wantalk.wanvideo.schedulers import make_scheduler
from wantalk.wanvideo.windows import window_starts
from talk_inputs import talk_inputs, tiny_talk_parts

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
    return tiny_talk_parts(3)


_inputs = talk_inputs


def test_three_windows_match_the_audio_length_and_overlap(parts, rng):
    model, vae = parts
    image, audio, text = _inputs(17, rng)  # windows at 0, 4, 8 (9 frames each, 5 motion frames)
    windows = []
    out = generate_long_video(model, vae, image, audio, text, SETTINGS, on_window=lambda i, f: windows.append(f))
    assert out.dtype == torch.float32 and out.shape == (17, 32, 32, 3)
    assert [len(w) for w in windows] == [9, 4, 4] and all(w.dtype == torch.uint8 for w in windows)
    assert torch.equal(out, torch.cat(windows).float() / 255)   # the IMAGE is the uint8 windows, filled in place


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


@pytest.mark.parametrize("continuation", CONTINUATIONS)
def test_resume_after_interrupt_gives_the_same_frames(parts, rng, tmp_path, continuation):
    model, vae = parts
    image, audio, text = _inputs(17, rng)
    settings = LongVideoSettings(**{**SETTINGS.__dict__, "continuation": continuation})
    full = generate_long_video(model, vae, image, audio, text, settings)

    class Stop(Exception):
        pass

    def interrupt(window, windows, step, steps):
        if window == 2 and step == 1:
            raise Stop

    with pytest.raises(Stop):
        generate_long_video(model, vae, image, audio, text, settings, resume_dir=str(tmp_path), on_step=interrupt)
    (folder,) = tmp_path.iterdir()   # one folder per run key
    assert sorted(p.name for p in folder.glob("window_*")) == ["window_0000.safetensors", "window_0001.safetensors"]
    steps_run = []
    resumed = generate_long_video(model, vae, image, audio, text, settings, resume_dir=str(tmp_path),
                                  on_step=lambda w, *_: steps_run.append(w))
    assert set(steps_run) == {2}  # only the unfinished window ran again
    assert torch.equal(resumed, full)
    # other weights do not reuse the stored windows
    with torch.no_grad():
        model.head.head.weight.mul_(1.5)
    try:
        changed = generate_long_video(model, vae, image, audio, text, settings, resume_dir=str(tmp_path))
    finally:
        with torch.no_grad():
            model.head.head.weight.div_(1.5)
    assert not torch.equal(changed, full)
    # another seed does not reuse the stored windows
    other = generate_long_video(model, vae, image, audio, text,
                                LongVideoSettings(**{**settings.__dict__, "seed": 8}), resume_dir=str(tmp_path))
    assert not torch.equal(other, full)


def test_short_audio_and_bad_sizes(parts, rng):
    model, vae = parts
    image, audio, text = _inputs(3, rng)
    assert generate_long_video(model, vae, image, audio, text, SETTINGS).shape[0] == 3
    with pytest.raises(ValueError, match="multiple of 16"):
        generate_long_video(model, vae, image[:, :24], audio, text, SETTINGS)
    with pytest.raises(ValueError, match="frame_window"):
        generate_long_video(model, vae, image, audio, text, LongVideoSettings(frame_window=10))
    with pytest.raises(ValueError, match="continuation"):
        generate_long_video(model, vae, image, audio, text, LongVideoSettings(continuation="svi"))


def test_motion_mask_covers_the_latents_of_the_motion_frames():
    for motion_frames, latents in ((1, 1), (5, 2), (9, 3), (25, 7)):
        mask = motion_mask(81, motion_frames, 2, 3)
        assert mask.shape == (4, 21, 2, 3)
        assert mask[:, :latents].eq(1).all() and mask[:, latents:].eq(0).all()


def test_noised_motion_writes_the_motion_latents_at_each_sigma(rng):
    scheduler = make_scheduler("infinitetalk_euler", 4, 7.0)
    motion = torch.randn(1, 16, 2, 3, 4, generator=rng)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    generator = torch.Generator().manual_seed(seed)
    wrapped = NoisedMotion(scheduler, motion, lambda shape: torch.randn(shape, generator=generator))
    replay = torch.Generator().manual_seed(seed)
    latent = wrapped.inject(torch.randn(1, 16, 5, 3, 4, generator=rng), 0)
    eps = torch.randn(motion.shape, generator=replay)
    assert torch.allclose(latent[:, :, :2], (1 - scheduler.sigmas[0]) * motion + scheduler.sigmas[0] * eps)
    for i in range(len(wrapped)):
        velocity = torch.randn(latent.shape, generator=rng)
        free = latent[:, :, 2:] - velocity[:, :, 2:] * (scheduler.sigmas[i] - scheduler.sigmas[i + 1])
        latent = wrapped.step(velocity, i, latent)
        eps = torch.randn(motion.shape, generator=replay)
        sigma = scheduler.sigmas[i + 1]
        assert torch.allclose(latent[:, :, :2], (1 - sigma) * motion + sigma * eps, rtol=1e-6, atol=1e-6)
        assert torch.allclose(latent[:, :, 2:], free, rtol=1e-6, atol=1e-6)   # the other frames: a plain step
    assert torch.equal(latent[:, :, :2], motion)    # sigma 0 after the last step: clean


def test_multitalk_continuation_conditions_on_noised_motion_frames(parts, rng, monkeypatch):
    """Window k > 0: y = VAE(last motion frames + zeros) with the mask over their latents; the model sees those
    latents noised at sigma_i in the first latent frames at step i; the decoded latent has them clean; CLIP
    features come from the last motion frame. Window 0 is plain I2V."""
    model, vae = parts
    image, audio, text = _inputs(29, rng)   # windows at 0, 8, 16: 13 frames, 5 motion frames = 2 latent frames
    settings = LongVideoSettings(**{**SETTINGS.__dict__, "continuation": "multitalk", "frame_window": 13})
    seen, decoded, clip_inputs, windows = [], [], [], []
    forward, decode = model.forward_batched, vae.decode
    monkeypatch.setattr(model, "forward_batched", lambda latent, t, context, clip_fea, y, **kw: (
        seen.append((latent.clone(), clip_fea, y)), forward(latent, t, context, clip_fea, y, **kw))[1])
    monkeypatch.setattr(vae, "decode", lambda latent, **kw: (decoded.append(latent.clone()), decode(latent, **kw))[1])
    projection = torch.randn(3, 257 * 32, generator=rng)

    def encode_clip(frame):
        clip_inputs.append(frame.clone())
        return (frame.mean((1, 2)) @ projection).reshape(1, 257, 32)

    out = generate_long_video(model, vae, image, audio, text, settings, encode_clip=encode_clip,
                              on_window=lambda i, f: windows.append(f))
    assert out.shape == (29, 32, 32, 3) and [len(w) for w in windows] == [13, 8, 8]
    passes = 3 * settings.steps    # text and audio scales != 1: three passes per step
    sigmas = make_scheduler(settings.scheduler, settings.steps, settings.shift).sigmas
    generator = torch.Generator().manual_seed(settings.seed)
    assert torch.equal(seen[0][0], torch.randn(seen[0][0].shape, generator=generator))   # window 0: pure noise
    assert seen[0][2][:, :4, 0].eq(1).all() and seen[0][2][:, :4, 1:].eq(0).all()
    assert seen[0][1] is text.clip_fea
    video = torch.cat(windows)
    for w in (1, 2):
        previous = video[8 * w:8 * w + 5].float().permute(3, 0, 1, 2) / 255 * 2 - 1
        encoded = vae.encode(torch.cat([previous, torch.zeros(3, 8, 32, 32)], 1)[None])
        motion = encoded[:, :, :2]
        generator = torch.Generator().manual_seed(settings.seed + w)
        noise = torch.randn(seen[0][0].shape, generator=generator)
        for step in range(settings.steps):
            latent, clip_fea, y = seen[w * passes + 3 * step]
            eps = torch.randn(motion.shape, generator=generator)
            expected = (1 - sigmas[step]) * motion + sigmas[step] * eps
            assert torch.allclose(latent[:, :, :2], expected, rtol=1e-5, atol=1e-5), (w, step)
            assert torch.allclose(y[:, 4:], encoded, rtol=1e-5, atol=1e-5)
            assert y[:, :4, :2].eq(1).all() and y[:, :4, 2:].eq(0).all()
            assert torch.allclose(clip_fea, encode_clip(previous[:, -1]), rtol=1e-5, atol=1e-5)
        assert torch.equal(seen[w * passes][0][:, :, 2:], noise[:, :, 2:])
        assert torch.allclose(decoded[w][:, :, :2], motion, rtol=1e-5, atol=1e-5)
    assert len(clip_inputs) == 2 + 2 * settings.steps    # windows 1 and 2 (+ the checks above)


def test_out_of_memory_becomes_a_clear_error(parts, rng, tmp_path, monkeypatch):
    from wantalk.wanvideo import windows as engine
    from wantalk.wanvideo.memory_plan import MemoryPlanError
    model, vae = parts
    image, audio, text = _inputs(17, rng)
    real_denoise, calls = engine.denoise, []

    def denoise_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_denoise(*args, **kwargs)
    monkeypatch.setattr(engine, "denoise", denoise_then_fail)
    with pytest.raises(MemoryPlanError, match="window 2 of 3.*resumes.*block swap"):
        generate_long_video(model, vae, image, audio, text, SETTINGS, resume_dir=str(tmp_path))
    (folder,) = tmp_path.iterdir()
    assert [p.name for p in folder.glob("window_*")] == ["window_0000.safetensors"]  # the finished window is kept
