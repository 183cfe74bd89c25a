"""The warp-specialized sm90 schedule of the 8-bit attention (wanvideo/kernels/sage_int8_ws.py) on a real Hopper GPU:
against float32 attention, and as accurate as the Triton kernel on the same 8-bit inputs.

    python -m pytest tests/test_sage_int8_ws_gpu.py -q
"""
import pytest
import torch

from wantalk.wanvideo.kernels import sage_int8, sage_int8_ws
from test_sage_int8_gpu import TOL, fp32_reference

pytestmark = pytest.mark.gpu

# (batch, query tokens, key tokens, q heads, k/v heads, head dim): Wan self-attention, short and odd key counts
# (the masked last block, one key), query counts off the 128-row tile, GQA, D 64
SHAPES = {
    "self_32760": (1, 32760, 32760, 40, 40, 128),
    "text_512": (1, 4096, 512, 8, 8, 128),
    "clip_257": (1, 2048, 257, 8, 8, 128),
    "odd_1559_d64": (2, 1559, 1559, 12, 12, 64),
    "one_key": (1, 300, 1, 4, 4, 128),
    "gqa_4099": (1, 4099, 4099, 8, 2, 128),
}
VARIANTS = [dict(stages=st) for st in (2, 3)]


def needs_kernel():
    reason = sage_int8_ws.unavailable()
    if reason is not None:
        pytest.skip(reason)


def run_ws(q, k, v, **variant):
    b, lq, h, d = q.shape
    quantized = sage_int8.quantize_qkv(q, k, v, d ** -0.5, torch.float8_e4m3fn, mma_key_order=True)
    out = torch.empty_like(q)
    sage_int8_ws.attend_quantized_ws(quantized, out, k.shape[1], k.shape[2], **variant)
    return out


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"stages{v['stages']}")
def test_ws_against_float32_and_triton(name, variant):
    needs_kernel()
    b, lq, lk, h, hk, d = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(hash(name) % 2**31)
    q = torch.randn(b, lq, h, d, device="cuda", generator=g).bfloat16()
    k = (torch.randn(b, lk, hk, d, device="cuda", generator=g) + torch.randn(d, device="cuda", generator=g)).bfloat16()
    v = torch.randn(b, lk, hk, d, device="cuda", generator=g).bfloat16()
    out = run_ws(q, k, v, **variant)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    rows = torch.randperm(lq, device="cuda", generator=g)[:256]
    ref = fp32_reference(q, k, v, rows)
    err = ((out[:, rows].float() - ref).norm() / ref.norm()).item()
    assert err < TOL[(True, False)], f"{name}: {err:.4f} off float32"
    triton_out = torch.empty_like(q)
    sage_int8.triton.set_allocator(sage_int8._tma_allocator)   # what sage_int8_attention does before TMA
    quantized = sage_int8.quantize_qkv(q, k, v, d ** -0.5, torch.float8_e4m3fn)   # the same codes, in key order
    sage_int8.attend_quantized(quantized, triton_out, lk, hk, True, None)
    triton_err = ((triton_out[:, rows].float() - ref).norm() / ref.norm()).item()
    # the same 8-bit inputs: as accurate as the Triton kernel (P's rounding differs, so not bit for bit)
    assert err <= 1.1 * triton_err + 1e-3, f"{name}: {err:.4f} off float32, the Triton kernel {triton_err:.4f}"


def test_a_compile_refusal_runs_the_triton_kernel_on_v_in_key_order(monkeypatch):
    """Where this Triton's Gluon cannot compile the kernel, sage_int8_attention logs it once and runs the Triton
    kernel, on V quantized again in plain key order (the sm90 order would scramble P.V)."""
    needs_kernel()
    import triton

    def refuse(*args, **kwargs):
        raise triton.compiler.errors.CompilationError(None, None, "stand-in refusal")

    monkeypatch.setattr(sage_int8_ws, "attend_quantized_ws", refuse)
    monkeypatch.setattr(sage_int8, "_WS_REFUSAL", {})
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(1, 1000, 4, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    out = sage_int8.sage_int8_attention(q, k, v)
    rows = torch.arange(1000, device="cuda")
    ref = fp32_reference(q, k, v, rows)
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOL[(True, False)]
    assert "stand-in refusal" in sage_int8._WS_REFUSAL[torch.cuda.current_device()]
    out = sage_int8.sage_int8_attention(q, k, v)   # refused once: straight to the Triton kernel
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOL[(True, False)]


def hostile_values(case, g):
    """q, k, v [1, 1000, 4, 128]: "spike": V is zero but for one key, so that key's 128-key block is about 1000x
    the size of the block it shares a step with; "tiny": the first 512 keys' V is 1e-4 of the rest's."""
    q, k, v = (torch.randn(1, 1000, 4, 128, device="cuda", generator=g) for _ in range(3))
    if case == "spike":
        v = torch.zeros_like(v)
        v[:, 700] = 100 * torch.randn(4, 128, device="cuda", generator=g)
    else:
        v[:, :512] *= 1e-4
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


@pytest.mark.parametrize("case", ["spike", "tiny"])
def test_v_blocks_of_very_different_size_keep_their_weight(case):
    """The sm90 kernel's two blocks of a step share one FP8 P, each block's P scaled by its V scale over the
    larger one: a block about 1000x smaller than its partner still keeps its keys' weight (H200: 3.6% / 3.8% off
    float32, the Triton kernel 3.6% / 3.7%, docs/BENCHMARKS.md)."""
    needs_kernel()
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = hostile_values(case, g)
    rows = torch.arange(1000, device="cuda")
    ref = fp32_reference(q, k, v, rows)
    out = sage_int8.sage_int8_attention(q, k, v)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[(True, False)], f"{case}: {err:.4f} off float32"
