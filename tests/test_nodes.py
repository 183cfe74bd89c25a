"""Node classes as plain Python: schemas are complete, loading works through the node, errors name node + input."""
import pytest
import torch

import wantalk
from wantalk import host, nodes_model_loading
from wantalk.wanvideo.loader import load_wan_model
from tiny_models import TINY_I2V, save_state_dict, tiny_wan


def test_every_node_input_has_a_tooltip():
    assert wantalk.NODE_CLASS_MAPPINGS
    for name, cls in wantalk.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, value in spec.get(section, {}).items():
                opts = value[1] if len(value) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert name in wantalk.NODE_DISPLAY_NAME_MAPPINGS
        assert hasattr(cls, cls.FUNCTION)


@pytest.fixture
def models_dir(tmp_path, use_models_root):
    use_models_root(tmp_path)
    return tmp_path


def test_loader_node_loads_from_the_models_folder(models_dir, rng):
    _, sd = tiny_wan(TINY_I2V, rng)
    save_state_dict(sd, str(models_dir / "diffusion_models" / "tiny_i2v.safetensors"), dtype=torch.bfloat16)
    spec = nodes_model_loading.WanTalkModelLoader.INPUT_TYPES()
    assert "tiny_i2v.safetensors" in spec["required"]["model"][0]
    model, report = nodes_model_loading.WanTalkModelLoader().load("tiny_i2v.safetensors", "bf16", "disabled", "auto",
                                                                    "offload_device")
    assert model.cfg.dim == TINY_I2V.dim and "disabled" in report


def test_loader_node_errors_name_the_input(models_dir, rng):
    (models_dir / "diffusion_models").mkdir()
    (models_dir / "diffusion_models" / "broken.safetensors").write_bytes(b"\x00" * 64)
    node = nodes_model_loading.WanTalkModelLoader()
    with pytest.raises(ValueError, match=r"\[wantalk Load Wan Model\] input 'model'"):
        node.load("broken.safetensors", "bf16", "disabled", "auto", "offload_device")
    with pytest.raises(ValueError, match="input 'model'.*not found"):
        node.load("absent.safetensors", "bf16", "disabled", "auto", "offload_device")


def test_loader_asks_comfyui_for_room_only_on_cuda(models_dir, rng, monkeypatch):
    _, sd = tiny_wan(TINY_I2V, rng)
    path = save_state_dict(sd, str(models_dir / "diffusion_models" / "tiny.safetensors"))
    params = sum(v.numel() for v in sd.values())
    assert nodes_model_loading.expected_model_bytes([path], "disabled") == 2 * params
    for mode in ("fp8_e4m3fn_scaled_fast", "fp4"):  # the layer plan's bytes: exactly what the load holds
        loaded = load_wan_model(path, quantization=mode)
        held = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
        assert nodes_model_loading.expected_model_bytes([path], mode) == held < 1.3 * params
    asked = []
    monkeypatch.setattr(host, "free_memory", lambda n, device: asked.append(n))
    nodes_model_loading.WanTalkModelLoader().load("tiny.safetensors", "bf16", "disabled", "auto", "offload_device")
    assert asked == []  # loading to the CPU takes no GPU memory


def test_cpu_compute_device_runs_the_model_where_it_is(rng):
    from wantalk.nodes_lowvram import compute_device_for
    model, _ = tiny_wan(TINY_I2V, rng)
    assert compute_device_for(model, "test").type == "cpu" and model.block_runner is None
