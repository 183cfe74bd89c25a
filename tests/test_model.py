"""Wan 2.1 DiT: key names at real size, reference values of docs/NOTES.md §1.4, call conventions."""
import math
import os
import re

import pytest
import torch

from wantalk.wanvideo.modules.fused_ops import rope_reference as apply_rope
from wantalk.wanvideo.modules.model import (WAN_I2V_14B, WAN_T2V_1_3B, WanModel, rope_cos_sin,
                                            rope_inv_freqs, rope_params, sinusoidal_embedding_1d)
from tiny_models import TINY_I2V, TINY_T2V, tiny_wan


def parse_keys(path):
    out = {}
    for line in open(path):
        key, shape = line.rstrip("\n").split("\t")[:2]
        out[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return out


def meta_shapes(cfg, **kw):
    with torch.device("meta"):
        model = WanModel(cfg, device="meta", **kw)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg,listing", [(WAN_I2V_14B, "keys_i2v14b.txt"), (WAN_T2V_1_3B, "keys_t2v1.3b.txt")])
def test_real_size_keys_and_shapes(cfg, listing, keys_dir):
    assert meta_shapes(cfg) == parse_keys(os.path.join(keys_dir, listing))


def test_sinusoidal_embedding_reference_values():
    e = sinusoidal_embedding_1d(256, torch.tensor([999.0, 0.0], dtype=torch.float64))
    assert e.dtype == torch.float32
    expect = [0.99964985298, 0.96378247859, -0.39899175772, 0.70482049565]
    assert torch.allclose(e[0, :4].double(), torch.tensor(expect, dtype=torch.float64), atol=1e-7)
    assert abs(e[0, 127].item() - 0.994243164144) < 1e-7
    expect2 = [-0.02646075274, -0.26668958354, -0.91695451211, 0.70938569827]
    assert torch.allclose(e[0, 128:132].double(), torch.tensor(expect2, dtype=torch.float64), atol=1e-7)
    assert abs(e[0, 255].item() - 1.071472377270e-01) < 1e-7
    assert torch.all(e[1, :128] == 1) and torch.all(e[1, 128:] == 0)


def test_rope_frequencies():
    t, h, w = rope_inv_freqs(128)
    assert (len(t), len(h), len(w)) == (22, 21, 21)
    assert torch.allclose(t[:4], torch.tensor([1, 0.657933224658, 0.432876128108, 0.284803586844], dtype=torch.float64))
    assert abs(t[21].item() - 1.519911083e-4) < 1e-12
    assert torch.allclose(h[:4], torch.tensor([1, 0.644946677104, 0.415956216307, 0.268269579528], dtype=torch.float64))
    assert abs(w[20].item() - 1.550515780e-4) < 1e-12
    table = rope_params(1024, 44)
    assert table.dtype == torch.complex128 and table.shape == (1024, 22)
    assert abs(torch.angle(table[5, 0]).item() - (-1.2831853071795865)) < 1e-12


def test_rope_toy_reference():
    x = (torch.arange(24 * 128, dtype=torch.float32) / 1000).reshape(1, 24, 1, 128)
    y = apply_rope(x, *rope_cos_sin((2, 3, 4), 128, "cpu"))
    assert abs(y.sum().item() - 4401.364258) < 2e-3
    expect = torch.tensor([-0.88748, 4.06848, 0.52901, 4.13327, 1.43903, 3.91363])
    assert torch.allclose(y[0, 23, 0, :6], expect, atol=1e-4)


def test_rope_leaves_padding_tokens_untouched(rng):
    x = torch.randn(2, 30, 3, 128, generator=rng)
    y = apply_rope(x, *rope_cos_sin((2, 3, 4), 128, "cpu"))
    assert torch.equal(y[:, 24:], x[:, 24:])
    # a rotation preserves the norm of each pair
    assert torch.allclose(y[:, :24].norm(dim=-1), x[:, :24].norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("cfg", [TINY_I2V, TINY_T2V], ids=["i2v", "t2v"])
def test_official_convention_equals_batched_interface(cfg, rng):
    model, _ = tiny_wan(cfg, rng)
    sizes = [(3, 6, 8), (2, 4, 6)]
    xs = [torch.randn(16, *s, generator=rng) for s in sizes]
    ys = [torch.randn(20, *s, generator=rng) for s in sizes] if cfg.image_branch else None
    ctx = [torch.randn(n, cfg.text_dim, generator=rng) for n in (5, 11)]
    clip = torch.randn(2, 257, cfg.clip_dim, generator=rng) if cfg.image_branch else None
    t = torch.tensor([900.0, 250.0])
    seq_len = max(math.prod(s) // 4 for s in sizes) + 5  # padded, as the official pipeline does
    outs = model(xs, t, ctx, seq_len, clip_fea=clip, y=ys)
    for i in range(2):
        ref = model.forward_batched(xs[i][None], t[i:i + 1], ctx[i][None], None if clip is None else clip[i:i + 1],
                                    None if ys is None else ys[i][None])[0]
        assert outs[i].shape == (16, *sizes[i])
        assert torch.allclose(outs[i], ref, rtol=1e-5, atol=1e-5)


def test_batch_items_are_independent(rng):
    model, _ = tiny_wan(TINY_I2V, rng)
    x = torch.randn(2, 16, 2, 4, 4, generator=rng)
    y = torch.randn(2, 20, 2, 4, 4, generator=rng)
    ctx = torch.randn(2, 7, 64, generator=rng)
    clip = torch.randn(2, 257, 32, generator=rng)
    t = torch.tensor([700.0, 100.0])
    both = model.forward_batched(x, t, ctx, clip, y)
    for i in range(2):
        one = model.forward_batched(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], clip[i:i + 1], y[i:i + 1])
        assert torch.allclose(both[i], one[0], rtol=1e-5, atol=1e-5)


def test_text_is_padded_to_512_rows_before_embedding(rng):
    """Padding rows go through text_embedding (non-zero bias) and are attended: the length matters."""
    model, _ = tiny_wan(TINY_T2V, rng)
    ctx = torch.randn(1, 6, 64, generator=rng)
    emb = model.embed_text(ctx)
    assert emb.shape == (1, 512, 256)
    pad_row = model.text_embedding(torch.zeros(64))
    assert torch.allclose(emb[0, 100], pad_row, atol=1e-6) and pad_row.abs().sum() > 0


def test_i2v_requires_conditioning_channels(rng):
    model, _ = tiny_wan(TINY_I2V, rng)
    with pytest.raises(ValueError, match="input channels"):
        model.forward_batched(torch.randn(1, 16, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, 64))
