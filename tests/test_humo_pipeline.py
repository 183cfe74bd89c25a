"""HuMo generation on tiny weights: reference fitting, the zero-video latent (cached, causal prefix), y / y_null,
the TIA passes the shared loop runs before and after t = 980 and their combination, the audio windows each long-
audio window gets, a tiny end-to-end run with resume, and bad inputs."""
import pytest
import torch

from wantalk.humo.audio_features import humo_audio_windows
from wantalk.humo.conditioning import humo_conditioning
from wantalk.humo.latent_reference import LatentReferenceConditioning, LatentReferenceGuidance, ReferenceInLatents
from wantalk.humo.pipeline import (HUMO_1_7B_DEFAULTS, HUMO_DEFAULTS, HUMO_DISTILLED, HumoSettings, encode_references, fit_reference,
                                   generate_humo_video, humo_y, window_frames, zero_video_latent)
from wantalk.wanvideo.windows import window_starts
from wantalk.wanvideo import guidance
from wantalk.wanvideo.sampling import Conditioning, denoise
from wantalk.wanvideo.schedulers import make_scheduler
from test_humo_model import TINY_HUMO_1_7B, tiny_humo
from tiny_models import tiny_vae

SETTINGS = HumoSettings(frames=9, motion_frames=5, steps=2, text_scale=2.0, audio_scale=3.0, seed=5)


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator()
    g.seed()
    model, _ = tiny_humo(g)
    vae, _ = tiny_vae(g)
    return model, vae


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- reference images

def test_fit_reference_keeps_aspect_on_white(rng):
    colour = torch.rand(3, generator=rng) * 2 - 1
    tall = colour[:, None, None].expand(3, 40, 20)           # aspect 0.5 into 32x48 -> 16x32, centred
    out = fit_reference(tall, 32, 48)
    assert out.shape == (3, 32, 48)
    assert torch.allclose(out[:, :, 16:32], colour[:, None, None].expand(3, 32, 16), atol=1e-5)
    assert (out[:, :, :16] == 1).all() and (out[:, :, 32:] == 1).all()
    wide = torch.rand(3, 10, 60, generator=rng) * 2 - 1      # aspect 6 into 32x48 -> 48x8, rows 12..19
    out = fit_reference(wide, 32, 48)
    assert (out[:, :12] == 1).all() and (out[:, 20:] == 1).all() and not (out[:, 12:20] == 1).all()


def test_references_are_encoded_one_by_one_and_appended(parts, rng):
    _, vae = parts
    images = [torch.rand(3, 32, 32, generator=rng) * 2 - 1, torch.rand(3, 24, 40, generator=rng) * 2 - 1]
    latents = encode_references(vae, images, 32, 32)
    assert latents.shape == (1, 16, 2, 4, 4)
    for i, img in enumerate(images):
        alone = vae.encode(fit_reference(img, 32, 32)[None, :, None])
        assert torch.equal(latents[:, :, i:i + 1], alone)
    assert encode_references(vae, None, 32, 48).abs().sum() == 0  # HuMo's stand-in: one zero latent frame


# ---------------------------------------------------------------------------------------------- y, y_null

def test_zero_video_latent_is_cached_and_a_causal_prefix(parts, monkeypatch):
    _, vae = parts
    long = zero_video_latent(vae, 32, 16, 4)
    calls = []
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda video: calls.append(video.shape) or original(video))
    short = zero_video_latent(vae, 32, 16, 2)
    assert not calls and torch.equal(short, long[:, :, :2])
    assert rel(original(torch.zeros(1, 3, 5, 32, 16)), short) < 1e-6  # the causal VAE: prefix == shorter encode
    assert zero_video_latent(vae, 16, 16, 2).shape == (1, 16, 2, 2, 2) and len(calls) == 1  # new size: one encode
    assert long.abs().sum() > 0  # grey video is not the zero latent


def test_y_holds_the_reference_at_the_end_with_the_mask(rng):
    zero = torch.randn(1, 16, 6, 4, 5, generator=rng)
    ref = torch.randn(1, 16, 2, 4, 5, generator=rng)
    y, y_null = humo_y(zero, ref)
    assert y.shape == y_null.shape == (1, 20, 6, 4, 5)
    assert (y[:, :4, :4] == 0).all() and (y[:, :4, 4:] == 1).all() and torch.equal(y[:, :4], y_null[:, :4])
    assert torch.equal(y[:, 4:, :4], zero[:, :, :4]) and torch.equal(y[:, 4:, 4:], ref)
    assert torch.equal(y_null[:, 4:], zero)
    with pytest.raises(ValueError, match="encode the reference images at the video size"):
        humo_y(zero, torch.randn(1, 16, 1, 4, 6, generator=rng))


# ---------------------------------------------------------------------------------------------- guidance in the loop

class RecordingModel:
    """Stands in for the DiT: records what each pass received and returns a velocity that identifies it."""

    def __init__(self, values):
        self.calls, self.values = [], values

    def forward_batched(self, x, t, context, clip_fea, y, audio=None):
        key = (self.values[id(context)], self.values[id(y)], self.values[id(audio)])
        self.calls.append((float(t[0]), key))
        return torch.full_like(x, float(hash(key) % 97)) + x


def test_tia_passes_and_formula_in_the_loop(rng):
    context, negative = torch.randn(1, 3, 8, generator=rng), torch.randn(1, 3, 8, generator=rng)
    y, y_null = torch.randn(1, 20, 2, 2, 2, generator=rng), torch.randn(1, 20, 2, 2, 2, generator=rng)
    audio, audio_null = object(), object()
    names = {id(context): "text", id(negative): "neg", id(y): "ref", id(y_null): "no_ref", id(audio): "audio",
             id(audio_null): "zero_audio"}
    model = RecordingModel(names)
    cond = Conditioning(context, negative, None, y, y_null, audio, audio_null)
    settings = HumoSettings(text_scale=4.5, audio_scale=6.0)
    scheduler = make_scheduler("unipc", 50, 5.0)
    velocities = []
    step = scheduler.step
    scheduler.step = lambda v, i, lat: velocities.append(v - lat) or step(v, i, lat)
    denoise(model, torch.randn(1, 16, 2, 2, 2, generator=rng), scheduler, cond, settings.plan())
    full, no_audio = ("text", "ref", "audio"), ("text", "ref", "zero_audio")
    with_image, without = ("neg", "ref", "zero_audio"), ("neg", "no_ref", "zero_audio")
    early = [float(t) for t in scheduler.timesteps if t > 980]
    assert 0 < len(early) < 50 and early[0] == 999
    for i, t in enumerate(scheduler.timesteps.tolist()):
        calls = model.calls[3 * i:3 * i + 3]
        assert [c[0] for c in calls] == [t] * 3
        assert [c[1] for c in calls] == [full, no_audio, with_image if t > 980 else without], t
    assert len(model.calls) == 150
    # The combination for one step below 980, from the recorded passes (velocity = marker + latent).
    i = len(early) + 3
    marks = [float(hash(k) % 97) for k in (full, no_audio, without)]
    a, s = 6.0, 4.5 - 2.0
    expected_offset = a * (marks[0] - marks[1]) + s * (marks[1] - marks[2]) + marks[2]
    assert torch.allclose(velocities[i], torch.full_like(velocities[i], expected_offset), atol=1e-4)
    marks[2] = float(hash(with_image) % 97)
    expected_offset = a * (marks[0] - marks[1]) + 4.5 * (marks[1] - marks[2]) + marks[2]
    assert torch.allclose(velocities[0], torch.full_like(velocities[0], expected_offset), atol=1e-4)


@pytest.mark.parametrize("settings,passes", [(HUMO_DEFAULTS, 3), (HumoSettings(guidance="ta"), 3),
                                             (HUMO_DISTILLED, 2), (HumoSettings(guidance="none"), 1)])
def test_plans_of_each_guidance_form(settings, passes):
    plan = settings.plan()
    assert len(plan.passes(999.0)) == len(plan.passes(500.0)) == passes
    if settings.guidance == "audio_cfg":
        assert plan.passes(500.0) == ("cond", "drop_audio")


def test_distilled_form_is_humo_formula_with_text_scale_one(rng):
    p = {k: torch.randn(2, 3, generator=rng) for k in ("cond", "drop_audio", "drop_all")}
    plan = HUMO_DISTILLED.plan()
    got = plan.combine({k: p[k] for k in plan.passes(500.0)}, 500.0)
    a = HUMO_DISTILLED.audio_scale
    assert torch.allclose(got, guidance.humo_cfg(p["cond"], p["drop_audio"], p["drop_all"], a, 1.0), atol=1e-6)


# ---------------------------------------------------------------------------------------------- end to end

def test_window_frames_for_short_audio():
    assert window_frames(97, 97) == 97 and window_frames(500, 97) == 97
    assert window_frames(50, 97) == 53 and window_frames(1, 97) == 5 and window_frames(9, 97) == 9


def _text(rng):
    return Conditioning(torch.randn(1, 5, 64, generator=rng), torch.randn(1, 3, 64, generator=rng))


def test_tiny_end_to_end_long_audio_windows(parts, rng, monkeypatch):
    model, vae = parts
    bands = torch.randn(15, 5, 6, generator=rng)
    refs = [torch.rand(3, 24, 40, generator=rng) * 2 - 1]
    starts = window_starts(15, 9, 5)
    assert starts == [0, 4, 8]
    seen = []
    forward = model.forward_batched
    monkeypatch.setattr(model, "forward_batched", lambda *a, audio=None, **k: seen.append(audio) or forward(*a, audio=audio, **k))
    steps = []
    out = generate_humo_video(model, vae, _text(rng), bands, refs, height=32, width=32, settings=SETTINGS,
                              on_step=lambda *s: steps.append(s))
    assert out.dtype == torch.float32 and out.shape == (15, 32, 32, 3)
    assert torch.equal((out * 255).round() / 255, out)   # uint8 levels: the IMAGE is filled from uint8 windows
    assert len(steps) == 3 * SETTINGS.steps and steps[-1] == (2, 3, 2, 2)
    per_window = 3 * SETTINGS.steps  # 3 TIA passes per step
    assert len(seen) == 3 * per_window
    for w, start in enumerate(starts):
        expect = humo_conditioning(model, humo_audio_windows(bands, 3, 1, start=start)).tokens
        assert torch.equal(seen[w * per_window].tokens, expect)   # the cond pass of each window
    assert torch.equal(seen[1].tokens, seen[2].tokens)            # zero audio in the other two passes


def test_resume_gives_the_same_frames_without_sampling(parts, rng, tmp_path, monkeypatch):
    model, vae = parts
    bands, text = torch.randn(11, 5, 6, generator=rng), _text(rng)
    first = generate_humo_video(model, vae, text, bands, None, height=32, width=16, settings=SETTINGS,
                                resume_dir=str(tmp_path))
    assert first.shape == (11, 32, 16, 3)
    monkeypatch.setattr(model, "forward_batched", lambda *a, **k: pytest.fail("resumed run sampled again"))
    assert torch.equal(generate_humo_video(model, vae, text, bands, None, height=32, width=16, settings=SETTINGS,
                                           resume_dir=str(tmp_path)), first)


# ---------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_are_explained(parts, rng):
    model, vae = parts
    bands, text = torch.randn(9, 5, 6, generator=rng), _text(rng)
    with pytest.raises(ValueError, match="multiple of 16"):
        generate_humo_video(model, vae, text, bands, height=40, width=32, settings=SETTINGS)
    with pytest.raises(ValueError, match="bands must be"):
        generate_humo_video(model, vae, text, torch.randn(9, 5, 1280), height=32, width=32, settings=SETTINGS)
    with pytest.raises(ValueError, match="frames must be 1 \\+ 4k"):
        generate_humo_video(model, vae, text, bands, height=32, width=32, settings=HumoSettings(frames=10))
    with pytest.raises(ValueError, match="unknown HuMo guidance"):
        HumoSettings(guidance="apg").validate()
    with pytest.raises(ValueError, match="reference image must be"):
        fit_reference(torch.rand(32, 32, 3), 32, 32)


# ---------------------------------------------------------------------------------------------- HuMo-1.7B

class LatentRecorder:
    """Stands in for a 16-channel DiT: records the reference frames it was shown, its text and audio."""

    def __init__(self, names):
        self.calls, self.names = [], names

    def forward_batched(self, x, t, context, clip_fea, y, audio=None):
        assert y is None and clip_fea is None
        self.calls.append((x[:, :, -1].clone(), self.names[id(context)], self.names[id(audio)]))
        return torch.zeros_like(x)


def test_1_7b_reference_enters_the_latents_only_in_the_image_pass(rng):
    context, negative = torch.randn(1, 3, 8, generator=rng), torch.randn(1, 3, 8, generator=rng)
    audio, audio_null = object(), object()
    reference = torch.randn(1, 16, 1, 2, 2, generator=rng)
    recorder = LatentRecorder({id(context): "text", id(negative): "neg", id(audio): "audio", id(audio_null): "zero"})
    cond = LatentReferenceConditioning(context, negative, reference, audio, audio_null)
    plan = HUMO_1_7B_DEFAULTS.plan(latent_reference=True)
    assert plan.passes(999.0) == plan.passes(100.0) == ("cond", "ta", "t", "neg")
    latent = torch.randn(1, 16, 3, 2, 2, generator=rng)
    runner = ReferenceInLatents(recorder)
    for name in plan.passes(500.0):
        args = cond.for_pass(name)
        runner.forward_batched(latent, torch.tensor([500.0]), args["context"], args["clip_fea"], args["y"],
                               audio=args["audio"])
    shown = [(torch.equal(x, reference[:, :, 0]), x.abs().sum() == 0, c, a) for x, c, a in recorder.calls]
    assert shown == [(True, False, "text", "audio"), (False, True, "text", "audio"), (False, True, "text", "zero"),
                     (False, True, "neg", "zero")]
    assert HumoSettings(guidance="ta").plan(latent_reference=True).passes(500.0) == ("ta", "t", "neg")


@pytest.mark.parametrize("with_image", [True, False])
def test_1_7b_guidance_formula_against_float64(rng, with_image):
    s_i, s_a, s_t = (float(torch.rand(1, generator=rng)) * 8 for _ in range(3))
    p = {k: torch.randn(2, 16, 3, generator=rng) for k in ("cond", "ta", "t", "neg")}
    d = {k: v.double() for k, v in p.items()}
    expected = s_a * (d["ta"] - d["t"]) + s_t * (d["t"] - d["neg"]) + d["neg"]
    if with_image:
        expected = expected + s_i * (d["cond"] - d["ta"])
    got = LatentReferenceGuidance(s_i, s_a, s_t, with_image).combine(p, 500.0)
    assert rel(got, expected) < 1e-6


def test_1_7b_end_to_end(rng):
    small, _ = tiny_humo(rng, TINY_HUMO_1_7B)
    vae, _ = tiny_vae(rng)
    bands, text = torch.randn(9, 5, 6, generator=rng), _text(rng)
    out = generate_humo_video(small, vae, text, bands, [torch.rand(3, 32, 32, generator=rng) * 2 - 1], height=32,
                              width=32, settings=HumoSettings(frames=9, motion_frames=5, steps=2, text_scale=7.5,
                                                                 audio_scale=7.5))
    assert out.shape == (9, 32, 32, 3) and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- the shared engine

def test_humo_runs_through_the_shared_window_engine(parts, rng, monkeypatch):
    """HuMo's windows go through wanvideo.windows (no import from multitalk/): the resident weights are released
    before every VAE call of the loop, and an out-of-memory error becomes the engine's advice."""
    import ast
    import os
    from wantalk.humo import pipeline
    from wantalk.wanvideo import windows as engine
    from wantalk.wanvideo.memory_plan import MemoryPlanError
    folder = os.path.dirname(pipeline.__file__)
    for name in os.listdir(folder):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(folder, name)).read())
            modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not any("multitalk" in m for m in modules), name
    model, vae = parts
    bands, text = torch.randn(13, 5, 6, generator=rng), _text(rng)    # windows at 0 and 4
    released, calls = [], []
    monkeypatch.setattr(engine, "release_vram", lambda m: released.append(m) or 0)
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda latent, **kw: calls.append(len(released)) or decode(latent, **kw))
    generate_humo_video(model, vae, text, bands, None, height=32, width=32, settings=SETTINGS)
    assert len(calls) == 2 and calls[0] >= 1 and calls[1] > calls[0] and all(m is model for m in released)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(engine, "denoise", out_of_memory)
    with pytest.raises(MemoryPlanError, match="window 1 of 2.*block swap"):
        generate_humo_video(model, vae, text, bands, None, height=32, width=32, settings=SETTINGS)
