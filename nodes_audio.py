"""Audio nodes for InfiniteTalk / MultiTalk: the wav2vec2 loader and the audio-embeds node.

The embeds node turns one or two ComfyUI `AUDIO` clips into per-speaker wav2vec2 features at 25 fps (our
encoder, with the official 16 kHz / -23 LUFS preparation), or converts ComfyUI's own `AUDIO_ENCODER_OUTPUT`
when users already run its wav2vec2 loader. It also passes on the audio the model heard, so that the sampler
can hand the matching sound to ComfyUI's video nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import host, validation
from .multitalk import audio_processing
from .multitalk.audio_processing import TARGET_RATE
from .multitalk.long_video import TalkAudio
from .multitalk.wav2vec2 import encode_for_infinitetalk, load_wav2vec2
from .nodes_common import CATEGORY, NodeInputError

AUDIO_ENCODER_TYPE = "WANTALK_AUDIO_ENCODER"
AUDIO_EMBEDS_TYPE = "WANTALK_AUDIO_EMBEDS"
FPS = 25
SAMPLES_PER_FRAME = TARGET_RATE // FPS     # 640 samples of 16 kHz audio per video frame
NATIVE_FEATURE_RATE = 50                   # ComfyUI's wav2vec2 output: one feature per 320 samples
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TWO_SPEAKER_MODES = ("para", "add")


@dataclass
class AudioEmbeds:
    """What flows from the embeds node to the sampler: the features (and speaker masks), plus the 16 kHz mono
    audio they were computed from (both speakers mixed), as a ComfyUI AUDIO dict."""
    talk: TalkAudio
    audio: dict

    @property
    def num_frames(self) -> int:
        return self.talk.num_frames


# ---- plain helpers --------------------------------------------------------------------------------------------

def fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Cut `x` (time on dim 0) to `length`, or append zeros (silence) up to it."""
    if x.shape[0] >= length:
        return x[:length]
    return torch.cat([x, x.new_zeros(length - x.shape[0], *x.shape[1:])])


def arrange_speakers(tracks: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """Two speakers as MultiTalk expects them: 'para' (talking at the same time) pads both to the longer clip;
    'add' (taking turns) puts speaker 2 after speaker 1, each silent while the other talks."""
    if len(tracks) == 1:
        return tracks
    if mode == "para":
        longest = max(t.shape[0] for t in tracks)
        return [fit_length(t, longest) for t in tracks]
    first, second = tracks
    return [torch.cat([first, second.new_zeros(second.shape)]), torch.cat([first.new_zeros(first.shape), second])]


def features_from_native(output: dict, name: str) -> torch.Tensor:
    """ComfyUI's AUDIO_ENCODER_OUTPUT -> `[frames at 25 fps, layers, channels]`: the transformer layers'
    outputs (all but the first entry, which is the input embedding), linearly resampled from 50 to 25 fps
    (align_corners=True), as ComfyUI's WanInfiniteTalkToVideo does."""
    layers = output.get("encoded_audio_all_layers") if isinstance(output, dict) else None
    if not layers or len(layers) < 2:
        raise NodeInputError("Audio Embeds", name, "expected the output of ComfyUI's 'Audio Encoder Encode' with a "
                             "wav2vec2 model (it has 'encoded_audio_all_layers'); a Whisper output does not fit "
                             "InfiniteTalk.")
    if not all(isinstance(layer, torch.Tensor) and layer.dim() == 3 and layer.shape == layers[0].shape
               for layer in layers):
        raise NodeInputError("Audio Embeds", name, "'encoded_audio_all_layers' must be equally shaped [1, frames, "
                             "channels] tensors (the output of ComfyUI's Audio Encoder Encode with wav2vec2).")
    if layers[0].shape[0] != 1:
        raise NodeInputError("Audio Embeds", name, f"holds a batch of {layers[0].shape[0]} clips; encode one clip "
                             f"per speaker.")
    stacked = torch.stack([layer[0].float().cpu() for layer in layers[1:]])     # [layers, T50, C]
    frames = int(stacked.shape[1] / NATIVE_FEATURE_RATE * FPS)
    if frames < 1:
        raise NodeInputError("Audio Embeds", name, "the encoded audio is shorter than one video frame (40 ms).")
    resampled = F.interpolate(stacked.transpose(1, 2), size=frames, mode="linear", align_corners=True)
    return resampled.permute(2, 0, 1).contiguous()


def encoding_progress():
    """An audio encoder's `progress(done, total)` callback (wav2vec2 `Chunking` pieces, Whisper's 30 s windows):
    honours ComfyUI's Stop between pieces and moves a progress bar made at the first report."""
    bar = []

    def report(done: int, total: int) -> None:
        host.check_interrupt()
        if not bar:
            bar.append(host.ProgressBar(total))
        bar[0].update(done - bar[0].current)
    return report


def speaker_region_masks(mask_1, mask_2) -> torch.Tensor | None:
    """`[3, H, W]` (speaker 1, speaker 2, background) from ComfyUI MASKs; one missing mask = the other's
    complement; None when neither is given (the sampler then uses the official left/right halves)."""
    if mask_1 is None and mask_2 is None:
        return None
    for index, mask in enumerate((mask_1, mask_2), 1):
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3)):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise NodeInputError("Audio Embeds", f"mask_{index}", f"expected a MASK [height, width] or [batch, "
                                 f"height, width] (the mask editor or Load Image's mask), got {shape}.")
    masks = [None if m is None else (m[0] if m.dim() == 3 else m).float().cpu() > 0.5 for m in (mask_1, mask_2)]
    if masks[0] is None:
        masks[0] = ~masks[1]
    if masks[1] is None:
        masks[1] = ~masks[0]
    if masks[0].shape != masks[1].shape:
        raise NodeInputError("Audio Embeds", "mask_2", f"has size {tuple(masks[1].shape)} but mask_1 has "
                             f"{tuple(masks[0].shape)}; draw both masks on the start image.")
    for index, mask in enumerate(masks, 1):
        if not mask.any():
            raise NodeInputError("Audio Embeds", f"mask_{index}", "is empty; paint the region of that speaker's "
                                 "face on the start image.")
    background = ~(masks[0] | masks[1])
    return torch.stack([masks[0], masks[1], background]).float()


# ---- nodes ----------------------------------------------------------------------------------------------------

class WanTalkAudioEncoderLoader:
    DESCRIPTION = ("Loads the wav2vec2-base audio encoder InfiniteTalk and MultiTalk were trained with "
                   "(TencentGameMate/chinese-wav2vec2-base, HF-format .safetensors or .bin) from models/audio_encoders.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (host.model_files("audio_encoders"), {
                "tooltip": "chinese-wav2vec2-base from models/audio_encoders (e.g. wav2vec2-chinese-base_fp16."
                           "safetensors, or the original model.safetensors / pytorch_model.bin)."}),
            "precision": (list(PRECISIONS), {
                "default": "fp32",
                "tooltip": "Compute precision. fp32 matches the official pipeline; the model is small (95M "
                           "parameters), so fp16/bf16 save little."}),
            "device": (["main_device", "cpu"], {
                "default": "main_device",
                "tooltip": "Where the encoder runs. cpu keeps GPU memory free for the video model and takes a "
                           "few seconds per minute of audio."}),
        }}

    RETURN_TYPES = (AUDIO_ENCODER_TYPE,)
    RETURN_NAMES = ("audio_encoder",)
    OUTPUT_TOOLTIPS = ("The wav2vec2 encoder for the wantalk Audio Embeds node.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, precision, device):
        node = "Load wav2vec2"
        validation.widgets(node, self.INPUT_TYPES(), {"precision": precision, "device": device})
        try:
            path = host.model_path("audio_encoders", model)
            target = host.torch_device() if device == "main_device" else torch.device("cpu")
            return (load_wav2vec2(path, device=target, dtype=PRECISIONS[precision]),)
        except (FileNotFoundError, ValueError) as exc:
            raise NodeInputError(node, "model", str(exc)) from None


class WanTalkAudioEmbeds:
    DESCRIPTION = ("Speech -> InfiniteTalk/MultiTalk audio features (one or two speakers). Also outputs the "
                   "loudness-normalised 16 kHz audio the model follows, for the final video.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio_1": ("AUDIO", {
                    "tooltip": "Speech of speaker 1 (any sample rate and channel count; it is converted to 16 kHz "
                               "mono). Separate the voice from music first for the best lip sync."}),
                "normalize_loudness": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Normalise each speaker to -23 LUFS as the official pipeline does (silence is left "
                               "as is). With encoded_audio_1 (ComfyUI's encoder) only the output audio is "
                               "normalised, since ComfyUI encoded the clip as it was."}),
                "audio_scale": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                    "tooltip": "Multiplies the audio features. Above 1 exaggerates mouth motion, below 1 calms it."}),
                "num_frames": ("INT", {
                    "default": 0, "min": 0, "max": 100000,
                    "tooltip": "Video length in frames at 25 fps. 0: the whole audio. Shorter cuts the audio, "
                               "longer pads it with silence."}),
                "two_speaker_mode": (list(TWO_SPEAKER_MODES), {
                    "default": "para",
                    "tooltip": "With audio_2: 'para' when both clips run in parallel on one timeline (a separated "
                               "conversation); 'add' when speaker 2 answers after speaker 1 (clips played one "
                               "after the other)."}),
            },
            "optional": {
                "audio_encoder": (AUDIO_ENCODER_TYPE, {
                    "tooltip": "The wav2vec2 encoder from 'Load wav2vec2 (wantalk)'. Leave empty when you connect "
                               "encoded_audio_1 from ComfyUI's own Audio Encoder Encode node."}),
                "audio_2": ("AUDIO", {
                    "tooltip": "Speech of speaker 2 (MultiTalk). Needs a MultiTalk/InfiniteTalk multi model."}),
                "mask_1": ("MASK", {
                    "tooltip": "Region of speaker 1 on the start image (paint it in the mask editor). Without masks "
                               "speaker 1 is the left half, speaker 2 the right half."}),
                "mask_2": ("MASK", {
                    "tooltip": "Region of speaker 2 on the start image. If only one mask is given, the other "
                               "speaker is everything outside it."}),
                "encoded_audio_1": ("AUDIO_ENCODER_OUTPUT", {
                    "tooltip": "Alternative to audio_encoder: speaker 1 encoded by ComfyUI's Load Audio Encoder + "
                               "Audio Encoder Encode (chinese-wav2vec2-base). audio_1 still provides the sound."}),
                "encoded_audio_2": ("AUDIO_ENCODER_OUTPUT", {
                    "tooltip": "Speaker 2 encoded by ComfyUI's Audio Encoder Encode (with encoded_audio_1)."}),
            },
        }

    RETURN_TYPES = (AUDIO_EMBEDS_TYPE, "AUDIO", "INT")
    RETURN_NAMES = ("audio_embeds", "audio", "num_frames")
    OUTPUT_TOOLTIPS = ("Audio features (and speaker masks) for the wantalk InfiniteTalk sampler.",
                       "The 16 kHz mono audio the features follow (both speakers mixed), loudness-normalised.",
                       "Number of video frames the audio covers at 25 fps.")
    FUNCTION = "embed"
    CATEGORY = CATEGORY

    def embed(self, audio_1, normalize_loudness, audio_scale, num_frames, two_speaker_mode, audio_encoder=None,
              audio_2=None, mask_1=None, mask_2=None, encoded_audio_1=None, encoded_audio_2=None):
        node = "Audio Embeds"
        validation.widgets(node, self.INPUT_TYPES(), locals())
        if audio_encoder is not None:
            validation.audio_encoder(node, "audio_encoder", audio_encoder, "wav2vec2")
        if audio_1 is None:
            raise NodeInputError(node, "audio_1", "connect the speech of speaker 1 (Load Audio).")
        clips = {"audio_1": audio_1, "audio_2": audio_2}
        tracks = []
        for name, clip in clips.items():
            if clip is None:
                continue
            try:
                track = audio_processing.to_mono_16k(validation.audio_scale(node, name, clip), name=name)
            except ValueError as exc:
                raise NodeInputError(node, name, str(exc)) from None
            validation.speech_level(node, name, track)
            tracks.append(audio_processing.normalize_loudness(track, TARGET_RATE) if normalize_loudness else track)
        if audio_encoder is not None:
            tracks = arrange_speakers(tracks, two_speaker_mode)
            if num_frames > 0:
                tracks = [fit_length(t, num_frames * SAMPLES_PER_FRAME) for t in tracks]
            features = [encode_for_infinitetalk(audio_encoder, t, FPS, progress=encoding_progress()).float().cpu()
                        for t in tracks]
        elif encoded_audio_1 is not None:
            features = self._native_features(encoded_audio_1, encoded_audio_2, len(tracks), two_speaker_mode)
            tracks = arrange_speakers(tracks, two_speaker_mode)
            if num_frames > 0:
                features = [fit_length(f, num_frames) for f in features]
        else:
            raise NodeInputError(node, "audio_encoder", "connect the wav2vec2 encoder ('Load wav2vec2 (wantalk)'), "
                                 "or ComfyUI's Audio Encoder Encode output to encoded_audio_1.")
        for index, feature in enumerate(features, 1):
            source = "audio_encoder" if audio_encoder is not None else f"encoded_audio_{index}"
            validation.finite(node, source, feature, f"feature values (speaker {index})")
        frames = min(f.shape[0] for f in features)
        features = [f[:frames] * audio_scale for f in features]
        mixed = fit_length(sum(tracks), frames * SAMPLES_PER_FRAME)
        for name, mask in (("mask_1", mask_1), ("mask_2", mask_2)):
            if isinstance(mask, torch.Tensor):
                validation.finite(node, name, mask, "mask values")
        masks = speaker_region_masks(mask_1, mask_2) if len(features) == 2 else None
        embeds = AudioEmbeds(TalkAudio(features, masks), {"waveform": mixed[None, None], "sample_rate": TARGET_RATE})
        return (embeds, embeds.audio, frames)

    @staticmethod
    def _native_features(encoded_1, encoded_2, speakers: int, mode: str) -> list[torch.Tensor]:
        if speakers == 2 and encoded_2 is None:
            raise NodeInputError("Audio Embeds", "encoded_audio_2", "audio_2 is connected: encode it with ComfyUI's "
                                 "Audio Encoder Encode too, or connect audio_encoder instead.")
        features = [features_from_native(encoded_1, "encoded_audio_1")]
        if speakers == 2:
            features.append(features_from_native(encoded_2, "encoded_audio_2"))
        return arrange_speakers(features, mode)


NODE_CLASS_MAPPINGS = {"WanTalkAudioEncoderLoader": WanTalkAudioEncoderLoader,
                       "WanTalkAudioEmbeds": WanTalkAudioEmbeds}
NODE_DISPLAY_NAME_MAPPINGS = {"WanTalkAudioEncoderLoader": "Load wav2vec2 (wantalk)",
                              "WanTalkAudioEmbeds": "Audio Embeds (wantalk)"}
