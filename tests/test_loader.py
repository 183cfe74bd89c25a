"""load_wan_model: stored dtypes, key prefixes, config inference, and a clear error for every bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from wantalk.wanvideo.checkpoint import CheckpointError
from wantalk.wanvideo.loader import infer_config, load_wan_model
from wantalk.wanvideo.modules.model import WAN_I2V_14B, WAN_T2V_1_3B, WanModel
from tiny_models import TINY_I2V, TINY_T2V, random_state_dict, save_state_dict, tiny_wan

PREFIXES = ["", "model.diffusion_model.", "diffusion_model.", "model."]


@pytest.fixture
def tiny(rng):
    return tiny_wan(TINY_I2V, rng)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_dtypes_and_prefixes(tmp_path, tiny, prefix, stored):
    model, sd = tiny
    path = save_state_dict(sd, str(tmp_path / "wan.safetensors"), prefix=prefix, dtype=stored)
    loaded = load_wan_model(path, base_dtype=torch.float32)
    assert loaded.cfg == TINY_I2V.with_(num_heads=2)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, sd[key].to(stored).float()), key


def test_loaded_model_computes_the_same(tmp_path, tiny, rng):
    model, sd = tiny
    loaded = load_wan_model(save_state_dict(sd, str(tmp_path / "w.safetensors")), base_dtype=torch.float32)
    args = (torch.randn(1, 16, 2, 4, 4, generator=rng), torch.tensor([321.0]), torch.randn(1, 4, 64, generator=rng),
            torch.randn(1, 257, 32, generator=rng), torch.randn(1, 20, 2, 4, 4, generator=rng))
    assert torch.equal(model.forward_batched(*args), loaded.forward_batched(*args))


def effective_weight(model, name, dtype=torch.float32):
    """The dense weight a (possibly fp8-stored) linear layer computes with."""
    layer = model.get_submodule(name)
    return layer.dequantize(dtype) if hasattr(layer, "dequantize") else layer.weight.to(dtype)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_stored_weights_load_without_requantizing(tmp_path, tiny, fp8):
    _, sd = tiny
    stored = {k: (v.to(fp8) if v.dim() == 2 and "blocks" in k else v) for k, v in sd.items()}
    loaded = load_wan_model(save_state_dict(stored, str(tmp_path / "f.safetensors")), base_dtype=torch.bfloat16)
    layer = loaded.get_submodule("blocks.0.ffn.0")
    assert layer.weight_bytes() < 1.05 * layer.in_features * layer.out_features  # still one byte per weight (+ scales)
    assert torch.equal(effective_weight(loaded, "blocks.0.ffn.0"), stored["blocks.0.ffn.0.weight"].float())


@pytest.mark.parametrize("scale_key,per_channel", [("scale_weight", False), ("weight_scale", True)])
def test_fp8_scaled_checkpoints(tmp_path, tiny, scale_key, per_channel):
    _, sd = tiny
    stored = {}
    for k, v in sd.items():
        if v.dim() == 2 and k.startswith("blocks.") and k.endswith(".weight"):
            amax = v.abs().amax(dim=1, keepdim=True) if per_channel else v.abs().max()
            scale = (amax / 448.0).float()
            stored[k] = (v / scale).to(torch.float8_e4m3fn)
            stored[k[:-len("weight")] + scale_key] = scale.reshape(-1) if per_channel else scale.reshape(())
        else:
            stored[k] = v
    stored["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    loaded = load_wan_model(save_state_dict(stored, str(tmp_path / "s.safetensors")), base_dtype=torch.float32)
    w = effective_weight(loaded, "blocks.1.self_attn.q")
    ref = sd["blocks.1.self_attn.q.weight"]
    assert (w - ref).norm() / ref.norm() < 0.05  # e4m3 rounding only: the scale was applied
    assert (w - ref).norm() / ref.norm() > 0  # and it really was stored in fp8


def test_pickle_checkpoint_weights_only(tmp_path, tiny):
    _, sd = tiny
    path = str(tmp_path / "wan.pt")
    torch.save({"model.diffusion_model." + k: v for k, v in sd.items()}, path)
    loaded = load_wan_model(path, base_dtype=torch.float32)
    assert torch.equal(loaded.state_dict()["head.head.weight"], sd["head.head.weight"])


def test_config_inferred_at_real_size():
    for cfg in (WAN_I2V_14B, WAN_T2V_1_3B):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in WanModel(cfg, device="meta").state_dict().items()}
        assert infer_config(shapes) == cfg


def test_t2v_tiny_loads(tmp_path, rng):
    _, sd = tiny_wan(TINY_T2V, rng)
    loaded = load_wan_model(save_state_dict(sd, str(tmp_path / "t.safetensors")), base_dtype=torch.float32)
    assert loaded.cfg.model_type == "t2v" and not loaded.cfg.image_branch


# ---- bad inputs ---------------------------------------------------------------------------------

def test_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a valid safetensors|corrupt"):
        load_wan_model(str(path))


def test_truncated_file(tmp_path, tiny):
    _, sd = tiny
    path = save_state_dict(sd, str(tmp_path / "t.safetensors"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_wan_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_wan_model(str(tmp_path / "nope.safetensors"))


def test_pickle_that_is_not_a_state_dict(tmp_path):
    path = str(tmp_path / "x.bin")
    torch.save(["not", "tensors"], path)
    with pytest.raises(CheckpointError, match="state dict"):
        load_wan_model(path)


def _save(tmp_path, tensors, name="m.safetensors"):
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_diffusers_format_is_named(tmp_path):
    path = _save(tmp_path, {"condition_embedder.time_proj.weight": torch.randn(4, 4),
                            "blocks.0.attn1.to_q.weight": torch.randn(4, 4)})
    with pytest.raises(CheckpointError, match="diffusers-format.*original-format"):
        load_wan_model(path)


@pytest.mark.parametrize("keys,what", [
    ({"encoder.downsamples.0.residual.0.gamma": (4, 1, 1, 1), "decoder.upsamples.0.residual.0.gamma": (4, 1, 1, 1)}, "VAE"),
    ({"token_embedding.weight": (8, 4), "blocks.0.ffn.gate.0.weight": (4, 4)}, "T5 text encoder"),
    ({"visual.transformer.0.attn.to_qkv.weight": (12, 4)}, "CLIP vision"),
    ({"feature_projection.projection.weight": (8, 4)}, "wav2vec2"),
    ({"audio_proj.proj1.weight": (8, 4), "blocks.0.audio_cross_attn.q_linear.weight": (4, 4)}, "add-on"),
])
def test_other_model_given_as_diffusion_model(tmp_path, keys, what):
    path = _save(tmp_path, {k: torch.randn(s) for k, s in keys.items()})
    with pytest.raises(CheckpointError, match=what):
        load_wan_model(path)


def test_missing_keys(tmp_path, tiny):
    _, sd = tiny
    del sd["blocks.1.cross_attn.k_img.weight"]
    with pytest.raises(CheckpointError, match="1 missing.*blocks.1.cross_attn.k_img.weight"):
        load_wan_model(save_state_dict(sd, str(tmp_path / "m.safetensors")))


def test_unexpected_keys(tmp_path, tiny):
    _, sd = tiny
    sd["img_emb.emb_pos"] = torch.randn(1, 514, 32)
    with pytest.raises(CheckpointError, match="unexpected.*img_emb.emb_pos"):
        load_wan_model(save_state_dict(sd, str(tmp_path / "u.safetensors")))


def test_shapes_fit_no_layout(tmp_path, tiny):
    _, sd = tiny
    sd["blocks.0.self_attn.q.weight"] = torch.randn(256, 128)
    with pytest.raises(CheckpointError, match="fits no known Wan 2.1 layout"):
        load_wan_model(save_state_dict(sd, str(tmp_path / "b.safetensors")))


def test_head_count_needs_a_hint_when_not_inferable(tmp_path, rng):
    cfg = TINY_T2V.with_(dim=96, num_heads=2, ffn_dim=128)
    model = WanModel(cfg, device="cpu", dtype=torch.float32)
    path = save_state_dict(random_state_dict(model, rng), str(tmp_path / "h.safetensors"))
    with pytest.raises(CheckpointError, match="attention heads"):
        load_wan_model(path)
    assert load_wan_model(path, config_overrides={"num_heads": 2}).cfg.num_heads == 2
    with open(tmp_path / "h.config.json", "w") as f:     # a config that names the file
        json.dump({"num_heads": 2, "dim": 96}, f)
    assert load_wan_model(path).cfg.num_heads == 2


def test_unknown_modes_are_refused(tmp_path, tiny):
    _, sd = tiny
    path = save_state_dict(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="quantization"):
        load_wan_model(path, quantization="int3")
    with pytest.raises(ValueError, match="attention_mode"):
        load_wan_model(path, attention_mode="xformers")


def test_load_wan_returns_a_handle_with_plan_report_and_sources(tmp_path, rng):
    from wantalk.wanvideo.loader import load_wan
    from tiny_models import make_tiny_lora
    _, sd = tiny_wan(TINY_I2V, rng)
    path = save_state_dict(sd, str(tmp_path / "wan.safetensors"))
    lora = make_tiny_lora(str(tmp_path / "l.safetensors"), sd, rng)
    handle = load_wan(path, quantization="fp8_e4m3fn_scaled", loras=[(lora, 0.5)], base_dtype=torch.float32)
    assert handle.config == handle.model.cfg and handle.addon is None
    assert handle.sources == (("model", path), ("lora", lora)) and handle.loras == ((lora, 0.5),)
    # the module the nodes pass along carries the same facts, not a second computation of them
    assert handle.model.source_paths == (path, lora) == handle.source_paths
    assert handle.model.layer_plan is handle.plan and handle.model.quant_report is handle.report
    planned = {n for n, e in handle.plan.items() if e.quantized}
    assert planned == set(handle.report.quantized) and all(e.storage == "float8_e4m3fn" and e.origin == "load"
                                                           for n, e in handle.plan.items() if n in planned)
    assert handle.plan["head.head"].storage == "dense" and handle.plan["head.head"].compute == "dense matmul"
