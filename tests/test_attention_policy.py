"""The attention policy as one value carried by the forward, and FlashAttention-4's place in the dispatch (its
contract rows with a stand-in kernel, its absence, its run-time refusal), on CPU."""
import logging
from types import SimpleNamespace

import pytest
import torch

from test_attention import TOL, reference, rel_err, stand_in
from tiny_models import TINY_I2V, tiny_wan
from wantalk.wanvideo.modules import attention as dispatch
from wantalk.wanvideo.modules import attention_kernels as kernels
from wantalk.wanvideo.modules.attention import (AUTO, AttentionPolicy, attention, attention_policy, policy_of,
                                                select_kernel, use_attention_policy)
from wantalk.wanvideo.modules.attention_kernels import CONTRACTS, Kernel, on_cpu, stand_in_kernels

FA4 = CONTRACTS["flash_attn_4"]


# ---------------------------------------------------------------------------------------------------------------
# The policy value
# ---------------------------------------------------------------------------------------------------------------

def test_policy_is_validated_once_and_knows_what_is_exact():
    with pytest.raises(ValueError, match="unknown attention mode 'xformers'"):
        AttentionPolicy("xformers")
    with pytest.raises(ValueError, match="unknown attention mode"):
        policy_of("xformers")
    assert policy_of("int8_triton") is policy_of("int8_triton") and policy_of(AUTO) is AUTO
    assert policy_of("int8_triton").quantized and policy_of("int8_triton").exact() == AUTO
    assert not policy_of("flash_attn_4").quantized and policy_of("sdpa_math").exact() == policy_of("sdpa_math")


def test_policy_context_nests_and_restores():
    assert attention_policy() == AUTO
    with use_attention_policy("sdpa_math"):
        assert attention_policy().mode == "sdpa_math"
        with use_attention_policy(AttentionPolicy("int8_triton")):
            assert attention_policy().mode == "int8_triton"
        assert attention_policy().mode == "sdpa_math"
    assert attention_policy() == AUTO


def test_explicit_policy_beats_the_running_one(rng):
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng) for n in (5, 7, 7))
    with use_attention_policy("sdpa_math"):
        assert select_kernel(q, k, v) == "sdpa_math"
        assert select_kernel(q, k, v, policy="auto") == "sdpa_native"


def recording_math():
    """A stand-in for `sdpa_math` (the CPU chain's last kernel) that counts its calls."""
    calls = []

    def run(q, k, v, *, scale, mask):
        calls.append(q.shape)
        return kernels.KERNELS["sdpa_native"].run(q, k, v, scale=scale, mask=mask)
    return Kernel("sdpa_math", CONTRACTS["sdpa_math"], run), calls


def test_the_forward_carries_the_policy_to_every_attention_call():
    """No module holds a mode: the model's policy (or the forward's argument) reaches every attention call, and
    the forward leaves the caller's policy as it was."""
    g = torch.Generator().manual_seed(0)
    model, _ = tiny_wan(generator=g)
    inputs = (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([500.0]),
              torch.randn(1, 7, TINY_I2V.text_dim, generator=g), torch.randn(1, 257, TINY_I2V.clip_dim, generator=g),
              torch.randn(1, TINY_I2V.in_dim - 16, 2, 8, 8, generator=g))
    assert not any(hasattr(m, "attention_mode") for m in model.modules() if m is not model)
    fake, calls = recording_math()
    with stand_in_kernels(fake), torch.no_grad():
        exact = model.forward_batched(*inputs)
        assert calls == []                                   # auto on CPU: sdpa_native
        pinned = model.forward_batched(*inputs, attention_policy="sdpa_math")
        per_forward = len(calls)
        assert per_forward >= 2 * len(model.blocks)          # self- and cross-attention of every block
        model.set_attention_mode("sdpa_math")
        assert model.attention_mode == "sdpa_math"
        model.forward_batched(*inputs)
        assert len(calls) == 2 * per_forward
        assert attention_policy() == AUTO
    assert rel_err(pinned, exact.double()) < 1e-5


def test_exact_sites_stay_exact_under_a_quantized_policy(rng):
    """The two-speaker reference map and Whisper ask for `attention_policy().exact()`: int8_triton becomes auto."""
    from wantalk.multitalk.audio_attention import reference_attention_map
    q, k = (torch.randn(1, 12, 4, 64, generator=rng) for _ in range(2))
    masks = torch.zeros(3, 6)
    masks[0, :2], masks[1, 2:4], masks[2, 4:] = 1, 1, 1
    seen = []
    real = dispatch._route

    def spy(q, k, v, mode, *rest):
        seen.append(mode)
        return real(q, k, v, mode, *rest)
    with use_attention_policy("int8_triton"):
        dispatch._route = spy
        try:
            amap = reference_attention_map(q, k, 6, masks, torch.float32)
        finally:
            dispatch._route = real
    assert seen == ["auto"] and amap.shape == (1, 3, 12) and amap.isfinite().all()


# ---------------------------------------------------------------------------------------------------------------
# FlashAttention-4 in the dispatch (stand-in kernels with its real contract; the sm90 chain on CPU)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def sm90_chain(monkeypatch):
    """The sm90 exact chain, made runnable on CPU (the real CPU chain has no FA4 or cuDNN)."""
    monkeypatch.setattr(dispatch, "exact_chain", lambda device_type, capability:
                        ("flash_attn_4", "sdpa_cudnn", "sdpa_native", "sdpa_math"))


def fa4_stand_ins():
    fa4, fa4_calls = stand_in("flash_attn_4", FA4)
    cudnn, cudnn_calls = stand_in("sdpa_cudnn", CONTRACTS["sdpa_cudnn"])
    return (fa4, cudnn), fa4_calls, cudnn_calls


def test_fa4_contract_rows():
    assert FA4.layout == "NHD" and FA4.dtypes == (torch.float16, torch.bfloat16) and FA4.exact
    assert FA4.feed_head_dim(128) == 128 and FA4.feed_head_dim(64) == 64
    assert FA4.feed_head_dim(256) is None and FA4.feed_head_dim(100) is None   # 128 max, multiples of 8
    assert FA4.gqa and not FA4.masks and FA4.custom_scale and FA4.align_bytes == 16
    assert FA4.capabilities == ((9, 0), (10, 0), (10, 3))
    call = kernels.Call(device_type="cuda", capability=(8, 9), dtype=torch.bfloat16, head_dim=128, q_heads=40,
                        kv_heads=40, kv_lens=(32760,), has_mask=False, default_scale=True, largest_numel=10)
    assert "capability" in FA4.rejection(call)
    assert FA4.rejection(kernels.dataclasses.replace(call, capability=(9, 0))) is None
    assert "dtype" in FA4.rejection(kernels.dataclasses.replace(call, capability=(9, 0), dtype=torch.float32))


def test_auto_uses_fa4_for_long_keys_and_cudnn_for_short(sm90_chain, rng):
    long_n, short_n = FA4.auto_from_kv_len, 257
    q = torch.randn(1, 8, 2, 64, generator=rng).half()
    kv = [torch.randn(1, long_n, 2, 64, generator=rng).half() for _ in range(2)]
    stand_ins, fa4_calls, cudnn_calls = fa4_stand_ins()
    with stand_in_kernels(*stand_ins):
        long_out = attention(q, *kv)
        short_out = attention(q, kv[0][:, :short_n], kv[1][:, :short_n])
        pinned = attention(q, kv[0][:, :short_n], kv[1][:, :short_n], policy="flash_attn_4")
        masked = select_kernel(q, *kv, attn_mask=torch.ones(8, long_n, dtype=torch.bool))
    assert [c["kv_len"] for c in fa4_calls] == [long_n, short_n]   # auto: long only; the pinned mode: any
    assert [c["kv_len"] for c in cudnn_calls] == [short_n]
    assert masked == "sdpa_native"
    for out, n in ((long_out, long_n), (short_out, short_n), (pinned, short_n)):
        assert rel_err(out, reference(q, kv[0][:, :n], kv[1][:, :n])) < TOL[torch.float16]


def test_fa4_gets_aligned_views_or_one_copy(sm90_chain, rng):
    """Fused q/k/v views go straight in; a misaligned base pointer is copied once (not twice: FA4 would clone it
    itself otherwise)."""
    n = FA4.auto_from_kv_len
    fused = torch.randn(1, n, 3 * 2 * 64, generator=rng).half().unflatten(-1, (3, 2, 64)).unbind(2)
    misaligned = torch.randn(n * 2 * 64 + 1, generator=rng).half()[1:].view(1, n, 2, 64)
    stand_ins, fa4_calls, _ = fa4_stand_ins()
    with stand_in_kernels(*stand_ins):
        with dispatch.count_copies() as copies:
            attention(*fused)
        assert copies.count == 0
        with dispatch.count_copies() as copies:
            out = attention(misaligned, fused[1], fused[2])
        assert copies.count == 1
    assert len(fa4_calls) == 2
    assert rel_err(out, reference(misaligned, fused[1], fused[2])) < TOL[torch.float16]


def test_missing_fa4_is_a_logged_fallback(sm90_chain, monkeypatch, rng, caplog):
    """The real FA4 kernel, its package absent: auto logs it once (info) and cuDNN serves."""
    dispatch._noted.clear()
    dispatch._unavailable.clear()
    monkeypatch.setattr(kernels, "_import", lambda name: None)
    fa4 = Kernel("flash_attn_4", on_cpu(FA4), kernels._flash_attn_4, kernels._fa4_unavailable)
    cudnn, cudnn_calls = stand_in("sdpa_cudnn", CONTRACTS["sdpa_cudnn"])
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng).half() for n in (8, FA4.auto_from_kv_len, FA4.auto_from_kv_len))
    with stand_in_kernels(fa4, cudnn), caplog.at_level(logging.INFO, logger="wantalk"):
        for _ in range(3):
            out = attention(q, k, v)
    dispatch._unavailable.clear()
    assert len(cudnn_calls) == 3 and rel_err(out, reference(q, k, v)) < TOL[torch.float16]
    lines = [r.getMessage() for r in caplog.records if "flash-attn-4 not installed" in r.getMessage()]
    assert len(lines) == 1 and "fa4" in lines[0]


def fake_fa4_package(behaviour):
    """A stand-in for `flash_attn.cute`: `behaviour(q, k, v)` decides what flash_attn_func does."""
    def flash_attn_func(q, k, v, softmax_scale, causal):
        assert not causal
        return behaviour(q, k, v, softmax_scale)
    return SimpleNamespace(flash_attn_func=flash_attn_func)


def nhd_attention(q, k, v, scale):
    return reference(q, k, v, scale).to(q.dtype), None   # FA4 may return (out, lse)


def test_fa4_refusing_or_failing_to_compile_is_unsupported(monkeypatch, rng):
    """The first call of a shape family is FA4's JIT compile: any failure there is a refusal
    (AttentionUnsupported); once a family ran, later failures are bugs and surface."""
    monkeypatch.setattr(kernels, "_fa4_compiled", {})
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng).half() for n in (8, 16, 16))

    def refuses(*args):
        raise AssertionError("FP8 is only supported on SM100 (compute capability 10.x) for FA4 CuTe.")
    monkeypatch.setattr(kernels, "_fa4_module", lambda: fake_fa4_package(refuses))
    with pytest.raises(kernels.AttentionUnsupported, match="SM100"):
        kernels._flash_attn_4(q, k, v, scale=0.125, mask=None)
    monkeypatch.setattr(kernels, "_fa4_module", lambda: fake_fa4_package(nhd_attention))
    out = kernels._flash_attn_4(q, k, v, scale=0.125, mask=None)
    assert rel_err(out, reference(q, k, v, 0.125)) < TOL[torch.float16]
    assert set(kernels._fa4_compiled) == {(torch.float16, 64, 1, q.device)}

    def broken(*args):
        raise RuntimeError("illegal memory access")
    monkeypatch.setattr(kernels, "_fa4_module", lambda: fake_fa4_package(broken))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        kernels._flash_attn_4(q, k, v, scale=0.125, mask=None)


def test_fa4_refusal_falls_back_in_the_dispatch(sm90_chain, monkeypatch, rng, caplog):
    dispatch._noted.clear()
    monkeypatch.setattr(kernels, "_fa4_compiled", {})

    def refuses(*args):
        raise AssertionError("head dim not supported")
    monkeypatch.setattr(kernels, "_fa4_module", lambda: fake_fa4_package(refuses))
    fa4 = Kernel("flash_attn_4", on_cpu(FA4), kernels._flash_attn_4)
    cudnn, cudnn_calls = stand_in("sdpa_cudnn", CONTRACTS["sdpa_cudnn"])
    n = FA4.auto_from_kv_len
    q, k, v = (torch.randn(1, m, 2, 64, generator=rng).half() for m in (8, n, n))
    with stand_in_kernels(fa4, cudnn), caplog.at_level(logging.WARNING, logger="wantalk"):
        outs = [attention(q, k, v) for _ in range(2)]
        assert select_kernel(q, k, v) == "sdpa_cudnn"      # remembered for this signature
    assert len(cudnn_calls) == 2
    assert all(rel_err(out, reference(q, k, v)) < TOL[torch.float16] for out in outs)
    assert sum("head dim not supported" in r.getMessage() for r in caplog.records) == 1


def test_unusable_packages_are_not_imported_for_calls_their_contract_refuses(sm90_chain, rng):
    """The contract is checked before availability: a kernel that could not serve the call anyway never has its
    (possibly slow, JIT-compiling) package imported."""
    asked = []

    def unavailable():
        asked.append(1)
        return "not installed"
    fa4 = Kernel("flash_attn_4", on_cpu(FA4), kernels._flash_attn_4, unavailable)
    cudnn, _ = stand_in("sdpa_cudnn", CONTRACTS["sdpa_cudnn"])
    q, k, v = (torch.randn(1, n, 2, 64, generator=rng) for n in (8, 16, 16))   # float32: FA4's contract refuses
    with stand_in_kernels(fa4, cudnn):
        dispatch._unavailable.clear()
        assert select_kernel(q, k, v) == "sdpa_native"
    assert asked == []


def test_cudnn_is_unavailable_on_rocm(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert "cuDNN" in kernels._cudnn_unavailable()
