"""Guidance formulas against float64 hand computations (coefficient form) and the pass planner."""
import pytest
import torch

from wantalk.wanvideo.guidance import PASS_DROPS, combine, plan_passes

SHAPE = (1, 16, 2, 6, 8)


def preds(rng, names):
    """Similar-but-different predictions (as real passes are), float32, plus their float64 copies."""
    base = torch.randn(SHAPE, generator=rng)
    out = {n: base + 0.3 * torch.randn(SHAPE, generator=rng) for n in names}
    return out, {n: p.double() for n, p in out.items()}


def scale(rng, low=1.5, high=8.0):
    return low + (high - low) * torch.rand((), generator=rng).item()


def check(result, expected):
    assert result.dtype == torch.float32
    err = (result.double() - expected).norm() / expected.norm()
    assert err < 1e-6, err


def test_wan_cfg(rng):
    g = scale(rng)
    p, d = preds(rng, ["cond", "uncond"])
    assert plan_passes("cfg", scale=g) == ("cond", "uncond")
    check(combine("cfg", p, scale=g), g * d["cond"] + (1 - g) * d["uncond"])


def test_infinitetalk_three_pass(rng):
    ts, aud = scale(rng), scale(rng)
    p, d = preds(rng, ["cond", "drop_text", "uncond"])
    assert plan_passes("infinitetalk", text_scale=ts, audio_scale=aud) == ("cond", "drop_text", "uncond")
    expected = ts * d["cond"] + (aud - ts) * d["drop_text"] + (1 - aud) * d["uncond"]
    check(combine("infinitetalk", p, text_scale=ts, audio_scale=aud), expected)


def test_infinitetalk_two_pass_when_text_scale_is_one(rng):
    aud = scale(rng)
    p, d = preds(rng, ["cond", "drop_audio"])
    assert plan_passes("infinitetalk", text_scale=1.0, audio_scale=aud) == ("cond", "drop_audio")
    check(combine("infinitetalk", p, text_scale=1.0, audio_scale=aud),
          aud * d["cond"] + (1 - aud) * d["drop_audio"])


def test_infinitetalk_audio_scale_one_needs_no_uncond_pass(rng):
    """audio 1 cancels the uncond pass in the 3-pass formula: any uncond gives the same velocity."""
    ts = scale(rng)
    p, d = preds(rng, ["cond", "drop_text", "uncond"])
    assert plan_passes("infinitetalk", text_scale=ts, audio_scale=1.0) == ("cond", "drop_text")
    reduced = combine("infinitetalk", {k: p[k] for k in ("cond", "drop_text")}, text_scale=ts, audio_scale=1.0)
    full = d["uncond"] + ts * (d["cond"] - d["drop_text"]) + (d["drop_text"] - d["uncond"])
    check(reduced, full)


@pytest.mark.parametrize("mode, scales", [("cfg", {"scale": 1.0}),
                                          ("infinitetalk", {"text_scale": 1.0, "audio_scale": 1.0})])
def test_unit_scales_need_one_pass(mode, scales, rng):
    assert plan_passes(mode, **scales) == ("cond",)
    p, d = preds(rng, ["cond"])
    assert torch.equal(combine(mode, p, **scales), p["cond"])


@pytest.mark.parametrize("timestep, text_weight_offset, negative", [(999, 0.0, "uncond"), (981, 0.0, "uncond"),
                                                                    (980, -2.0, "drop_all"), (113, -2.0, "drop_all")])
def test_humo_tia(timestep, text_weight_offset, negative, rng):
    a, s = scale(rng), scale(rng)
    passes = plan_passes("humo_tia", text_scale=s, audio_scale=a, timestep=timestep)
    assert passes == ("cond", "drop_audio", negative)
    p, d = preds(rng, passes)
    w = s + text_weight_offset
    expected = a * d["cond"] + (w - a) * d["drop_audio"] + (1 - w) * d[negative]
    check(combine("humo_tia", p, text_scale=s, audio_scale=a, timestep=torch.tensor(float(timestep))), expected)


def test_humo_ta(rng):
    a, s = scale(rng), scale(rng)
    passes = plan_passes("humo_ta", text_scale=s, audio_scale=a)
    assert passes == ("cond", "drop_audio", "uncond")
    p, d = preds(rng, passes)
    check(combine("humo_ta", p, text_scale=s, audio_scale=a),
          a * d["cond"] + (s - a) * d["drop_audio"] + (1 - s) * d["uncond"])


def test_every_planned_pass_has_a_meaning():
    plans = {plan_passes(m, scale=sc, text_scale=sc, audio_scale=au, timestep=t)
             for m in ("cfg", "infinitetalk", "humo_tia", "humo_ta")
             for sc in (1.0, 5.0) for au in (1.0, 4.0) for t in (999, 500)}
    assert {n for plan in plans for n in plan} <= set(PASS_DROPS)
    assert all(plan[0] == "cond" and len(set(plan)) == len(plan) for plan in plans)
    assert PASS_DROPS["uncond"] == {"text", "audio"} and PASS_DROPS["drop_all"] == {"text", "audio", "image"}


def test_bad_requests_are_explained(rng):
    p, _ = preds(rng, ["cond"])
    with pytest.raises(ValueError, match="missing"):
        combine("infinitetalk", p, text_scale=5.0, audio_scale=4.0)
    with pytest.raises(ValueError, match="timestep"):
        plan_passes("humo_tia", text_scale=5.0, audio_scale=5.5)
    with pytest.raises(ValueError, match="unknown guidance mode"):
        plan_passes("apg", scale=5.0)
