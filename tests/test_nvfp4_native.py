"""The Blackwell native NVFP4 path's plumbing on the CPU, with a stand-in for cuBLAS' block-scaled FP4 GEMM (no
Blackwell GPU was available): operand layouts, scale swizzling, global scales and bias, either byte order cuBLAS
may read, the per-device self-check refusing a GEMM that does not reproduce the reference, and the layer falling
back to its other path when the check fails. The Triton activation quantizer is checked bit for bit against
`quant_formats` on a GPU (`test_quantizer_matches_reference_gpu`)."""
import pytest
import torch

from wantalk import fp8_optimization
from wantalk.wanvideo.kernels import nvfp4_native
from wantalk.wanvideo.kernels import quant_formats as qf


def fake_cublas(hi_first: bool):
    """torch._scaled_mm for NVFP4 operands as cuBLAS defines it, reading bytes in the given nibble order."""
    def unpack(packed_fp4):
        b = packed_fp4.contiguous().view(torch.uint8) if packed_fp4.is_contiguous() else \
            packed_fp4.t().contiguous().view(torch.uint8)
        first, second = (b >> 4, b & 15) if hi_first else (b & 15, b >> 4)
        return qf.e2m1_decode(torch.stack([first, second], -1).reshape(b.shape[0], -1)).float()

    def scaled_mm(a, b, *, scale_a, scale_b, out_dtype, **_):
        assert a.dtype == b.dtype == torch.float4_e2m1fn_x2 and scale_a.dtype == torch.float8_e4m3fn
        m, n, k = a.shape[0], b.shape[1], 2 * a.shape[1]
        assert b.t().is_contiguous(), "cuBLAS FP4 wants B column-major (the weight's [N, K/2] transposed)"
        sa = qf.from_blocked(scale_a, m, k // 16).float().repeat_interleave(16, 1)
        sb = qf.from_blocked(scale_b, n, k // 16).float().repeat_interleave(16, 1)
        return ((unpack(a) * sa) @ (unpack(b) * sb).T).to(out_dtype)
    return scaled_mm


def problem(m=70, k=96, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    bias = (0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)
    return x, w, bias


def reference(x, packed, scales, g, bias):
    xq, xs, xg = qf.nvfp4_quantize(x)
    m, k = x.shape
    return qf.nvfp4_dequantize(xq, xs, xg, (m, k), torch.float32) @ \
        qf.nvfp4_dequantize(packed, scales, g, (scales.shape[0], k), torch.float32).T + bias.float()


@pytest.mark.parametrize("cublas_hi_first", [True, False], ids=["cublas_high_first", "cublas_low_first"])
def test_linear_matches_reference_in_either_byte_order(monkeypatch, cublas_hi_first):
    """Both operands are packed alike, so a GEMM reading the other nibble first permutes K inside each scale block
    of both: the product is the same, and the stored weights need no repacking whichever order cuBLAS uses."""
    monkeypatch.setattr(torch, "_scaled_mm", fake_cublas(cublas_hi_first))
    x, w, bias = problem()
    packed, scales, g = qf.nvfp4_quantize(w)
    ref = reference(x, packed, scales, g, bias)
    out = nvfp4_native.linear(x, packed, scales, g, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (70, 48)
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


def test_self_check_accepts_a_correct_gemm_and_refuses_a_wrong_or_failing_one(monkeypatch):
    right = fake_cublas(True)
    monkeypatch.setattr(torch, "_scaled_mm", right)
    assert nvfp4_native.self_check(torch.device("cpu")) is None
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: 1.05 * right(*a, **kw))     # 5% off: not accepted
    assert "relative error" in nvfp4_native.self_check(torch.device("cpu"))
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, *, scale_a, scale_b, out_dtype: right(
        a, b, scale_a=scale_a.roll(1, 0), scale_b=scale_b, out_dtype=out_dtype))     # scales read in another layout
    assert "relative error" in nvfp4_native.self_check(torch.device("cpu"))

    def refuse(*a, **kw):
        raise RuntimeError("FP4 needs sm100")
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    reason = nvfp4_native.self_check(torch.device("cpu"))
    assert "refused" in reason and "sm100" in reason


def test_no_native_path_off_blackwell():
    assert nvfp4_native.unsupported(torch.device("cpu")) is not None
    assert nvfp4_native.available(torch.device("cpu")) is False


def _fast_fp4_layer(w, bias):
    layer = fp8_optimization.NVFP4Linear(w.shape[1], w.shape[0], fast=True)
    layer.set_from_float(w)
    layer.bias.data.copy_(bias)
    return layer


@pytest.mark.parametrize("checked", [True, False], ids=["self_check_passed", "self_check_failed"])
def test_fast_fp4_layer_takes_the_native_path_only_when_checked(monkeypatch, checked):
    """With the device check passing, the layer's fast path is the native GEMM; failing, the layer keeps its
    other path (here the dequantizing one: the CPU has no FP8 matmul)."""
    calls = []
    cublas = fake_cublas(False)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(1) or cublas(*a, **kw))
    monkeypatch.setattr(nvfp4_native, "available", lambda device: checked)
    monkeypatch.setattr(fp8_optimization, "fp8_compute_reason", lambda device: None)
    monkeypatch.setattr(fp8_optimization.NVFP4Linear, "has_fp8_weight", lambda self: False)
    x, w, bias = problem(m=33, k=64, n=32, seed=1)
    layer = _fast_fp4_layer(w, bias)
    out = layer(x.reshape(3, 11, 64))
    assert out.shape == (3, 11, 32) and bool(calls) == checked
    ref = reference(x, layer.weight, layer.weight_scale, layer.weight_scale_2, bias) if checked else \
        x.float() @ layer.dequantize(torch.float32).T + bias.float()
    assert ((out.reshape(33, 32).float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_quantizer_matches_reference_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    x = torch.randn(37, 5120, device="cuda").to(torch.bfloat16) * torch.rand(37, 1, device="cuda") * 10
    x[3, 32:64] = 0                                                        # all-zero blocks keep a zero scale
    packed, scales, g = nvfp4_native.quantize_activation(x)
    ref_packed, ref_scales, ref_g = qf.nvfp4_quantize(x)
    assert torch.equal(g, ref_g)
    assert torch.equal(scales.view(torch.uint8), ref_scales[:37].view(torch.uint8))
    assert torch.equal(packed, ref_packed[:37])
