"""HuMo bands from Whisper's windows one at a time (issue 15, items 8/10): the same bands as the all-layers path
(33 hidden states of the whole clip, then `humo_bands`), while the memory held grows with the bands only."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from tiny_humo import TINY_WHISPER, tiny_whisper
from tiny_models import random_state_dict
from wantalk import nodes_humo
from wantalk.humo.audio_features import humo_bands, humo_bands_streamed
from wantalk.humo.whisper import WhisperEncoder, hidden_frames, log_mel_spectrogram, whisper_window_states

CLEAR_REFS = "/proc/self/clear_refs"   # writing 5 resets the peak resident size (Linux)


def assert_same_bands(got, want):
    """Equal up to the final rounding of F.interpolate's blend (bit-identical where its CPU kernel fuses the
    multiply-add as addcmul does)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() <= torch.finfo(want.dtype).eps * want.abs().max()


def all_layers_bands(encoder, audio):
    """The path before streaming, written out: every 30 s window (here 0.2 s) padded, log-mel'd and encoded on its
    own, all 33 states of every window concatenated, cut to two frames per 640 samples, then `humo_bands`."""
    cfg = encoder.config
    states = []
    for start in range(0, audio.shape[0], cfg.chunk_samples):
        chunk = audio[start:start + cfg.chunk_samples]
        chunk = F.pad(chunk, (0, cfg.chunk_samples - chunk.shape[0]))
        with torch.no_grad():
            states.append(torch.stack(encoder(log_mel_spectrogram(chunk, cfg.n_mels)[None]), dim=2)[0])
    return humo_bands(torch.cat(states)[:2 * (audio.shape[0] // 640)].float())


@pytest.mark.parametrize("t50,split", [(2, 1), (4, 1), (58, 7), (60, 60), (101, 10), (3002, 1500), (3002, 333)])
def test_streamed_bands_equal_humo_bands_for_any_split(rng, t50, split):
    hidden = 3 * torch.randn(t50, 33, 37, generator=rng)
    got = humo_bands_streamed(torch.split(hidden, split), t50)
    assert_same_bands(got, humo_bands(hidden))


def test_streamed_bands_refuse_a_wrong_frame_count(rng):
    hidden = torch.randn(20, 33, 4, generator=rng)
    with pytest.raises(ValueError, match="20 frames, expected 22"):
        humo_bands_streamed(torch.split(hidden, 7), 22)
    with pytest.raises(ValueError, match="more than the 18"):
        humo_bands_streamed(torch.split(hidden, 7), 18)
    with pytest.raises(ValueError, match="33"):
        humo_bands_streamed([hidden[:, :32]], 20)


def test_humo_embeds_node_gives_the_all_layers_bands_on_a_multi_window_clip(rng):
    encoder, _ = tiny_whisper(rng)
    samples = 5 * TINY_WHISPER.chunk_samples + 1333           # six windows, the last one short
    audio = 0.1 * torch.randn(samples, generator=rng)
    embeds, _, frames = nodes_humo.WanTalkHuMoEmbeds().embed({"waveform": audio[None, None], "sample_rate": 16000},
                                                             0, whisper=encoder)
    want = all_layers_bands(encoder, audio)
    assert frames == samples // 640 == want.shape[0]
    assert_same_bands(embeds.bands, want)


def peak_growth(fn):
    """(fn(), bytes by which this process's peak resident size during `fn` exceeded its size before)."""
    def resident(key):
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(fields[key].split()[0]) * 1024
    with open(CLEAR_REFS, "w") as f:
        f.write("5")
    before = resident("VmRSS")
    result = fn()
    return result, resident("VmHWM") - before


@pytest.mark.skipif(not os.access(CLEAR_REFS, os.W_OK),
                    reason="needs Linux /proc/self/clear_refs to measure the peak resident size")
def test_memory_follows_the_bands_not_the_33_layers(rng):
    # the tiny Whisper with 2 s windows (100 positions) keeps minutes of audio fast on a CPU
    cfg = dataclasses.replace(TINY_WHISPER, num_positions=100)
    encoder = WhisperEncoder(cfg)
    encoder.load_state_dict(random_state_dict(encoder, rng))
    encoder.eval()

    def bands_of(seconds):
        audio = 0.1 * torch.randn(seconds * 16000, generator=rng)
        return peak_growth(lambda: humo_bands_streamed(whisper_window_states(encoder, audio),
                                                       hidden_frames(audio.shape[0])))

    bands_of(10)                                                      # allocator warm-up
    window_bytes = cfg.num_positions * 33 * cfg.d_model * 4
    for seconds in (60, 300):
        bands, growth = bands_of(seconds)
        bound = bands.nbytes + 4 * window_bytes + 4_000_000             # the output, a few windows, allocator slack
        assert growth <= bound, (seconds, growth, bands.nbytes)
    all_layers = hidden_frames(300 * 16000) * 33 * cfg.d_model * 4   # what the old path held for 5 minutes
    assert all_layers > 5 * bound
