"""Careless and crafted inputs through the nodes as plain Python (issue 15): each is refused with an error that
names the node, the input and what was expected, or warned about (log + ComfyUI) when it is only probable."""
import logging
import math

import pytest
import torch

from wantalk import host
from wantalk.nodes_audio import AudioEmbeds
from wantalk.nodes_common import NodeInputError
from wantalk.nodes_infinitetalk import ClipVisionEmbeds, WanTalkInfiniteTalkSampler
from wantalk.multitalk.long_video import TalkAudio
from tiny_models import TINY_I2V, tiny_graph_infinitetalk_config, tiny_infinitetalk, tiny_vae, tiny_wan

LAYERS, CHANNELS = 12, 64
IT = "InfiniteTalk Sampler"
SMALL = dict(width=32, height=32, steps=1, shift=7.0, scheduler="infinitetalk_euler", text_scale=2.0,
             audio_scale=3.0, seed=5, frame_window=5, motion_frames=1, color_correction=0.5, max_frames=0,
             save_windows=False)


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator().manual_seed(2)
    return tiny_infinitetalk(g, config=tiny_graph_infinitetalk_config())[0], tiny_vae(g)[0]


def graph_inputs(rng, frames=5, speakers=1):
    features = [torch.randn(frames, LAYERS, CHANNELS, generator=rng) for _ in range(speakers)]
    audio = {"waveform": torch.randn(1, 1, frames * 640, generator=rng), "sample_rate": 16000}
    return dict(audio_embeds=AudioEmbeds(TalkAudio(features), audio),
                positive=[[torch.randn(1, 6, TINY_I2V.text_dim, generator=rng), {}]],
                negative=[[torch.randn(1, 6, TINY_I2V.text_dim, generator=rng), {}]],
                start_image=torch.rand(1, 40, 48, 3, generator=rng),
                clip_vision_output=ClipVisionEmbeds(torch.randn(1, 257, TINY_I2V.clip_dim, generator=rng)))


def sample(parts, inputs, **changes):
    model, vae = parts
    args = {**inputs, **SMALL, **changes}
    return WanTalkInfiniteTalkSampler().sample(args.pop("model", model), args.pop("vae", vae), **args)


def with_nan(tensor, index=0):
    bad = tensor.clone()
    bad.view(-1)[index] = float("nan")
    return bad


@pytest.fixture
def warnings_seen(monkeypatch):
    """What host.warn_user was asked to show (the ComfyUI toast path needs a server; the log path is host's)."""
    seen = []
    monkeypatch.setattr(host, "warn_user", seen.append)
    return seen


# ---- 1. non-finite values ----------------------------------------------------------------------------------------

def test_nan_pixel_in_start_image_is_refused(parts, rng):
    inputs = graph_inputs(rng)
    inputs["start_image"] = with_nan(inputs["start_image"], 17)
    with pytest.raises(NodeInputError, match=rf"\[wantalk {IT}\] input 'start_image': contains 1 NaN/inf pixels"):
        sample(parts, inputs)


@pytest.mark.parametrize("widget", ["text_scale", "audio_scale", "shift", "color_correction"])
def test_nan_float_widget_is_refused(parts, rng, widget):
    with pytest.raises(NodeInputError, match=rf"{IT}\] input '{widget}': is nan; give a finite number"):
        sample(parts, graph_inputs(rng), **{widget: math.nan})


@pytest.mark.parametrize("name", ["positive", "negative"])
def test_nan_in_prompt_conditioning_is_refused(parts, rng, name):
    inputs = graph_inputs(rng)
    inputs[name] = [[with_nan(inputs[name][0][0], 5), {}]]
    with pytest.raises(NodeInputError, match=rf"input '{name}': contains 1 NaN/inf embedding values"):
        sample(parts, inputs)


def test_nan_in_clip_features_is_refused(parts, rng):
    inputs = graph_inputs(rng)
    inputs["clip_vision_output"] = ClipVisionEmbeds(with_nan(inputs["clip_vision_output"].penultimate_hidden_states))
    with pytest.raises(NodeInputError, match="input 'clip_vision_output': contains 1 NaN/inf feature values"):
        sample(parts, inputs)


# ---- 2. ranges and layouts ---------------------------------------------------------------------------------------

def test_float_image_in_0_255_is_refused(parts, rng):
    inputs = graph_inputs(rng)
    inputs["start_image"] = inputs["start_image"] * 255
    with pytest.raises(NodeInputError, match="input 'start_image': has values from .* a ComfyUI IMAGE is in 0..1 "
                                             r"\(this looks like 0..255: divide by 255"):
        sample(parts, inputs)


def test_uint8_image_is_converted_with_a_warning(parts, rng, warnings_seen):
    inputs = graph_inputs(rng)
    reference, _, _ = sample(parts, inputs)
    inputs["start_image"] = (inputs["start_image"] * 255).round().to(torch.uint8)
    converted, _, _ = sample(parts, inputs)
    assert any("'start_image' is uint8 (0..255); converted" in w for w in warnings_seen)
    assert (converted - reference).abs().mean() < 1 / 255   # the same picture up to rounding, not a white image


def test_channels_first_image_is_refused(parts, rng):
    inputs = graph_inputs(rng)
    inputs["start_image"] = torch.rand(1, 3, 40, 48, generator=rng)
    with pytest.raises(NodeInputError, match=r"input 'start_image': has shape \(1, 3, 40, 48\): channels first"):
        sample(parts, inputs)


def test_empty_image_batch_is_refused(parts, rng):
    inputs = graph_inputs(rng)
    inputs["start_image"] = torch.rand(0, 40, 48, 3)
    with pytest.raises(NodeInputError, match=r"input 'start_image': is empty \(shape \(0, 40, 48, 3\)\)"):
        sample(parts, inputs)


def test_two_dimensional_clip_features_are_refused(parts, rng):
    inputs = graph_inputs(rng)
    inputs["clip_vision_output"] = ClipVisionEmbeds(torch.randn(257, TINY_I2V.clip_dim, generator=rng))
    with pytest.raises(NodeInputError, match=r"input 'clip_vision_output': expected CLIP vision features "
                                             r"\[1, 257, 1280\]"):
        sample(parts, inputs)


@pytest.mark.parametrize("width", [0, -16])
def test_zero_or_negative_width_is_refused(parts, rng, width):
    with pytest.raises(NodeInputError, match=rf"input 'width': must be between 16 and 4096, got {width}"):
        sample(parts, graph_inputs(rng), width=width)


def test_batch_of_start_images_warns_that_only_the_first_is_used(parts, rng, warnings_seen):
    inputs = graph_inputs(rng)
    inputs["start_image"] = torch.rand(3, 40, 48, 3, generator=rng)
    sample(parts, inputs)
    assert any(f"[wantalk {IT}] input 'start_image' is a batch of 3 images; only the first is used" in w
               for w in warnings_seen)


# ---- 11. each widget error names its own input ---------------------------------------------------------------

@pytest.mark.parametrize("widget,value,expected", [
    ("steps", 0, "must be between 1 and 200, got 0"),
    ("steps", 2.5, "expected a whole number"),
    ("shift", -1.0, "must be between 0.0 and 100.0"),
    ("scheduler", "euler_ancestral_x", "unknown value 'euler_ancestral_x'; choose one of"),
    ("color_correction", 2.0, "must be between 0.0 and 1.0"),
    ("seed", 2**64, f"must be between 0 and {2**63 - 1}"),
    ("seed", -1, "must be between 0"),
    ("save_windows", "yes", "expected true or false"),
])
def test_bad_widget_is_reported_against_its_own_input(parts, rng, widget, value, expected):
    with pytest.raises(NodeInputError, match=rf"{IT}\] input '{widget}': {expected}"):
        sample(parts, graph_inputs(rng), **{widget: value})


# ---- 12. probable mistakes warn without refusing ------------------------------------------------------------

def test_tiny_start_image_warns(parts, rng, warnings_seen):
    inputs = graph_inputs(rng)
    inputs["start_image"] = torch.rand(1, 7, 7, 3, generator=rng)
    frames, _, _ = sample(parts, inputs)
    assert frames.shape[0] == 5
    assert any("input 'start_image' is only 7x7 pixels" in w for w in warnings_seen)


def test_warn_user_logs_outside_comfyui(caplog):
    with caplog.at_level(logging.WARNING, logger="wantalk"):
        host.warn_user("[wantalk X] input 'y' looks odd")
    assert "input 'y' looks odd" in caplog.text


# ---- 5. mismatched parts -----------------------------------------------------------------------------------------

def test_humo_model_into_infinitetalk_sampler(parts, rng):
    from tiny_humo import tiny_graph_humo
    humo = tiny_graph_humo(torch.Generator().manual_seed(3))[0]
    with pytest.raises(NodeInputError, match=rf"{IT}\] input 'model': this is a humo model; use it with HuMo "
                                             r"Sampler \(wantalk\)\. Expected a Wan 2.1 I2V 14B model with "
                                             "InfiniteTalk"):
        sample(parts, graph_inputs(rng), model=humo)


def test_plain_model_into_infinitetalk_sampler(parts, rng):
    plain = tiny_wan(TINY_I2V, torch.Generator().manual_seed(4))[0]
    with pytest.raises(NodeInputError, match="input 'model': this is a plain Wan I2V model without audio layers"):
        sample(parts, graph_inputs(rng), model=plain)


def test_wrong_vae_and_wrong_embeds_into_infinitetalk_sampler(parts, rng):
    from wantalk.nodes_humo import HumoEmbeds
    with pytest.raises(NodeInputError, match="input 'vae': expected the Wan 2.1 VAE from Load Wan VAE"):
        sample(parts, graph_inputs(rng), vae=object())
    inputs = graph_inputs(rng)
    inputs["audio_embeds"] = HumoEmbeds(torch.randn(5, 5, 64, generator=rng), [], inputs["audio_embeds"].audio)
    with pytest.raises(NodeInputError, match="input 'audio_embeds': got HumoEmbeds; expected the output of Audio "
                                             r"Embeds \(wantalk\)"):
        sample(parts, inputs)


# ---- 7. paths ----------------------------------------------------------------------------------------------------

@pytest.fixture
def model_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "_FALLBACK_ROOT", str(tmp_path / "models"))
    (tmp_path / "models" / "vae" / "sub").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "sub" / "good.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    return tmp_path


def test_model_path_resolves_names_inside_the_folder(model_folders):
    assert host.model_path("vae", "sub/good.safetensors") == str(model_folders / "models" / "vae" / "sub" /
                                                                 "good.safetensors")


@pytest.mark.parametrize("name", ["../../secret.safetensors", "sub/../../../secret.safetensors",
                                  "..\\..\\secret.safetensors", "ABSOLUTE"])
def test_model_path_refuses_absolute_paths_and_traversal(model_folders, name):
    name = str(model_folders / "secret.safetensors") if name == "ABSOLUTE" else name
    with pytest.raises(host.ModelPathError, match=r"points outside the models/vae folder \(absolute paths and '..' "
                                                  "are refused\)"):
        host.model_path("vae", name)


def test_loader_node_names_the_input_for_a_path_outside_the_folder(model_folders):
    from wantalk.nodes_infinitetalk import WanTalkVAELoader
    with pytest.raises(NodeInputError, match=r"Load Wan VAE\] input 'vae_name': .* points outside the models/vae"):
        WanTalkVAELoader().load(str(model_folders / "secret.safetensors"), "bf16")
