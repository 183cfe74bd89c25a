"""InfiniteTalk / MultiTalk model add-on: real-size keys, the audio windows, the audio projection and the
per-block audio attention (one and two speakers) against float64 references, the loader, and bad inputs."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from wantalk.multitalk.audio_attention import InfiniteTalkBlockAdapter, rope_1d
from wantalk.multitalk.audio_proj import AudioProjModel, latent_audio_windows
from wantalk.multitalk.conditioning import (AudioConditioning, audio_conditioning, speaker_masks,
                                            zero_audio_conditioning)
from wantalk.multitalk.model_addon import InfiniteTalkConfig, detect_infinitetalk, infinitetalk_addon
from wantalk.wanvideo.checkpoint import CheckpointError
from wantalk.wanvideo.loader import build_model, infer_config, load_wan_model
from test_model import parse_keys
from tiny_models import TINY_I2V, random_state_dict, save_state_dict, tiny_addon_model

# Small audio sizes whose shapes the detector reads back exactly (12 layers of 4 channels).
TINY_AUDIO = InfiniteTalkConfig(audio_layers=12, audio_channels=4, intermediate_dim=16, output_dim=24, context_tokens=4)
GRID_LATENT = (3, 8, 12)  # latent frames, height, width -> token grid (3, 4, 6)


def tiny_infinitetalk(rng, cfg=TINY_I2V, acfg=TINY_AUDIO, dtype=torch.float32):
    return tiny_addon_model(cfg, infinitetalk_addon(acfg), rng, dtype)


@pytest.fixture(scope="module")
def tiny():
    """One tiny InfiniteTalk model (unseeded random weights) shared by the tests that only read it."""
    g = torch.Generator()
    g.seed()
    return tiny_infinitetalk(g)


def random_windows(rng, speakers, frames, acfg=TINY_AUDIO):
    return torch.randn(speakers, frames, acfg.audio_window, acfg.audio_layers, acfg.audio_channels, generator=rng)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- sizes and keys

def test_real_size_keys_shapes_and_detected_config(keys_dir):
    listing = parse_keys(os.path.join(keys_dir, "keys_infinitetalk.txt"))
    cfg = infer_config(listing)
    addon = detect_infinitetalk(listing, cfg)
    assert addon is not None and addon.config == InfiniteTalkConfig()
    with torch.device("meta"):
        model = build_model(cfg.with_(audio=addon.config), addon, device="meta", dtype=torch.bfloat16)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == listing


def test_plain_wan_keys_are_not_infinitetalk(keys_dir):
    listing = parse_keys(os.path.join(keys_dir, "keys_i2v14b.txt"))
    assert detect_infinitetalk(listing, infer_config(listing)) is None


# ---------------------------------------------------------------------------------------------- audio windows

def test_latent_audio_windows_are_frames_4j_minus_5_to_4j_plus_2(rng):
    frames, latents = 21, 6
    feats = torch.randn(2, frames, 3, 2, generator=rng)  # distinct values per audio frame
    offsets = torch.arange(-2, 3)
    clamp = lambda i: min(max(i, 0), frames - 1)
    windows = torch.stack([feats[:, [clamp(i + o) for o in offsets.tolist()]] for i in range(frames)], dim=1)
    first, later = latent_audio_windows(windows)
    assert torch.equal(first, windows[:, :1])
    assert later.shape == (2, latents - 1, 8, 3, 2)
    for j in range(1, latents):
        for k in range(8):
            assert torch.equal(later[:, j - 1, k], feats[:, clamp(4 * j - 5 + k)]), (j, k)


def test_latent_audio_windows_need_4n_plus_1_frames(rng):
    with pytest.raises(ValueError, match="4n\\+1"):
        latent_audio_windows(torch.randn(1, 20, 5, 2, 3, generator=rng))


# ---------------------------------------------------------------------------------------------- audio projection

def test_audio_projection_matches_float64(rng):
    proj = AudioProjModel(TINY_AUDIO)
    proj.load_state_dict(random_state_dict(proj, rng))
    first = torch.randn(2, 1, 5, 12, 4, generator=rng)
    later = torch.randn(2, 4, 8, 12, 4, generator=rng)
    p = {k: v.double() for k, v in proj.state_dict().items()}
    lin = lambda name, t: t @ p[name + ".weight"].T + p[name + ".bias"]
    a = torch.relu(lin("proj1", first.double().flatten(2)))
    b = torch.relu(lin("proj1_vf", later.double().flatten(2)))
    h = torch.relu(lin("proj2", torch.cat([a, b], dim=1)))
    tokens = lin("proj3", h).unflatten(-1, (4, 24))
    mu, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    ref = (tokens - mu) / torch.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"]
    out = proj(first, later)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 4, 24)
    assert rel(out, ref) < 1e-5


# ---------------------------------------------------------------------------------------------- 1-D RoPE

def test_rope_1d_reference_values():
    """docs/NOTES.md §1.4: q = ones, head 128, positions [0, 2, 12, 22]."""
    out = rope_1d(torch.ones(1, 4, 1, 128), torch.tensor([[0.0, 2.0, 12.0, 22.0]]))[0, :, 0, :4]
    expected = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                             [-1.325444221496582, 0.4931505620479584, -1.1474822759628296, 0.8266102075576782],
                             [1.3804268836975098, 0.3072810173034668, 0.2551279664039612, -1.3910102844238281],
                             [-0.9911095499992371, -1.0088121891021729, 0.7794392108917236, 1.1800315380096436]])
    assert torch.allclose(out, expected, atol=1e-5)


def complex_rope(x, positions):
    """float64 1-D RoPE as a complex rotation of pairs (2i, 2i+1) by positions * 10000^(-2i/D)."""
    d = x.shape[-1]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones_like(inv), positions.double()[..., None] * inv)  # [B, L, D/2]
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * rot[:, :, None]).flatten(-2)


def test_rope_1d_matches_complex_rotation(rng):
    x = torch.randn(2, 7, 3, 16, generator=rng)
    pos = torch.rand(2, 7, generator=rng) * 24
    assert rel(rope_1d(x, pos), complex_rope(x, pos)) < 1e-6


# ---------------------------------------------------------------------------------------------- audio attention

def reference_audio_residual(p, x, tokens, grid, heads, speakers, masks=None, q_self=None, k_self=None):
    """float64, written from docs/NOTES.md §3.3: per-frame attention of h*w queries over that frame's audio
    tokens; with two speakers, 1-D RoPE positions from the first-frame reference attention map."""
    f, h, w = grid
    s, dim = h * w, x.shape[-1]
    d = dim // heads
    x, tokens = x.double()[0], tokens.double()[0]
    xn = F.layer_norm(x, (dim,), p["norm_x.weight"], p["norm_x.bias"], 1e-6)
    q = (xn @ p["audio_cross_attn.q_linear.weight"].T + p["audio_cross_attn.q_linear.bias"]).view(-1, heads, d)
    kv = tokens @ p["audio_cross_attn.kv_linear.weight"].T + p["audio_cross_attn.kv_linear.bias"]
    k, v = kv[..., :dim].reshape(f, -1, heads, d), kv[..., dim:].reshape(f, -1, heads, d)
    n_a = k.shape[1]
    if speakers == 2:
        qs, ks = q_self.double()[0], k_self.double()[0, :s]
        attn = torch.softmax(torch.einsum("lnd,snd->nls", qs, ks) / math.sqrt(d), dim=-1)
        per_class = torch.einsum("nls,cs->ncl", attn, masks.double()) / masks.double().sum(1)[None, :, None]
        half = heads // 2
        amap = (per_class[:half].mean(0) + per_class[half:2 * half].mean(0)) / 2
        lo, hi = amap.min(dim=1).values, amap.max(dim=1).values
        pos = torch.empty(amap.shape[1], dtype=torch.float64)
        for i in range(amap.shape[1]):
            c = int(amap[:, i].argmax())
            pos[i] = 12.0 if c == 2 else (amap[c, i] - lo[c]) / (hi[c] - lo[c]) * 4 + (0, 20)[c]
        q = complex_rope(q[None], pos[None])[0]
        k_pos = torch.tensor([2.0] * (n_a // 2) + [22.0] * (n_a - n_a // 2), dtype=torch.float64).repeat(f)
        k = complex_rope(k.reshape(1, f * n_a, heads, d), k_pos[None])[0].view(f, n_a, heads, d)
    q = q.view(f, s, heads, d)
    attn = torch.softmax(torch.einsum("fsnd,fand->fnsa", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("fnsa,fand->fsnd", attn, v).reshape(f * s, dim)
    return out @ p["audio_cross_attn.proj.weight"].T + p["audio_cross_attn.proj.bias"]


@pytest.mark.parametrize("speakers,heads", [(1, 4), (2, 4), (2, 5)])
def test_block_audio_attention_matches_float64(rng, speakers, heads):
    cfg = TINY_I2V.with_(dim=20 * heads, num_heads=heads, audio=TINY_AUDIO)
    adapter = InfiniteTalkBlockAdapter(cfg)
    adapter.load_state_dict(random_state_dict(adapter, rng))
    grid = (3, 4, 6)
    length, d = 3 * 24, cfg.dim // heads
    x = torch.randn(1, length, cfg.dim, generator=rng)
    tokens = torch.randn(1, 3, 4 * speakers, TINY_AUDIO.output_dim, generator=rng)
    masks = torch.zeros(3, 4, 6)
    masks[0, :3, :2], masks[1, 1:, 3:] = 1, 1
    masks[2] = (masks[0] + masks[1] == 0).float()
    cond = AudioConditioning(tokens, speakers, masks)
    q_self, k_self = torch.randn(2, 1, length, heads, d, generator=rng)
    inp = SimpleNamespace(grid=grid, audio=cond)
    out = adapter.forward_in_block(adapter, x, inp, [q_self, k_self] if cond.needs_qk else None)
    p = {k: v.double() for k, v in adapter.state_dict().items()}
    ref = reference_audio_residual(p, x, tokens, grid, heads, speakers, masks.flatten(1), q_self, k_self)
    assert rel(out[0], ref) < 1e-5


# ---------------------------------------------------------------------------------------------- whole model

def run_model(model, rng, audio, batch=1):
    f, h, w = GRID_LATENT
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    args = (torch.randn(batch, 16, f, h, w, generator=g), torch.tensor([613.0]), torch.randn(batch, 5, 64, generator=g),
            torch.randn(batch, 257, 32, generator=g), torch.randn(batch, 20, f, h, w, generator=g))
    return model.forward_batched(*args, audio=audio), args


def test_one_two_and_zero_audio_run_and_differ(rng, tiny):
    model, _ = tiny
    frames = 4 * (GRID_LATENT[0] - 1) + 1
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    outs = {}
    for name, cond in [("one", audio_conditioning(model, random_windows(rng, 1, frames))),
                       ("two", audio_conditioning(model, random_windows(rng, 2, frames))),
                       ("zero", zero_audio_conditioning(model, frames)), ("none", None)]:
        outs[name], _ = run_model(model, torch.Generator().manual_seed(seed), cond)
        assert outs[name].shape == (1, 16, *GRID_LATENT) and outs[name].isfinite().all()
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert rel(outs[a], outs[b]) > 1e-3, (a, b)


def test_zero_audio_is_one_speaker_of_zero_windows_through_the_projection(rng, tiny):
    model, _ = tiny
    cond = zero_audio_conditioning(model, 9)
    assert cond.speakers == 1 and not cond.needs_qk and cond.tokens.shape == (1, 3, 4, 24)
    assert cond.tokens.abs().sum() > 0  # biases and the LayerNorm make zero audio non-zero tokens
    assert torch.equal(cond.tokens, audio_conditioning(model, torch.zeros(1, 9, 5, 12, 4)).tokens)


def test_official_call_convention_equals_conditioning_object(rng, tiny):
    model, _ = tiny
    windows = random_windows(rng, 2, 9)
    masks = torch.zeros(3, 8, 12)
    masks[0, :, :5], masks[1, 2:, 7:] = 1, 1
    masks[2] = (masks[0] + masks[1] == 0).float()
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    batched, (x, t, ctx, clip, y) = run_model(model, torch.Generator().manual_seed(seed),
                                              audio_conditioning(model, windows, masks))
    official = model([x[0]], t, [ctx[0]], 3 * 4 * 6, clip_fea=clip, y=[y[0]], audio=windows, ref_target_masks=masks)
    assert torch.equal(official[0], batched[0])


def test_batch_items_are_independent(rng, tiny):
    model, _ = tiny
    cond = audio_conditioning(model, random_windows(rng, 2, 9))
    out, (x, t, ctx, clip, y) = run_model(model, rng, cond, batch=2)
    single = model.forward_batched(x[1:], t, ctx[1:], clip[1:], y[1:], audio=cond)
    assert rel(out[1:], single) < 1e-6


# ---------------------------------------------------------------------------------------------- masks

def test_default_speaker_masks_geometry():
    m = speaker_masks(480, 832)
    rows = lambda mask: (int(mask.any(1).nonzero().min()), int(mask.any(1).nonzero().max()) + 1)
    cols = lambda mask: (int(mask.any(0).nonzero().min()), int(mask.any(0).nonzero().max()) + 1)
    assert rows(m[0]) == rows(m[1]) == (24, 456)
    assert cols(m[0]) == (20, 395) and cols(m[1]) == (436, 811)
    assert torch.equal(m[2], ((m[0] + m[1]) == 0).float())


def test_box_masks_and_token_grid():
    m = speaker_masks(16, 24, boxes=[(0, 0, 12, 16), (12, 4, 24, 16)])
    assert m[0, :, :12].all() and not m[0, :, 12:].any() and m[1, 4:, 12:].all() and not m[1, :4].any()
    tm = AudioConditioning(torch.zeros(1, 1, 8, 24), 2, m).token_masks((1, 8, 12))
    assert tm.shape == (3, 96) and torch.equal(tm.view(3, 8, 12), m[:, ::2, ::2])


def test_two_masks_get_a_background():
    m = torch.zeros(2, 4, 6)
    m[0, :, :2], m[1, :, 4:] = 1, 1
    tm = AudioConditioning(torch.zeros(1, 1, 8, 24), 2, m).token_masks((1, 4, 6)).view(3, 4, 6)
    assert tm[2, :, 2:4].all() and tm[2].sum() == 8


# ---------------------------------------------------------------------------------------------- loading

def addon_part(sd):
    return {k: v for k, v in sd.items() if k.startswith("audio_proj.") or ".audio_cross_attn." in k or ".norm_x." in k}


def test_loader_combined_file(tmp_path, rng, tiny):
    model, sd = tiny
    loaded = load_wan_model(save_state_dict(sd, str(tmp_path / "it.safetensors"), prefix="model.diffusion_model."),
                            base_dtype=torch.float32)
    assert loaded.cfg.audio == TINY_AUDIO
    cond = audio_conditioning(loaded, random_windows(rng, 2, 9))
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    a, _ = run_model(loaded, torch.Generator().manual_seed(seed), cond)
    b, _ = run_model(model, torch.Generator().manual_seed(seed), cond)
    assert rel(a, b) < 1e-6  # not bit-equal: memory-mapped weights may be differently aligned for BLAS


def test_loader_base_plus_separate_addon(tmp_path, rng, tiny):
    _, sd = tiny
    extra = addon_part(sd)
    base = {k: v for k, v in sd.items() if k not in extra}
    base_path = save_state_dict(base, str(tmp_path / "wan_i2v.safetensors"))
    addon_path = save_state_dict(extra, str(tmp_path / "infinitetalk.safetensors"), dtype=torch.bfloat16)
    loaded = load_wan_model(base_path, extra_weights=[addon_path], base_dtype=torch.float32)
    assert loaded.cfg.audio == TINY_AUDIO
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v.to(torch.bfloat16).float()) for k, v in extra.items())
    assert all(torch.equal(state[k], v) for k, v in base.items())


def test_addon_for_another_model_dim_is_refused(tmp_path, rng, tiny):
    _, base_sd = tiny
    _, other = tiny_infinitetalk(rng, cfg=TINY_I2V.with_(dim=128, num_heads=1))
    base = {k: v for k, v in base_sd.items() if k not in addon_part(base_sd)}
    base_path = save_state_dict(base, str(tmp_path / "wan.safetensors"))
    addon_path = save_state_dict(addon_part(other), str(tmp_path / "it.safetensors"))
    with pytest.raises(CheckpointError, match="dim 256"):
        load_wan_model(base_path, extra_weights=[addon_path], base_dtype=torch.float32)


def test_addon_on_a_t2v_model_is_refused(rng, tiny):
    _, sd = tiny
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes["patch_embedding.weight"] = (256, 16, 1, 2, 2)
    with pytest.raises(CheckpointError, match="I2V"):
        detect_infinitetalk(shapes, infer_config(shapes))


def test_wrapper_key_naming_loads(tmp_path, rng, tiny):
    _, sd = tiny
    renamed = {("multitalk_" + k if k.startswith("audio_proj.") else k): v for k, v in sd.items()}
    loaded = load_wan_model(save_state_dict(renamed, str(tmp_path / "kj.safetensors")), base_dtype=torch.float32)
    assert loaded.cfg.audio == TINY_AUDIO
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items() if k.startswith("audio_proj."))


# ---------------------------------------------------------------------------------------------- bad inputs

def test_bad_conditioning_inputs_are_explained(rng, tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="one or two speakers"):
        audio_conditioning(model, random_windows(rng, 3, 9))
    with pytest.raises(ValueError, match="audio windows must be"):
        audio_conditioning(model, torch.randn(1, 9, 5, 12, 768, generator=rng))
    bad = random_windows(rng, 1, 9)
    bad[0, 3, 1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        audio_conditioning(model, bad)
    with pytest.raises(ValueError, match="latent frames"):
        run_model(model, rng, audio_conditioning(model, random_windows(rng, 1, 13)))
    tiny_speaker = torch.zeros(3, 8, 12)
    tiny_speaker[0, 1, 1], tiny_speaker[1, :, 6:] = 1, 1  # speaker 1 falls between the tokens' nearest samples
    with pytest.raises(ValueError, match="speaker 1 mask covers no video token"):
        run_model(model, rng, audio_conditioning(model, random_windows(rng, 2, 9), tiny_speaker))
