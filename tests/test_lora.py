"""LoRA: every key convention merges to `W + strength * alpha/rank * B @ A` (float64 reference), merge happens
before quantization, unmerged (run-time) equals merged, chains add up, bad LoRAs give clear messages."""
import logging
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from wantalk.wanvideo.loader import load_wan_model
from wantalk.wanvideo.lora import LayerNames, LoraError, LoraModeError, attach_unmerged_loras
from tiny_models import TINY_I2V, save_state_dict, tiny_infinitetalk, tiny_wan

# Model layer -> its diffusers name (written out by hand, from diffusers' Wan conversion table).
LOW_RANK_LAYERS = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.1.self_attn.o": "blocks.1.attn1.to_out.0",
    "blocks.0.cross_attn.k_img": "blocks.0.attn2.add_k_proj",
    "blocks.1.cross_attn.v_img": "blocks.1.attn2.add_v_proj",
    "blocks.0.cross_attn.o": "blocks.0.attn2.to_out.0",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Model parameter -> (module path in original names, in diffusers names, LoRA suffix).
FULL_DELTAS = {
    "blocks.0.norm3.weight": ("blocks.0.norm3", "blocks.0.norm2", "diff"),
    "blocks.1.modulation": ("blocks.1.modulation", "blocks.1.scale_shift_table", "diff"),
    "blocks.0.self_attn.q.bias": ("blocks.0.self_attn.q", "blocks.0.attn1.to_q", "diff_b"),
    "blocks.1.cross_attn.norm_k_img.weight": ("blocks.1.cross_attn.norm_k_img", "blocks.1.attn2.norm_added_k", "diff"),
}
AUDIO_LAYERS = {name: name for name in ("blocks.0.audio_cross_attn.q_linear", "blocks.1.audio_cross_attn.kv_linear",
                                        "blocks.1.audio_cross_attn.proj")}
AUDIO_DELTAS = {"blocks.0.norm_x.weight": ("blocks.0.norm_x", "blocks.0.norm_x", "diff"),
                "blocks.1.audio_cross_attn.q_linear.bias": ("blocks.1.audio_cross_attn.q_linear",
                                                            "blocks.1.audio_cross_attn.q_linear", "diff_b")}


def lora_key(convention: str, module: str, diffusers_module: str, role: str) -> str:
    """A LoRA key as each published convention writes it; role: down, up, alpha or a full-delta suffix."""
    if convention == "peft":
        return f"diffusion_model.{module}." + {"down": "lora_A.weight", "up": "lora_B.weight"}.get(role, role)
    if convention == "diffusers":
        return f"transformer.{diffusers_module}." + {"down": "lora_A.weight", "up": "lora_B.weight"}.get(role, role)
    suffix = {"down": "lora_down.weight", "up": "lora_up.weight"}.get(role, role)
    if convention == "kohya":
        return f"lora_unet_{module.replace('.', '_')}.{suffix}"
    return f"diffusion_model.{module}.{suffix}"  # "down_up"


def make_lora(path, sd, convention, rng, layers=LOW_RANK_LAYERS, deltas=FULL_DELTAS, scale=0.3):
    """Write a LoRA for the (key -> tensor) model `sd`; return {model key: float64 delta at strength 1}."""
    tensors, expected = {}, {}
    with_alpha = convention in ("down_up", "kohya")
    for module, diffusers_module in layers.items():
        w = sd[f"{module}.weight"].double()
        rank = int(torch.randint(2, 7, (1,), generator=rng))
        down = torch.randn(rank, w.shape[1], generator=rng, dtype=torch.float64)
        up = torch.randn(w.shape[0], rank, generator=rng, dtype=torch.float64) * (scale * w.std() / rank ** 0.5)
        alpha = rank * (0.5 + 1.5 * float(torch.rand(1, generator=rng))) if with_alpha else rank
        tensors[lora_key(convention, module, diffusers_module, "down")] = down.float()
        tensors[lora_key(convention, module, diffusers_module, "up")] = up.float()
        if with_alpha:
            tensors[lora_key(convention, module, diffusers_module, "alpha")] = torch.tensor(alpha)
        expected[f"{module}.weight"] = (alpha / rank) * (up.float().double() @ down.float().double())
    for key, (module, diffusers_module, suffix) in deltas.items():
        delta = scale * sd[key].abs().mean() * torch.randn(sd[key].shape, generator=rng)
        tensors[lora_key(convention, module, diffusers_module, suffix)] = delta
        expected[key] = delta.double()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path), expected


def assert_merged(model, sd, expected_by_lora, strengths):
    """Every parameter equals base + sum(strength * delta) in float64; untouched ones are unchanged."""
    state = model.state_dict()
    for key, base in sd.items():
        ref = base.double() + sum(s * e[key] for s, e in zip(strengths, expected_by_lora) if key in e)
        got = state[key].double()
        if any(key in e for e in expected_by_lora):
            err = (got - ref).norm() / ref.norm()
            moved = (ref - base.double()).norm() / ref.norm()
            assert err < 1e-6 and moved > 1e-2, (key, float(err), float(moved))
        else:
            assert torch.equal(got, base.double()), key


@pytest.fixture
def base(tmp_path, rng):
    _, sd = tiny_wan(TINY_I2V, rng)
    return save_state_dict(sd, str(tmp_path / "wan.safetensors")), sd


def forward_inputs(rng):
    return (torch.randn(1, 16, 2, 4, 4, generator=rng), torch.tensor([321.0]), torch.randn(1, 4, 64, generator=rng),
            torch.randn(1, 257, 32, generator=rng), torch.randn(1, 20, 2, 4, 4, generator=rng))


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- key conventions, merge exactness --------------------------------------------------------------------

@pytest.mark.parametrize("convention", ["peft", "down_up", "kohya", "diffusers"])
def test_each_convention_merges_exactly(tmp_path, base, rng, convention):
    path, sd = base
    lora, expected = make_lora(tmp_path / f"{convention}.safetensors", sd, convention, rng)
    strength = float(torch.rand(1, generator=rng)) * 1.5 + 0.25
    model = load_wan_model(path, base_dtype=torch.float32, loras=[(lora, strength)])
    assert_merged(model, sd, [expected], [strength])


def test_infinitetalk_audio_layers_merge(tmp_path, rng):
    _, sd = tiny_infinitetalk(rng)
    path = save_state_dict(sd, str(tmp_path / "it.safetensors"))
    results = []
    for convention in ("down_up", "kohya"):
        lora, expected = make_lora(tmp_path / f"{convention}.safetensors", sd, convention, rng,
                                   layers={**AUDIO_LAYERS, "blocks.0.self_attn.k": "blocks.0.attn1.to_k"},
                                   deltas=AUDIO_DELTAS)
        results.append((lora, expected))
    model = load_wan_model(path, base_dtype=torch.float32, loras=[(p, 1.0) for p, _ in results])
    assert model.addon_name == "InfiniteTalk"
    assert_merged(model, sd, [e for _, e in results], [1.0, 1.0])


def test_two_loras_chained(tmp_path, base, rng):
    path, sd = base
    first, e1 = make_lora(tmp_path / "a.safetensors", sd, "peft", rng)
    overlap = {k: LOW_RANK_LAYERS[k] for k in ("blocks.0.self_attn.q", "blocks.0.cross_attn.k_img")}
    second, e2 = make_lora(tmp_path / "b.safetensors", sd, "kohya", rng, layers=overlap, deltas={})
    model = load_wan_model(path, base_dtype=torch.float32, loras=[(first, 0.7), (second, -0.4)])
    assert_merged(model, sd, [e1, e2], [0.7, -0.4])


def test_zero_strength_changes_nothing(tmp_path, base, rng):
    path, sd = base
    lora, _ = make_lora(tmp_path / "l.safetensors", sd, "peft", rng)
    model = load_wan_model(path, base_dtype=torch.float32, loras=[(lora, 0.0)])
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def quantized_state(model):
    return {k: (v.view(torch.uint8) if v.element_size() == 1 else v) for k, v in model.state_dict().items()}


def test_merged_then_quantized_equals_quantized_merged(tmp_path, base, rng):
    path, sd = base
    lora, _ = make_lora(tmp_path / "l.safetensors", sd, "down_up", rng)
    merged = load_wan_model(path, base_dtype=torch.float32, loras=[(lora, 0.8)])
    premerged = save_state_dict(merged.state_dict(), str(tmp_path / "premerged.safetensors"))
    mode = "fp8_e4m3fn_scaled"
    with_lora = quantized_state(load_wan_model(path, base_dtype=torch.bfloat16, quantization=mode, loras=[(lora, 0.8)]))
    reference = quantized_state(load_wan_model(premerged, base_dtype=torch.bfloat16, quantization=mode))
    without = quantized_state(load_wan_model(path, base_dtype=torch.bfloat16, quantization=mode))
    assert with_lora["blocks.0.self_attn.q.weight"].dtype == torch.uint8  # really stored as fp8
    for key, value in reference.items():
        assert torch.equal(with_lora[key], value), key
    assert not torch.equal(with_lora["blocks.1.ffn.2.weight"], without["blocks.1.ffn.2.weight"])


# ---- unmerged (run-time) mode --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_unmerged_equals_merged_and_strength_changes_without_reload(tmp_path, base, rng, dtype, tol):
    path, sd = base
    lora_a, _ = make_lora(tmp_path / "a.safetensors", sd, "down_up", rng)
    lora_b, _ = make_lora(tmp_path / "b.safetensors", sd, "diffusers", rng)
    args = forward_inputs(rng)
    plain = load_wan_model(path, base_dtype=dtype)
    expect_plain = plain.forward_batched(*args)
    runtime = attach_unmerged_loras(plain, [(lora_a, 1.0), (lora_b, 0.5)])
    for strengths in ((1.0, 0.5), (0.3, -0.8)):
        runtime.set_strength(0, strengths[0])
        runtime.set_strength(1, strengths[1])
        merged = load_wan_model(path, base_dtype=dtype, loras=[(lora_a, strengths[0]), (lora_b, strengths[1])])
        expect = merged.forward_batched(*args)
        got = plain.forward_batched(*args)
        assert rel_err(got, expect) < tol, strengths
        assert rel_err(got, expect_plain) > 0.1  # the LoRAs do change the output
    runtime.set_strength(0, 0.0)
    runtime.set_strength(1, 0.0)
    assert torch.equal(plain.forward_batched(*args), expect_plain)
    runtime.remove()
    assert set(plain.state_dict()) == set(sd)
    assert all(torch.equal(v, sd[k].to(dtype)) for k, v in plain.state_dict().items())


def test_unmerged_factors_travel_with_the_module(tmp_path, base, rng):
    path, sd = base
    lora, _ = make_lora(tmp_path / "l.safetensors", sd, "peft", rng)
    model = load_wan_model(path, base_dtype=torch.float32)
    attach_unmerged_loras(model, [(lora, 1.0)])
    layer = model.get_submodule("blocks.0.self_attn.q")
    buffers = dict(layer.named_buffers())
    assert len(buffers) == 2 and not any("wantalk" in k for k in model.state_dict())
    layer.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in layer.buffers())


@pytest.mark.parametrize("mode", ["fp8_e4m3fn_scaled", "fp4"])
def test_unmerged_refused_for_quantized_models(tmp_path, base, rng, mode):
    path, sd = base
    lora, _ = make_lora(tmp_path / "l.safetensors", sd, "peft", rng)
    model = load_wan_model(path, base_dtype=torch.bfloat16, quantization=mode)
    with pytest.raises(LoraModeError, match=f"'{mode}'.*lora_mode 'merge'"):
        attach_unmerged_loras(model, [(lora, 1.0)])


def test_unmerged_refused_for_fp8_files_loaded_unquantized(tmp_path, base, rng):
    _, sd = base
    stored = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 and k.startswith("blocks.") else v) for k, v in sd.items()}
    model = load_wan_model(save_state_dict(stored, str(tmp_path / "f8.safetensors")), base_dtype=torch.bfloat16)
    lora, _ = make_lora(tmp_path / "l.safetensors", sd, "peft", rng)
    with pytest.raises(LoraModeError, match="fp8/fp4 linear layers.*merge"):
        attach_unmerged_loras(model, [(lora, 1.0)])


# ---- bad LoRAs -------------------------------------------------------------------------------------------

def test_unknown_keys_are_listed_in_one_warning(tmp_path, base, rng, caplog):
    path, sd = base
    lora, expected = make_lora(tmp_path / "l.safetensors", sd, "down_up", rng)
    tensors = load_file(lora)
    tensors["diffusion_model.blocks.0.not_a_layer.lora_down.weight"] = torch.randn(2, 256, generator=rng)
    tensors["diffusion_model.blocks.0.not_a_layer.lora_up.weight"] = torch.randn(256, 2, generator=rng)
    tensors["diffusion_model.blocks.7.self_attn.q.diff_b"] = torch.randn(256, generator=rng)  # no block 7
    tensors["some_training_step"] = torch.tensor(1000.0)
    save_file(tensors, lora)
    with caplog.at_level(logging.WARNING, logger="wantalk"):
        model = load_wan_model(path, base_dtype=torch.float32, loras=[(lora, 1.0)])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "LoRA" in r.getMessage()]
    assert len(warnings) == 1
    for key in ("not_a_layer.lora_down.weight", "not_a_layer.lora_up.weight", "blocks.7.self_attn.q.diff_b",
                "some_training_step"):
        assert key in warnings[0]
    assert_merged(model, sd, [expected], [1.0])


def test_nothing_matches_is_an_error(tmp_path, base, rng):
    path, _ = base
    lora = str(tmp_path / "flux.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 64, generator=rng),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(64, 4, generator=rng)}, lora)
    with pytest.raises(LoraError, match="none of the 2 keys.*another model family"):
        load_wan_model(path, base_dtype=torch.float32, loras=[(lora, 1.0)])


def test_lora_for_another_model_size_is_a_clear_error(tmp_path, base, rng):
    path, _ = base
    small, _ = tiny_wan(TINY_I2V.with_(dim=128, ffn_dim=256, num_heads=1), rng)
    lora, _ = make_lora(tmp_path / "small.safetensors", small.state_dict(), "kohya", rng)
    with pytest.raises(LoraError, match=r"different model.*'blocks\.\d\.\w+\.\w+\.weight'.*\(128, 128\).*\(256, 256\)"):
        load_wan_model(path, base_dtype=torch.float32, loras=[(lora, 1.0)])


def test_dora_is_refused(tmp_path, base, rng):
    path, sd = base
    lora, _ = make_lora(tmp_path / "l.safetensors", sd, "down_up", rng)
    tensors = load_file(lora)
    tensors["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(256, 1)
    save_file(tensors, lora)
    with pytest.raises(LoraError, match="DoRA"):
        load_wan_model(path, base_dtype=torch.float32, loras=[(lora, 1.0)])


# ---- real-size names (meta, no weights) ----------------------------------------------------------------

def real_shapes(keys_dir, listing):
    shapes = {}
    for line in open(f"{keys_dir}/{listing}"):
        key, shape = line.split("\t")[:2]
        shapes[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return shapes


@pytest.mark.parametrize("listing", ["keys_infinitetalk.txt", "keys_humo17b.txt", "keys_t2v1.3b.txt"])
def test_every_real_layer_resolves_in_every_convention(keys_dir, listing):
    shapes = real_shapes(keys_dir, listing)
    names = LayerNames(shapes)
    linears = [k[:-len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    assert len(linears) > 300
    assert len(names.underscored) == len(names.dotted)  # no two layers share an underscored name
    for module in linears:
        for lora_name in (f"diffusion_model.{module}", f"lora_unet_{module.replace('.', '_')}", module,
                          f"lora_unet__{module.replace('.', '_')}"):
            assert names.resolve(lora_name) == module, lora_name


def test_real_size_spot_checks(keys_dir):
    shapes = {**real_shapes(keys_dir, "keys_infinitetalk.txt"), **real_shapes(keys_dir, "keys_humo17b.txt")}
    names = LayerNames(shapes)
    spot_checks = {
        "lora_unet_blocks_0_cross_attn_k_img": "blocks.0.cross_attn.k_img",
        "transformer.blocks.39.attn2.add_v_proj": "blocks.39.cross_attn.v_img",
        "transformer.blocks.3.attn1.to_out.0": "blocks.3.self_attn.o",
        "transformer.blocks.7.ffn.net.0.proj": "blocks.7.ffn.0",
        "base_model.model.blocks.7.ffn.net.2": "blocks.7.ffn.2",
        "lora_unet_blocks_12_attn2_to_q": "blocks.12.cross_attn.q",
        "transformer.condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
        "transformer.blocks.5.norm2": "blocks.5.norm3",
        "lora_unet_blocks_5_audio_cross_attn_kv_linear": "blocks.5.audio_cross_attn.kv_linear",
        "diffusion_model.blocks.5.modulation": "blocks.5.modulation",
        "lora_unet_multitalk_audio_proj_proj1": "audio_proj.proj1",
        "lora_unet_blocks_3_audio_cross_attn_wrapper_audio_cross_attn_k":
            "blocks.3.audio_cross_attn_wrapper.audio_cross_attn.k",
    }
    for lora_name, module in spot_checks.items():
        assert names.resolve(lora_name) == module, lora_name
    assert names.target("blocks.5.modulation", "weight") == "blocks.5.modulation"
    assert names.target("blocks.5.norm_x", "bias") == "blocks.5.norm_x.bias"
    assert math.prod(shapes["blocks.5.audio_cross_attn.kv_linear.weight"]) == 10240 * 768


# ---- nodes -----------------------------------------------------------------------------------------------

@pytest.fixture
def models_dir(tmp_path, use_models_root):
    use_models_root(tmp_path / "models")
    return tmp_path / "models"


def test_lora_nodes_chain_into_the_loader(models_dir, rng):
    from wantalk.nodes_lora import WanTalkLoraSelect
    from wantalk.nodes_model_loading import WanTalkModelLoader
    _, sd = tiny_wan(TINY_I2V, rng)
    save_state_dict(sd, str(models_dir / "diffusion_models" / "wan.safetensors"))
    (models_dir / "loras").mkdir()
    first, e1 = make_lora(models_dir / "loras" / "distill.safetensors", sd, "down_up", rng)
    second, e2 = make_lora(models_dir / "loras" / "style.safetensors", sd, "diffusers", rng)
    assert {"distill.safetensors", "style.safetensors"} <= set(WanTalkLoraSelect.INPUT_TYPES()["required"]["lora"][0])
    (chain,) = WanTalkLoraSelect().select("distill.safetensors", 0.5)
    (chain,) = WanTalkLoraSelect().select("style.safetensors", 1.0, prev_lora=chain)
    assert chain == ((first, 0.5), (second, 1.0))
    loader = WanTalkModelLoader()
    model, _ = loader.load("wan.safetensors", "fp32", "disabled", "auto", "offload_device", lora=chain)
    assert_merged(model, sd, [e1, e2], [0.5, 1.0])
    runtime, _ = loader.load("wan.safetensors", "fp32", "disabled", "auto", "offload_device", lora=chain,
                             lora_mode="unmerged")
    assert runtime.unmerged_loras.strengths == [0.5, 1.0]
    again, _ = loader.load("wan.safetensors", "fp32", "disabled", "auto", "offload_device",
                           lora=((first, 0.25), (second, 1.0)), lora_mode="unmerged")
    assert again is runtime and runtime.unmerged_loras.strengths == [0.25, 1.0]  # no reload for a new strength


def test_lora_node_errors_name_the_input(models_dir, rng):
    from wantalk.nodes_lora import WanTalkLoraSelect
    from wantalk.nodes_model_loading import WanTalkModelLoader
    _, sd = tiny_wan(TINY_I2V, rng)
    save_state_dict(sd, str(models_dir / "diffusion_models" / "wan.safetensors"))
    save_state_dict(sd, str(models_dir / "loras" / "not_a_lora.safetensors"))
    with pytest.raises(ValueError, match=r"\[wantalk WanTalk LoRA\] input 'lora'.*no LoRA keys"):
        WanTalkLoraSelect().select("not_a_lora.safetensors", 1.0)
    lora, _ = make_lora(models_dir / "loras" / "l.safetensors", sd, "peft", rng)
    with pytest.raises(ValueError, match=r"input 'lora_mode'.*fp8_e4m3fn_scaled.*'merge'"):
        WanTalkModelLoader().load("wan.safetensors", "bf16", "fp8_e4m3fn_scaled", "auto", "offload_device",
                                  lora=((lora, 1.0),), lora_mode="unmerged")
    small, _ = tiny_wan(TINY_I2V.with_(dim=128, ffn_dim=256, num_heads=1), rng)
    other, _ = make_lora(models_dir / "loras" / "small.safetensors", small.state_dict(), "peft", rng)
    with pytest.raises(ValueError, match=r"input 'lora'.*different model"):
        WanTalkModelLoader().load("wan.safetensors", "bf16", "disabled", "auto", "offload_device",
                                  lora=((other, 1.0),))


def test_unmerged_loras_stream_with_block_swap(tmp_path, base, rng):
    from wantalk.wanvideo.block_swap import configure_block_swap

    class NoPinning:
        def pin(self, arena):
            return False

        def unpin(self, arena):
            pass

    path, sd = base
    low_rank, _ = make_lora(tmp_path / "low_rank.safetensors", sd, "peft", rng, deltas={})
    with_norms, _ = make_lora(tmp_path / "with_norms.safetensors", sd, "kohya", rng)
    loras = [(low_rank, 1.0), (with_norms, 0.7)]
    args = forward_inputs(rng)
    swapped, plain = (load_wan_model(path, base_dtype=torch.float32) for _ in range(2))
    runtime, reference = attach_unmerged_loras(swapped, loras), attach_unmerged_loras(plain, loras)
    configure_block_swap(swapped, 1, device="cpu", pinner=NoPinning())
    for strength in (1.0, -0.6):  # the low-rank-only LoRA's strength changes under block swap
        runtime.set_strength(0, strength)
        reference.set_strength(0, strength)
        assert torch.equal(swapped.forward_batched(*args), plain.forward_batched(*args)), strength
    with pytest.raises(LoraError, match="block swap"):
        runtime.set_strength(1, 0.2)
