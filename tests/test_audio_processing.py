"""Audio preparation (multitalk/audio_processing.py): mono/16 kHz resampling on synthesized tones, BS.1770-4
loudness against the standard's sine reference and a direct filter recursion, normalisation, input errors."""
import math

import pytest
import torch

from wantalk.multitalk import audio_processing as ap
from wantalk.multitalk.audio_processing import (AudioInputError, integrated_loudness, k_weight, normalize_loudness,
                                                resample, to_mono_16k)


def uniform(rng, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=rng, dtype=torch.float64))


def tone(freq, rate, seconds, amplitude=0.5, phase=0.0):
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return amplitude * torch.sin(2 * math.pi * freq * t + phase)


def fit_tone(y, rate, freq):
    """Amplitude of `freq` in the middle half of `y` (least squares) and the rms of what is left."""
    n = y.shape[-1]
    mid = y[n // 4: 3 * n // 4].double()
    t = (torch.arange(mid.shape[0], dtype=torch.float64) + n // 4) / rate
    basis = torch.stack([torch.sin(2 * math.pi * freq * t), torch.cos(2 * math.pi * freq * t)], 1)
    coef = torch.linalg.lstsq(basis, mid[:, None]).solution[:, 0]
    return float(coef.norm()), float((mid - basis @ coef).pow(2).mean().sqrt())


# ---------------------------------------------------------------- resampling

@pytest.mark.parametrize("rate", [44100, 48000, 8000, 44101])
def test_resampling_keeps_tone_frequency_and_amplitude(rng, rate):
    top = min(rate, 16000) / 2 * 0.9
    freq, amplitude, phase = uniform(rng, 100, top), uniform(rng, 0.05, 0.9), uniform(rng, 0, 6.28)
    x = tone(freq, rate, 0.5, amplitude, phase).float()
    y = to_mono_16k(x, rate)
    assert y.dtype == torch.float32 and y.shape == (-(-x.shape[0] * 16000 // rate),)
    fitted, residual = fit_tone(y, 16000, freq)          # a shifted frequency would leave a large residual
    assert abs(fitted / amplitude - 1) < 1e-3
    assert residual < 1e-4 * amplitude


@pytest.mark.parametrize("rate", [44100, 48000])
def test_resampling_suppresses_tones_above_8khz(rng, rate):
    freq = uniform(rng, 8600, 20000)
    y = resample(tone(freq, rate, 0.5), rate, 16000)
    alias = abs(16000 * round(freq / 16000) - freq)
    assert fit_tone(y, 16000, alias)[0] < 1e-4 * 0.5     # > 80 dB down
    assert y[len(y) // 4: -len(y) // 4].pow(2).mean().sqrt() < 1e-4 * 0.5


def test_upsampling_leaves_no_images(rng):
    freq = uniform(rng, 200, 3400)
    y = resample(tone(freq, 8000, 0.5), 8000, 16000)
    assert abs(fit_tone(y, 16000, freq)[0] / 0.5 - 1) < 1e-3
    assert fit_tone(y, 16000, 8000 - freq)[0] < 1e-3 * 0.5              # image > 60 dB down


def test_bank_and_gather_paths_agree(rng):
    x = torch.randn(2, 3000, generator=rng, dtype=torch.float64)
    up, down = 160, 441
    kernels, h = ap._phase_kernels(up, down)
    n_out = -(-3000 * up // down)
    bank = ap._apply_bank(x, kernels, h, up, down, n_out)
    gathered = ap._apply_gather(x, kernels, h, up, down, n_out)
    assert torch.allclose(bank, gathered, rtol=0, atol=1e-12)


def test_mono_is_the_channel_mean(rng):
    stereo = torch.randn(1, 2, 8000, generator=rng)
    y = to_mono_16k({"waveform": stereo, "sample_rate": 16000})
    assert torch.allclose(y, stereo[0].mean(0), atol=1e-7)
    left_only = to_mono_16k(torch.stack([stereo[0, 0], torch.zeros(8000)]), 16000)
    assert torch.allclose(left_only, stereo[0, 0] / 2, atol=1e-7)


# ---------------------------------------------------------------- loudness

def direct_k_weighting(x, rate):
    """scipy.signal.lfilter semantics written as the plain recursion, both biquads in turn."""
    out = x.double().tolist()
    for b, a in ap.k_weighting_coefficients(rate):
        x1 = x2 = y1 = y2 = 0.0
        for n, x0 in enumerate(out):
            y0 = b[0] * x0 + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
            out[n], x1, x2, y1, y2 = y0, x0, x1, y0, y1
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_k_weighting_equals_the_recursive_filter(rng, rate):
    x = torch.randn(3000, generator=rng, dtype=torch.float64)
    assert torch.allclose(k_weight(x[None], rate)[0], direct_k_weighting(x, rate), rtol=0, atol=1e-10)


def gain_at(rate, freq, coefficients=None):
    """|H(f)|^2 of a biquad cascade (default: our K-weighting), evaluated on the unit circle."""
    z = complex(math.cos(2 * math.pi * freq / rate), -math.sin(2 * math.pi * freq / rate))
    gain = 1.0
    for b, a in coefficients or ap.k_weighting_coefficients(rate):
        gain *= abs((b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z)) ** 2
    return gain


def test_k_weighting_follows_the_standards_48k_filter():
    """BS.1770-4 Tables 1-2 give the K filter at 48 kHz; pyloudnorm's RBJ biquads (which we reproduce for any
    rate) follow its response within 0.05 dB from 20 Hz to 20 kHz."""
    standard = [((1.53512485958697, -2.69169618940638, 1.19839281085285), (1.0, -1.69065929318241, 0.73248077421585)),
                ((1.0, -2.0, 1.0), (1.0, -1.99004745483398, 0.99007225036621))]
    for freq in torch.logspace(math.log10(20), math.log10(20000), 200).tolist():
        assert 10 * math.log10(gain_at(48000, freq) / gain_at(48000, freq, standard)) == pytest.approx(0, abs=0.05)


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
@pytest.mark.parametrize("amplitude, reference", [(1.0, -3.01), (0.1, -23.01)])
def test_1khz_sine_reads_the_standards_reference(rng, rate, amplitude, reference):
    """BS.1770: a 0 dBFS 1 kHz sine reads -3.01 LKFS; at -20 dBFS (amplitude 0.1) -23.01. pyloudnorm's filter
    approximation reads 0.03-0.07 LU below that; the steady-state value is -0.691 + 10 log10(A^2/2 |H|^2).
    Whole 100 ms steps: pyloudnorm's last block would otherwise run past the end and count short."""
    seconds = int(torch.randint(20, 40, (), generator=rng)) / 10
    x = tone(1000, rate, seconds, amplitude, uniform(rng, 0, 6.28))
    loudness = integrated_loudness(x, rate)
    assert abs(loudness - reference) < 0.1
    assert loudness == pytest.approx(-0.691 + 10 * math.log10(amplitude ** 2 / 2 * gain_at(rate, 1000)), abs=2e-3)


def speech_like(rng, seconds, rate=16000):
    """Low-passed noise with a 3-6 Hz syllable envelope, pauses, and a random overall level."""
    n = int(seconds * rate)
    noise = torch.randn(n, generator=rng, dtype=torch.float64)
    voiced = torch.nn.functional.avg_pool1d(noise[None, None], 5, 1, 2)[0, 0]
    t = torch.arange(n, dtype=torch.float64) / rate
    envelope = torch.sin(math.pi * uniform(rng, 3, 6) * t).abs() * (torch.sin(2 * math.pi * 0.4 * t) > -0.3)
    return voiced * envelope * 10 ** (uniform(rng, -45, -5) / 20)


def test_speech_like_noise_is_normalised_to_minus_23(rng):
    x = speech_like(rng, uniform(rng, 3, 6)).float()
    y = normalize_loudness(x, 16000)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert abs(integrated_loudness(y, 16000) - (-23.0)) < 0.1
    assert torch.allclose(y / x.abs().max(), x / x.abs().max() * (y.abs().max() / x.abs().max()), atol=1e-6)


def reference_loudness(x, rate):
    """BS.1770-4 eq. 1-7 block by block on the recursively filtered mono signal (pyloudnorm's block bounds)."""
    y = direct_k_weighting(x, rate)
    n_blocks = int(round((len(y) / rate - 0.4) / 0.1)) + 1
    z = [float(y[int(0.4 * 0.25 * j * rate):int(0.4 * (0.25 * j + 1) * rate)].pow(2).sum()) / (0.4 * rate)
         for j in range(n_blocks)]
    level = [-0.691 + 10 * math.log10(v) if v > 0 else -math.inf for v in z]
    kept = [v for v, l in zip(z, level) if l >= -70]
    if not kept:
        return -math.inf
    relative = -0.691 + 10 * math.log10(sum(kept) / len(kept)) - 10
    kept = [v for v, l in zip(z, level) if l > relative and l > -70]
    return -0.691 + 10 * math.log10(sum(kept) / len(kept)) if kept else -math.inf


def test_gating_matches_the_standards_equations(rng):
    loud = speech_like(rng, uniform(rng, 1.5, 2.5))
    quiet = 1e-3 * loud[: int(uniform(rng, 0.5, 1.5) * 16000)]            # -60 dB: under the relative gate
    silent = torch.zeros(int(uniform(rng, 0.5, 1.5) * 16000), dtype=torch.float64)   # under the absolute gate
    x = torch.cat([loud, quiet, silent, loud.flip(0)])
    measured = integrated_loudness(x, 16000)
    assert measured == pytest.approx(reference_loudness(x, 16000), abs=1e-9)
    ungated = -0.691 + 10 * math.log10(float(direct_k_weighting(x, 16000).pow(2).mean()))
    assert measured > ungated + 0.5                                      # the gates did drop blocks


def test_silence_and_near_silence_are_left_alone(rng):
    silence = torch.zeros(32000)
    assert integrated_loudness(silence, 16000) == float("-inf")
    assert normalize_loudness(silence, 16000) is silence
    whisper = 1e-6 * torch.randn(32000, generator=rng)        # about -120 LUFS
    assert integrated_loudness(whisper, 16000) < -100
    assert normalize_loudness(whisper, 16000) is whisper
    short = 0.1 * torch.randn(3000, generator=rng)            # shorter than a 400 ms block: no loudness
    assert normalize_loudness(short, 16000) is short
    with pytest.raises(AudioInputError, match="gating block"):
        integrated_loudness(short, 16000)


# ---------------------------------------------------------------- input errors

def test_bad_audio_is_rejected_with_a_clear_message(rng):
    with pytest.raises(AudioInputError, match="speaker 1 is empty"):
        to_mono_16k({"waveform": torch.zeros(1, 1, 0), "sample_rate": 44100}, name="speaker 1")
    broken = torch.randn(1, 2, 4000, generator=rng)
    broken[0, 1, 7] = float("nan")
    with pytest.raises(AudioInputError, match="audio contains 1 NaN/inf"):
        to_mono_16k({"waveform": broken, "sample_rate": 16000})
    with pytest.raises(AudioInputError, match="shorter than one video frame at 25 fps"):
        to_mono_16k(torch.randn(1700, generator=rng), 44100)
    with pytest.raises(AudioInputError, match="batch of 2 clips"):
        to_mono_16k({"waveform": torch.randn(2, 1, 4000, generator=rng), "sample_rate": 16000})
    with pytest.raises(AudioInputError, match="sample rate"):
        to_mono_16k(torch.randn(4000, generator=rng), 0)
    with pytest.raises(AudioInputError, match="needs its sample_rate"):
        to_mono_16k(torch.randn(4000, generator=rng))


def test_audio_embeds_node_reports_progress_and_honours_stop_per_chunk(monkeypatch, progress_bars):
    """A clip longer than one wav2vec2 chunk (100 s > 80 s): the node's progress bar goes to its total, and a
    Stop (ComfyUI's check_interrupt raising) ends the encode at the next chunk."""
    from tiny_models import synth_speech, tiny_wav2vec2
    from wantalk import host, nodes_audio
    encoder = tiny_wav2vec2(torch.Generator().manual_seed(1))[0]
    speech = synth_speech(20)
    clip = {"waveform": torch.cat([speech * (0.5 + 0.1 * k) for k in range(5)])[None, None], "sample_rate": 16000}
    checks = []

    monkeypatch.setattr(host, "check_interrupt", lambda: checks.append(1))
    _, _, frames = nodes_audio.WanTalkAudioEmbeds().embed(clip, False, 1.0, 0, "para", audio_encoder=encoder)
    (bar,) = progress_bars
    assert frames == 2500 and bar.current == bar.total == len(checks) > 3

    class Stop(Exception):
        pass

    def stop_on_third():
        checks.append(1)
        if len(checks) >= 3:
            raise Stop
    checks.clear()
    monkeypatch.setattr(host, "check_interrupt", stop_on_third)
    with pytest.raises(Stop):
        nodes_audio.WanTalkAudioEmbeds().embed(clip, False, 1.0, 0, "para", audio_encoder=encoder)
    assert len(checks) == 3
