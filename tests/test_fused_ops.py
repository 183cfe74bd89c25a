"""Fused block stages: the CUDA (Triton) versions equal the plain-torch definitions; the CPU path IS the definition."""
import pytest
import torch

from wantalk.wanvideo.modules.fused_ops import (layer_norm_modulate, layer_norm_modulate_reference, residual_add,
                                                residual_add_reference, rms_norm_reference, rms_norm_rope,
                                                rope_reference)
from wantalk.wanvideo.modules.model import rope_cos_sin

from test_fused_block_stages import triton_on_cpu  # noqa: F401 (fixture)


def test_cpu_path_is_the_reference(rng):
    x = torch.randn(2, 24, 256, generator=rng)
    scale, shift = torch.randn(2, 256, generator=rng), torch.randn(2, 256, generator=rng)
    assert torch.equal(layer_norm_modulate(x, 1e-6, scale=scale, shift=shift, out_dtype=torch.bfloat16),
                       layer_norm_modulate_reference(x, 1e-6, scale=scale, shift=shift).bfloat16())
    w = 1 + 0.1 * torch.randn(256, generator=rng)
    rope = rope_cos_sin((2, 3, 4), 128, "cpu")
    out = rms_norm_rope(x, w, 1e-6, 2, torch.float32, rope)
    ref = rope_reference(rms_norm_reference(x, w, 1e-6).view(2, 24, 2, 128), *rope)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_stages_match_reference(dtype):
    dev = "cuda"
    b, grid, heads, d = 2, (3, 30, 52), 40, 128
    c = heads * d
    l = grid[0] * grid[1] * grid[2]
    x32 = torch.randn(b, l, c, device=dev) * 3 + 0.5
    scale, shift = torch.randn(b, c, device=dev) * 0.1, torch.randn(b, c, device=dev) * 0.1
    w, bias = 1 + 0.1 * torch.randn(c, device=dev), 0.1 * torch.randn(c, device=dev)
    for kw in ({"scale": scale, "shift": shift}, {"weight": w, "bias": bias}):
        out = layer_norm_modulate(x32, 1e-6, out_dtype=dtype, **kw)
        ref = layer_norm_modulate_reference(x32, 1e-6, **kw).to(dtype)
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-5 if dtype == torch.float32 \
            else ((out.float() - ref.float()).abs() > 0).float().mean().item() < 0.02
    xq = torch.randn(b, l, c, device=dev).to(dtype)
    wq = (1 + 0.1 * torch.randn(c, device=dev)).to(dtype)
    rope = rope_cos_sin(grid, d, dev)
    for r in (rope, None):
        out = rms_norm_rope(xq, wq, 1e-6, heads, dtype, r)
        y = rms_norm_reference(xq, wq, 1e-6).view(b, l, heads, d)
        ref = (rope_reference(y, *r) if r is not None else y).to(dtype)
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < (1e-6 if dtype == torch.float32 else 4e-3), rel


@pytest.mark.gpu
def test_triton_residual_add_matches_reference():
    x = torch.randn(2, 3000, 5120, device="cuda")
    y = torch.randn(2, 3000, 5120, device="cuda").bfloat16()
    g = torch.randn(2, 5120, device="cuda")
    for gate in (g, None):
        out, ref = residual_add(x, y, gate), residual_add_reference(x, y, gate)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("c, heads", [(2560, 20), (1536, 12), (384, 3)])
def test_rms_rope_kernel_in_chunks_matches_reference(triton_on_cpu, rng, dtype, c, heads):
    """The chunked kernel (several chunks, a masked last chunk at 1536 and 384) on the Triton interpreter, with and
    without RoPE, against the torch definition; B=2 so the RoPE table is indexed per token, not per row. (bf16 runs on
    the GPU test above: the interpreter multiplies two bf16 blocks wrongly.)"""
    grid = (2, 3, 5)
    b, l = 2, grid[0] * grid[1] * grid[2]
    x = (torch.randn(b, l, c, generator=rng) * 3 + torch.randn(c, generator=rng)).to(dtype)
    w = (1 + 0.1 * torch.randn(c, generator=rng)).to(dtype)
    rope = rope_cos_sin(grid, c // heads, "cpu")
    for r in (rope, None):
        out = rms_norm_rope(x, w, 1e-6, heads, dtype, r)
        y = rms_norm_reference(x, w, 1e-6).view(b, l, heads, c // heads)
        ref = (rope_reference(y, *r) if r is not None else y).to(dtype)
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < (1e-6 if dtype == torch.float32 else 4e-3), rel
        if dtype == torch.float16:   # rounding-level differences only (fp32 sum order), on few elements
            assert ((out.float() - ref.float()).abs() > 0).float().mean().item() < 0.02
