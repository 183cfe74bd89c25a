"""Peak-VRAM planning at real size (14B + InfiniteTalk built on the meta device): block sizes per quantization,
the automatic number of swapped blocks for 12/16/24 GB cards, and the refusal message when nothing fits."""
import os
import re

import pytest
import torch

from wantalk.wanvideo import memory_plan as mp
from wantalk.wanvideo.loader import build_model, infer_config
from wantalk.wanvideo.quantization import DEFAULT_PARAMS_TO_KEEP, apply_policy

GB = 10**9
RUN_480P = mp.RunSettings(tokens=mp.video_tokens(81, 480, 832))


def meta_model(keys_dir, mode: str):
    shapes = {}
    for line in open(os.path.join(keys_dir, "keys_infinitetalk.txt")):
        key, shape = line.rstrip("\n").split("\t")[:2]
        shapes[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    from wantalk.multitalk.model_addon import detect_infinitetalk
    cfg = infer_config(shapes)
    addon = detect_infinitetalk(shapes, cfg)
    with torch.device("meta"):
        model = build_model(cfg.with_(audio=addon.config), addon, device="meta", dtype=torch.bfloat16)
    apply_policy(model, mode, DEFAULT_PARAMS_TO_KEEP, base_dtype=torch.bfloat16)
    return model


@pytest.fixture(scope="module")
def sizes(request):
    keys_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "keys")
    out = {}
    for mode in ("disabled", "fp8_e4m3fn_scaled", "fp4"):
        model = meta_model(keys_dir, mode)
        out[mode] = (model.cfg, mp.ModelBytes.of(model))
    return out


def test_video_tokens():
    assert mp.video_tokens(81, 480, 832) == 21 * 30 * 52 == 32760


def test_block_bytes_follow_the_stored_format(sizes):
    cfg, bf16 = sizes["disabled"]
    per_block_params = bf16.blocks[0] / 2
    assert cfg.num_layers == len(bf16.blocks) == 40
    assert 4.5e8 < per_block_params < 4.8e8  # attention (self, text, image), FFN, audio cross-attention
    fp8, fp4 = sizes["fp8_e4m3fn_scaled"][1], sizes["fp4"][1]
    assert 0.49 < fp8.blocks[0] / bf16.blocks[0] < 0.52
    assert 0.26 < fp4.blocks[0] / bf16.blocks[0] < 0.30
    assert fp4.other == fp8.other == bf16.other  # kept layers stay bf16
    assert fp4.dequant_temp == cfg.dim * cfg.ffn_dim * 2  # the FFN weight in bf16, while it runs


@pytest.mark.parametrize("mode,card_gb", [("fp4", 12), ("fp8_e4m3fn_scaled", 16), ("disabled", 24)])
def test_auto_swap_fits_the_card(sizes, mode, card_gb):
    cfg, sz = sizes[mode]
    n = mp.choose_blocks_to_swap(cfg, sz, RUN_480P, card_gb * GB)
    plan = mp.plan_memory(cfg, sz, RUN_480P, blocks_to_swap=n)
    assert 0 < n < 40 and plan.peak <= card_gb * GB
    assert mp.plan_memory(cfg, sz, RUN_480P, blocks_to_swap=n - 1).peak > card_gb * GB  # the fewest that fit
    assert plan.slots == 2 * max(sz.blocks)
    print(f"{mode} {card_gb} GB: swap {n} blocks; {plan.summary()}")


def test_more_vram_streams_fewer_blocks(sizes):
    cfg, sz = sizes["fp8_e4m3fn_scaled"]
    counts = [mp.choose_blocks_to_swap(cfg, sz, RUN_480P, gb * GB) for gb in (14, 16, 20, 24, 40)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0


def test_activations_grow_with_tokens_speakers_and_unfused_stages(sizes):
    cfg, sz = sizes["fp4"]
    base = mp.activation_bytes(cfg, RUN_480P, 2, sz.dequant_temp)
    assert 2.5 * 2**30 < base < 6 * 2**30
    half = mp.activation_bytes(cfg, mp.RunSettings(RUN_480P.tokens // 2), 2, sz.dequant_temp)
    assert half < 0.6 * base
    two = mp.activation_bytes(cfg, mp.RunSettings(RUN_480P.tokens, two_speakers=True), 2, sz.dequant_temp)
    unfused = mp.activation_bytes(cfg, mp.RunSettings(RUN_480P.tokens, fused=False), 2, sz.dequant_temp)
    assert two > base and unfused > base


def test_a_card_too_small_gets_a_plan_message(sizes):
    cfg, sz = sizes["fp8_e4m3fn_scaled"]
    with pytest.raises(mp.MemoryPlanError) as info:
        mp.choose_blocks_to_swap(cfg, sz, RUN_480P, 5 * GB)
    text = str(info.value)
    assert "5.0 GiB" not in text and "needs about" in text
    for hint in ("fp4", "smaller window", "prefetch 0"):
        assert hint in text
    fits = mp.choose_blocks_to_swap(cfg, sz, RUN_480P, 16 * GB)
    with pytest.raises(mp.MemoryPlanError, match=f"blocks_to_swap={fits} "):
        mp.plan_memory(cfg, sz, RUN_480P, blocks_to_swap=1).check(16 * GB, fits_with_swap=fits)


def test_decode_advice_names_tiling_and_release(sizes):
    cfg, sz = sizes["fp4"]
    decode = mp.DecodeSettings(81, 480, 832, tile_size=None, release_model=False)
    plan = mp.plan_memory(cfg, sz, RUN_480P, blocks_to_swap=20, decode=decode)
    tiled = mp.vae_decode_bytes(mp.DecodeSettings(81, 480, 832, tile_size=256))
    assert tiled < plan.decode
    with pytest.raises(mp.MemoryPlanError) as info:
        plan.check(plan.decode_peak - 1)
    assert "tiled VAE decode" in str(info.value) and "release_vram" in str(info.value)


def test_bad_settings():
    cfg = type("Cfg", (), {"dim": 8, "ffn_dim": 16})()
    sz = mp.ModelBytes(other=10, blocks=(5, 5), dequant_temp=0)
    with pytest.raises(ValueError, match="blocks_to_swap"):
        mp.plan_memory(cfg, sz, mp.RunSettings(4), blocks_to_swap=3)
    assert mp.available_vram("cpu") > 2**60
