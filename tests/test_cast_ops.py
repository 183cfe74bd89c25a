"""Layers of the model cast their own input (wanvideo/modules/cast_ops.py): the compute dtype travels with the
layer through the layer plan (quantized layers) and run-time LoRA wrappers, float32 layers stay float32."""
import torch
import torch.nn as nn

from wantalk.wanvideo import quantization as q
from wantalk.wanvideo.lora import LoraLinear
from wantalk.wanvideo.modules import cast_ops


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_linear_casts_to_its_weight_dtype(rng):
    layer = cast_ops.Linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(3, 64, generator=rng)  # float32 activations meet a bf16 weight in bf16
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    assert torch.equal(out, nn.functional.linear(x.bfloat16(), layer.weight, layer.bias))
    layer.to(torch.float16)  # read at call time (block swap and loaders re-point weights)
    assert layer(x).dtype == torch.float16 == layer.compute_dtype


def test_float32_layer_computes_in_float32(rng):
    layer = cast_ops.Float32Linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(3, 64, generator=rng).bfloat16()
    out = layer(x)
    ref = x.double() @ layer.weight.double().T + layer.bias.double()
    assert out.dtype == torch.float32 and _rel(out, ref) < 1e-6


def test_quantized_layers_keep_the_cast_rule(rng):
    model = nn.Sequential(cast_ops.Linear(64, 32, device="meta", dtype=torch.bfloat16),
                          cast_ops.Float32Linear(32, 32, device="meta", dtype=torch.bfloat16),
                          nn.Linear(32, 32, device="meta", dtype=torch.bfloat16))
    q.apply_policy(model, "fp8_e4m3fn_scaled", (), base_dtype=torch.bfloat16)
    for i, (n, k) in enumerate([(32, 64), (32, 32), (32, 32)]):
        q.load_param(model, f"{i}.weight", torch.randn(n, k, generator=rng) / k ** 0.5, device="cpu",
                     base_dtype=torch.bfloat16)
        q.load_param(model, f"{i}.bias", torch.randn(n, generator=rng), device="cpu", base_dtype=torch.bfloat16)
    assert [m.input_dtype for m in model] == [torch.bfloat16, torch.float32, None]
    x = torch.randn(3, 64, generator=rng)
    h = model[0](x)
    assert h.dtype == torch.bfloat16 and model[1](h).dtype == torch.float32
    assert model[2](h).dtype == torch.bfloat16  # a layer built outside the seam computes in its input's dtype


def test_lora_wrapper_keeps_the_cast_rule(rng):
    base = cast_ops.Float32Linear(16, 8, dtype=torch.bfloat16)
    wrapped = LoraLinear(base, [1.0])
    x = torch.randn(2, 16, generator=rng).bfloat16()
    assert wrapped.compute_dtype == torch.float32 and torch.equal(wrapped(x), base(x))
    assert type(wrapped.plain()) is cast_ops.Float32Linear
