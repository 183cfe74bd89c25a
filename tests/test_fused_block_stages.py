"""Fused block stages of issue 16: LayerNorm -> E4M3 rows (once for q, k, v), residual add + LayerNorm in one pass,
GELU(tanh) -> E4M3 rows, and the `FP8Rows` contract of the quantized linear layers.

The kernels run on the CPU through the Triton interpreter (`PYTHONPATH=<triton> TRITON_INTERPRET=1 pytest ...`,
skipped without it) against the unfused sequence run the same way, bit for bit; on a GPU, bit for bit against the
unfused CUDA sequence. The CPU path (no Triton) is the plain-torch definition, unchanged."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from wantalk import fp8_optimization as fp8
from wantalk.wanvideo.kernels import quant_formats as qf
from wantalk.wanvideo.modules import cast_ops
from wantalk.wanvideo.modules import fused_ops as fo

EPS = 1e-6


def bits(t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_rows_equal(rows: fp8.FP8Rows, codes: torch.Tensor, scales: torch.Tensor):
    assert rows.codes.dtype == torch.float8_e4m3fn and rows.scales.shape == scales.shape
    assert torch.equal(bits(rows.codes.reshape(codes.shape)), bits(codes)) and torch.equal(rows.scales, scales)


def block_inputs(rng, b=2, l=37, c=320, device="cpu"):
    """A residual stream with per-channel offsets, a bf16 branch output, per-batch gates and modulations
    (different for each batch item), LayerNorm affine near 1: none of it zero."""
    r = lambda *s: torch.randn(*s, generator=rng)
    t = {"x": r(b, l, c) * 2 + r(c) * 3, "y": (r(b, l, c) + r(c)).bfloat16(), "gate": r(b, c) * 0.3,
         "scale": r(b, c) * 0.3, "shift": r(b, c) * 0.3, "weight": (1 + 0.1 * r(c)).bfloat16(),
         "bias": (0.1 * r(c)).bfloat16()}
    return {k: v.to(device) for k, v in t.items()}


NORMS = {"modulated": ("scale", "shift"), "affine": ("weight", "bias")}


def norm_args(t, kind):
    return {k: t[k] for k in NORMS[kind]}


# ------------------------------------------------------------------------------------------------
# CPU: the definition, unchanged
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(NORMS))
@pytest.mark.parametrize("gated", [True, False])
def test_cpu_residual_norm_is_the_reference(rng, kind, gated):
    t = block_inputs(rng)
    gate = t["gate"] if gated else None
    x, xn = fo.residual_layer_norm_modulate(t["x"], t["y"], gate, EPS, out_dtype=torch.bfloat16,
                                            **norm_args(t, kind))
    x_ref = fo.residual_add_reference(t["x"], t["y"], gate)
    assert torch.equal(x, x_ref)
    assert torch.equal(xn, fo.layer_norm_modulate_reference(x_ref, EPS, out_dtype=torch.bfloat16, **norm_args(t, kind)))


def fp8_layer(rng, k=64, n=48, **kw):
    layer = fp8.FP8Linear(k, n, fast=True, **kw)
    layer.set_from_float(torch.randn(n, k, generator=rng) / k ** 0.5)
    layer.bias.data.normal_(0, 0.1, generator=rng)
    return layer


def test_linears_say_whether_they_take_fp8_rows(rng, monkeypatch):
    """Only fast layers with an E4M3 weight whose input cast keeps the dtype take rows; plain layers, the slow path,
    e5m2 weights and a device without FP8 matmuls get tensors."""
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    fast, e5m2, slow = fp8_layer(rng), fp8_layer(rng, fp8_dtype=torch.float8_e5m2), fp8_layer(rng)
    slow.fast = False
    assert not fp8.wants_fp8_rows([fast], cpu, bf16)              # no FP8 matmul on this device
    monkeypatch.setattr(fp8, "fp8_compute_reason", lambda device: None)
    assert fp8.wants_fp8_rows([fast, fast], cpu, bf16)
    assert not fp8.wants_fp8_rows([fast], cpu, torch.float32)
    assert not fp8.wants_fp8_rows([fast, cast_ops.Linear(64, 48)], cpu, bf16)
    assert not fp8.wants_fp8_rows([fast, e5m2], cpu, bf16) and not fp8.wants_fp8_rows([slow], cpu, bf16)
    fast.input_dtype = torch.float16                              # its own cast would round the input again
    assert not fp8.wants_fp8_rows([fast], cpu, bf16)


def scaled_mm_in_float64(a, b, *, scale_a, scale_b, out_dtype, bias=None, **_):
    """A stand-in for the row-wise scaled `torch._scaled_mm` on the CPU."""
    out = (a.double() * scale_a.double()) @ (b.double() * scale_b.double())
    return (out if bias is None else out + bias.double()).to(out_dtype)


def test_layer_takes_fp8_rows_as_it_quantizes_itself(rng, monkeypatch):
    """Handed rows, the layer gives what it gives for the tensor they stand for (same GEMM operands, same shape and
    dtype); the GEMM here is a float64 stand-in for `torch._scaled_mm`, the quantizer the torch reference."""
    def reference_rows(x):
        codes, scales = qf.quantize_rows_reference(x.reshape(-1, x.shape[-1]))
        return fp8.FP8Rows(codes.view(x.shape), scales, x.dtype)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm_in_float64)
    monkeypatch.setattr(fp8, "fp8_compute_reason", lambda device: None)
    monkeypatch.setattr(fp8, "quantize_activation", reference_rows)
    layer = fp8_layer(rng)
    layer.input_dtype = torch.bfloat16
    x = (torch.randn(2, 19, 64, generator=rng) + torch.randn(64, generator=rng)).bfloat16()
    out = layer(reference_rows(x))
    assert out.shape == (2, 19, 48) and out.dtype == torch.bfloat16
    assert torch.equal(out, layer(x))
    dense = x.double() @ layer.dequantize(torch.float64).T + layer.bias.double()
    assert 1e-3 < ((out.double() - dense).norm() / dense.norm()).item() < 0.06


# ------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on the CPU, or a GPU)
# ------------------------------------------------------------------------------------------------

def _interpreter_tanh(x):
    """libdevice's tanh for the Triton interpreter, which has no extern functions."""
    import triton.language as tl
    from triton.runtime import interpreter
    import numpy as np
    return tl.tensor(interpreter.TensorHandle(np.tanh(x.handle.data), x.handle.dtype.scalar), x.type)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Run the fused kernels on CPU tensors through the Triton interpreter."""
    if fo.triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton run with TRITON_INTERPRET=1")
    monkeypatch.setattr(fo, "_use_triton", lambda *tensors: True)
    monkeypatch.setattr(fo, "libdevice", SimpleNamespace(tanh=_interpreter_tanh))
    from wantalk.wanvideo.kernels import quant_triton
    return quant_triton


def quantize_rows(qt, t):
    return qt.quantize_rows(t.reshape(-1, t.shape[-1]))


@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_emits_the_rows_quantize_rows_would(rng, triton_on_cpu, kind):
    t = block_inputs(rng)
    rows = fo.layer_norm_modulate(t["x"], EPS, out_dtype=torch.bfloat16, fp8_rows=True, **norm_args(t, kind))
    plain = fo.layer_norm_modulate(t["x"], EPS, out_dtype=torch.bfloat16, **norm_args(t, kind))
    assert rows.dtype == torch.bfloat16 and rows.shape == t["x"].shape
    assert_rows_equal(rows, *quantize_rows(triton_on_cpu, plain))
    assert (rows.codes.float().abs().reshape(-1, 320).amax(1) == 448).all()   # every row uses the full range
    ref = fo.layer_norm_modulate_reference(t["x"], EPS, **norm_args(t, kind))  # the kernel's LayerNorm itself
    assert ((plain.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("kind", list(NORMS))
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("to_fp8", [True, False])
def test_residual_norm_equals_the_two_passes(rng, triton_on_cpu, kind, gated, to_fp8):
    t = block_inputs(rng, b=2, l=23, c=200)
    gate = t["gate"] if gated else None
    x, xn = fo.residual_layer_norm_modulate(t["x"], t["y"], gate, EPS, out_dtype=torch.bfloat16, fp8_rows=to_fp8,
                                            **norm_args(t, kind))
    x_ref = fo.residual_add(t["x"], t["y"], gate)
    xn_ref = fo.layer_norm_modulate(x_ref, EPS, out_dtype=torch.bfloat16, **norm_args(t, kind))
    assert torch.equal(bits(x), bits(x_ref)) and not torch.equal(x, t["x"])
    if to_fp8:
        assert_rows_equal(xn, *quantize_rows(triton_on_cpu, xn_ref))
    else:
        assert torch.equal(bits(xn), bits(xn_ref))
    # batch items are modulated/gated with their own vectors: swapping them changes the result
    swapped = {k: t[k].flip(0) for k in ("gate", "scale", "shift")}
    x_sw, _ = fo.residual_layer_norm_modulate(t["x"], t["y"], swapped["gate"] if gated else None, EPS,
                                              out_dtype=torch.bfloat16, **norm_args({**t, **swapped}, kind))
    assert torch.equal(x_sw, x) != gated


def test_gelu_rows_follow_torch_gelu_tanh(rng, triton_on_cpu):
    """float32 hidden (no rounding step the interpreter models differently from the GPU): the kernel's GELU is the
    torch formula's operation order bit for bit, then exactly `quantize_rows`; ragged width 1000 (not a multiple of
    the kernel's step), 3x17 rows."""
    import numpy as np
    h = torch.randn(3, 17, 1000, generator=rng) * 2 + torch.randn(1000, generator=rng)
    h[0, 3] = -h[0, 3].abs() - 0.1                    # rows whose largest input stays below 0.5: their scale
    h[1, 5] = 0.1 * torch.randn(1000, generator=rng)  # comes from every element's GELU, not from GELU(max h)
    assert h[0, 3].max() < 0.5 and h[1, 5].max() < 0.5
    rows = fo.gelu_tanh_fp8_rows(h)
    beta, kappa = torch.tensor(fo.GELU_BETA), torch.tensor(fo.GELU_KAPPA)
    inner = beta * (h + kappa * (h * h * h))
    g = 0.5 * h * (1 + torch.from_numpy(np.tanh(inner.numpy())))
    assert ((g - F.gelu(h, approximate="tanh")).abs().max() < 1e-5)
    assert rows.dtype == torch.float32 and rows.shape == h.shape
    assert_rows_equal(rows, *quantize_rows(triton_on_cpu, g))


def fast_fp8_blocks(model):
    """The blocks' linear layers as fast row-wise FP8 layers, as `fp8_e4m3fn_scaled_fast` plans them."""
    for name, module in list(model.blocks.named_modules()):
        if isinstance(module, torch.nn.Linear):
            layer = fp8.FP8Linear(module.in_features, module.out_features, fast=True)
            layer.set_from_float(module.weight.float())
            layer.bias.data.copy_(module.bias)
            layer.input_dtype = torch.bfloat16
            parent, _, leaf = name.rpartition(".")
            setattr(model.blocks.get_submodule(parent), leaf, layer)


def test_model_with_fused_stages_equals_unfused(rng, triton_on_cpu, monkeypatch):
    """Tiny Wan I2V + InfiniteTalk with fast FP8 blocks: every stage hands its layers rows (q/k/v, norm3 -> cross
    q, text + image attention -> cross o, audio norm -> audio q, FFN norm -> ffn[0], GELU -> ffn[2]), the FFN
    residual of a block is added in the next block's first pass, and the output is bit for bit the unfused one.
    The GELU and add kernels have their own tests (the interpreter rounds bf16 unlike torch) and the interpreter
    cannot run the RMSNorm-RoPE kernel on bf16: they are their definitions here."""
    from tiny_models import tiny_infinitetalk
    from wantalk.multitalk.conditioning import zero_audio_conditioning
    from wantalk.wanvideo.modules import model as wan
    monkeypatch.setattr(fp8, "fp8_compute_reason", lambda device: None)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm_in_float64)
    monkeypatch.setattr(wan, "gelu_tanh_fp8_rows", lambda h: fp8.quantize_activation(F.gelu(h, approximate="tanh")))
    monkeypatch.setattr(wan, "rms_norm_rope", fo.rms_norm_rope_reference)
    monkeypatch.setattr(wan, "add_fp8_rows", lambda a, b: fp8.quantize_activation(a + b))
    model, _ = tiny_infinitetalk(rng, dtype=torch.bfloat16)
    fast_fp8_blocks(model)
    f, h, w = 3, 8, 12
    args = (torch.randn(1, 16, f, h, w, generator=rng), torch.tensor([613.0]), torch.randn(1, 5, 64, generator=rng),
            torch.randn(1, 257, 32, generator=rng), torch.randn(1, 20, f, h, w, generator=rng))
    audio = zero_audio_conditioning(model, 4 * (f - 1) + 1)
    decisions, decide = [], wan.wants_fp8_rows
    monkeypatch.setattr(wan, "wants_fp8_rows", lambda *a: decisions.append(decide(*a)) or decisions[-1])
    fused = model.forward_batched(*args, audio=audio)
    assert len(decisions) == 2 * 6 and all(decisions)
    monkeypatch.setattr(wan, "wants_fp8_rows", lambda *a: False)
    monkeypatch.setattr(wan, "residual_layer_norm_modulate", fo.residual_then_layer_norm_modulate)
    unfused = model.forward_batched(*args, audio=audio)
    assert fused.isfinite().all() and torch.equal(bits(fused), bits(unfused))


def test_sum_rows_are_the_rows_of_the_sum(rng, triton_on_cpu):
    """float32 branch outputs (no bf16 rounding step the interpreter models differently): the add happens in the
    quantization pass, exactly; ragged width 200."""
    a = torch.randn(2, 29, 200, generator=rng) + torch.randn(200, generator=rng)
    b = torch.randn(2, 29, 200, generator=rng) * 0.5
    rows = fo.add_fp8_rows(a, b)
    assert rows.shape == a.shape and rows.dtype == torch.float32
    assert_rows_equal(rows, *quantize_rows(triton_on_cpu, a + b))


# ------------------------------------------------------------------------------------------------
# GPU: bit for bit the unfused CUDA sequence
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(NORMS))
def test_gpu_fused_stages_are_bit_identical(rng, kind):
    if fo.triton is None:
        pytest.skip("Triton is not installed")
    from wantalk.wanvideo.kernels import quant_triton as qt
    t = block_inputs(rng, b=2, l=3001, c=5120, device="cuda")
    for gate in (t["gate"], None):
        x, rows = fo.residual_layer_norm_modulate(t["x"], t["y"], gate, EPS, out_dtype=torch.bfloat16,
                                                  fp8_rows=True, **norm_args(t, kind))
        x_ref = fo.residual_add(t["x"], t["y"], gate)
        xn_ref = fo.layer_norm_modulate(x_ref, EPS, out_dtype=torch.bfloat16, **norm_args(t, kind))
        assert torch.equal(bits(x), bits(x_ref))
        assert_rows_equal(rows, *quantize_rows(qt, xn_ref))
        rows = fo.layer_norm_modulate(x_ref, EPS, out_dtype=torch.bfloat16, fp8_rows=True, **norm_args(t, kind))
        assert_rows_equal(rows, *quantize_rows(qt, xn_ref))
    h = (torch.randn(2, 3001, 13824, device="cuda") * 1.5 - 0.3).bfloat16()
    h[0, 7] = -h[0, 7].abs() - 0.1                # rows whose scale comes from every element (max h < 0.5)
    h[1, 9] = (0.1 * torch.randn(13824, device="cuda")).bfloat16()
    assert_rows_equal(fo.gelu_tanh_fp8_rows(h), *quantize_rows(qt, F.gelu(h, approximate="tanh")))
    a, b = t["y"], (torch.randn_like(t["y"], dtype=torch.float32) * 0.7).bfloat16()
    assert_rows_equal(fo.add_fp8_rows(a, b), *quantize_rows(qt, a + b))
