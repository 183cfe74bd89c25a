"""Whisper encoder, log-mel front end and loader (humo/whisper.py) against independent float64 references."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wantalk.humo.whisper import (WhisperEncoder, WhisperEncoderConfig, hidden_states_from_comfy, hz_to_mel,
                                  load_whisper_encoder, log_mel_spectrogram, mel_filterbank, mel_to_hz,
                                  whisper_hidden_states)

SMALL = WhisperEncoderConfig(n_mels=16, d_model=64, num_layers=2, num_heads=4, ffn_dim=96, num_positions=10)


def rel_err(a, b):
    a, b = (torch.as_tensor(t).detach().to(torch.float64) for t in (a, b))
    return float((a - b).norm() / b.norm())


def random_encoder(cfg, rng, dtype=torch.float32):
    enc = WhisperEncoder(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            noise = torch.randn(p.shape, generator=rng, dtype=torch.float64)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(noise / math.sqrt(fan_in))
    return enc.eval()


# ---------------------------------------------------------------- float64 references (written from the papers/HF docs)

def ref_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_conv1d(x, w, b, stride):
    """x [C, T], w [O, C, 3], zero padding 1."""
    xp = torch.nn.functional.pad(x, (1, 1))
    t_out = (x.shape[1] + 2 - 3) // stride + 1
    cols = torch.stack([xp[:, i * stride:i * stride + 3] for i in range(t_out)])  # [T, C, 3]
    return torch.einsum("tck,ock->ot", cols, w) + b[:, None]


def ref_encoder_states(sd, mel, num_heads):
    """HF WhisperEncoder hidden states for one mel [n_mels, 2P], float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = ref_gelu(ref_conv1d(mel.double(), sd["conv1.weight"], sd["conv1.bias"], 1))
    x = ref_gelu(ref_conv1d(x, sd["conv2.weight"], sd["conv2.bias"], 2)).T + sd["embed_positions.weight"]
    states = [x]
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(n_layers):
        p = lambda n: sd[f"layers.{i}.{n}"]
        h = ref_layer_norm(x, p("self_attn_layer_norm.weight"), p("self_attn_layer_norm.bias"))
        q = h @ p("self_attn.q_proj.weight").T + p("self_attn.q_proj.bias")
        k = h @ p("self_attn.k_proj.weight").T
        v = h @ p("self_attn.v_proj.weight").T + p("self_attn.v_proj.bias")
        heads = lambda t: t.reshape(t.shape[0], num_heads, -1).transpose(0, 1)
        qh, kh, vh = heads(q), heads(k), heads(v)
        att = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(qh.shape[-1]), dim=-1) @ vh
        x = x + att.transpose(0, 1).reshape(x.shape) @ p("self_attn.out_proj.weight").T + p("self_attn.out_proj.bias")
        h = ref_layer_norm(x, p("final_layer_norm.weight"), p("final_layer_norm.bias"))
        h = ref_gelu(h @ p("fc1.weight").T + p("fc1.bias")) @ p("fc2.weight").T + p("fc2.bias")
        x = x + h
        states.append(x)
    states[-1] = ref_layer_norm(x, sd["layer_norm.weight"], sd["layer_norm.bias"])
    return torch.stack(states, dim=1)   # [P, L+1, d]


def slaney_hz(mel):
    """Slaney mel -> Hz from its definition: linear 200/3 Hz per mel below 15 mel, factor 6.4 per 27 mel above."""
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * 6.4 ** ((mel - 15.0) / 27.0))


def slaney_edges(n_mels, f_max=8000.0):
    mel_max = 15.0 + 27.0 * math.log(f_max / 1000.0) / math.log(6.4)
    return slaney_hz(np.linspace(0.0, mel_max, n_mels + 2))


def ref_log_mel(audio, n_mels):
    """numpy float64 log-mel: reflect-padded frames, periodic Hann, rfft power, last frame dropped."""
    x = np.asarray(audio, dtype=np.float64)
    padded = np.pad(x, (200, 200), mode="reflect")
    n_frames = 1 + len(x) // 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([padded[i * 160:i * 160 + 400] * window for i in range(n_frames)], axis=1)
    power = np.abs(np.fft.rfft(frames, axis=0)) ** 2
    mel = mel_filterbank(n_mels).numpy() @ power[:, :-1]
    log_mel = np.log10(np.maximum(mel, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return (log_mel + 4.0) / 4.0


# ---------------------------------------------------------------- encoder

def test_encoder_states_match_float64_reference(rng):
    enc = random_encoder(SMALL, rng)
    mel = torch.randn(2, SMALL.n_mels, SMALL.mel_frames, generator=rng)
    states = enc(mel)
    assert len(states) == SMALL.num_layers + 1
    sd = enc.state_dict()
    for b in range(2):
        got = torch.stack([s[b] for s in states], dim=1)
        want = ref_encoder_states(sd, mel[b], SMALL.num_heads)
        assert got.shape == want.shape == (SMALL.num_positions, SMALL.num_layers + 1, SMALL.d_model)
        for layer in range(SMALL.num_layers + 1):
            assert rel_err(got[:, layer], want[:, layer]) < 2e-6, layer


def test_encoder_rejects_wrong_mel_shape(rng):
    enc = random_encoder(SMALL, rng)
    with pytest.raises(ValueError, match=r"\[B, 16, 20\]"):
        enc(torch.randn(1, SMALL.n_mels, SMALL.mel_frames - 2, generator=rng))


def test_real_size_keys_match_published_whisper_large_v3_encoder():
    """openai/whisper-large-v3 config.json: d_model 1280, encoder_layers 32, encoder_attention_heads 20,
    encoder_ffn_dim 5120, num_mel_bins 128, max_source_positions 1500; k_proj has no bias."""
    d, ffn = 1280, 5120
    expected = {"encoder.conv1.weight": (d, 128, 3), "encoder.conv1.bias": (d,),
                "encoder.conv2.weight": (d, d, 3), "encoder.conv2.bias": (d,),
                "encoder.embed_positions.weight": (1500, d),
                "encoder.layer_norm.weight": (d,), "encoder.layer_norm.bias": (d,)}
    for i in range(32):
        p = f"encoder.layers.{i}."
        expected.update({p + "self_attn.k_proj.weight": (d, d)})
        for proj in ("q_proj", "v_proj", "out_proj"):
            expected.update({p + f"self_attn.{proj}.weight": (d, d), p + f"self_attn.{proj}.bias": (d,)})
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            expected.update({p + f"{norm}.weight": (d,), p + f"{norm}.bias": (d,)})
        expected.update({p + "fc1.weight": (ffn, d), p + "fc1.bias": (ffn,),
                         p + "fc2.weight": (d, ffn), p + "fc2.bias": (d,)})
    enc = WhisperEncoder(device="meta")
    got = {"encoder." + k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == expected
    assert len(got) == 487
    assert sum(math.prod(s) for s in got.values()) == 636_968_960   # whisper-large-v3 encoder size
    assert enc.config.chunk_samples == 480000 and enc.config.mel_frames == 3000


# ---------------------------------------------------------------- log-mel front end

def test_slaney_scale_anchor_points():
    assert float(hz_to_mel(torch.tensor(1000.0))) == pytest.approx(15.0)
    assert float(hz_to_mel(torch.tensor(600.0))) == pytest.approx(9.0)
    assert float(hz_to_mel(torch.tensor(6400.0))) == pytest.approx(42.0)
    f = torch.tensor([0.0, 123.4, 999.0, 1000.0, 2500.0, 8000.0], dtype=torch.float64)
    assert torch.allclose(mel_to_hz(hz_to_mel(f)), f, rtol=1e-12, atol=1e-9)


def test_mel_filterbank_structure():
    fb = mel_filterbank(128)
    assert fb.shape == (128, 201) and fb.dtype == torch.float64
    assert (fb >= 0).all() and (fb.max(dim=1).values > 0).all()
    edges = slaney_edges(128)
    bins = np.linspace(0.0, 8000.0, 201)
    # Peaks sit on the FFT bin nearest to each filter's centre (ties allowed either side).
    peak_hz = bins[fb.argmax(dim=1).numpy()]
    assert np.all(np.abs(peak_hz - edges[1:-1]) <= 40.0 / 2 + 1e-9)
    # Un-normalised triangles with shared edges add up to 1 between the first and last centre.
    enorm = 2.0 / (edges[2:] - edges[:-2])
    tri_sum = (fb.numpy() / enorm[:, None]).sum(axis=0)
    inside = (bins >= edges[1]) & (bins <= edges[-2])
    assert np.allclose(tri_sum[inside], 1.0, atol=1e-9)
    # Slaney normalisation: unit area; exact for filters spanning many bins.
    wide = (edges[2:] - edges[:-2]) > 6 * 40.0
    assert wide.sum() >= 15
    assert np.allclose(fb.numpy()[wide].sum(axis=1) * 40.0, 1.0, atol=0.02)


def test_log_mel_matches_float64_reference(rng):
    audio = torch.zeros(6400)
    audio[:4000] = 0.3 * torch.randn(4000, generator=rng)            # silent tail exercises the max - 8 floor
    got = log_mel_spectrogram(audio, 128)
    want = ref_log_mel(audio.numpy(), 128)
    assert got.shape == want.shape == (128, 40) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5
    assert float(got.min()) == pytest.approx(float(got.max()) - 2.0, abs=1e-5)   # floor is active


def test_log_mel_of_pure_tone_peaks_at_its_mel_bin(rng):
    f0 = 1500.0 + 5000.0 * float(torch.rand(1, generator=rng))
    t = torch.arange(16000, dtype=torch.float64) / 16000
    log_mel = log_mel_spectrogram(torch.sin(2 * math.pi * f0 * t).float(), 128)
    centres = slaney_edges(128)[1:-1]
    expected = int(np.argmin(np.abs(centres - f0)))
    assert abs(int(log_mel.mean(dim=1).argmax()) - expected) <= 1, (f0, expected)


def test_log_mel_rejects_stereo():
    with pytest.raises(ValueError, match="mono"):
        log_mel_spectrogram(torch.ones(2, 16000))


# ---------------------------------------------------------------- HuMo hidden-state pipeline

def test_whisper_hidden_states_chunks_pad_and_truncate_like_humo(rng):
    enc = random_encoder(SMALL, rng)
    chunk = SMALL.chunk_samples                      # 3200 samples = 20 mel frames = 10 positions
    n = 2 * chunk + 1500
    audio = 0.2 * torch.randn(n, generator=rng)
    got = whisper_hidden_states(enc, audio)
    frames = 2 * (n // 640)
    assert got.shape == (frames, SMALL.num_layers + 1, SMALL.d_model)
    sd = enc.state_dict()
    want = []
    for start in range(0, n, chunk):
        piece = np.zeros(chunk)
        seg = audio[start:start + chunk].numpy()
        piece[:len(seg)] = seg
        want.append(ref_encoder_states(sd, torch.from_numpy(ref_log_mel(piece, SMALL.n_mels)), SMALL.num_heads))
    want = torch.cat(want)[:frames]
    assert rel_err(got, want) < 1e-5


def test_whisper_hidden_states_rejects_audio_shorter_than_a_frame(rng):
    with pytest.raises(ValueError, match="640"):
        whisper_hidden_states(random_encoder(SMALL, rng), torch.randn(600, generator=rng))


def test_hidden_states_from_comfy_output(rng):
    layers = tuple(torch.randn(2, 20, 8, generator=rng) for _ in range(5))
    out = {"encoded_audio": layers[-1], "encoded_audio_all_layers": layers, "audio_samples": 5000}
    hidden = hidden_states_from_comfy(out, batch_index=1)
    assert hidden.shape == (2 * (5000 // 640), 5, 8)
    for t in range(hidden.shape[0]):
        for layer in range(5):
            assert torch.equal(hidden[t, layer], layers[layer][1, t])
    with pytest.raises(ValueError, match="encoded_audio_all_layers"):
        hidden_states_from_comfy({"encoded_audio": layers[-1]})


# ---------------------------------------------------------------- loading

LOADABLE = WhisperEncoderConfig(n_mels=16, d_model=128, num_layers=2, num_heads=2, ffn_dim=192, num_positions=10)


def test_load_safetensors_with_model_prefix_and_decoder_keys(tmp_path, rng):
    src = random_encoder(LOADABLE, rng)
    sd = {"model.encoder." + k: v.contiguous() for k, v in src.state_dict().items()}
    sd["model.decoder.embed_tokens.weight"] = torch.randn(7, 128, generator=rng)
    sd["proj_out.weight"] = torch.randn(7, 128, generator=rng)
    path = str(tmp_path / "whisper.safetensors")
    save_file(sd, path)
    enc = load_whisper_encoder(path, dtype=torch.float32)
    assert enc.config == LOADABLE
    mel = torch.randn(1, 16, 20, generator=rng)
    for a, b in zip(enc(mel), src(mel)):
        assert torch.equal(a, b)


def test_load_bin_in_half_precision(tmp_path, rng):
    src = random_encoder(LOADABLE, rng)
    path = str(tmp_path / "pytorch_model.bin")
    torch.save({"encoder." + k: v for k, v in src.state_dict().items()}, path)
    enc = load_whisper_encoder(path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in enc.parameters())
    mel = torch.randn(1, 16, 20, generator=rng)
    assert rel_err(enc(mel)[-1].float(), src(mel)[-1]) < 5e-3


def test_load_rejects_non_whisper_and_incomplete_files(tmp_path, rng):
    path = str(tmp_path / "other.safetensors")
    save_file({"blocks.0.attn.query.weight": torch.randn(4, 4, generator=rng)}, path)
    with pytest.raises(ValueError, match="not a Whisper checkpoint"):
        load_whisper_encoder(path)
    sd = {"encoder." + k: v.contiguous() for k, v in random_encoder(LOADABLE, rng).state_dict().items()}
    del sd["encoder.layers.1.fc2.bias"]
    save_file(sd, path)
    with pytest.raises(ValueError, match="layers.1.fc2.bias"):
        load_whisper_encoder(path)
    del sd["encoder.embed_positions.weight"]
    save_file(sd, path)
    with pytest.raises(ValueError, match="embed_positions"):
        load_whisper_encoder(path)
