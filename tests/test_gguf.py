"""GGUF diffusion models (city96/ComfyUI-GGUF layout): dequantization against the `gguf` package's reference,
tiny Wan I2V files written the way city96's tools write them, and clear errors for bad files."""
import os

import numpy as np
import pytest
import torch

import gguf  # noqa: E402  (a dependency of the pack: pyproject, requirements, .ci/run)

from gguf import GGMLQuantizationType as GT  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from wantalk.fp8_optimization import FP8Linear, GGUFLinear  # noqa: E402
from wantalk.wanvideo.checkpoint import CheckpointError  # noqa: E402
from wantalk.wanvideo.gguf import city96_quantizes  # noqa: E402
from wantalk.wanvideo.kernels import gguf_dequant as gd  # noqa: E402
from wantalk.wanvideo.loader import load_wan_model  # noqa: E402
from wantalk.wanvideo.lora import LoraError  # noqa: E402
from tiny_models import TINY_I2V, make_tiny_lora, tiny_infinitetalk, tiny_wan  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

M_VARIANT_HIGHER = {"Q4_K": "Q6_K", "Q5_K": "Q6_K"}  # `_M` files: attention v and ffn.2 one type up


def random_blocks(qtype: str, n: int, amp: float, rng: np.random.Generator) -> np.ndarray:
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return gd.random_blocks(qtype, n, amp, g).numpy()


def reference(blocks: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, GT[qtype]).reshape(blocks.shape[0], -1)


# ---- dequantization ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(gd.BLOCK_FORMATS))
def test_dequantize_is_bit_exact_with_gguf_reference(qtype):
    rng = np.random.default_rng()
    blocks = random_blocks(qtype, 97, 1.0, rng)
    ours = gd.dequantize_blocks(torch.from_numpy(blocks), qtype).numpy()
    ref = reference(blocks, qtype)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", list(gd.BLOCK_FORMATS))
def test_dequantize_to_weight_shape_and_dtype(qtype):
    block, size = gd.BLOCK_FORMATS[qtype]
    rows, cols = 3, 2 * max(block, 256)
    blocks = random_blocks(qtype, rows * cols // block, 0.1, np.random.default_rng())
    data = torch.from_numpy(blocks).reshape(rows, -1)
    out = gd.dequantize(data, qtype, (rows, cols), torch.bfloat16)
    expect = torch.from_numpy(reference(blocks, qtype)).reshape(rows, cols).to(torch.bfloat16)
    assert out.shape == (rows, cols) and out.dtype == torch.bfloat16 and torch.equal(out, expect)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("qtype", list(gd.BLOCK_FORMATS))
def test_dequantize_on_gpu_matches_reference(qtype):
    """torch path: bit-exact float32. Triton path (where the type has one): float32 within 1e-6 relative (FMA
    contraction may round a product-difference once instead of twice); bf16 output within one bf16 rounding."""
    block, size = gd.BLOCK_FORMATS[qtype]
    rows, cols = 64, 4096
    blocks = random_blocks(qtype, rows * cols // block, 1.0, np.random.default_rng())
    ref = torch.from_numpy(reference(blocks, qtype)).reshape(rows, cols)
    data = torch.from_numpy(blocks).cuda()
    exact = gd.dequantize_blocks(data, qtype).reshape(rows, cols).cpu()
    assert torch.equal(exact, ref)
    fast = gd.dequantize(data.reshape(rows, -1), qtype, (rows, cols), torch.float32).cpu()
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    half = gd.dequantize(data.reshape(rows, -1), qtype, (rows, cols), torch.bfloat16).cpu().float()
    torch.testing.assert_close(half, ref.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


# ---- a converter that writes what city96's tools write -----------------------------------------------------

def _tensor_type(key: str, value: torch.Tensor, qtype: str, m_variant: bool) -> str:
    """convert.py: 1-D, <= 1024 values and `.modulation` -> F32; the rest F16/BF16; llama-quantize then quantizes
    the block linears (K types need rows of whole 256-blocks, else F16), `_M` one type up for v and ffn.2."""
    if value.dim() == 1 or value.numel() <= 1024 or ".modulation" in key:
        return "F32"
    if m_variant and (key.endswith(".v.weight") or key.endswith(".ffn.2.weight")):
        qtype = M_VARIANT_HIGHER.get(qtype, qtype)
    return qtype if city96_quantizes(key, tuple(value.shape), qtype) else "F16"


def write_city96_gguf(path: str, sd: dict, qtype: str, *, m_variant=False, arch="wan", prefix="",
                      rng=None) -> dict:
    """Write `sd` as a city96-style Wan GGUF and return the weights the file holds (float32, dequantized by the
    `gguf` reference). Q8_0 and the legacy types are quantized from the weights by `gguf`; K types (llama.cpp's
    C quantizer only) get random blocks of the weights' size: the file layout is what the loader must read."""
    rng = rng or np.random.default_rng()
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    held = {}
    five_d = {}
    for key, value in sd.items():
        if value.dim() == 5:  # fix_5d_tensors.py appends it as F32 after quantization
            five_d[key] = value
            continue
        kind = _tensor_type(key, value, qtype, m_variant)
        array = value.float().numpy()
        if kind == "F32":
            data = array
        elif kind == "F16":
            data = array.astype(np.float16)
        elif kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
            data = gguf.quants.quantize(array, GT[kind])
        else:
            block, _ = gd.BLOCK_FORMATS[kind]
            amp = float(array.std()) * 2
            data = random_blocks(kind, array.size // block, amp, rng).reshape(array.shape[0], -1)
        writer.add_tensor(prefix + key, data, raw_dtype=GT[kind])
        held[key] = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, GT[kind]), dtype=np.float32)
                                     .reshape(tuple(value.shape)).copy())
    for key, value in five_d.items():
        writer.add_tensor(prefix + key, value.float().numpy(), raw_dtype=GT.F32)
        held[key] = value.float()
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _inputs(rng, batch=1):
    return (torch.randn(batch, 16, 2, 4, 4, generator=rng), torch.tensor([321.0] * batch),
            torch.randn(batch, 4, 64, generator=rng), torch.randn(batch, 257, 32, generator=rng),
            torch.randn(batch, 20, 2, 4, 4, generator=rng))


def _gguf_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}


@pytest.mark.parametrize("qtype,m_variant", [("Q8_0", False), ("Q5_K", False), ("Q4_K", True), ("Q5_0", False),
                                             ("Q3_K", False)])
def test_tiny_i2v_gguf_loads_and_matches_its_dequantized_weights(tmp_path, rng, qtype, m_variant):
    _, sd = tiny_wan(TINY_I2V, rng)
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    held = write_city96_gguf(path, sd, qtype, m_variant=m_variant, prefix="model.diffusion_model.")
    model = load_wan_model(path)  # no options
    layers = _gguf_layers(model)
    assert layers and all(m.qtype == (M_VARIANT_HIGHER.get(qtype, qtype) if m_variant and
                                      (n.endswith(".v") or n.endswith("ffn.2")) else qtype)
                          for n, m in layers.items())
    assert model.cfg == TINY_I2V
    assert f"{qtype} " in model.quant_report.summary() and (not m_variant or "Q6_K " in model.quant_report.summary())
    # memory holds the file's blocks: every quantized tensor's bytes as stored
    reader = gguf.GGUFReader(path)
    stored = {t.name.removeprefix("model.diffusion_model."): t.n_bytes for t in reader.tensors}
    assert all(m.weight.numel() == stored[f"{n}.weight"] for n, m in layers.items())
    reference_path = save_file({k: v.contiguous() for k, v in held.items()}, str(tmp_path / "ref.safetensors"))
    reference_model = load_wan_model(str(tmp_path / "ref.safetensors"))
    args = _inputs(rng)
    out, ref = model.forward_batched(*args), reference_model.forward_batched(*args)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    assert torch.equal(out, ref)


def test_gguf_addon_and_safetensors_addon_load_together(tmp_path, rng):
    """An InfiniteTalk add-on as GGUF on a GGUF base (both in circulation), merged through the same entry point."""
    _, sd = tiny_infinitetalk(rng)
    markers = ("audio_proj.", "audio_cross_attn.", "norm_x.")
    addon = {k: v for k, v in sd.items() if any(m in k for m in markers)}
    base = {k: v for k, v in sd.items() if k not in addon}
    held = write_city96_gguf(str(tmp_path / "base.gguf"), base, "Q4_K")
    held.update(write_city96_gguf(str(tmp_path / "addon.gguf"), addon, "Q8_0"))
    model = load_wan_model(str(tmp_path / "base.gguf"), extra_weights=(str(tmp_path / "addon.gguf"),),
                           base_dtype=torch.float32)
    assert model.addon_name == "InfiniteTalk"
    kinds = {m.qtype for n, m in _gguf_layers(model).items() if "audio_cross_attn" in n}
    assert kinds == {"Q8_0"}
    for key, value in model.state_dict().items():
        if key in held and value.is_floating_point():
            assert torch.equal(value, held[key]), key


def test_q8_0_to_fp8_at_load_and_coarse_types_refused(tmp_path, rng):
    _, sd = tiny_wan(TINY_I2V, rng)
    q8 = str(tmp_path / "q8.gguf")
    held = write_city96_gguf(q8, sd, "Q8_0")
    model = load_wan_model(q8, quantization="fp8_e4m3fn_scaled")
    layer = model.blocks[0].ffn[0]
    assert isinstance(layer, FP8Linear)
    err = (layer.dequantize(torch.float32) - held["blocks.0.ffn.0.weight"]).norm() / held["blocks.0.ffn.0.weight"].norm()
    assert 0 < err < 0.05
    q4 = str(tmp_path / "q4.gguf")
    write_city96_gguf(q4, sd, "Q4_K")
    with pytest.raises(CheckpointError, match=r"Q4_K.*'disabled'"):
        load_wan_model(q4, quantization="fp8_e4m3fn_scaled_fast")


def test_lora_merges_into_gguf_model_and_stays_in_blocks(tmp_path, rng):
    """A merged layer goes back into blocks as Q8_0 (not bf16): the output matches the LoRA merged into the
    dequantized weights within Q8_0 rounding, far below the LoRA's own effect."""
    _, sd = tiny_wan(TINY_I2V, rng)
    path = str(tmp_path / "m.gguf")
    held = write_city96_gguf(path, sd, "Q4_K")
    lora = make_tiny_lora(str(tmp_path / "l.safetensors"), held, rng, scale=0.5)
    save_file({k: v.contiguous() for k, v in held.items()}, str(tmp_path / "ref.safetensors"))
    model = load_wan_model(path, loras=[(lora, 0.8)], base_dtype=torch.float32)
    reference_model = load_wan_model(str(tmp_path / "ref.safetensors"), loras=[(lora, 0.8)], base_dtype=torch.float32)
    plain = load_wan_model(path, base_dtype=torch.float32)
    args = _inputs(rng)
    out, ref, without = (m.forward_batched(*args) for m in (model, reference_model, plain))
    error = ((out - ref).norm() / ref.norm()).item()
    effect = ((without - ref).norm() / ref.norm()).item()
    assert error < 0.01 and error < effect / 10, (error, effect)
    layers = _gguf_layers(model)  # the tiny LoRA changes every block linear: each one went back into Q8_0 blocks
    assert "blocks.1.ffn.2" in layers and {m.qtype for m in layers.values()} == {"Q8_0"}
    # the bytes planned before the load (what ComfyUI is asked to free) are the merged model's, not the Q4_K file's
    from wantalk import nodes_model_loading
    held_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert nodes_model_loading.expected_model_bytes([path], "disabled", torch.float32, loras=[(lora, 0.8)]) == held_bytes
    assert nodes_model_loading.expected_model_bytes([path], "disabled", torch.float32) < held_bytes


# ---- bad input ---------------------------------------------------------------------------------------------

def test_gguf_lora_is_refused_with_what_to_use(tmp_path, rng):
    _, sd = tiny_wan(TINY_I2V, rng)
    path = str(tmp_path / "m.gguf")
    write_city96_gguf(path, sd, "Q8_0")
    fake_lora = str(tmp_path / "lora.gguf")
    write_city96_gguf(fake_lora, {"blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 256)}, "Q8_0")
    with pytest.raises(LoraError, match="GGUF LoRA.*safetensors"):
        load_wan_model(path, loras=[(fake_lora, 1.0)])


def test_other_architecture_is_refused(tmp_path, rng):
    _, sd = tiny_wan(TINY_I2V, rng)
    path = str(tmp_path / "flux.gguf")
    write_city96_gguf(path, sd, "Q8_0", arch="flux")
    with pytest.raises(CheckpointError, match="architecture 'flux', not a Wan 2.1"):
        load_wan_model(path)
    write_city96_gguf(path, sd, "Q8_0", arch="t5encoder")  # city96's umt5 GGUFs sit in the same download pages
    with pytest.raises(CheckpointError, match="'t5encoder'.*text encoder: load it with ComfyUI-GGUF's CLIPLoader"):
        load_wan_model(path)


def test_truncated_gguf_is_refused(tmp_path, rng):
    _, sd = tiny_wan(TINY_I2V, rng)
    path = str(tmp_path / "m.gguf")
    write_city96_gguf(path, sd, "Q4_K")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="truncated|damaged"):
        load_wan_model(path)
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(CheckpointError, match="truncated|damaged"):
        load_wan_model(path)


def test_unknown_quant_type_is_refused(tmp_path, rng):
    _, sd = tiny_wan(TINY_I2V, rng)
    path = str(tmp_path / "iq.gguf")
    writer = gguf.GGUFWriter(path=None, arch="wan")
    for key, value in sd.items():
        if key == "blocks.0.ffn.0.weight":  # IQ4_NL: 32 weights in 18 bytes, a type wantalk does not read
            writer.add_tensor(key, np.zeros((value.shape[0], value.shape[1] // 32 * 18), np.uint8), raw_dtype=GT.IQ4_NL)
        else:
            writer.add_tensor(key, value.float().numpy(), raw_dtype=GT.F32)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="IQ4_NL.*blocks.0.ffn.0.weight.*Supported: F32"):
        load_wan_model(path)


def test_loader_node_lists_and_loads_a_gguf_with_its_planned_bytes(tmp_path, rng, use_models_root):
    from wantalk import nodes_model_loading
    use_models_root(tmp_path)
    (tmp_path / "diffusion_models").mkdir()
    _, sd = tiny_wan(TINY_I2V, rng)
    path = str(tmp_path / "diffusion_models" / "wan-Q4_K.gguf")
    write_city96_gguf(path, sd, "Q4_K")
    node = nodes_model_loading.WanTalkModelLoader
    assert "wan-Q4_K.gguf" in node.INPUT_TYPES()["required"]["model"][0]
    model, report = node().load("wan-Q4_K.gguf", "bf16", "disabled", "auto", "offload_device")
    layers = _gguf_layers(model)
    assert report.startswith(f"disabled: {len(layers)} linear layers quantized") and len(layers) == 2 * 12
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert nodes_model_loading.expected_model_bytes([path], "disabled") == held
    assert model.layer_plan["blocks.0.ffn.0"] == model.layer_plan["blocks.1.self_attn.q"]
    assert model.layer_plan["blocks.0.ffn.0"].storage == "Q4_K" and model.layer_plan["head.head"].storage == "dense"
    assert model.source_paths == (path,)
    with pytest.raises(ValueError, match=r"\[wantalk Load Wan Model\] input 'quantization': quantization "
                                         r"'fp8_e4m3fn_scaled' cannot be applied to GGUF weights stored as Q4_K"):
        node().load("wan-Q4_K.gguf", "bf16", "fp8_e4m3fn_scaled", "auto", "offload_device")


def test_nan_block_scale_is_refused_naming_the_tensor(tmp_path, rng):
    """Issue 15.1 for GGUF: the blocks are bytes (no float check sees them); a NaN scale made every weight of its
    block NaN, and the video black, with no error."""
    _, sd = tiny_wan(TINY_I2V, rng)
    path = str(tmp_path / "m.gguf")
    write_city96_gguf(path, sd, "Q4_K")
    target = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blocks.1.ffn.2.weight")
    with open(path, "r+b") as f:
        f.seek(target.data_offset + 144 * 3)  # the 4th block's d
        f.write(np.array([np.nan], dtype=np.float16).tobytes())
    with pytest.raises(CheckpointError, match=r"'blocks.1.ffn.2.weight' \(Q4_K\) has 1 non-finite"):
        load_wan_model(path)


def test_14b_infinitetalk_q4_k_plans_under_12_gb_with_block_swap():
    """The full-size layout (official key listing) as a city96 Q4_K file, planned from its headers alone: the
    layer plan keeps the blocks (Q4_K bytes) and the memory plan fits a 12 GB card (1e9 bytes) at 480x832x81 by
    streaming some blocks. (The GPU run of the same load: bench/gguf_14b.py.)"""
    import re
    from wantalk.wanvideo import memory_plan as mp
    from wantalk.wanvideo.loader import plan_model
    listing = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "keys", "keys_infinitetalk.txt")
    shapes = {}
    for line in open(listing):
        key, shape = line.rstrip("\n").split("\t")[:2]
        shapes[key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    stored = {k: "Q4_K" for k, shape in shapes.items() if city96_quantizes(k, shape, "Q4_K")}
    planned = plan_model(shapes, None, stored=stored)
    layers = [e for e in planned.plan.values() if e.storage == "Q4_K"]
    assert len(layers) == len([k for k in stored if k.startswith("blocks.")]) and len(layers) >= 40 * 11
    bf16_bytes = 2 * sum(int(np.prod(shape)) for shape in shapes.values())
    assert planned.weight_bytes < 0.33 * bf16_bytes  # Q4_K blocks: 4.5 bits a weight; embeddings, head in bf16
    cfg, sizes = planned.model.cfg, mp.ModelBytes.of(planned.model)
    run = mp.RunSettings(mp.video_tokens(81, 480, 832))
    swapped = mp.choose_blocks_to_swap(cfg, sizes, run, 12 * 10**9)
    plan = mp.plan_memory(cfg, sizes, run, blocks_to_swap=swapped)
    assert 0 < swapped < cfg.num_layers and plan.peak <= 12 * 10**9
    assert sizes.dequant_temp == cfg.dim * cfg.ffn_dim * 2  # a GGUF FFN weight dequantized to bf16 while it runs


def test_comfyui_lists_gguf_models_and_addons_but_not_as_loras(tmp_path, monkeypatch):
    """ComfyUI's own lists carry only torch extensions; GGUF files are added where the loader reads them."""
    from types import SimpleNamespace
    from wantalk import host
    for kind in ("diffusion_models", "model_patches", "loras"):
        (tmp_path / kind / "sub").mkdir(parents=True)
        (tmp_path / kind / "sub" / "m-Q4_K.gguf").write_bytes(b"GGUF")
        (tmp_path / kind / "m.safetensors").write_bytes(b"")
    stub = SimpleNamespace(get_filename_list=lambda kind: ["m.safetensors"],
                           get_folder_paths=lambda kind: [str(tmp_path / kind)])
    monkeypatch.setattr(host, "_folder_paths", stub)
    gguf_name = os.path.join("sub", "m-Q4_K.gguf")
    assert host.model_files("diffusion_models") == ["m.safetensors", gguf_name]
    assert host.model_files("model_patches") == ["m.safetensors", gguf_name]
    assert host.model_files("loras") == ["m.safetensors"]
