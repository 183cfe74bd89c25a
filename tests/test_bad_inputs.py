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


# ---- 11. each widget error names its own input ---------------------------------------------------------------

@pytest.mark.parametrize("widget,value,expected", [
    ("steps", 0, "must be between 1 and 200, got 0"),
    ("steps", 2.5, "expected a whole number"),
    ("shift", -1.0, "must be between 0.0 and 100.0"),
    ("scheduler", "euler_ancestral_x", "unknown value 'euler_ancestral_x'; choose one of"),
    ("color_correction", 2.0, "must be between 0.0 and 1.0"),
    ("seed", 2**64, f"must be between 0 and {2**63 - 1}"),
    ("seed", -1, "must be between 0"),
    ("seed", 10**400, "must be between 0 and"),
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
    with pytest.raises(NodeInputError, match=rf"{IT}\] input 'model': this is a HuMo model; use it with HuMo "
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
def model_folders(tmp_path, use_models_root):
    use_models_root(tmp_path / "models")
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
                                                  r"are refused\)"):
        host.model_path("vae", name)


def test_loader_node_names_the_input_for_a_path_outside_the_folder(model_folders):
    from wantalk.nodes_infinitetalk import WanTalkVAELoader
    with pytest.raises(NodeInputError, match=r"Load Wan VAE\] input 'vae_name': .* points outside the models/vae"):
        WanTalkVAELoader().load(str(model_folders / "secret.safetensors"), "bf16")


# ---- audio: integer PCM, silence, the wrong encoder ------------------------------------------------------------

@pytest.fixture(scope="module")
def wav2vec2():
    from tiny_models import tiny_wav2vec2
    return tiny_wav2vec2(torch.Generator().manual_seed(1))[0]


@pytest.fixture(scope="module")
def whisper():
    from tiny_humo import tiny_whisper
    return tiny_whisper(torch.Generator().manual_seed(1))[0]


def speech_clip(rng, seconds=0.6):
    from tiny_models import synth_speech
    wave = synth_speech(seconds, 16000, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    return (0.5 * wave / wave.abs().max())[None, None]


def embeds(encoder, audio, **extra):
    from wantalk.nodes_audio import WanTalkAudioEmbeds
    return WanTalkAudioEmbeds().embed(audio, False, 1.0, 0, "para", audio_encoder=encoder, **extra)


def test_int32_pcm_is_normalised_by_its_dtype(wav2vec2, rng):
    wave = speech_clip(rng)
    pcm = (wave * 2**31).round().to(torch.int32)
    reference, _, _ = embeds(wav2vec2, {"waveform": pcm.float() / 2**31, "sample_rate": 16000})
    from_pcm, _, _ = embeds(wav2vec2, {"waveform": pcm, "sample_rate": 16000})
    assert torch.allclose(from_pcm.talk.features[0], reference.talk.features[0], atol=1e-5)


def test_integer_pcm_stored_as_float_is_refused(wav2vec2, rng):
    pcm_as_float = (speech_clip(rng) * 2**31).round()
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'audio_1': has float samples up to .*e\+0?9; "
                                             "ComfyUI AUDIO is float in -1..1.*divide by 32768"):
        embeds(wav2vec2, {"waveform": pcm_as_float, "sample_rate": 16000})


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_audio_is_named_as_such_not_as_pcm_stored_as_float(wav2vec2, rng, bad):
    wave = speech_clip(rng).clone()
    wave[0, 0, 123] = bad
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'audio_1': contains 1 NaN/inf samples of"):
        embeds(wav2vec2, {"waveform": wave, "sample_rate": 16000})


def test_silence_as_speech_warns(wav2vec2, warnings_seen):
    embeds(wav2vec2, {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000})
    assert any("[wantalk Audio Embeds] input 'audio_1' is silent" in w for w in warnings_seen)


def test_speech_does_not_warn(wav2vec2, rng, warnings_seen):
    embeds(wav2vec2, {"waveform": speech_clip(rng), "sample_rate": 16000})
    assert not warnings_seen


def test_whisper_into_infinitetalk_audio_embeds(whisper, rng):
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'audio_encoder': got WhisperEncoder; expected "
                                             "the wav2vec2 encoder"):
        embeds(whisper, {"waveform": speech_clip(rng), "sample_rate": 16000})


def test_wav2vec2_into_humo_embeds(wav2vec2, rng):
    from wantalk.nodes_humo import WanTalkHuMoEmbeds
    with pytest.raises(NodeInputError, match=r"HuMo Embeds\] input 'whisper': got Wav2Vec2Encoder; expected the "
                                             "Whisper encoder"):
        WanTalkHuMoEmbeds().embed({"waveform": speech_clip(rng), "sample_rate": 16000}, 0, whisper=wav2vec2)


def test_humo_embeds_checks_audio_and_reference_images(whisper, rng, warnings_seen):
    from wantalk.nodes_humo import WanTalkHuMoEmbeds
    clip = {"waveform": speech_clip(rng), "sample_rate": 16000}
    with pytest.raises(NodeInputError, match=r"HuMo Embeds\] input 'reference_images': contains 1 NaN/inf pixels"):
        WanTalkHuMoEmbeds().embed(clip, 0, whisper=whisper, reference_images=with_nan(torch.rand(1, 80, 64, 3)))
    with pytest.raises(NodeInputError, match="input 'reference_images': has values from .* looks like 0..255"):
        WanTalkHuMoEmbeds().embed(clip, 0, whisper=whisper, reference_images=torch.rand(1, 80, 64, 3) * 255)
    with pytest.raises(NodeInputError, match=r"HuMo Embeds\] input 'audio': has float samples up to"):
        WanTalkHuMoEmbeds().embed({"waveform": clip["waveform"] * 2**15, "sample_rate": 16000}, 0, whisper=whisper)
    WanTalkHuMoEmbeds().embed({"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}, 0, whisper=whisper,
                              reference_images=torch.rand(1, 7, 7, 3))
    assert any("input 'audio' is silent" in w for w in warnings_seen)
    assert any("input 'reference_images' is only 7x7 pixels" in w for w in warnings_seen)


# ---- HuMo sampler: mismatched parts and widgets ----------------------------------------------------------------

@pytest.fixture(scope="module")
def humo_parts():
    from tiny_humo import tiny_graph_humo
    g = torch.Generator().manual_seed(6)
    return tiny_graph_humo(g)[0], tiny_vae(g)[0]


def humo_sample(parts, rng, **changes):
    from wantalk.nodes_humo import HumoEmbeds, WanTalkHuMoSampler
    model, vae = parts
    audio = {"waveform": torch.randn(1, 1, 5 * 640, generator=rng) * 0.1, "sample_rate": 16000}
    args = dict(model=model, vae=vae, humo_embeds=HumoEmbeds(torch.randn(5, 5, 64, generator=rng), [], audio),
                positive=[[torch.randn(1, 6, 64, generator=rng), {}]],
                negative=[[torch.randn(1, 4, 64, generator=rng), {}]],
                width=32, height=32, steps=1, shift=5.0, scheduler="unipc", guidance="ta", text_scale=5.0,
                audio_scale=5.5, seed=3, frame_window=5, motion_frames=1, max_frames=0, save_windows=False)
    args.update(changes)
    return WanTalkHuMoSampler().sample(**args)


@pytest.mark.parametrize("widget,value,expected", [
    ("steps", 0, "must be between 1 and 200"), ("seed", 2**64, "must be between 0 and"),
    ("guidance", "tiax", "unknown value 'tiax'"), ("text_scale", math.nan, "is nan; give a finite number"),
    ("shift", math.inf, "is inf; give a finite number"), ("image_scale", -1.0, "must be between 0.0 and 30.0"),
])
def test_humo_bad_widget_is_reported_against_its_own_input(humo_parts, rng, widget, value, expected):
    with pytest.raises(NodeInputError, match=rf"HuMo Sampler\] input '{widget}': {expected}"):
        humo_sample(humo_parts, rng, **{widget: value})


def test_infinitetalk_parts_into_humo_sampler(humo_parts, parts, rng):
    with pytest.raises(NodeInputError, match=r"HuMo Sampler\] input 'model': this is an InfiniteTalk/MultiTalk "
                                             r"model; use it with InfiniteTalk Sampler \(wantalk\)"):
        humo_sample(humo_parts, rng, model=parts[0])
    wav2vec2_embeds = AudioEmbeds(TalkAudio([torch.randn(5, LAYERS, CHANNELS, generator=rng)]),
                                  {"waveform": torch.zeros(1, 1, 3200), "sample_rate": 16000})
    with pytest.raises(NodeInputError, match=r"input 'humo_embeds': got AudioEmbeds; expected the output of HuMo "
                                             r"Embeds \(wantalk\)"):
        humo_sample(humo_parts, rng, humo_embeds=wav2vec2_embeds)


def test_humo_model_in_the_infinitetalk_conditioning(humo_parts, parts, rng):
    """Below the nodes too: the conditioning builders say which model they got (was AttributeError 'audio_window')."""
    from wantalk.humo.conditioning import humo_conditioning
    from wantalk.multitalk.conditioning import audio_conditioning
    with pytest.raises(ValueError, match=r"no InfiniteTalk/MultiTalk audio layers \(it is a HuMo model: use the HuMo "
                                         "sampler\\)"):
        audio_conditioning(humo_parts[0], torch.randn(5, 5, LAYERS, CHANNELS, generator=rng))
    with pytest.raises(ValueError, match=r"no HuMo audio layers \(it is an InfiniteTalk/MultiTalk model"):
        humo_conditioning(parts[0], torch.randn(3, 8, 5, 64, generator=rng))


def test_loader_widgets_are_named(model_folders):
    from wantalk.nodes_infinitetalk import WanTalkVAELoader
    from wantalk.nodes_lowvram import WanTalkBlockSwap
    from wantalk.nodes_model_loading import WanTalkModelLoader
    with pytest.raises(NodeInputError, match=r"Load Wan Model\] input 'quantization': unknown value 'fp9'; "
                                             "choose one of disabled"):
        WanTalkModelLoader().load("m.safetensors", "bf16", "fp9", "auto", "main_device")
    with pytest.raises(NodeInputError, match=r"Load Wan Model\] input 'base_precision': unknown value 'fp64'"):
        WanTalkModelLoader().load("m.safetensors", "fp64", "disabled", "auto", "main_device")
    with pytest.raises(NodeInputError, match=r"Block Swap\] input 'blocks_to_swap': expected a whole number, got 1.5"):
        WanTalkBlockSwap().configure(None, 1.5, 1)
    with pytest.raises(NodeInputError, match=r"Load Wan VAE\] input 'precision': unknown value 'fp64'"):
        WanTalkVAELoader().load("v.safetensors", "fp64")


def test_two_speakers_on_the_single_speaker_model_warn(parts, rng, warnings_seen, monkeypatch):
    monkeypatch.setattr(parts[0], "source_paths", ("/models/diffusion_models/wan_i2v_14b.safetensors",
                                                   "/models/model_patches/Wan2_1-InfiniteTalk_Single_14B.safetensors"),
                        raising=False)
    inputs = graph_inputs(rng, speakers=2)
    sample(parts, inputs, width=64)
    assert any("input 'audio_embeds' has two speakers but the model was loaded from '/models/model_patches/Wan2_1-"
               "InfiniteTalk_Single_14B.safetensors', which looks like the single-speaker" in w for w in warnings_seen)
    warnings_seen.clear()
    sample(parts, graph_inputs(rng, speakers=1))
    assert not any("two speakers" in w for w in warnings_seen)


def test_nan_in_native_encoder_outputs(rng):
    from wantalk.nodes_audio import WanTalkAudioEmbeds
    from wantalk.nodes_humo import WanTalkHuMoEmbeds
    clip = {"waveform": speech_clip(rng, 0.4), "sample_rate": 16000}
    layers = [torch.randn(1, 20, CHANNELS, generator=rng) for _ in range(LAYERS + 1)]
    layers[3] = with_nan(layers[3])
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'encoded_audio_1': contains 1 NaN/inf feature "
                                             r"values \(speaker 1\)"):
        WanTalkAudioEmbeds().embed(clip, False, 1.0, 0, "para", encoded_audio_1={"encoded_audio_all_layers": layers})
    whisper_layers = [torch.randn(1, 20, 64, generator=rng) for _ in range(33)]
    whisper_layers[30] = with_nan(whisper_layers[30])
    with pytest.raises(NodeInputError, match=r"HuMo Embeds\] input 'encoded_audio': contains \d+ NaN/inf band values"):
        WanTalkHuMoEmbeds().embed(clip, 0, encoded_audio={"encoded_audio_all_layers": whisper_layers,
                                                          "audio_samples": 6400})


def test_warn_user_shows_the_warning_on_the_running_node(monkeypatch):
    """In ComfyUI the warning goes to the executing node as progress text (what ComfyUI's own nodes use)."""
    import sys
    import types
    sent = []
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(
        send_progress_text=lambda text, node_id: sent.append((text, node_id)),
        send_sync=lambda event, data, sid: sent.append((event, data, sid)), client_id="c1"))
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: types.SimpleNamespace(node_id="17", prompt_id="p")
    monkeypatch.setitem(sys.modules, "server", server)
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    monkeypatch.setattr(host, "_folder_paths", object())
    host.warn_user("[wantalk X] input 'audio' is silent")
    assert sent == [("warning: [wantalk X] input 'audio' is silent", "17"),
                    ("wantalk.warning", {"message": "[wantalk X] input 'audio' is silent", "node": "17"}, "c1")]


def test_nan_in_a_speaker_mask(wav2vec2, rng):
    clip = {"waveform": speech_clip(rng), "sample_rate": 16000}
    mask = torch.zeros(1, 32, 32)
    mask[0, :, :16] = 1
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'mask_2': contains 1 NaN/inf mask values"):
        embeds(wav2vec2, clip, audio_2=clip, mask_1=mask, mask_2=with_nan(1 - mask, 40))


def test_damaged_embeddings_file(model_folders, monkeypatch):
    from wantalk.nodes_infinitetalk import WanTalkLoadEmbeddings
    monkeypatch.chdir(model_folders)
    folder = model_folders / "output" / "wantalk_embeddings"
    folder.mkdir(parents=True)
    (folder / "bad.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{\"a\": [1, 2, 3]}")
    with pytest.raises(NodeInputError, match=r"Load Embeddings\] input 'embeddings': '.*bad\.safetensors' cannot be "
                                             "read as safetensors"):
        WanTalkLoadEmbeddings().load("bad.safetensors")


def test_addon_path_outside_the_folders_is_named(model_folders):
    from wantalk.nodes_model_loading import WanTalkModelLoader
    (model_folders / "models" / "diffusion_models").mkdir()
    (model_folders / "models" / "diffusion_models" / "m.safetensors").write_bytes(b"x")
    with pytest.raises(NodeInputError, match=r"Load Wan Model\] input 'addon_model': model_patches file name "
                                             r"'\.\./\.\./secret\.safetensors' points outside"):
        WanTalkModelLoader().load("m.safetensors", "bf16", "disabled", "auto", "main_device",
                                  addon_model="../../secret.safetensors")
