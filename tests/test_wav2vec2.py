"""wav2vec2 audio encoder (multitalk/wav2vec2.py): numerics vs an independent float64 reference, the published
key layout at real size, InfiniteTalk's interpolate-before-encoder embedding, frame windows, loading."""
import gc
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tiny_models import random_state_dict
from wantalk.multitalk.wav2vec2 import (CHINESE_WAV2VEC2_BASE, Wav2Vec2Config, Wav2Vec2Encoder, audio_windows,
                                        encode_for_infinitetalk, infer_wav2vec2_config, load_wav2vec2)
from wantalk.wanvideo.checkpoint import CheckpointError

# Small model: fewer/smaller convs, even positional kernel (exercises the dropped extra frame), 4 heads of 8.
TINY = Wav2Vec2Config(conv_dims=(16, 24, 32), conv_kernels=(10, 3, 2), conv_strides=(5, 2, 2), hidden_size=32,
                      num_layers=2, num_heads=4, intermediate_size=64, pos_conv_kernel=8, pos_conv_groups=4)
# Loadable small model: the loader infers heads as hidden // 64.
SMALL = Wav2Vec2Config(conv_dims=(32, 32, 32), conv_kernels=(10, 3, 2), conv_strides=(5, 2, 2), hidden_size=128,
                       num_layers=2, num_heads=2, intermediate_size=96, pos_conv_kernel=16, pos_conv_groups=4)


def published_base_keys() -> dict:
    """HF Wav2Vec2Model state dict of TencentGameMate/chinese-wav2vec2-base, written from its config.json
    (conv_dim 512 x7, conv_kernel (10,3,3,3,3,2,2), conv_bias false, feat_extract_norm group, hidden 768,
    12 layers, intermediate 3072, num_conv_pos_embeddings 128, groups 16; weight norm as weight_g/weight_v)."""
    keys = {"masked_spec_embed": (768,),
            "feature_extractor.conv_layers.0.conv.weight": (512, 1, 10),
            "feature_extractor.conv_layers.0.layer_norm.weight": (512,),
            "feature_extractor.conv_layers.0.layer_norm.bias": (512,),
            "feature_projection.layer_norm.weight": (512,), "feature_projection.layer_norm.bias": (512,),
            "feature_projection.projection.weight": (768, 512), "feature_projection.projection.bias": (768,),
            "encoder.pos_conv_embed.conv.weight_g": (1, 1, 128),
            "encoder.pos_conv_embed.conv.weight_v": (768, 48, 128),
            "encoder.pos_conv_embed.conv.bias": (768,),
            "encoder.layer_norm.weight": (768,), "encoder.layer_norm.bias": (768,)}
    for i, kernel in enumerate((3, 3, 3, 3, 2, 2), start=1):
        keys[f"feature_extractor.conv_layers.{i}.conv.weight"] = (512, 512, kernel)
    for n in range(12):
        p = f"encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[p + f"attention.{proj}.weight"], keys[p + f"attention.{proj}.bias"] = (768, 768), (768,)
        for norm in ("layer_norm", "final_layer_norm"):
            keys[p + f"{norm}.weight"], keys[p + f"{norm}.bias"] = (768,), (768,)
        keys[p + "feed_forward.intermediate_dense.weight"], keys[p + "feed_forward.intermediate_dense.bias"] = \
            (3072, 768), (3072,)
        keys[p + "feed_forward.output_dense.weight"], keys[p + "feed_forward.output_dense.bias"] = (768, 3072), (768,)
    return keys


def tiny_encoder(cfg, rng):
    model = Wav2Vec2Encoder(cfg, device="cpu", dtype=torch.float32)
    sd = random_state_dict(model, rng)
    sd = {k: (v.abs() + 0.5 if k.endswith("weight_g") else v) for k, v in sd.items()}
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), sd


# ---------------------------------------------------------------- independent float64 reference

def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _interpolate(x, n):
    """Linear, align_corners=True, along dim 0, written out. Source positions are rounded to float32 as
    F.interpolate does for the official code's float32 features (exact positions differ by ~3e-5 relative)."""
    if n == 1:
        return x[:1]
    scale = torch.tensor((x.shape[0] - 1) / (n - 1), dtype=torch.float32)
    pos = (torch.arange(n, dtype=torch.float32) * scale).double()
    lo = pos.floor().long().clamp(max=x.shape[0] - 1)
    hi = (lo + 1).clamp(max=x.shape[0] - 1)
    w = (pos - lo)[:, None]
    return x[lo] * (1 - w) + x[hi] * w


def reference_forward(sd, cfg, wav, num_frames=None):
    """[layers, frames, hidden] in float64 with plain torch ops."""
    sd = {k: v.double() for k, v in sd.items()}
    x = wav.double()[None, None]
    for i, stride in enumerate(cfg.conv_strides):
        p = f"feature_extractor.conv_layers.{i}."
        x = F.conv1d(x, sd[p + "conv.weight"], sd.get(p + "conv.bias"), stride=stride)
        if i == 0:
            mean = x.mean(-1, keepdim=True)
            var = ((x - mean) ** 2).mean(-1, keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5) * sd[p + "layer_norm.weight"][:, None] + sd[p + "layer_norm.bias"][:, None]
        x = _gelu(x)
    feats = x[0].T
    if num_frames is not None:
        feats = _interpolate(feats, num_frames)
    h = _linear(sd, "feature_projection.projection",
                _layer_norm(feats, sd["feature_projection.layer_norm.weight"], sd["feature_projection.layer_norm.bias"]))
    v, g = sd["encoder.pos_conv_embed.conv.weight_v"], sd["encoder.pos_conv_embed.conv.weight_g"]
    weight = g * v / torch.sqrt((v ** 2).sum(dim=(0, 1), keepdim=True))
    pos = F.conv1d(h.T[None], weight, sd["encoder.pos_conv_embed.conv.bias"], padding=cfg.pos_conv_kernel // 2,
                   groups=cfg.pos_conv_groups)[0, :, :h.shape[0]].T
    h = _layer_norm(h + _gelu(pos), sd["encoder.layer_norm.weight"], sd["encoder.layer_norm.bias"])
    outs = []
    heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    for n in range(cfg.num_layers):
        p = f"encoder.layers.{n}."
        q, k, val = (_linear(sd, p + f"attention.{t}_proj", h).view(-1, heads, d) for t in "qkv")
        att = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d), dim=-1)
        a = _linear(sd, p + "attention.out_proj", torch.einsum("hij,jhd->ihd", att, val).reshape(h.shape))
        h = _layer_norm(h + a, sd[p + "layer_norm.weight"], sd[p + "layer_norm.bias"])
        ff = _linear(sd, p + "feed_forward.output_dense", _gelu(_linear(sd, p + "feed_forward.intermediate_dense", h)))
        h = _layer_norm(h + ff, sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"])
        outs.append(h)
    return torch.stack(outs)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------- tests

def test_real_size_layout_is_the_published_one():
    model = Wav2Vec2Encoder(device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    published = published_base_keys()
    assert ours == {k: v for k, v in published.items() if k != "masked_spec_embed"}   # training-only vector
    assert sum(math.prod(s) for s in published.values()) == 94_371_712                  # HF Wav2Vec2Model base
    assert infer_wav2vec2_config(published) == CHINESE_WAV2VEC2_BASE
    assert CHINESE_WAV2VEC2_BASE.receptive_field == 400                                  # 25 ms, hop 320


@pytest.mark.parametrize("conv_bias", [False, True])
def test_encoder_matches_float64_reference(rng, conv_bias):
    cfg = Wav2Vec2Config(**{**TINY.__dict__, "conv_bias": conv_bias})
    model, sd = tiny_encoder(cfg, rng)
    wav = 0.3 * torch.randn(int(torch.randint(1500, 4000, (1,), generator=rng)), generator=rng)
    out = model(wav[None])[0]
    ref = reference_forward(sd, cfg, wav)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for layer in range(cfg.num_layers):
        assert rel_err(out[layer], ref[layer]) < 1e-5


def test_interpolation_happens_before_the_encoder(rng):
    model, sd = tiny_encoder(TINY, rng)
    samples = int(torch.randint(16000, 24000, (1,), generator=rng))
    wav = 0.3 * torch.randn(samples, generator=rng)
    emb = encode_for_infinitetalk(model, wav, fps=25)
    n_frames = int(samples / 16000 * 25)
    assert emb.shape == (n_frames, TINY.num_layers, TINY.hidden_size)
    # same as: CNN features -> interpolation to n_frames -> projection + transformer
    cnn = model.cnn_features(wav[None])
    interpolated = F.interpolate(cnn.transpose(1, 2), size=n_frames, mode="linear", align_corners=True)
    manual = model.layer_outputs(interpolated.transpose(1, 2))[0].transpose(0, 1)
    assert torch.allclose(emb, manual, rtol=0, atol=1e-6)
    assert rel_err(emb, reference_forward(sd, TINY, wav, n_frames).transpose(0, 1)) < 1e-5
    # and not the same as running the transformer at 50 fps and interpolating its outputs afterwards
    native = model(wav[None])[0].transpose(1, 2)                      # [layers, hidden, 50 fps frames]
    after = F.interpolate(native, size=n_frames, mode="linear", align_corners=True).permute(2, 0, 1)
    assert rel_err(after, emb) > 1e-2


@pytest.mark.parametrize("samples, fps, frames", [(640, 25, 1), (48000, 25, 75), (48001, 25, 75), (16000, 30, 30)])
def test_frame_count(rng, samples, fps, frames):
    model, _ = tiny_encoder(TINY, rng)
    assert encode_for_infinitetalk(model, 0.1 * torch.randn(samples, generator=rng), fps=fps).shape[0] == frames


def test_do_normalize_is_zero_mean_unit_variance(rng):
    model, _ = tiny_encoder(TINY, rng)
    wav = 0.05 * torch.randn(4000, generator=rng) + 0.02
    normed = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)
    assert torch.allclose(encode_for_infinitetalk(model, wav, do_normalize=True),
                          encode_for_infinitetalk(model, normed), atol=1e-5)


def test_encode_rejects_bad_audio(rng):
    model, _ = tiny_encoder(TINY, rng)
    with pytest.raises(ValueError, match="shorter than one video frame"):
        encode_for_infinitetalk(model, torch.randn(639, generator=rng))
    with pytest.raises(ValueError, match="NaN"):
        encode_for_infinitetalk(model, torch.full((4000,), float("nan")))
    with pytest.raises(ValueError, match="mono"):
        encode_for_infinitetalk(model, torch.randn(2, 4000, generator=rng))
    with pytest.raises(ValueError, match="at least 400 samples"):
        Wav2Vec2Encoder(device="meta").cnn_features(torch.zeros(1, 399, device="meta"))


def test_audio_windows_are_clamped_at_both_ends(rng):
    n = int(torch.randint(6, 12, (1,), generator=rng))
    features = torch.randn(n, 3, 4, generator=rng)
    windows = audio_windows(features, 0, n)
    assert windows.shape == (n, 5, 3, 4)
    for i in range(n):
        for j, offset in enumerate(range(-2, 3)):
            assert torch.equal(windows[i, j], features[min(max(i + offset, 0), n - 1)])
    assert torch.equal(windows[0, :3], features[[0, 0, 0]]) and torch.equal(windows[-1, 2:], features[[-1, -1, -1]])
    late = audio_windows(features, n - 2, 4)           # beyond the end: the last frame repeats
    assert torch.equal(late[-1], features[[-1] * 5])
    with pytest.raises(ValueError, match="odd"):
        audio_windows(features, 0, 2, window=4)


def _save(sd, path, prefix="", parametrized=False, extras=True, dtype=torch.float32):
    out = {}
    for k, v in sd.items():
        if parametrized:
            k = k.replace("weight_g", "parametrizations.weight.original0").replace("weight_v", "parametrizations.weight.original1")
        out[prefix + k] = v.to(dtype).contiguous()
    if extras:   # Wav2Vec2ForPreTraining heads and the SpecAugment vector are ignored
        out.update({"quantizer.codevectors": torch.randn(1, 8, 4), "project_hid.weight": torch.randn(4, 128),
                    "project_q.weight": torch.randn(4, 4), prefix + "masked_spec_embed": torch.randn(128)})
    if str(path).endswith(".safetensors"):
        save_file(out, str(path))
    else:
        torch.save(out, str(path))
    return str(path)


@pytest.mark.parametrize("name, prefix, parametrized", [("model.safetensors", "wav2vec2.", False),
                                                         ("pytorch_model.bin", "", True),
                                                         ("w.safetensors", "", True)])
def test_loader_accepts_published_variants(tmp_path, rng, name, prefix, parametrized):
    source, sd = tiny_encoder(SMALL, rng)
    loaded = load_wav2vec2(_save(sd, tmp_path / name, prefix, parametrized))
    assert loaded.config == SMALL
    wav = 0.3 * torch.randn(3000, generator=rng)
    assert torch.equal(loaded(wav[None]), source(wav[None]))


def test_loader_casts_half_precision_files(tmp_path, rng):
    _, sd = tiny_encoder(SMALL, rng)
    loaded = load_wav2vec2(_save(sd, tmp_path / "fp16.safetensors", "wav2vec2.", dtype=torch.float16))
    weight = loaded.encoder.layers[1].feed_forward.output_dense.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, sd["encoder.layers.1.feed_forward.output_dense.weight"].half().float())


def test_loader_rejects_other_models(tmp_path, rng):
    whisper = {"model.encoder.conv1.weight": torch.randn(8, 4, 3), "model.encoder.embed_positions.weight": torch.randn(6, 8)}
    path = _save(whisper, tmp_path / "whisper.safetensors", extras=False)
    with pytest.raises(CheckpointError, match="whisper.safetensors.*Whisper"):
        load_wav2vec2(path)
    dit = {"blocks.0.self_attn.q.weight": torch.randn(8, 8), "patch_embedding.weight": torch.randn(8, 4, 1, 2, 2)}
    path = _save(dit, tmp_path / "dit.safetensors", extras=False)
    with pytest.raises(CheckpointError, match="dit.safetensors.*not a wav2vec2"):
        load_wav2vec2(path)
    _, sd = tiny_encoder(SMALL, rng)
    large = {**sd, "feature_extractor.conv_layers.1.layer_norm.weight": torch.ones(32)}
    with pytest.raises(CheckpointError, match="wav2vec2-large"):
        load_wav2vec2(_save(large, tmp_path / "large.safetensors", extras=False))
    broken = {k: v for k, v in sd.items() if k != "encoder.layers.1.final_layer_norm.bias"}
    with pytest.raises(CheckpointError, match="missing.*final_layer_norm.bias"):
        load_wav2vec2(_save(broken, tmp_path / "broken.safetensors", extras=False))


# ---------------------------------------------------------------- long clips: overlapping chunks (issue 15)

def test_cnn_in_chunks_equals_one_pass_including_the_clip_wide_group_norm(rng):
    """The first conv's GroupNorm normalises each channel over the whole clip: chunks must use clip-wide
    statistics. A clip whose loudness changes along the way makes per-chunk statistics visibly wrong."""
    from wantalk.multitalk.wav2vec2 import Chunking, cnn_features_chunked
    model, _ = tiny_encoder(TINY, rng)
    wav = torch.randn(1, 20011, generator=rng) * torch.linspace(0.1, 3.0, 20011)
    reference = model.cnn_features(wav)
    got = cnn_features_chunked(model, wav, Chunking(cnn_frames=97))
    assert got.shape == reference.shape
    assert rel_err(got, reference) < 1e-5
    per_chunk = torch.cat([model.cnn_features(wav[:, a * 20:(b - 1) * 20 + TINY.receptive_field])
                           for a, b in ((0, 500), (500, reference.shape[1]))], dim=1)
    assert rel_err(per_chunk, reference) > 1e-2  # what the first pass is for


def test_chunk_windows_keep_every_frame_once_with_context():
    from wantalk.multitalk.wav2vec2 import Chunking
    chunking = Chunking(one_pass=5, exact=10, block=4, window=7, context=3)
    assert chunking.windows(10) == [(0, 10, 0, 10)] and chunking.steps(10, 12) == 12 * 3
    kept = []
    for lo, hi, start, end in chunking.windows(30):
        assert 0 <= lo <= start < end <= hi <= 30
        assert start - lo == min(3, start) and hi - end == min(3, 30 - end)
        kept += range(start, end)
    assert kept == list(range(30))
    with pytest.raises(ValueError, match="block, window"):
        Chunking(block=0)


def long_speech(seconds: int, rng) -> torch.Tensor:
    """Synthetic speech of any length: a 20 s speech-like clip (tiny_models.synth_speech), time-reversed every
    other time, at varying levels."""
    from tiny_models import synth_speech
    clip = synth_speech(20, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    parts = [(clip if i % 2 else clip.flip(0)) * (0.3 + torch.rand(1, generator=rng)) for i in range(-(-seconds // 20))]
    return torch.cat(parts)[:seconds * 16000]


def test_long_clips_match_the_one_pass_encode(rng):
    """2 minutes (3000 frames) on the tiny 12-layer encoder: layer by layer with attention in query blocks, equal
    to the one-pass result up to float rounding, with a progress report per block; a clip up to
    `Chunking.one_pass` frames is encoded exactly as before. Clips beyond `Chunking.exact` go in overlapping
    windows (here forced on this clip with small windows): within WINDOW_TOLERANCE of the one-pass result."""
    from tiny_models import tiny_wav2vec2
    from wantalk.multitalk.wav2vec2 import WINDOW_TOLERANCE, Chunking
    model, _ = tiny_wav2vec2(torch.Generator().manual_seed(0))
    wav = long_speech(120, torch.Generator().manual_seed(0))
    one_pass = encode_for_infinitetalk(model, wav, chunking=Chunking(one_pass=10**6, exact=10**6))
    calls = []
    pieces = encode_for_infinitetalk(model, wav, progress=lambda done, total: calls.append((done, total)))
    assert pieces.shape == one_pass.shape == (3000, 12, 64)
    assert rel_err(pieces, one_pass) < 1e-5
    total = calls[0][1]
    assert calls == [(i, total) for i in range(1, total + 1)] and total >= 12 * 2
    windows = encode_for_infinitetalk(model, wav, chunking=Chunking(exact=2000, window=1000, context=500))
    worst = ((windows - one_pass).norm(dim=(0, 2)) / one_pass.norm(dim=(0, 2))).max().item()
    assert 1e-4 < worst < WINDOW_TOLERANCE  # an approximation, and a close one
    short = wav[:80 * 16000]
    reference = model(short[None], num_frames=2000)[0].transpose(0, 1)
    assert torch.equal(encode_for_infinitetalk(model, short), reference)


class PeakRss:
    """Peak resident memory of this process above its level at start, sampled every 2 ms in a thread."""

    def __init__(self):
        import threading
        self.base = self.peak = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _run(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def grown(self) -> int:
        return self.peak - self.base


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to sample memory")
def test_ten_minutes_of_speech_in_bounded_memory_and_stops_within_one_chunk(rng):
    """10 minutes on the tiny encoder: memory beyond the output stays at the level of an 80 s one-pass encode,
    and a Stop seen by the progress callback (as ComfyUI's check_interrupt raises) ends the encode within one
    piece (a block of queries of one layer)."""
    import threading
    import time
    from tiny_models import tiny_wav2vec2
    model, _ = tiny_wav2vec2(rng)
    wav = long_speech(600, rng)
    gc.collect()
    with PeakRss() as one_chunk:  # what one chunk of 80 s needs, encoded in one pass
        encode_for_infinitetalk(model, wav[:80 * 16000])
    gc.collect()
    with PeakRss() as whole:
        features = encode_for_infinitetalk(model, wav)
    output = features.numel() * 4 + 30000 * 16 * 4 * 2  # the embedding, the CNN features (and interpolated)
    assert features.shape == (15000, 12, 64)
    assert whole.grown < output + 3 * one_chunk.grown + 64 * 2**20, (whole.grown, output, one_chunk.grown)
    del features

    class Stop(Exception):
        pass

    stop_at, seen = [], []

    def progress(done, total):
        seen.append(time.perf_counter())
        if stop_at:
            raise Stop
    timer = threading.Timer(1.0, lambda: stop_at.append(time.perf_counter()))
    start = time.perf_counter()
    timer.start()
    with pytest.raises(Stop):
        encode_for_infinitetalk(model, wav, progress=progress)
    latency = time.perf_counter() - stop_at[0]
    chunk_seconds = max(b - a for a, b in zip([start] + seen, seen))
    assert latency <= chunk_seconds + 0.05, (latency, chunk_seconds)
    print(f"10 min: memory beyond the output {(whole.grown - output) / 2**20:.0f} MiB (one 80 s chunk "
          f"{one_chunk.grown / 2**20:.0f} MiB); Stop honoured after {latency:.3f} s (longest chunk "
          f"{chunk_seconds:.3f} s)")
