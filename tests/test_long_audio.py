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
