"""APG (the official InfiniteTalk --use_apg) against an independent float64 computation over several steps."""
import numpy as np
import pytest
import torch

from wantalk.wanvideo.guidance import AdaptiveProjectedGuidance, plan_passes


def reference_direction(diff: np.ndarray, cond: np.ndarray, threshold: float) -> np.ndarray:
    """Official formula per sample, written out: shrink to the norm threshold, drop the part along cond."""
    length = np.sqrt((diff ** 2).sum())
    if threshold > 0 and length > threshold:
        diff = diff * (threshold / length)
    along = cond.ravel() / np.sqrt((cond ** 2).sum())
    return diff - (diff.ravel() @ along) * along.reshape(cond.shape)


def reference_run(steps, text_scale, audio_scale, momentum, threshold):
    text_avg = audio_avg = 0.0
    out = []
    for p in steps:
        cond = p["cond"]
        if np.isclose(text_scale, 1.0):
            audio_avg = (cond - p["drop_audio"]) + momentum * audio_avg
            out.append(cond + (audio_scale - 1) * reference_direction(audio_avg, cond, threshold))
        else:
            text_avg = (cond - p["drop_text"]) + momentum * text_avg
            audio_avg = (p["drop_text"] - p["uncond"]) + momentum * audio_avg
            out.append(cond + (text_scale - 1) * reference_direction(text_avg, cond, threshold)
                       + (audio_scale - 1) * reference_direction(audio_avg, cond, threshold))
    return out


@pytest.mark.parametrize("text_scale, audio_scale, threshold", [(5.0, 4.0, 55.0), (1.0, 2.0, 55.0),
                                                                (3.0, 2.5, 0.0), (5.0, 4.0, 3.0)])
def test_apg_matches_the_official_formula_over_steps(rng, text_scale, audio_scale, threshold):
    apg = AdaptiveProjectedGuidance(text_scale, audio_scale, momentum=-0.75, norm_threshold=threshold)
    passes = apg.passes(900.0)
    assert passes == plan_passes("infinitetalk", text_scale=text_scale, audio_scale=audio_scale)
    steps = [{name: torch.randn(1, 4, 3, 6, 5, generator=rng) * (1 + 2 * k) for name in passes} for k in range(4)]
    expected = reference_run([{n: t[0].double().numpy() for n, t in s.items()} for s in steps],
                             text_scale, audio_scale, -0.75, threshold)
    for preds, want in zip(steps, expected):
        got = apg.combine(preds, 900.0)[0].double().numpy()
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_apg_differs_from_plain_guidance_and_each_window_starts_fresh(rng):
    preds = {n: torch.randn(1, 4, 2, 4, 4, generator=rng) for n in ("cond", "drop_text", "uncond")}
    plain = preds["uncond"] + 5 * (preds["cond"] - preds["drop_text"]) + 4 * (preds["drop_text"] - preds["uncond"])
    first = AdaptiveProjectedGuidance(5.0, 4.0)
    a = first.combine(preds, 1.0)
    assert (a - plain).abs().max() > 1e-3
    b = first.combine(preds, 1.0)                      # the momentum now holds the first step
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(AdaptiveProjectedGuidance(5.0, 4.0).combine(preds, 1.0), a)
