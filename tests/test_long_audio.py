"""Long audio through HuMo's Whisper: already encoded in HuMo's 30 s windows (linear in the length); each window
reports progress, and a Stop raised from the report ends the encode at that window (issue 15, item 10)."""
import pytest
import torch

from test_whisper import SMALL, random_encoder
from wantalk.humo.whisper import whisper_hidden_states


def test_whisper_reports_each_window_and_stops_at_a_raised_stop(rng):
    enc = random_encoder(SMALL, rng)
    audio = 0.2 * torch.randn(4 * SMALL.chunk_samples + 700, generator=rng)
    calls = []
    whole = whisper_hidden_states(enc, audio, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert torch.equal(whole, whisper_hidden_states(enc, audio))  # reporting changes nothing

    class Stop(Exception):
        pass

    def stop_at_two(done, total):
        calls.append(done)
        if done == 2:
            raise Stop
    calls.clear()
    with pytest.raises(Stop):
        whisper_hidden_states(enc, audio, progress=stop_at_two)
    assert calls == [1, 2]


def test_humo_embeds_node_shows_whisper_progress_and_honours_stop(tmp_path, monkeypatch, rng, use_models_root,
                                                                  progress_bars):
    from tiny_humo import TINY_HUMO_FILES, make_tiny_humo_models
    from wantalk import host, nodes_humo
    make_tiny_humo_models(str(tmp_path))
    use_models_root(tmp_path)
    (whisper,) = nodes_humo.WanTalkWhisperLoader().load(TINY_HUMO_FILES["audio_encoders"], "fp32", "cpu")
    samples = int(3.5 * whisper.config.chunk_samples)
    clip = {"waveform": 0.1 * torch.randn(1, 1, samples, generator=rng), "sample_rate": 16000}
    checks = []

    class Stop(Exception):
        pass

    monkeypatch.setattr(host, "check_interrupt", lambda: checks.append(1))
    nodes_humo.WanTalkHuMoEmbeds().embed(clip, 0, whisper=whisper)
    (bar,) = progress_bars
    assert bar.current == bar.total == len(checks) == 4

    def stop_on_second():
        checks.append(1)
        if len(checks) == 2:
            raise Stop
    checks.clear()
    monkeypatch.setattr(host, "check_interrupt", stop_on_second)
    with pytest.raises(Stop):
        nodes_humo.WanTalkHuMoEmbeds().embed(clip, 0, whisper=whisper)
    assert len(checks) == 2
