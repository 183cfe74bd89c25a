"""HuMo model add-on: real-size keys of HuMo-17B and 1.7B, the audio projection and the per-block audio attention
against float64 references written from docs/NOTES.md §4.1, the official call convention, loading and
detection, the quantization policy on the audio layers, and bad inputs."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wantalk.humo.audio_attention import HumoBlockAdapter
from wantalk.humo.audio_features import humo_audio_windows
from wantalk.humo.audio_proj import HumoAudioProj
from wantalk.humo.conditioning import HumoAudioConditioning, humo_conditioning, zero_humo_conditioning
from wantalk.humo.model_addon import HumoConfig, detect_humo, humo_addon
from wantalk.multitalk.model_addon import detect_infinitetalk
from wantalk.wanvideo import quantization as q
from wantalk.wanvideo.checkpoint import CheckpointError
from wantalk.wanvideo.loader import build_model, infer_config, load_wan_model
from test_model import parse_keys
from tiny_models import TINY_I2V, TINY_T2V, random_state_dict, save_state_dict, tiny_addon_model

# Small audio sizes the detector reads back exactly: 8-frame windows of 5 bands x 6 channels, 4 tokens of 24.
TINY_HUMO = HumoConfig(audio_channels=6, intermediate_dim=16, output_dim=24, context_tokens=4)
TINY_HUMO_17B = TINY_I2V.with_(image_branch=False)   # I2V-shaped (36 channels), no CLIP branch
TINY_HUMO_1_7B = TINY_T2V
GRID_LATENT = (4, 8, 12)  # 3 video latent frames + 1 reference frame, latent height, width


def tiny_humo(rng, cfg=TINY_HUMO_17B, acfg=TINY_HUMO, dtype=torch.float32):
    return tiny_addon_model(cfg, humo_addon(acfg), rng, dtype)


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator()
    g.seed()
    return tiny_humo(g)


def random_windows(rng, frames, acfg=TINY_HUMO):
    return torch.randn(frames, acfg.window, acfg.bands, acfg.audio_channels, generator=rng)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- sizes and keys

@pytest.mark.parametrize("listing,model_type", [("keys_humo17b.txt", "i2v"), ("keys_humo1.7b.txt", "t2v")])
def test_real_size_keys_shapes_and_detected_config(keys_dir, listing, model_type):
    keys = parse_keys(os.path.join(keys_dir, listing))
    cfg = infer_config(keys)
    addon = detect_humo(keys, cfg)
    assert addon is not None and addon.config == HumoConfig() and addon.name == "HuMo"
    assert cfg.model_type == model_type and not cfg.image_branch
    assert detect_infinitetalk(keys, cfg) is None
    with torch.device("meta"):
        model = build_model(cfg.with_(audio=addon.config), addon, device="meta", dtype=torch.bfloat16)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys


@pytest.mark.parametrize("listing", ["keys_i2v14b.txt", "keys_t2v1.3b.txt", "keys_infinitetalk.txt"])
def test_other_models_are_not_humo(keys_dir, listing):
    keys = parse_keys(os.path.join(keys_dir, listing))
    assert detect_humo(keys, infer_config(keys)) is None


# ---------------------------------------------------------------------------------------------- audio projection

def test_audio_projection_matches_float64(rng):
    proj = HumoAudioProj(TINY_HUMO)
    proj.load_state_dict(random_state_dict(proj, rng))
    windows = torch.randn(2, 5, 8, 5, 6, generator=rng)
    p = {k: v.double() for k, v in proj.state_dict().items()}
    lin = lambda name, t: t @ p[f"audio_proj_glob_{name}.layer.weight"].T + p[f"audio_proj_glob_{name}.layer.bias"]
    h = torch.relu(lin(2, torch.relu(lin(1, windows.double().reshape(2, 5, -1)))))
    tokens = lin(3, h).reshape(2, 5, 4, 24)
    mu, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    ref = (tokens - mu) / torch.sqrt(var + 1e-5) * p["audio_proj_glob_norm.layer.weight"] + p["audio_proj_glob_norm.layer.bias"]
    out = proj(windows)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 4, 24)
    assert rel(out, ref) < 1e-5


# ---------------------------------------------------------------------------------------------- audio attention

def reference_audio_residual(p, x, tokens, grid, heads):
    """float64 from docs/NOTES.md §4.1: LayerNorm (affine, eps 1e-6); q = RMSNorm(Wq x), k = RMSNorm(Wk a),
    v = Wv a; per latent frame the h*w queries attend to that frame's audio tokens; o."""
    f, h, w = grid
    dim = x.shape[-1]
    d = dim // heads
    pre = "audio_cross_attn_wrapper."
    lin = lambda name, t: t @ p[pre + f"audio_cross_attn.{name}.weight"].T + p[pre + f"audio_cross_attn.{name}.bias"]
    rms = lambda t, name: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * p[pre + f"audio_cross_attn.{name}.weight"]
    xn = F.layer_norm(x.double()[0], (dim,), p[pre + "norm1_audio.weight"], p[pre + "norm1_audio.bias"], 1e-6)
    a = tokens.double()[0]
    qh = rms(lin("q", xn), "norm_q").view(f, h * w, heads, d)
    kh = rms(lin("k", a), "norm_k").view(f, -1, heads, d)
    vh = lin("v", a).view(f, -1, heads, d)
    out = torch.empty(f, h * w, heads, d, dtype=torch.float64)
    for frame in range(f):
        for head in range(heads):
            scores = qh[frame, :, head] @ kh[frame, :, head].T / math.sqrt(d)
            out[frame, :, head] = torch.softmax(scores, dim=-1) @ vh[frame, :, head]
    return lin("o", out.reshape(f * h * w, dim))


@pytest.mark.parametrize("heads", [2, 5])
def test_block_audio_attention_matches_float64(rng, heads):
    cfg = TINY_HUMO_17B.with_(dim=16 * heads, num_heads=heads, audio=TINY_HUMO)
    adapter = HumoBlockAdapter(cfg)
    adapter.load_state_dict(random_state_dict(adapter, rng))
    grid = (3, 4, 6)
    x = torch.randn(1, 72, cfg.dim, generator=rng)
    tokens = torch.randn(1, 3, 4, TINY_HUMO.output_dim, generator=rng)
    out = adapter.forward_in_block(adapter, x, SimpleNamespace(grid=grid, audio=HumoAudioConditioning(tokens)))
    ref = reference_audio_residual({k: v.double() for k, v in adapter.state_dict().items()}, x, tokens, grid, heads)
    assert rel(out[0], ref) < 1e-5


def test_each_frame_hears_only_its_own_audio(rng, tiny):
    model, _ = tiny
    adapter = SimpleNamespace(audio_cross_attn_wrapper=model.blocks[0].audio_cross_attn_wrapper)
    grid = (3, 2, 3)
    x = torch.randn(1, 18, model.cfg.dim, generator=rng)
    tokens = torch.randn(1, 3, 4, TINY_HUMO.output_dim, generator=rng)
    changed = tokens.clone()
    changed[:, 1] = torch.randn(4, TINY_HUMO.output_dim, generator=rng)
    run = lambda t: HumoBlockAdapter.forward_in_block(adapter, x, SimpleNamespace(grid=grid, audio=HumoAudioConditioning(t)))
    a, b = run(tokens), run(changed)
    assert torch.equal(a[:, :6], b[:, :6]) and torch.equal(a[:, 12:], b[:, 12:])
    assert rel(b[:, 6:12], a[:, 6:12]) > 1e-3


# ---------------------------------------------------------------------------------------------- whole model

def model_inputs(rng, cfg, batch=1):
    f, h, w = GRID_LATENT
    y = torch.randn(batch, 20, f, h, w, generator=rng) if cfg.in_dim > 16 else None
    return torch.randn(batch, 16, f, h, w, generator=rng), torch.tensor([613.0]), torch.randn(batch, 5, 64, generator=rng), y


def test_audio_zero_audio_and_no_audio_differ(rng, tiny):
    model, _ = tiny
    x, t, ctx, y = model_inputs(rng, model.cfg)
    outs = {name: model.forward_batched(x, t, ctx, None, y, audio=cond) for name, cond in [
        ("audio", humo_conditioning(model, random_windows(rng, GRID_LATENT[0]))),
        ("zero", zero_humo_conditioning(model, GRID_LATENT[0])), ("none", None)]}
    for out in outs.values():
        assert out.shape == (1, 16, *GRID_LATENT) and out.isfinite().all()
    assert rel(outs["audio"], outs["zero"]) > 1e-3 and rel(outs["zero"], outs["none"]) > 1e-3


def test_zero_audio_goes_through_the_projection(tiny):
    model, _ = tiny
    cond = zero_humo_conditioning(model, 5)
    assert cond.tokens.shape == (1, 5, 4, 24) and cond.tokens.abs().sum() > 0
    assert torch.equal(cond.tokens, humo_conditioning(model, torch.zeros(5, 8, 5, 6)).tokens)


@pytest.mark.parametrize("cfg", [TINY_HUMO_17B, TINY_HUMO_1_7B], ids=["17b", "1.7b"])
def test_official_call_convention_equals_conditioning_object(rng, cfg):
    model, _ = tiny_humo(rng, cfg)
    bands = torch.randn(30, 5, 6, generator=rng)
    windows = humo_audio_windows(bands, GRID_LATENT[0] - 1, 1)
    x, t, ctx, y = model_inputs(rng, cfg)
    batched = model.forward_batched(x, t, ctx, None, y, audio=humo_conditioning(model, windows))
    seq_len = math.prod(GRID_LATENT) // 4
    official = model([x[0]], t, [ctx[0]], seq_len, audio=[windows], y=None if y is None else [y[0]])
    assert torch.equal(official[0], batched[0])
    with pytest.raises(TypeError, match="unexpected arguments for a HuMo model"):
        model([x[0]], t, [ctx[0]], seq_len, audio=[windows], ref_target_masks=None)


def test_batch_items_are_independent(rng, tiny):
    model, _ = tiny
    cond = humo_conditioning(model, random_windows(rng, GRID_LATENT[0]))
    x, t, ctx, y = model_inputs(rng, model.cfg, batch=2)
    both = model.forward_batched(x, t, ctx, None, y, audio=cond)
    single = model.forward_batched(x[1:], t, ctx[1:], None, y[1:], audio=cond)
    assert rel(both[1:], single) < 1e-6


def test_random_conditioning_for_benchmarks(tiny):
    model, _ = tiny
    cond = model.cfg.audio.random_conditioning(model, 7, "cpu")
    assert cond.tokens.shape == (1, 7, 4, 24) and not cond.needs_qk


# ---------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("cfg", [TINY_HUMO_17B, TINY_HUMO_1_7B], ids=["17b", "1.7b"])
def test_loader_detects_and_loads_humo(tmp_path, rng, cfg):
    model, sd = tiny_humo(rng, cfg)
    path = save_state_dict(sd, str(tmp_path / "humo.safetensors"), prefix="model.diffusion_model.")
    loaded = load_wan_model(path, base_dtype=torch.float32)
    assert loaded.addon_name == "HuMo" and loaded.cfg.audio == TINY_HUMO
    assert loaded.cfg.model_type == cfg.model_type and not loaded.cfg.image_branch
    cond = humo_conditioning(loaded, random_windows(rng, GRID_LATENT[0]))
    x, t, ctx, y = model_inputs(rng, cfg)
    assert rel(loaded.forward_batched(x, t, ctx, None, y, audio=cond),
               model.forward_batched(x, t, ctx, None, y, audio=cond)) < 1e-6


def test_quantization_policy_on_the_humo_layers():
    with torch.device("meta"):
        model = build_model(TINY_HUMO_17B.with_(audio=TINY_HUMO), humo_addon(TINY_HUMO), device="meta",
                            dtype=torch.bfloat16)
    report = q.apply_policy(model, "fp8_e4m3fn_scaled", q.DEFAULT_PARAMS_TO_KEEP, base_dtype=torch.bfloat16)
    audio_block = [n for n in report.quantized if ".audio_cross_attn_wrapper." in n]
    assert {n.rsplit(".", 1)[1] for n in audio_block} == {"q", "k", "v", "o"}
    assert len(audio_block) == 4 * TINY_HUMO_17B.num_layers
    assert all(type(model.get_submodule(n)) is not nn.Linear for n in audio_block)
    audio_proj = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("audio_proj.")]
    assert len(audio_proj) == 3 and set(audio_proj) <= set(report.kept_linears)


# ---------------------------------------------------------------------------------------------- bad inputs

def test_humo_file_with_wrong_dims_is_refused(rng, tiny):
    _, sd = tiny
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes["blocks.0.audio_cross_attn_wrapper.audio_cross_attn.k.weight"] = (TINY_I2V.dim, 32)
    with pytest.raises(CheckpointError, match="do not fit this model.*audio_cross_attn.k.weight"):
        detect_humo(shapes, infer_config(shapes))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes["audio_proj.audio_proj_glob_1.layer.weight"] = (16, 8 * 5 * 6 + 1)
    with pytest.raises(CheckpointError, match="not a HuMo model"):
        detect_humo(shapes, infer_config(shapes))


def test_humo_with_a_clip_branch_is_refused(rng, tiny):
    _, sd = tiny
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes["blocks.0.cross_attn.k_img.weight"] = (TINY_I2V.dim, TINY_I2V.dim)
    with pytest.raises(CheckpointError, match="no CLIP image branch"):
        detect_humo(shapes, infer_config(shapes))


def test_humo_file_missing_block_layers_is_refused(tmp_path, rng, tiny):
    _, sd = tiny
    partial = {k: v for k, v in sd.items() if "audio_cross_attn_wrapper" not in k}
    with pytest.raises(CheckpointError, match="HuMo weights are incomplete"):
        load_wan_model(save_state_dict(partial, str(tmp_path / "humo.safetensors")), base_dtype=torch.float32)


def test_bad_conditioning_inputs_are_explained(rng, tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="HuMo audio windows must be"):
        humo_conditioning(model, torch.randn(4, 8, 5, 1280, generator=rng))
    bad = random_windows(rng, 4)
    bad[2, 3, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        humo_conditioning(model, bad)
    x, t, ctx, y = model_inputs(rng, model.cfg)
    with pytest.raises(ValueError, match="reference frames"):
        model.forward_batched(x, t, ctx, None, y, audio=humo_conditioning(model, random_windows(rng, 3)))
    plain = build_model(TINY_I2V, None, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="no HuMo audio layers"):
        humo_conditioning(plain, random_windows(rng, 4))
