"""InfiniteTalk nodes as plain Python on tiny weights: audio embeds (our encoder and ComfyUI's encoder output),
speaker masks, stored embeddings, the sampler end to end (frames, audio, fps, progress, interrupt + resume) and
its input errors."""
import math

import pytest
import torch

from wantalk import host
from wantalk.multitalk import audio_processing
from wantalk.multitalk.wav2vec2 import encode_for_infinitetalk
from wantalk.nodes_audio import (AudioEmbeds, WanTalkAudioEmbeds, WanTalkAudioEncoderLoader, features_from_native,
                                 speaker_region_masks)
from wantalk.nodes_infinitetalk import (ClipVisionEmbeds, WanTalkInfiniteTalkSampler, WanTalkLoadEmbeddings,
                                        WanTalkSaveEmbeddings, preview_image)
from wantalk.nodes_model_loading import NodeInputError
from wantalk.multitalk.buckets import fit_frames
from wantalk.multitalk.clip_input import official_clip_pixels
from wantalk.multitalk.long_video import TalkAudio
from test_clip_input import FakeComfyClipVision
from tiny_models import (TINY_FILES, TINY_I2V, save_state_dict, synth_speech, tiny_graph_infinitetalk_config,
                         tiny_infinitetalk, tiny_vae, tiny_wav2vec2)

LAYERS, CHANNELS = 12, 64


@pytest.fixture
def folders(tmp_path, monkeypatch, use_models_root):
    """Model folders and the output folder of the host fallbacks, in a temporary directory."""
    use_models_root(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def encoder():
    return tiny_wav2vec2(torch.Generator().manual_seed(1))[0]


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator().manual_seed(2)
    return tiny_infinitetalk(g, config=tiny_graph_infinitetalk_config())[0], tiny_vae(g)[0]


def _audio(seconds, rate, channels, rng):
    wave = synth_speech(seconds, rate, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    stereo = torch.stack([wave * (0.5 + 0.5 * c) for c in range(channels)])
    return {"waveform": stereo[None], "sample_rate": rate}


def test_audio_encoder_loader_reads_the_models_folder(folders, rng):
    _, sd = tiny_wav2vec2(rng)
    save_state_dict(sd, str(folders / "models" / "audio_encoders" / TINY_FILES["audio_encoders"]), prefix="wav2vec2.")
    assert TINY_FILES["audio_encoders"] in WanTalkAudioEncoderLoader.INPUT_TYPES()["required"]["model"][0]
    model, = WanTalkAudioEncoderLoader().load(TINY_FILES["audio_encoders"], "fp32", "cpu")
    assert model.config.num_layers == LAYERS and model.config.hidden_size == CHANNELS
    with pytest.raises(NodeInputError, match=r"Load wav2vec2\] input 'model'"):
        WanTalkAudioEncoderLoader().load("absent.safetensors", "fp32", "cpu")


def test_audio_embeds_follow_the_official_preparation(encoder, rng):
    audio = _audio(0.9, 22050, 2, rng)
    embeds, out_audio, frames = WanTalkAudioEmbeds().embed(audio, True, 1.5, 0, "para", audio_encoder=encoder)
    mono = audio_processing.to_mono_16k(audio)
    expected = encode_for_infinitetalk(encoder, audio_processing.normalize_loudness(mono, 16000)) * 1.5
    assert frames == int(0.9 * 25) == embeds.num_frames
    assert embeds.talk.features[0].shape == (frames, LAYERS, CHANNELS)
    torch.testing.assert_close(embeds.talk.features[0], expected)
    assert out_audio["sample_rate"] == 16000 and out_audio["waveform"].shape == (1, 1, frames * 640)
    assert abs(audio_processing.integrated_loudness(out_audio["waveform"][0, 0], 16000) + 23) < 0.1


def test_num_frames_cuts_or_pads_with_silence(encoder, rng):
    audio = _audio(0.5, 16000, 1, rng)
    node = WanTalkAudioEmbeds()
    short, _, n_short = node.embed(audio, False, 1.0, 7, "para", audio_encoder=encoder)
    long, long_audio, n_long = node.embed(audio, False, 1.0, 30, "para", audio_encoder=encoder)
    assert (n_short, n_long) == (7, 30)
    assert long_audio["waveform"].shape[-1] == 30 * 640 and not long_audio["waveform"][..., 13 * 640:].any()


def test_two_speakers_add_mode_takes_turns(encoder, rng):
    a, b = _audio(0.5, 16000, 1, rng), _audio(0.7, 16000, 1, rng)
    embeds, audio, frames = WanTalkAudioEmbeds().embed(a, True, 1.0, 0, "add", audio_encoder=encoder, audio_2=b)
    assert frames == int(1.2 * 25) and len(embeds.talk.features) == 2
    assert embeds.talk.masks is None              # the sampler draws the official left/right halves
    track_a = audio_processing.normalize_loudness(audio_processing.to_mono_16k(a), 16000)
    torch.testing.assert_close(audio["waveform"][0, 0, :track_a.shape[0]], track_a)   # speaker 1 first, alone


def test_native_encoder_output_matches_linear_resampling(rng):
    t50, layers = int(torch.randint(30, 90, (1,), generator=rng)), 13
    hidden = [torch.randn(1, t50, 8, generator=rng) for _ in range(layers)]
    out = features_from_native({"encoded_audio_all_layers": hidden, "audio_samples": t50 * 320}, "encoded_audio_1")
    n = int(t50 / 50 * 25)
    ref = torch.empty(n, layers - 1, 8, dtype=torch.float64)
    for j in range(n):                            # align_corners=True: output j sits at j (T - 1) / (n - 1)
        pos = j * (t50 - 1) / (n - 1)
        lo = min(int(math.floor(pos)), t50 - 2)
        w = pos - lo
        for layer in range(1, layers):
            h = hidden[layer][0].double()
            ref[j, layer - 1] = (1 - w) * h[lo] + w * h[lo + 1]
    assert out.shape == ref.shape
    assert (out.double() - ref).abs().max() / ref.abs().max() < 5e-5    # float32 sample positions


def test_native_output_path_and_its_errors(rng):
    hidden = [torch.randn(1, 60, CHANNELS, generator=rng) for _ in range(LAYERS + 1)]
    audio = _audio(1.2, 16000, 1, rng)
    embeds, _, frames = WanTalkAudioEmbeds().embed(audio, True, 1.0, 0, "para",
                                                   encoded_audio_1={"encoded_audio_all_layers": hidden})
    assert frames == 30 and embeds.talk.features[0].shape == (30, LAYERS, CHANNELS)
    with pytest.raises(NodeInputError, match="input 'audio_encoder'"):
        WanTalkAudioEmbeds().embed(audio, True, 1.0, 0, "para")
    with pytest.raises(NodeInputError, match="input 'encoded_audio_2'"):
        WanTalkAudioEmbeds().embed(audio, True, 1.0, 0, "para", audio_2=audio,
                                   encoded_audio_1={"encoded_audio_all_layers": hidden})
    with pytest.raises(NodeInputError, match="Whisper"):
        features_from_native({"encoded_audio": torch.zeros(1, 5, 8)}, "encoded_audio_1")


def test_bad_audio_names_the_input(encoder):
    silent_nan = {"waveform": torch.full((1, 1, 16000), float("nan")), "sample_rate": 16000}
    with pytest.raises(NodeInputError, match="input 'audio_1'.*NaN"):
        WanTalkAudioEmbeds().embed(silent_nan, True, 1.0, 0, "para", audio_encoder=encoder)


def test_speaker_masks_from_one_or_two_drawn_masks():
    left = torch.zeros(1, 6, 8)
    left[:, :, :3] = 1
    masks = speaker_region_masks(left, None)
    assert masks.shape == (3, 6, 8) and masks[1, :, 3:].all() and not masks[2].any()
    with pytest.raises(NodeInputError, match="mask_2"):
        speaker_region_masks(left, torch.ones(1, 5, 8))
    with pytest.raises(NodeInputError, match="mask_1.*empty"):
        speaker_region_masks(torch.zeros(1, 6, 8), left)


def test_embeddings_round_trip(folders, rng):
    pos, neg = torch.randn(1, 7, 64, generator=rng), torch.randn(1, 4, 64, generator=rng)
    clip = ClipVisionEmbeds(torch.randn(1, 257, 32, generator=rng))
    WanTalkSaveEmbeddings().save([[pos, {}]], [[neg, {}]], "prompt", clip)
    assert "prompt.safetensors" in WanTalkLoadEmbeddings.INPUT_TYPES()["required"]["embeddings"][0]
    p, n, c = WanTalkLoadEmbeddings().load("prompt.safetensors")
    torch.testing.assert_close(p[0][0], pos)
    torch.testing.assert_close(n[0][0], neg)
    torch.testing.assert_close(c.penultimate_hidden_states, clip["penultimate_hidden_states"])


SMALL = dict(width=32, height=32, steps=2, shift=7.0, scheduler="infinitetalk_euler", text_scale=2.0,
             audio_scale=3.0, seed=5, frame_window=9, motion_frames=5, color_correction=0.5, max_frames=0,
             save_windows=False)


def _graph_inputs(rng, frames=15, speakers=1, masks=None):
    features = [torch.randn(frames, LAYERS, CHANNELS, generator=rng) for _ in range(speakers)]
    audio = {"waveform": torch.randn(1, 1, frames * 640, generator=rng), "sample_rate": 16000}
    embeds = AudioEmbeds(TalkAudio(features, masks), audio)
    positive = [[torch.randn(1, 6, TINY_I2V.text_dim, generator=rng), {}]]
    negative = [[torch.randn(1, 6, TINY_I2V.text_dim, generator=rng), {}]]
    image = torch.rand(1, 40, 48, 3, generator=rng)
    clip = ClipVisionEmbeds(torch.randn(1, 257, TINY_I2V.clip_dim, generator=rng))
    return embeds, positive, negative, image, clip


def test_sampler_outputs_frames_audio_and_fps(parts, rng, monkeypatch):
    model, vae = parts
    embeds, positive, negative, image, clip = _graph_inputs(rng)
    updates, update = [], host.ProgressBar.update

    def record(self, n=1, preview=None):
        updates.append((n, preview))
        update(self, n, preview)
    monkeypatch.setattr(host.ProgressBar, "update", record)
    frames, audio, fps = WanTalkInfiniteTalkSampler().sample(model, vae, embeds, positive, negative, image,
                                                             clip_vision_output=clip, **SMALL)
    assert frames.shape == (15, 32, 32, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0
    assert fps == 25.0 and audio["waveform"].shape == (1, 1, 15 * 640) and audio["sample_rate"] == 16000
    assert sum(n for n, _ in updates) == 3 * SMALL["steps"]            # windows at 0, 4, 8
    previews = [p for _, p in updates if p is not None]
    assert len(previews) == (3 if preview_image(torch.zeros(2, 2, 3, dtype=torch.uint8)) else 0)


def test_sampler_two_speakers_with_drawn_masks(parts, rng):
    model, vae = parts
    masks = torch.zeros(3, 40, 48)
    masks[0, :, :20], masks[1, :, 28:], masks[2, :, 20:28] = 1, 1, 1
    embeds, positive, negative, image, clip = _graph_inputs(rng, frames=9, speakers=2, masks=masks)
    wide = dict(SMALL, width=64)                                        # 2 x 4 tokens: room for both speakers
    frames, _, _ = WanTalkInfiniteTalkSampler().sample(model, vae, embeds, positive, negative, image, **wide)
    assert frames.shape == (9, 32, 64, 3)
    bad = AudioEmbeds(TalkAudio(embeds.talk.features, torch.ones(3, 8, 8)), embeds.audio)
    with pytest.raises(NodeInputError, match="masks are .* start image"):
        WanTalkInfiniteTalkSampler().sample(model, vae, bad, positive, negative, image, **wide)


def test_interrupted_run_resumes_from_saved_windows(parts, rng, folders, monkeypatch):
    model, vae = parts
    inputs = _graph_inputs(rng, frames=11)                             # windows at 0 and 4
    settings = dict(SMALL, save_windows=True)
    sampler = WanTalkInfiniteTalkSampler()
    reference, _, _ = sampler.sample(model, vae, *inputs[:4], clip_vision_output=inputs[4], **dict(SMALL))
    calls = []

    def cancel_in_second_window():
        calls.append(1)
        if len(calls) == SMALL["steps"] + 1:
            raise host.Interrupted()
    monkeypatch.setattr(host, "check_interrupt", cancel_in_second_window)
    with pytest.raises(host.Interrupted):
        sampler.sample(model, vae, *inputs[:4], clip_vision_output=inputs[4], **settings)
    saved = list((folders / "output" / "wantalk_windows").rglob("window_*.safetensors"))
    assert len(saved) == 1
    monkeypatch.setattr(host, "check_interrupt", lambda: calls.append(1))
    calls.clear()
    resumed, _, _ = sampler.sample(model, vae, *inputs[:4], clip_vision_output=inputs[4], **settings)
    assert len(calls) == SMALL["steps"]                                 # only window 2 was sampled
    assert torch.equal(resumed, reference)


def test_sampler_input_errors_name_the_input(parts, rng):
    model, vae = parts
    embeds, positive, negative, image, clip = _graph_inputs(rng, frames=5)
    sampler = WanTalkInfiniteTalkSampler()
    with pytest.raises(NodeInputError, match="input 'width/height'.*multiple of 16"):
        sampler.sample(model, vae, embeds, positive, negative, image, **dict(SMALL, width=40))
    with pytest.raises(NodeInputError, match="input 'positive'.*umT5"):
        sampler.sample(model, vae, embeds, [[torch.randn(1, 6, 48), {}]], negative, image, **SMALL)
    with pytest.raises(NodeInputError, match="input 'clip_vision_output'"):
        sampler.sample(model, vae, embeds, positive, negative, image,
                       clip_vision_output=ClipVisionEmbeds(torch.randn(1, 257, 1280)), **SMALL)
    with pytest.raises(NodeInputError, match="frame_window"):
        sampler.sample(model, vae, embeds, positive, negative, image, **dict(SMALL, frame_window=10))


def test_multitalk_continuation_reencodes_the_last_frame_with_clip_vision(parts, rng):
    model, vae = parts
    embeds, positive, negative, image, clip = _graph_inputs(rng)       # windows at 0, 4, 8
    sampler = WanTalkInfiniteTalkSampler()
    encoder = FakeComfyClipVision(rng, TINY_I2V.clip_dim)
    frames, _, _ = sampler.sample(model, vae, embeds, positive, negative, image, clip_vision_output=clip,
                                  continuation="multitalk", clip_vision=encoder, **SMALL)
    assert frames.shape == (15, 32, 32, 3)
    assert len(encoder.seen) == 2 and all(layer == -2 for _, layer in encoder.seen)
    last_of_window_0 = frames[8].permute(2, 0, 1) * 2 - 1             # window 1 continues from frames 4..8
    torch.testing.assert_close(encoder.seen[0][0], official_clip_pixels(last_of_window_0), atol=1e-5, rtol=0)
    infinitetalk, _, _ = sampler.sample(model, vae, embeds, positive, negative, image, clip_vision_output=clip,
                                        clip_vision=encoder, **SMALL)
    assert len(encoder.seen) == 2 and not torch.equal(infinitetalk, frames)   # precomputed features win
    with pytest.raises(NodeInputError, match="input 'clip_vision'"):
        sampler.sample(model, vae, embeds, positive, negative, image, clip_vision_output=clip,
                       continuation="multitalk", clip_vision=FakeComfyClipVision(rng, TINY_I2V.clip_dim + 1), **SMALL)
    with pytest.raises(NodeInputError, match="continuation"):
        sampler.sample(model, vae, embeds, positive, negative, image, continuation="loop", **SMALL)

# ---- dubbing, chaining, size buckets ------------------------------------------------------------------------

def _moving_video(rng, count, height=40, width=48):
    """A video whose frames differ clearly: a bright bar that moves one step per frame over random texture."""
    video = torch.rand(count, height, width, 3, generator=rng) * 0.5
    for i in range(count):
        video[i, :, (3 * i) % width] = 1.0
    return video


def test_one_frame_video_and_a_still_video_give_the_image_to_video_result(parts, rng):
    model, vae = parts
    embeds, positive, negative, image, clip = _graph_inputs(rng, frames=11)
    sampler = WanTalkInfiniteTalkSampler()
    still, _, _ = sampler.sample(model, vae, embeds, positive, negative, image, clip_vision_output=clip, **SMALL)
    listed, _, _ = sampler.sample(model, vae, embeds, positive, negative, [image[0]], clip_vision_output=clip,
                                  **SMALL)
    held, _, _ = sampler.sample(model, vae, embeds, positive, negative, image.expand(6, -1, -1, -1),
                                clip_vision_output=clip, video_fps=10.0, **SMALL)
    assert torch.equal(still, listed) and torch.equal(still, held)


def test_dubbing_conditions_each_window_on_the_video_frame_at_its_start_time(parts, rng):
    model, vae = parts
    embeds, positive, negative, _, _ = _graph_inputs(rng, frames=15)  # windows start at 0, 4, 8
    video, fps = _moving_video(rng, 4), 12.5                            # 0.32 s: shorter than the 0.6 s audio
    encoder = FakeComfyClipVision(rng, TINY_I2V.clip_dim)
    frames, audio, _ = WanTalkInfiniteTalkSampler().sample(model, vae, embeds, positive, negative, video,
                                                           clip_vision=encoder, video_fps=fps, **SMALL)
    assert frames.shape == (15, 32, 32, 3) and audio["waveform"].shape[-1] == 15 * 640
    # Independently: window start s (25 fps) shows the frame covering time s / 25, i.e. floor(s * 12.5 / 25);
    # start 8 is at 0.32 s, the video's end (frame 4 does not exist): its last frame, 3, is held.
    expected = [0, 2, 3]
    seen = [pixels for pixels, _ in encoder.seen]
    assert len(seen) == len(expected)
    fitted = [fit_frames(video[i].permute(2, 0, 1)[None], 32, 32)[0] * 2 - 1 for i in range(4)]
    for pixels, index in zip(seen, expected):
        torch.testing.assert_close(pixels, official_clip_pixels(fitted[index]), atol=1e-6, rtol=0)
    still_first = WanTalkInfiniteTalkSampler().sample(model, vae, embeds, positive, negative, video[:1],
                                                      clip_vision=encoder, **SMALL)[0]
    assert not torch.equal(still_first, frames)                        # the later frames changed the video


def test_chained_samplers_equal_one_sampler_on_the_whole_audio(parts, rng):
    model, vae = parts
    embeds, positive, negative, image, clip = _graph_inputs(rng, frames=19)   # windows at 0, 4, 8, 12
    sampler = WanTalkInfiniteTalkSampler()
    whole, whole_audio, _ = sampler.sample(model, vae, embeds, positive, negative, image, clip_vision_output=clip,
                                           **SMALL)
    first, first_audio, _ = sampler.sample(model, vae, embeds, positive, negative, image, clip_vision_output=clip,
                                           **dict(SMALL, max_frames=9))
    rest, rest_audio, _ = sampler.sample(model, vae, embeds, positive, negative, image, clip_vision_output=clip,
                                         previous_frames=first, **SMALL)
    assert first.shape[0] == 9 and rest.shape[0] == 10
    assert torch.equal(torch.cat([first, rest]), whole)
    torch.testing.assert_close(torch.cat([first_audio["waveform"], rest_audio["waveform"]], -1),
                               whole_audio["waveform"])


def test_size_bucket_follows_the_start_images_aspect_ratio(parts, rng, monkeypatch):
    from wantalk.multitalk import buckets
    model, vae = parts
    monkeypatch.setitem(buckets.BUCKETS, "infinitetalk-480", {"0.50": (32, 64), "1.00": (48, 48), "2.00": (64, 32)})
    embeds, positive, negative, _, clip = _graph_inputs(rng, frames=5)
    tall = torch.rand(1, 70, 40, 3, generator=rng)                     # 1.75: the 2.00 bucket
    frames, _, _ = WanTalkInfiniteTalkSampler().sample(model, vae, embeds, positive, negative, tall,
                                                       clip_vision_output=clip, size="infinitetalk-480", **SMALL)
    assert frames.shape == (5, 64, 32, 3)


def test_dubbing_and_chaining_input_errors_name_the_input(parts, rng):
    model, vae = parts
    embeds, positive, negative, image, clip = _graph_inputs(rng, frames=9)
    sampler = WanTalkInfiniteTalkSampler()

    def run(**kw):
        args = dict(dict(SMALL, start_image=image), **kw)
        return sampler.sample(model, vae, embeds, positive, negative, **args)
    with pytest.raises(NodeInputError, match="input 'start_image'.*empty"):
        run(start_image=[])
    with pytest.raises(NodeInputError, match="input 'start_image'.*empty"):
        run(start_image=torch.zeros(0, 40, 48, 3))
    with pytest.raises(NodeInputError, match="input 'start_image'.*frame 1 is 40x48 but frame 0 is 48x40"):
        run(start_image=[image[0], torch.rand(48, 40, 3, generator=rng)])
    for fps in (0.0, -25.0, float("nan")):
        with pytest.raises(NodeInputError, match="input 'video_fps'"):
            run(start_image=_moving_video(rng, 3), video_fps=fps)
    with pytest.raises(NodeInputError, match="input 'previous_frames'.*4 frames.*motion_frames = 5"):
        run(previous_frames=torch.rand(4, 32, 32, 3, generator=rng))
    with pytest.raises(NodeInputError, match="input 'previous_frames'.*is 48x32 but this sampler makes 32x32"):
        run(previous_frames=torch.rand(6, 32, 48, 3, generator=rng))
    with pytest.raises(NodeInputError, match="input 'audio_embeds'.*covers 9 frames but previous_frames already has 9"):
        run(previous_frames=torch.rand(9, 32, 32, 3, generator=rng))
    with pytest.raises(NodeInputError, match="input 'continuation'.*dubbing"):
        run(start_image=_moving_video(rng, 3), continuation="multitalk")


def test_clip_vision_alone_encodes_the_official_input_of_the_start_image(parts, rng):
    model, vae = parts
    embeds, positive, negative, image, _ = _graph_inputs(rng, frames=9)
    encoder = FakeComfyClipVision(rng, TINY_I2V.clip_dim)
    WanTalkInfiniteTalkSampler().sample(model, vae, embeds, positive, negative, image, clip_vision=encoder, **SMALL)
    fitted = fit_frames(image.permute(0, 3, 1, 2), 32, 32)[0] * 2 - 1  # the bucket-cropped frame, not a CLIP crop
    assert len(encoder.seen) == 1
    torch.testing.assert_close(encoder.seen[0][0], official_clip_pixels(fitted), atol=1e-6, rtol=0)


def test_apg_option_reaches_the_guidance(parts, rng, monkeypatch):
    from wantalk.wanvideo import guidance
    model, vae = parts
    inputs = _graph_inputs(rng, frames=9)
    made = []
    original = guidance.AdaptiveProjectedGuidance.__init__

    def record(self, *args, **kwargs):
        made.append(args)
        original(self, *args, **kwargs)
    monkeypatch.setattr(guidance.AdaptiveProjectedGuidance, "__init__", record)
    sampler = WanTalkInfiniteTalkSampler()
    plain, _, _ = sampler.sample(model, vae, *inputs[:4], clip_vision_output=inputs[4], **SMALL)
    assert not made
    projected, _, _ = sampler.sample(model, vae, *inputs[:4], clip_vision_output=inputs[4], apg=True, **SMALL)
    assert made and made[0][:2] == (SMALL["text_scale"], SMALL["audio_scale"])
    assert projected.shape == plain.shape and not torch.equal(projected, plain)
