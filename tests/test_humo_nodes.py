"""HuMo nodes as plain Python: Whisper loading from the models folder, embeds from our encoder and from ComfyUI's
AUDIO_ENCODER_OUTPUT (same bands), reference images, the sampler end to end on tiny files, and input errors."""

import pytest
import torch

from wantalk import nodes_humo
from wantalk.humo.audio_features import humo_bands
from wantalk.humo.whisper import log_mel_spectrogram, whisper_hidden_states
from tiny_humo import TINY_HUMO_FILES, make_tiny_humo_models
from tiny_models import TINY_I2V, tiny_vae, tiny_wan


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_humo_models(str(root))
    return root


@pytest.fixture
def models_dir(files, use_models_root):
    use_models_root(files)
    return files


def speech(rng, seconds):
    return {"waveform": torch.randn(1, 2, int(44100 * seconds), generator=rng) * 0.1, "sample_rate": 44100}


def test_whisper_loader_and_embeds(models_dir, rng):
    assert TINY_HUMO_FILES["audio_encoders"] in nodes_humo.WanTalkWhisperLoader.INPUT_TYPES()["required"]["model"][0]
    (whisper,) = nodes_humo.WanTalkWhisperLoader().load(TINY_HUMO_FILES["audio_encoders"], "fp32", "cpu")
    refs = torch.rand(2, 24, 40, 3, generator=rng)
    embeds, audio, frames = nodes_humo.WanTalkHuMoEmbeds().embed(speech(rng, 0.3), 0, whisper=whisper,
                                                                 reference_images=refs)
    assert frames == 7 and embeds.bands.shape == (7, 5, 64) and embeds.bands.isfinite().all()
    assert audio["sample_rate"] == 16000 and audio["waveform"].shape == (1, 1, 7 * 640)
    assert len(embeds.references) == 2 and torch.equal(embeds.references[1], refs[1].permute(2, 0, 1) * 2 - 1)
    longer, audio, frames = nodes_humo.WanTalkHuMoEmbeds().embed(speech(rng, 0.3), 20, whisper=whisper)
    assert frames == 20 and longer.bands[7:].abs().sum() == 0 and audio["waveform"].shape[-1] == 20 * 640


def test_native_encoder_output_gives_the_same_bands(models_dir, rng):
    (whisper,) = nodes_humo.WanTalkWhisperLoader().load(TINY_HUMO_FILES["audio_encoders"], "fp32", "cpu")
    clip = {"waveform": torch.randn(1, 1, 2560, generator=rng) * 0.1, "sample_rate": 16000}  # one 0.2 s chunk
    mel = log_mel_spectrogram(torch.nn.functional.pad(clip["waveform"][0, 0], (0, 3200 - 2560)), 16)
    native = {"encoded_audio_all_layers": whisper(mel[None]), "audio_samples": 2560}
    ours, _, _ = nodes_humo.WanTalkHuMoEmbeds().embed(clip, 0, whisper=whisper)
    theirs, _, _ = nodes_humo.WanTalkHuMoEmbeds().embed(clip, 0, encoded_audio=native)
    assert ours.bands.shape == (4, 5, 64) and torch.allclose(ours.bands, theirs.bands, atol=1e-6)
    assert torch.allclose(ours.bands, humo_bands(whisper_hidden_states(whisper, clip["waveform"][0, 0])), atol=1e-6)


def test_embeds_errors_name_the_input(models_dir, rng):
    node = nodes_humo.WanTalkHuMoEmbeds()
    with pytest.raises(ValueError, match=r"\[wantalk HuMo Embeds\] input 'whisper'"):
        node.embed(speech(rng, 0.2), 0)
    with pytest.raises(ValueError, match="input 'encoded_audio'"):
        node.embed(speech(rng, 0.2), 0, encoded_audio={"encoded_audio": torch.zeros(1, 3, 4)})
    (whisper,) = nodes_humo.WanTalkWhisperLoader().load(TINY_HUMO_FILES["audio_encoders"], "fp32", "cpu")
    with pytest.raises(ValueError, match="input 'reference_images'"):
        node.embed(speech(rng, 0.2), 0, whisper=whisper, reference_images=torch.rand(24, 40, 3))


def test_sampler_end_to_end_on_tiny_files(models_dir, rng):
    from wantalk.nodes_model_loading import WanTalkModelLoader
    model, _ = WanTalkModelLoader().load(TINY_HUMO_FILES["diffusion_models"], "fp32", "disabled", "auto",
                                         "offload_device")
    vae, _ = tiny_vae(rng)
    (whisper,) = nodes_humo.WanTalkWhisperLoader().load(TINY_HUMO_FILES["audio_encoders"], "fp32", "cpu")
    embeds, _, frames = nodes_humo.WanTalkHuMoEmbeds().embed(speech(rng, 0.3), 0, whisper=whisper,
                                                             reference_images=torch.rand(1, 40, 24, 3, generator=rng))
    positive = [[torch.randn(1, 6, 64, generator=rng), {}]]
    negative = [[torch.randn(1, 4, 64, generator=rng), {}]]
    images, audio, fps = nodes_humo.WanTalkHuMoSampler().sample(
        model, vae, embeds, positive, negative, 32, 32, 2, 5.0, "unipc", "tia", 5.0, 5.5, 3, 9, 5, 0, False)
    assert images.shape == (frames, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    assert fps == 25.0 and audio["waveform"].shape[-1] == frames * 640
    plain, _ = tiny_wan(TINY_I2V, rng)
    with pytest.raises(ValueError, match="input 'model': this is a plain Wan I2V model without audio layers"):
        nodes_humo.WanTalkHuMoSampler().sample(plain, vae, embeds, positive, negative, 32, 32, 2, 5.0, "unipc",
                                               "tia", 5.0, 5.5, 3, 9, 5, 0, False)
    with pytest.raises(ValueError, match="input 'width/height'"):
        nodes_humo.WanTalkHuMoSampler().sample(model, vae, embeds, positive, negative, 40, 32, 2, 5.0, "unipc",
                                               "tia", 5.0, 5.5, 3, 9, 5, 0, False)
