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


# ---- what the allocator reserves beyond the tensors (issue 15, item 9) ----------------------------------------

RUN_33 = mp.RunSettings(tokens=mp.video_tokens(33, 480, 832))
FIXED = mp.Allocator("native", expandable=False)
ASYNC = mp.Allocator("cudaMallocAsync", expandable=False)


def test_fixed_segments_reserve_covers_the_measured_fragmentation(sizes):
    """The accepted-then-OOM case: fp4, 33 frames, 12e9-byte cap; the allocator held 1.12 GiB in split segments
    when a 372 MiB FFN activation was requested. The plan must reserve at least that beside its tensors."""
    cfg, sz = sizes["fp4"]
    largest = mp.largest_transient(cfg, RUN_33, sz.compute_bytes, sz.dequant_temp)
    assert abs(largest / mp.MIB - 372) < 8  # the request in the error message
    n = mp.choose_blocks_to_swap(cfg, sz, RUN_33, 12 * GB, allocator=FIXED)
    plan = mp.plan_memory(cfg, sz, RUN_33, blocks_to_swap=n, allocator=FIXED)
    assert plan.reserve >= 1.12 * mp.GIB
    tensors = plan.sampling_peak - plan.reserve
    assert tensors + 1.12 * mp.GIB <= 12 * GB  # the stranded bytes and every tensor fit under the cap
    assert "allocator reserve" in plan.summary() and "fixed segments" in plan.summary()


def test_expandable_and_async_reserves_are_small_and_swap_fewer_blocks(sizes):
    cfg, sz = sizes["fp4"]
    largest = mp.largest_transient(cfg, RUN_480P, sz.compute_bytes, sz.dequant_temp)
    assert mp.Allocator().overhead(largest) == mp.EXPANDABLE_GAPS * mp.EXPANDABLE_PAGE < FIXED.overhead(largest)
    assert ASYNC.overhead(largest) < mp.Allocator().overhead(largest)
    counts = {a.describe(): mp.choose_blocks_to_swap(cfg, sz, RUN_480P, 12 * GB, allocator=a)
              for a in (ASYNC, mp.Allocator(), FIXED)}
    assert list(counts.values()) == sorted(counts.values()) and counts["cudaMallocAsync"] < counts[FIXED.describe()]


def test_refusal_under_fixed_segments_says_to_turn_on_expandable_segments(sizes):
    cfg, sz = sizes["fp4"]
    with pytest.raises(mp.MemoryPlanError) as info:
        mp.choose_blocks_to_swap(cfg, sz, mp.RunSettings(mp.video_tokens(161, 720, 1280)), 12 * GB, allocator=FIXED)
    text = str(info.value)
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in text and "fragmentation" in text
    with pytest.raises(mp.MemoryPlanError) as info:
        mp.choose_blocks_to_swap(cfg, sz, mp.RunSettings(mp.video_tokens(161, 720, 1280)), 12 * GB)
    assert "expandable_segments" not in str(info.value)  # already on: nothing to gain there


class FakeCuda:
    """torch.cuda's allocator queries with set numbers."""

    def __init__(self, monkeypatch, backend="native", free=50 * GB, total=80 * GB, allocated=10 * GB,
                 reserved=12 * GB, fraction=1.0, settings_error=None):
        self.calls, self.emptied = [], 0
        for name, value in {"is_available": lambda: True, "get_allocator_backend": lambda: backend,
                            "mem_get_info": lambda d: (free, total), "memory_allocated": lambda d: allocated,
                            "memory_reserved": lambda d: reserved, "current_device": lambda: 0,
                            "get_per_process_memory_fraction": lambda d: fraction,
                            "empty_cache": self.empty}.items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)

        def record(text):
            if settings_error:
                raise settings_error
            self.calls.append(text)
        monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", record, raising=False)
        monkeypatch.setattr(mp, "_expandable_turned_on", False)
        for var in mp._ALLOC_CONF_VARS:
            monkeypatch.delenv(var, raising=False)

    def empty(self):
        self.emptied += 1


def test_expandable_segments_turned_on_once_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(mp.sys, "platform", "linux")
    fake = FakeCuda(monkeypatch)
    assert mp.use_expandable_segments() == mp.Allocator("native", True)
    assert mp.use_expandable_segments().expandable and fake.calls == ["expandable_segments:True"]
    monkeypatch.setattr(mp, "_expandable_turned_on", False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512,expandable_segments:False")
    assert mp.use_expandable_segments() == FIXED and len(fake.calls) == 1  # an explicit choice is kept
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert mp.use_expandable_segments().expandable and len(fake.calls) == 1


def test_expandable_segments_where_the_allocator_has_none(monkeypatch, caplog):
    monkeypatch.setattr(mp.sys, "platform", "linux")
    fake = FakeCuda(monkeypatch, backend="cudaMallocAsync")
    assert mp.use_expandable_segments() == ASYNC and fake.calls == []  # ComfyUI's default allocator
    fake = FakeCuda(monkeypatch, settings_error=RuntimeError("unknown allocator setting"))
    assert mp.use_expandable_segments() == FIXED
    assert "expandable_segments:True" in caplog.text  # the warning says what to set
    monkeypatch.setattr(mp.sys, "platform", "win32")
    fake = FakeCuda(monkeypatch)
    assert mp.use_expandable_segments() == FIXED and fake.calls == []


def test_available_vram_counts_what_the_allocator_can_still_reserve(monkeypatch):
    fake = FakeCuda(monkeypatch, free=50 * GB, total=80 * GB, allocated=10 * GB, reserved=12 * GB)
    assert mp.available_vram("cuda") == 50 * GB  # native: the 2 GB of split segments are not usable
    assert fake.emptied == 1  # unused cached segments released first
    FakeCuda(monkeypatch, fraction=0.25)
    assert mp.available_vram("cuda:0") == 20 * GB - 12 * GB  # the native cap is checked against reserved bytes
    FakeCuda(monkeypatch, backend="cudaMallocAsync", fraction=0.25)
    assert mp.available_vram("cuda") == 20 * GB - 10 * GB  # cudaMallocAsync checks bytes in use
    FakeCuda(monkeypatch, backend="cudaMallocAsync")
    assert mp.available_vram("cuda") == 52 * GB  # its pool's cached bytes are reused


@pytest.mark.parametrize("triton_stages", [True, False])
def test_resident_cuda_model_is_planned_with_the_stages_that_will_run(monkeypatch, triton_stages):
    """A model resident on CUDA is planned with the torch (unfused) stages' memory where Triton cannot serve it, as a
    block-swapped one is: planning it as fused would under-count its activations."""
    from types import SimpleNamespace
    planned = []
    monkeypatch.setattr(mp, "fused_stages", lambda device: triton_stages and device.type == "cuda")
    monkeypatch.setattr(mp.ModelBytes, "of", staticmethod(lambda model: "sizes"))
    monkeypatch.setattr(mp, "use_expandable_segments", lambda: "allocator")
    monkeypatch.setattr(mp, "available_vram", lambda device: 10 ** 12)
    monkeypatch.setattr(mp, "plan_memory", lambda cfg, sizes, run, **kw: planned.append(run) or
                        SimpleNamespace(peak=1, weights=0))
    model = SimpleNamespace(cfg="cfg", block_runner=None,
                            parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda"))]))
    mp.check_before_sampling(model, RUN_480P)
    assert [run.fused for run in planned] == [triton_stages]
