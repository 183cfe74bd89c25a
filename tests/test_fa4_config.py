"""FlashAttention-4's tuned tile config (FA4_TUNED_CONFIGS) on CPU, with a stand-in package: the listed config is
used for its (capability, head dim) only, FA4 refusing it falls back to FA4's default with one warning, and the
choice made at a family's first call is kept for the process."""
import logging
from types import SimpleNamespace

import pytest
import torch

from test_attention import TOL, reference, rel_err
from wantalk.wanvideo.modules import attention_kernels as kernels

TUNED = dict(tile_mn=(192, 128), mma_pv_is_rs=True, intra_wg_overlap=False)


def nhd_attention(q, k, v, scale):
    return reference(q, k, v, scale).to(q.dtype)


class FakeFA4:
    """Stand-ins for `flash_attn.cute` (public function, FA4's default config) and `flash_attn.cute.interface`
    (the internal forward that takes a tile config); each records its calls; `refuse_tuned` makes the internal one
    fail as FA4's config asserts do."""

    def __init__(self, refuse_tuned=False, refuse_default=False):
        self.default_calls, self.tuned_configs = [], []
        self.refuse_tuned, self.refuse_default = refuse_tuned, refuse_default

    def flash_attn_func(self, q, k, v, softmax_scale, causal):
        self.default_calls.append(q.shape)
        if self.refuse_default:
            raise AssertionError("head dim not supported")
        return nhd_attention(q, k, v, softmax_scale), None

    def _flash_attn_fwd(self, q, k, v, softmax_scale, causal, **config):
        self.tuned_configs.append(config)
        if self.refuse_tuned:
            raise AssertionError("tile_m 192 not supported here")
        return nhd_attention(q, k, v, softmax_scale), None, None, None, None

    def modules(self):
        return {"flash_attn.cute": SimpleNamespace(flash_attn_func=self.flash_attn_func),
                "flash_attn.cute.interface": SimpleNamespace(_flash_attn_fwd=self._flash_attn_fwd)}


@pytest.fixture
def fa4(monkeypatch):
    """Install a fake FA4 on an 'sm90' device with a tuned config for fp16, head dim 64, one q head per k/v head;
    returns a function that makes the fake (so each test picks its refusals)."""
    monkeypatch.setattr(kernels, "_fa4_compiled", {})
    monkeypatch.setattr(kernels, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(kernels, "FA4_TUNED_CONFIGS", {((9, 0), torch.float16, 64, 1): TUNED})

    def install(**refusals):
        fake = FakeFA4(**refusals)
        monkeypatch.setattr(kernels, "_import", fake.modules().get)
        return fake
    return install


def qkv(rng, d=64, dtype=torch.float16, kv_heads=2):
    q = torch.randn(1, 8, 2, d, generator=rng).to(dtype)
    return [q, *(torch.randn(1, 16, kv_heads, d, generator=rng).to(dtype) for _ in range(2))]


def run_twice(q, k, v):
    return [kernels._flash_attn_4(q, k, v, scale=0.125, mask=None) for _ in range(2)]


def test_tuned_config_is_used_for_its_capability_and_head_dim(fa4, rng):
    fake = fa4()
    q, k, v = qkv(rng)
    outs = run_twice(q, k, v)
    assert fake.tuned_configs == [TUNED, TUNED] and fake.default_calls == []
    assert all(rel_err(out, reference(q, k, v, 0.125)) < TOL[torch.float16] for out in outs)


def test_unmeasured_cases_keep_fa4_default(fa4, monkeypatch, rng):
    """Another head dim, dtype, GQA or GPU: FA4's own config."""
    fake = fa4()
    for inputs in (qkv(rng, d=128), qkv(rng, dtype=torch.bfloat16), qkv(rng, kv_heads=1)):
        run_twice(*inputs)
    monkeypatch.setattr(kernels, "_capability", lambda device: (10, 0))
    run_twice(*qkv(rng))
    assert fake.tuned_configs == [] and len(fake.default_calls) == 8


def test_refused_tuned_config_falls_back_to_default_once(fa4, rng, caplog):
    fake = fa4(refuse_tuned=True)
    q, k, v = qkv(rng)
    with caplog.at_level(logging.WARNING, logger="wantalk"):
        outs = run_twice(q, k, v)
    assert fake.tuned_configs == [TUNED]            # tried once, at the family's first call
    assert len(fake.default_calls) == 2
    assert all(rel_err(out, reference(q, k, v, 0.125)) < TOL[torch.float16] for out in outs)
    warnings = [r.getMessage() for r in caplog.records if "refused its tuned config" in r.getMessage()]
    assert len(warnings) == 1 and "tile_m 192" in warnings[0]


def test_refusing_both_configs_is_unsupported(fa4, rng):
    fa4(refuse_tuned=True, refuse_default=True)
    with pytest.raises(kernels.AttentionUnsupported, match="head dim not supported"):
        kernels._flash_attn_4(*qkv(rng), scale=0.125, mask=None)
    assert kernels._fa4_compiled == {}
