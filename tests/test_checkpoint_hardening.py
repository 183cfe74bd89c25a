"""Damaged and crafted model files (issue 15, items 1 and 6): safetensors headers that are not what the format says,
config values out of bounds, a stray config.json in a shared folder, NaN/inf in weights and LoRAs. Each is refused
with the file (and tensor or key) named, or ignored with a log line when it does not belong to the file."""
import json
import logging
import math
import struct

import pytest
import torch
from safetensors.torch import save_file

from wantalk.wanvideo.checkpoint import CheckpointError, CheckpointReader
from wantalk.wanvideo.loader import load_wan_model
from wantalk.wanvideo.lora import LoraError
from tiny_models import TINY_I2V, tiny_wan

LINEAR = "blocks.1.ffn.0.weight"


@pytest.fixture
def weights(rng):
    return tiny_wan(TINY_I2V, rng)[1]


def write(path, sd, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return str(path)


def raw_safetensors(path, header: bytes, data: bytes = b"\0" * 16) -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


# ---- crafted headers ---------------------------------------------------------------------------------------------

def test_header_that_is_a_json_list(tmp_path):
    path = raw_safetensors(tmp_path / "list.safetensors", b'[{"dtype": "F32"}]')
    with pytest.raises(CheckpointError, match=r"list\.safetensors' has a safetensors header that is a JSON list, "
                                              "not an object of tensors"):
        CheckpointReader(path)


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [4]},
                                   {"dtype": "F32", "shape": [4], "data_offsets": [16]},
                                   {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
                                   {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]},
                                   "not an entry"])
def test_header_entry_without_valid_data_offsets(tmp_path, entry):
    path = raw_safetensors(tmp_path / "entry.safetensors", json.dumps({"w": entry}).encode())
    with pytest.raises(CheckpointError, match=r"entry\.safetensors': the header entry of tensor 'w' is not a "
                                              "safetensors entry"):
        CheckpointReader(path)


def test_metadata_that_is_not_strings(tmp_path):
    header = {"__metadata__": {"config": {"num_heads": 4}}, "w": {"dtype": "F32", "shape": [4],
                                                                  "data_offsets": [0, 16]}}
    path = raw_safetensors(tmp_path / "meta.safetensors", json.dumps(header).encode())
    with pytest.raises(CheckpointError, match="'__metadata__' must map names to strings"):
        CheckpointReader(path)


# ---- config values -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,shown", [("num_heads", 0, "num_heads=0"), ("text_len", 10**12, "text_len="),
                                             ("eps", math.nan, "eps=nan"), ("num_heads", 2.5, "num_heads=2.5"),
                                             ("eps", -1e-6, "eps=-1e-06")])
def test_metadata_config_out_of_bounds(tmp_path, weights, key, value, shown):
    path = write(tmp_path / "m.safetensors", weights, {"config": json.dumps({key: value})})
    with pytest.raises(CheckpointError, match=rf"m\.safetensors' \(metadata 'config'\): config value {shown}.* is "
                                              "out of bounds"):
        load_wan_model(path)


def test_own_config_file_out_of_bounds(tmp_path, weights):
    path = write(tmp_path / "m.safetensors", weights)
    (tmp_path / "m.config.json").write_text(json.dumps({"text_len": 1e12}))
    with pytest.raises(CheckpointError, match=r"m\.config\.json': config value text_len=1000000000000\.0 is out of "
                                              "bounds"):
        load_wan_model(path)


def test_num_heads_that_does_not_divide_the_dim(tmp_path, weights):
    path = write(tmp_path / "m.safetensors", weights, {"config": json.dumps({"num_heads": 3})})
    with pytest.raises(CheckpointError, match="num_heads 3 .* does not divide the model dim 256"):
        load_wan_model(path)


def test_stray_config_json_in_a_shared_folder_is_ignored(tmp_path, weights, caplog):
    first = write(tmp_path / "a.safetensors", weights)
    write(tmp_path / "b.safetensors", weights)
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 4}))
    with caplog.at_level(logging.WARNING, logger="wantalk"):
        model = load_wan_model(first)
    assert model.cfg.num_heads == TINY_I2V.num_heads
    assert "config.json' is ignored for 'a.safetensors': a config.json names no model file" in caplog.text


def test_config_that_names_the_file_is_used_and_logged(tmp_path, weights, caplog):
    path = write(tmp_path / "m.safetensors", weights)
    write(tmp_path / "other.safetensors", weights)
    (tmp_path / "m.config.json").write_text(json.dumps({"num_heads": 4, "dim": 5120}))
    with caplog.at_level(logging.INFO, logger="wantalk"):
        model = load_wan_model(path)
        other = load_wan_model(str(tmp_path / "other.safetensors"))
    assert model.cfg.num_heads == 4 and "config values from the file's own metadata/config: {'num_heads': 4}" in \
        caplog.text
    assert other.cfg.num_heads == TINY_I2V.num_heads


# ---- non-finite weights ------------------------------------------------------------------------------------------

def test_nan_weight_names_tensor_and_file(tmp_path, weights):
    weights[LINEAR].view(-1)[7] = float("nan")
    path = write(tmp_path / "nan.safetensors", weights)
    with pytest.raises(CheckpointError, match=rf"nan\.safetensors': tensor '{LINEAR}' holds 1 non-finite"):
        load_wan_model(path)


def test_inf_norm_weight_in_bf16_file(tmp_path, weights):
    weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    weights["blocks.0.norm3.weight"][3] = float("inf")
    path = write(tmp_path / "inf.safetensors", weights)
    with pytest.raises(CheckpointError, match="tensor 'blocks.0.norm3.weight' holds 1 non-finite"):
        load_wan_model(path)


def test_nan_in_fp8_file(tmp_path, weights):
    weights = dict(weights)
    fp8 = weights[LINEAR].to(torch.float8_e4m3fn)
    fp8.view(torch.uint8).view(-1)[0] = 0x7F                            # e4m3fn NaN
    weights[LINEAR] = fp8
    path = write(tmp_path / "fp8.safetensors", weights)
    with pytest.raises(CheckpointError, match=f"tensor '{LINEAR}' holds 1 non-finite"):
        load_wan_model(path)


def test_nonfinite_count(rng):
    from wantalk.wanvideo.checkpoint import nonfinite_count
    x = torch.randn(1000, generator=rng)
    assert nonfinite_count(x) == 0 and nonfinite_count(x.to(torch.float8_e5m2)) == 0
    x[[3, 500]] = torch.tensor([float("inf"), float("nan")])
    assert nonfinite_count(x) == 2 and nonfinite_count(x.to(torch.bfloat16)) == 2
    assert nonfinite_count(x.to(torch.float8_e5m2)) == 2
    assert nonfinite_count(torch.full((4,), 3e38)) == 0                 # the sum overflows, the values are finite


# ---- LoRA --------------------------------------------------------------------------------------------------------

def lora(tmp_path, weights, rng, up_value=None, alpha=2.0, name="l.safetensors"):
    down = torch.randn(2, weights[LINEAR].shape[1], generator=rng)
    up = torch.randn(weights[LINEAR].shape[0], 2, generator=rng) * 0.01
    if up_value is not None:
        up[0, 0] = up_value
    module = "diffusion_model." + LINEAR.removesuffix(".weight")
    return write(tmp_path / name, {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                                   f"{module}.alpha": torch.tensor(alpha)})


@pytest.fixture
def base_file(tmp_path, weights):
    return write(tmp_path / "base.safetensors", weights)


def test_lora_with_nan_tensor(tmp_path, weights, base_file, rng):
    path = lora(tmp_path, weights, rng, up_value=float("nan"))
    with pytest.raises(LoraError, match=r"LoRA '.*l\.safetensors': tensor 'diffusion_model\.blocks\.1\.ffn\.0\."
                                        r"lora_up\.weight' holds 1 non-finite"):
        load_wan_model(base_file, loras=[(path, 1.0)])


def test_lora_with_nan_alpha(tmp_path, weights, base_file, rng):
    path = lora(tmp_path, weights, rng, alpha=float("inf"))
    with pytest.raises(LoraError, match=r"'diffusion_model\.blocks\.1\.ffn\.0\.alpha' is inf; the file is damaged"):
        load_wan_model(base_file, loras=[(path, 1.0)])


def test_lora_with_nan_strength(tmp_path, weights, base_file, rng):
    path = lora(tmp_path, weights, rng)
    with pytest.raises(LoraError, match="strength nan is not a finite number"):
        load_wan_model(base_file, loras=[(path, float("nan"))])


def test_lora_node_names_the_strength_input(tmp_path, weights, rng, use_models_root):
    from wantalk.nodes_common import NodeInputError
    from wantalk.nodes_lora import WanTalkLoraSelect
    use_models_root(tmp_path / "models")
    (tmp_path / "models" / "loras").mkdir(parents=True)
    lora(tmp_path / "models" / "loras", weights, rng)
    with pytest.raises(NodeInputError, match=r"WanTalk LoRA\] input 'strength': is nan; give a finite number"):
        WanTalkLoraSelect().select("l.safetensors", float("nan"))


# ---- the other model parts -------------------------------------------------------------------------------------

def poisoned(sd, key_part):
    sd = {k: v.clone() for k, v in sd.items()}
    key = next(k for k in sorted(sd) if key_part in k and sd[k].numel() > 1)
    sd[key].view(-1)[1] = float("nan")
    return sd, key


def test_nan_in_vae_file(tmp_path, rng):
    from tiny_models import tiny_vae
    from wantalk.wanvideo.vae import load_wan_vae
    sd, key = poisoned(tiny_vae(rng)[1], "decoder.")
    path = write(tmp_path / "vae.safetensors", sd)
    with pytest.raises(CheckpointError, match=rf"vae\.safetensors': tensor '{key}' holds 1 non-finite"):
        load_wan_vae(path)


def test_nan_in_wav2vec2_file(tmp_path, rng):
    from tiny_models import tiny_wav2vec2
    from wantalk.multitalk.wav2vec2 import load_wav2vec2
    sd, key = poisoned(tiny_wav2vec2(rng)[1], "encoder.")
    path = write(tmp_path / "w2v.safetensors", {"wav2vec2." + k: v for k, v in sd.items()})
    with pytest.raises(CheckpointError, match=rf"w2v\.safetensors': tensor 'wav2vec2\.{key}' holds 1 non-finite"):
        load_wav2vec2(path)


def test_nan_in_whisper_file(tmp_path, rng):
    from tiny_humo import tiny_whisper
    from wantalk.humo.whisper import load_whisper_encoder
    sd, key = poisoned(tiny_whisper(rng)[1], "layers.")
    path = write(tmp_path / "whisper.safetensors", {"model.encoder." + k: v for k, v in sd.items()})
    with pytest.raises(CheckpointError, match=rf"whisper\.safetensors': tensor '.*' holds 1 non-finite"):
        load_whisper_encoder(path)
