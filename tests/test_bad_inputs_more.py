"""More careless and crafted inputs through the nodes as plain Python (issue 15, the bad-input lists of issues 14
and 18): each case ended in a raw exception from deep inside, unbounded work, or a silently wrong video before it
was refused at the node boundary with an error that names the node and the input."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from wantalk import host
from wantalk.nodes_audio import AudioEmbeds
from wantalk.nodes_common import NodeInputError
from wantalk.nodes_infinitetalk import ClipVisionEmbeds, WanTalkLoadEmbeddings, WanTalkSaveEmbeddings
from wantalk.multitalk.long_video import TalkAudio
from test_bad_inputs import (IT, LAYERS, CHANNELS, embeds, graph_inputs, parts, sample,  # noqa: F401 (fixtures)
                             speech_clip, wav2vec2)
from tiny_models import TINY_I2V, make_tiny_lora, tiny_vae, write_tiny_infinitetalk_files


# ---- INT widgets that are not Python ints (was TypeError in a slice / manual_seed) ----------------------------

@pytest.mark.parametrize("widget,value", [("width", 32.0), ("seed", 5.0), ("seed", "numpy")])
def test_int_widget_given_a_float_or_numpy_int(parts, rng, widget, value):
    import numpy as np
    value = np.int64(5) if value == "numpy" else value
    with pytest.raises(NodeInputError, match=rf"{IT}\] input '{widget}': expected a whole number \(Python int\)"):
        sample(parts, graph_inputs(rng), **{widget: value})


# ---- a NaN that slips past every input check gives an error, not a black video --------------------------------

def test_extreme_but_finite_prompt_that_overflows_is_an_error_not_a_clamped_video(parts, rng):
    """A finite 1e30 embedding made NaN latents that the uint8 conversion clamped into a plausible video."""
    inputs = graph_inputs(rng)
    inputs["positive"] = [[torch.randn(1, 6, TINY_I2V.text_dim, generator=rng) * 1e30, {}]]
    with pytest.raises(NodeInputError, match=rf"{IT}\] input 'audio_embeds/model': window 1 of 1 produced NaN/inf"):
        sample(parts, inputs)


def test_nan_reference_in_crafted_humo_embeds_is_refused(rng):
    from tiny_humo import tiny_graph_humo
    from wantalk.nodes_humo import HumoEmbeds, WanTalkHuMoSampler
    g = torch.Generator().manual_seed(6)
    model, vae = tiny_graph_humo(g)[0], tiny_vae(g)[0]
    audio = {"waveform": torch.randn(1, 1, 3200, generator=rng) * 0.1, "sample_rate": 16000}
    reference = torch.rand(3, 32, 32, generator=rng) * 2 - 1
    reference[1, 2, 3] = math.nan
    with pytest.raises(NodeInputError, match=r"HuMo Sampler\] input 'humo_embeds': contains 1 NaN/inf reference"):
        WanTalkHuMoSampler().sample(model, vae, HumoEmbeds(torch.randn(5, 5, 64, generator=rng), [reference], audio),
                                    [[torch.randn(1, 6, 64, generator=rng), {}]],
                                    [[torch.randn(1, 4, 64, generator=rng), {}]], 32, 32, 1, 5.0, "unipc", "tia",
                                    5.0, 5.5, 3, 5, 1, 0, False)


# ---- CLIP features and the CLIP vision model -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 257, 32), (1, 0, 32)])
def test_empty_clip_features_are_refused(parts, rng, shape):
    inputs = graph_inputs(rng)
    inputs["clip_vision_output"] = ClipVisionEmbeds(torch.randn(shape, generator=rng))
    with pytest.raises(NodeInputError, match=rf"{IT}\] input 'clip_vision_output': expected CLIP vision features"):
        sample(parts, inputs)


class _Encodes:
    """A stand-in CLIP vision object whose encode_image returns `out`."""

    def __init__(self, out):
        self.out = out

    def encode_image(self, pixels, crop=True):
        return self.out


@pytest.mark.parametrize("clip_vision,expected", [
    (object(), "expected the CLIP vision model from Load CLIP Vision .* got object"),
    (_Encodes({}), "expected the CLIP vision model from Load CLIP Vision .* got _Encodes"),
    (_Encodes({"penultimate_hidden_states": torch.randn(257, 32)}), "expected CLIP vision features"),
    (_Encodes({"penultimate_hidden_states": torch.randn(0, 257, 32)}), "expected CLIP vision features"),
])
def test_wrong_clip_vision_object_is_named(parts, rng, clip_vision, expected):
    with pytest.raises(NodeInputError, match=rf"{IT}\] input 'clip_vision': {expected}"):
        sample(parts, graph_inputs(rng), clip_vision_output=None, clip_vision=clip_vision)


def test_audio_embeds_without_speakers(parts, rng):
    inputs = graph_inputs(rng)
    inputs["audio_embeds"] = AudioEmbeds(TalkAudio([]), inputs["audio_embeds"].audio)
    with pytest.raises(NodeInputError, match=rf"{IT}\] input 'audio_embeds': holds no speaker's features"):
        sample(parts, inputs)


# ---- Audio Embeds ------------------------------------------------------------------------------------------------

def test_missing_audio_1(wav2vec2):
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'audio_1': connect the speech of speaker 1"):
        embeds(wav2vec2, None)


def test_sample_rate_far_below_audio_rates_is_refused_before_any_work(wav2vec2, rng):
    """8000 samples 'at 1 Hz' were resampled to 2 hours of 16 kHz audio and encoded (195 s on the tiny encoder)."""
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'audio_1': audio_1: sample rate 1 Hz is not an "
                                             "audio rate"):
        embeds(wav2vec2, {"waveform": speech_clip(rng), "sample_rate": 1})


def test_channels_last_waveform_is_named(wav2vec2, rng):
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'audio_1': .* it looks channels last"):
        embeds(wav2vec2, {"waveform": speech_clip(rng).transpose(1, 2).repeat(1, 1, 2), "sample_rate": 16000})


def test_unsigned_8_bit_pcm_is_centred(wav2vec2, rng):
    """8-bit WAV is unsigned around 128: divided by 256 it kept a 0.5 offset in the output audio."""
    wave = speech_clip(rng)
    reference = embeds(wav2vec2, {"waveform": wave, "sample_rate": 16000})[1]["waveform"]
    pcm = (wave * 127 + 128).round().to(torch.uint8)
    out = embeds(wav2vec2, {"waveform": pcm, "sample_rate": 16000})[1]["waveform"]
    assert float((out - reference).abs().max()) < 2 / 127   # 8-bit rounding, not a 0.5 offset


@pytest.mark.parametrize("layers", [[1, 2, 3], "shapes"])
def test_malformed_native_encoder_output(rng, layers):
    if layers == "shapes":
        layers = [torch.randn(1, 20, CHANNELS, generator=rng) for _ in range(LAYERS)] + [torch.randn(1, 21, 32)]
    clip = {"waveform": speech_clip(rng), "sample_rate": 16000}
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'encoded_audio_1': 'encoded_audio_all_layers' "
                                             "must be equally shaped"):
        embeds(None, clip, encoded_audio_1={"encoded_audio_all_layers": layers})


@pytest.mark.parametrize("mask", ["numpy", (1, 1, 32, 32)])
def test_malformed_speaker_mask(wav2vec2, rng, mask):
    mask = torch.ones(1, 32, 32).numpy() if mask == "numpy" else torch.ones(mask)
    clip = {"waveform": speech_clip(rng), "sample_rate": 16000}
    with pytest.raises(NodeInputError, match=r"Audio Embeds\] input 'mask_1': expected a MASK \[height, width\]"):
        embeds(wav2vec2, clip, audio_2=clip, mask_1=mask)


# ---- embeddings files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [5, "a\0b", ".."])
def test_bad_embeddings_file_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    text = [[torch.randn(1, 4, 64), {}]]
    with pytest.raises(NodeInputError, match=r"Save Embeddings\] input 'name': "):
        WanTalkSaveEmbeddings().save(text, text, name)


def test_save_embeddings_with_a_wrong_clip_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = [[torch.randn(1, 4, 64), {}]]
    with pytest.raises(NodeInputError, match=r"Save Embeddings\] input 'clip_vision_output': expected the output"):
        WanTalkSaveEmbeddings().save(text, text, "p", clip_vision_output=object())
    with pytest.raises(NodeInputError, match=r"Load Embeddings\] input 'embeddings': choose a file"):
        WanTalkLoadEmbeddings().load(None)


# ---- the model loader, LoRAs and the Multi-GPU node ------------------------------------------------------------

@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    files = write_tiny_infinitetalk_files(str(root), 0)
    lora = make_tiny_lora(str(root / "loras" / "good.safetensors"), load_file(files["diffusion_models"]),
                          torch.Generator().manual_seed(0))
    (root / "loras" / "empty.safetensors").write_bytes(b"")
    factors = load_file(lora)
    down = next(k for k in factors if k.endswith("lora_down.weight"))
    save_file({k: v for k, v in factors.items() if k != down}, str(root / "loras" / "half.safetensors"))
    with host.using_models_root(str(root)):
        yield root


def load_model(**changes):
    from wantalk.nodes_model_loading import WanTalkModelLoader
    args = dict(model="tiny_wan2.1_i2v.safetensors", base_precision="bf16", quantization="disabled",
                attention_mode="auto", load_device="main_device", addon_model="tiny_infinitetalk.safetensors")
    return WanTalkModelLoader().load(**{**args, **changes})


def test_damaged_lora_file_is_reported_against_the_lora_input(model_files):
    path = str(model_files / "loras" / "empty.safetensors")
    with pytest.raises(NodeInputError, match=r"Load Wan Model\] input 'lora': LoRA: .*empty\.safetensors' is not a "
                                             "safetensors file"):
        load_model(lora=((path, 1.0),))


def test_lora_with_half_a_low_rank_pair_is_refused(model_files):
    """The layer whose lora_down was missing was skipped with only a log line: a partly applied LoRA."""
    path = str(model_files / "loras" / "half.safetensors")
    with pytest.raises(NodeInputError, match=r"Load Wan Model\] input 'lora': LoRA '.*half\.safetensors' is damaged: "
                                             r"'.*lora_up\.weight' has no matching down factor"):
        load_model(lora=((path, 1.0),))


@pytest.mark.parametrize("lora", [5, (("x",),), ((3, 1.0),)])
def test_malformed_lora_chain(model_files, lora):
    from wantalk.nodes_lora import WanTalkLoraSelect
    with pytest.raises(NodeInputError, match=r"Load Wan Model\] input 'lora': expected the output of a WanTalk LoRA"):
        load_model(lora=lora)
    with pytest.raises(NodeInputError, match=r"WanTalk LoRA\] input 'prev_lora': expected the output of a WanTalk"):
        WanTalkLoraSelect().select("good.safetensors", 1.0, prev_lora=lora)


def test_params_to_keep_must_be_text(model_files):
    with pytest.raises(NodeInputError, match=r"Load Wan Model\] input 'params_to_keep': expected text, got 5"):
        load_model(params_to_keep=5)


@pytest.mark.parametrize("model", [None, "vae"])
def test_multi_gpu_node_given_something_else_than_a_model(model):
    from wantalk.nodes_parallel import WanTalkMultiGPU
    model = tiny_vae(torch.Generator().manual_seed(0), dim=4)[0] if model == "vae" else model
    with pytest.raises(NodeInputError, match=r"Multi-GPU\] input 'model': expected the model from Load Wan Model"):
        WanTalkMultiGPU().configure(model, "cpu,cpu", 0)


def test_windows_folder_that_cannot_be_used_names_save_windows(parts, rng, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "wantalk_windows").write_text("a file where the folder belongs")
    with pytest.raises(NodeInputError, match=rf"{IT}\] input 'save_windows': the windows folder '.*wantalk_windows' "
                                             "cannot be used"):
        sample(parts, graph_inputs(rng), save_windows=True)


def test_an_error_beside_the_windows_folder_is_not_blamed_on_save_windows(tmp_path):
    from wantalk.validation import windows_folder_error
    folder = tmp_path / "wantalk_windows"
    sibling = PermissionError(13, "Permission denied", str(tmp_path / "wantalk_windows_old" / "x"))
    assert windows_folder_error(IT, str(folder), sibling) is sibling
    for inside in (folder, folder / "run" / "0.safetensors"):
        error = windows_folder_error(IT, str(folder), PermissionError(13, "Permission denied", str(inside)))
        assert isinstance(error, NodeInputError) and "input 'save_windows'" in str(error)


@pytest.fixture
def gguf_file(tmp_path):
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(path=None, arch="wan")
    writer.add_tensor("blocks.0.self_attn.q.weight", np.random.default_rng().standard_normal((4, 32), np.float32))
    path = str(tmp_path / "model.gguf")
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_chosen_as_lora_says_what_to_use(gguf_file, tmp_path):
    """The LoRA node saw 'neither safetensors nor a weights-only torch checkpoint (RuntimeError: mmap ...)'."""
    from wantalk.nodes_lora import WanTalkLoraSelect
    (tmp_path / "loras").mkdir()
    os_path = tmp_path / "loras" / "lora.gguf"
    os_path.write_bytes(open(gguf_file, "rb").read())
    with host.using_models_root(str(tmp_path)):
        with pytest.raises(NodeInputError, match=r"WanTalk LoRA\] input 'lora': '.*lora\.gguf' is a GGUF LoRA; wantalk "
                                                 r"reads LoRAs as safetensors\. Use the LoRA's \.safetensors release"):
            WanTalkLoraSelect().select("lora.gguf", 1.0)


def test_gguf_chosen_as_vae_says_what_to_use(gguf_file, tmp_path):
    from wantalk.nodes_infinitetalk import WanTalkVAELoader
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "vae.gguf").write_bytes(open(gguf_file, "rb").read())
    with host.using_models_root(str(tmp_path)):
        with pytest.raises(NodeInputError, match=r"Load Wan VAE\] input 'vae_name': '.*vae\.gguf' is a GGUF file; only "
                                                 r"Load Wan Model reads GGUF .* Use the \.safetensors release"):
            WanTalkVAELoader().load("vae.gguf", "fp32")


def test_zero_shift_is_reported_against_shift(parts, rng):
    """The widget allows 0, which the scheduler refused: the error named 'audio_embeds/model'."""
    with pytest.raises(NodeInputError, match=rf"{IT}\] input 'shift': must be above 0"):
        sample(parts, graph_inputs(rng), shift=0.0)
