"""Wan 2.1 VAE: key layout, loading, causal-cache correctness against a whole-clip float64 reference,
latent statistics, tiling, progress and errors. Small random VAEs (dim 8) keep it fast on CPU."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from wantalk.wanvideo.modules.vae_tiling import edge_weights, run_tiled, tile_spans
from wantalk.wanvideo.vae import WanVAE, WanVAEConfig, load_wan_vae

# docs/NOTES.md §2 (typed here independently of the implementation)
MEAN = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
                    dtype=torch.float64).view(1, 16, 1, 1, 1)
STD = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
                   dtype=torch.float64).view(1, 16, 1, 1, 1)
SMALL = WanVAEConfig(dim=8)


def random_vae_state_dict(rng: torch.Generator, config: WanVAEConfig = SMALL) -> dict:
    """Fan-in scaled weights, gammas near 1; the decoder head is scaled so most outputs stay inside [-1, 1]
    (then the final clamp does not hide differences)."""
    sd = {}
    for name, p in WanVAE(config, device="meta").state_dict().items():
        if name.endswith("gamma"):
            sd[name] = 1 + 0.1 * torch.randn(p.shape, generator=rng)
        elif p.dim() > 1:
            sd[name] = torch.randn(p.shape, generator=rng) / p[0].numel() ** 0.5
        else:
            sd[name] = 0.1 * torch.randn(p.shape, generator=rng)
    sd["decoder.head.2.weight"] *= 0.3
    return sd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_video(rng, frames, h, w, dtype=torch.float32):
    return (torch.rand(1, 3, frames, h, w, generator=rng, dtype=torch.float64) * 2 - 1).to(dtype)


# -- independent whole-clip reference: every causal conv runs over the whole clip at once, no cache ------------

def ref_causal_conv(conv, x):
    kt, kh, kw = conv.weight.shape[2:]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0))
    return F.conv3d(padded, conv.weight, conv.bias, stride=conv.stride)


def ref_norm(norm, x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1]) * norm.gamma


def each_frame(fn, x):
    return torch.stack([fn(x[:, :, i]) for i in range(x.shape[2])], dim=2)


def ref_residual(block, x):
    r = block.residual
    h = ref_causal_conv(r[2], F.silu(ref_norm(r[0], x)))
    h = ref_causal_conv(r[6], F.silu(ref_norm(r[3], h)))
    if isinstance(block.shortcut, nn.Identity):
        return h + x
    return h + F.conv3d(x, block.shortcut.weight, block.shortcut.bias)


def ref_attention(block, x):
    def frame(f):
        b, c, h, w = f.shape
        q, k, v = F.conv2d(ref_norm(block.norm, f), block.to_qkv.weight, block.to_qkv.bias).flatten(2).split(c, dim=1)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)
        return f + F.conv2d((v @ a.transpose(1, 2)).view(b, c, h, w), block.proj.weight, block.proj.bias)
    return each_frame(frame, x)


def ref_resample(block, x):
    conv = block.resample[1]
    if block.mode.startswith("up"):
        if block.mode == "upsample3d":  # frame 0 stays single; later frames -> causal time conv -> 2 frames each
            y = ref_causal_conv(block.time_conv, x[:, :, 1:])
            c = x.shape[1]
            x = torch.cat([x[:, :, :1], torch.stack([y[:, :c], y[:, c:]], dim=3).flatten(2, 3)], dim=2)
        nearest = lambda f: f.repeat_interleave(2, -1).repeat_interleave(2, -2)
        return each_frame(lambda f: F.conv2d(nearest(f), conv.weight, conv.bias, padding=1), x)
    x = each_frame(lambda f: F.conv2d(F.pad(f, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2), x)
    if block.mode == "downsample3d":  # frame 0 passes; then windows (0,1,2), (2,3,4), ...
        x = torch.cat([x[:, :, :1], F.conv3d(x, block.time_conv.weight, block.time_conv.bias, stride=(2, 1, 1))], 2)
    return x


def ref_block(block, x):
    if hasattr(block, "residual"):
        return ref_residual(block, x)
    if hasattr(block, "to_qkv"):
        return ref_attention(block, x)
    return ref_resample(block, x)


def ref_head(head, x):
    return ref_causal_conv(head[2], F.silu(ref_norm(head[0], x)))


def ref_mu(vae, video):
    """Raw (unnormalised) latent mean."""
    e = vae.encoder
    x = ref_causal_conv(e.conv1, video)
    for block in (*e.downsamples, *e.middle):
        x = ref_block(block, x)
    return F.conv3d(ref_head(e.head, x), vae.conv1.weight, vae.conv1.bias)[:, :16]


def ref_decoder(vae, raw_z):
    """Decoder output (unclamped) for unnormalised latents."""
    d = vae.decoder
    x = ref_causal_conv(d.conv1, F.conv3d(raw_z, vae.conv2.weight, vae.conv2.bias))
    for block in (*d.middle, *d.upsamples):
        x = ref_block(block, x)
    return ref_head(d.head, x)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny convolutions run fastest single-threaded (and do not suffer from a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def vae64(rng):
    return WanVAE.from_state_dict(random_vae_state_dict(rng), dtype=torch.float64)


@pytest.fixture
def vae32(rng):
    return WanVAE.from_state_dict(random_vae_state_dict(rng))


# -- layout and loading ----------------------------------------------------------------------------------------

def test_real_size_keys_and_shapes_match_official_listing(keys_dir):
    expected = {}
    with open(os.path.join(keys_dir, "keys_vae.txt")) as f:
        for line in f:
            key, shape = line.rstrip("\n").split("\t")[:2]
            expected[key] = tuple(int(n) for n in shape.strip("(),").split(",") if n.strip())
    model = WanVAE(WanVAEConfig(), device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 126_892_531  # docs/NOTES.md §2


@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_safetensors_round_trip_infers_config(tmp_path, rng, prefix):
    sd = random_vae_state_dict(rng, WanVAEConfig(dim=16))
    path = str(tmp_path / "vae.safetensors")
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, path)
    vae = load_wan_vae(path)
    assert vae.config == WanVAEConfig(dim=16, z_dim=16)
    loaded = vae.state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert not any(p.requires_grad for p in vae.parameters())


def test_pth_loads_weights_only_in_requested_dtype(tmp_path, rng):
    sd = random_vae_state_dict(rng)
    path = str(tmp_path / "Wan2.1_VAE.pth")
    torch.save(sd, path)
    vae = load_wan_vae(path, dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    assert torch.equal(vae.state_dict()["decoder.conv1.weight"], sd["decoder.conv1.weight"].bfloat16())


# -- numerics --------------------------------------------------------------------------------------------------

def test_chunked_encode_with_cache_equals_whole_clip_reference(vae64, rng):
    video = random_video(rng, 9, 32, 24, torch.float64)
    z = vae64.encode(video)
    assert z.shape == (1, 16, 3, 4, 3)
    expected = (ref_mu(vae64, video) - MEAN) / STD
    assert rel_err(z, expected) < 1e-10


def test_chunked_decode_with_cache_equals_whole_clip_reference(vae64, rng):
    z = torch.randn(1, 16, 3, 3, 4, generator=rng, dtype=torch.float64)
    video = vae64.decode(z)
    assert video.shape == (1, 3, 9, 24, 32)
    raw = ref_decoder(vae64, z * STD + MEAN)
    assert (raw.abs() < 1).double().mean() > 0.5  # the clamp leaves most values informative
    assert rel_err(video, raw.clamp(-1, 1)) < 1e-10


def test_latent_statistics_are_applied(vae32, rng):
    """encode returns (mu - mean) / std (checked with a constant mu), and decode inverts it (z * std + mean)."""
    video = random_video(rng, 5, 16, 16)
    vae32.conv1.weight.zero_()
    z = vae32.encode(video)
    expected = ((vae32.conv1.bias[:16].view(1, 16, 1, 1, 1) - MEAN) / STD).expand_as(z)
    assert rel_err(z, expected) < 1e-6

    vae = WanVAE.from_state_dict(random_vae_state_dict(rng), dtype=torch.float64)
    video = random_video(rng, 5, 16, 16, torch.float64)
    decoded = vae.decode(vae.encode(video))
    assert rel_err(decoded, ref_decoder(vae, ref_mu(vae, video)).clamp(-1, 1)) < 1e-10


def test_bfloat16_tracks_float32(rng):
    sd = random_vae_state_dict(rng)
    vae32, vae16 = WanVAE.from_state_dict(sd), WanVAE.from_state_dict(sd, dtype=torch.bfloat16)
    video = random_video(rng, 5, 16, 16)
    z = vae32.encode(video)
    assert vae16.encode(video).dtype == torch.float32
    assert rel_err(vae16.encode(video), z) < 0.1
    assert rel_err(vae16.decode(z), vae32.decode(z)) < 0.1


# -- tiling ----------------------------------------------------------------------------------------------------

def test_tiles_cover_the_grid_and_cross_fade_linearly():
    assert tile_spans(10, 6, 2) == [(0, 6), (4, 10)]
    assert tile_spans(5, 6, 2) == [(0, 5)]
    spans = tile_spans(13, 6, 2)
    assert spans[-1][1] == 13 and all(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    calls = []

    def tile_id(x):  # each tile answers with its own number: the blend shows the cross-fade
        calls.append(x.shape)
        return torch.full(x.shape, float(len(calls) - 1))

    out = run_tiled(tile_id, torch.zeros(1, 1, 10), grid=(1, 10), tile=6, overlap=2, in_scale=1, out_scale=1)
    torch.testing.assert_close(out[0, 0], torch.tensor([0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1.]))
    w = [edge_weights(spans, i, 8) for i in range(len(spans))]
    assert all(len(wi) == (e - s) * 8 for wi, (s, e) in zip(w, spans))


def test_tiled_blend_is_exact_for_a_pointwise_map(rng):
    x = torch.randn(1, 2, 3, 7, 5, generator=rng)
    up = lambda v: (3 * v).repeat_interleave(8, -1).repeat_interleave(8, -2)
    out = run_tiled(up, x, grid=(7, 5), tile=3, overlap=1, in_scale=1, out_scale=8)
    torch.testing.assert_close(out, up(x), rtol=1e-6, atol=1e-6)


def test_tiled_decode_matches_untiled(vae32, rng):
    z = torch.randn(1, 16, 2, 8, 6, generator=rng)
    full = vae32.decode(z)
    assert torch.equal(vae32.decode(z, tile_size=64, tile_overlap=16), full)  # one tile: same code path
    tiled = vae32.decode(z, tile_size=48, tile_overlap=32)
    assert tiled.shape == full.shape
    # 2x2 tiles of 6x6 latents: they see zero padding and attend per tile, and random weights are far less local
    # than trained ones. Measured 0.09-0.19; misplaced or unnormalised tiles give ~1.
    err = rel_err(tiled, full)
    assert err < 0.3, err


def test_tiled_encode_matches_untiled(vae32, rng):
    video = random_video(rng, 5, 64, 48)
    full = vae32.encode(video)
    tiled = vae32.encode(video, tile_size=48, tile_overlap=32)
    assert tiled.shape == full.shape
    err = rel_err(tiled, full)
    assert err < 0.2, err  # measured 0.07-0.09 (see the decode test)


# -- progress and errors ---------------------------------------------------------------------------------------

def test_progress_called_per_latent_frame_and_can_interrupt(vae32, rng):
    z = torch.randn(1, 16, 3, 4, 4, generator=rng)
    calls = []
    vae32.decode(z, on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    vae32.decode(z, tile_size=24, tile_overlap=8, on_progress=lambda d, t: calls.append((d, t)))
    assert calls == [(d, 12) for d in range(1, 13)]  # 2x2 tiles x 3 latent frames
    calls.clear()
    vae32.encode(random_video(rng, 9, 16, 16), on_progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    class Stop(Exception):
        pass

    def stop_at_2(done, total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        vae32.decode(z, on_progress=stop_at_2)


def test_not_a_vae_file_is_named(tmp_path):
    path = str(tmp_path / "wan2.1_i2v_480p_14B.safetensors")
    save_file({"patch_embedding.weight": torch.ones(4, 36, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.ones(4, 4)},
              path)
    with pytest.raises(ValueError, match="not a Wan 2.1 VAE") as err:
        load_wan_vae(path)
    assert path in str(err.value) and "diffusion model" in str(err.value)


def test_missing_keys_are_reported(tmp_path, rng):
    sd = random_vae_state_dict(rng)
    del sd["decoder.upsamples.3.time_conv.weight"]
    path = str(tmp_path / "broken_vae.safetensors")
    save_file(sd, path)
    with pytest.raises(ValueError, match="1 missing") as err:
        load_wan_vae(path)
    assert path in str(err.value) and "decoder.upsamples.3.time_conv.weight" in str(err.value)


def test_bad_video_and_tile_arguments(vae32, rng):
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae32.encode(random_video(rng, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae32.encode(random_video(rng, 5, 20, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        vae32.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        vae32.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="tile_size"):
        vae32.decode(torch.zeros(1, 16, 1, 4, 4), tile_size=20)


# -- GPU (needs a CUDA GPU: python -m pytest tests/test_vae.py -q -m gpu) ---------------------------------

@pytest.mark.gpu
def test_gpu_real_size_matches_cpu_float64_and_tiles_bound_memory(rng):
    sd = random_vae_state_dict(rng, WanVAEConfig())
    cpu, gpu = WanVAE.from_state_dict(sd, dtype=torch.float64), WanVAE.from_state_dict(sd, device="cuda")
    video = random_video(rng, 5, 32, 32)
    z = gpu.encode(video.cuda())
    assert rel_err(z.cpu(), cpu.encode(video.double())) < 1e-2  # cuDNN may use TF32
    assert rel_err(gpu.decode(z).cpu(), cpu.decode(z.cpu().double())) < 1e-2

    latents = torch.randn(1, 16, 2, 90, 160, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    full = gpu.decode(latents)
    full_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tiled = gpu.decode(latents, tile_size=256, tile_overlap=64)
    tiled_peak = torch.cuda.max_memory_allocated()
    assert full.shape == tiled.shape == (1, 3, 5, 720, 1280)
    assert tiled_peak < 0.5 * full_peak, (tiled_peak, full_peak)
    assert rel_err(tiled, full) < 0.5
