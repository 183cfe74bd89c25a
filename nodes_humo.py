"""HuMo nodes: the Whisper loader, the HuMo embeds (audio bands + reference images) and the HuMo sampler.

Thin shells over `humo.whisper`, `humo.audio_features` and `humo.pipeline.generate_humo_video`; they share the
VAE loader, the CONDITIONING bridge, progress/preview and the resumable-window folder with the InfiniteTalk
nodes, and return IMAGE frames plus the matching AUDIO and fps for ComfyUI's Create Video -> Save Video.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import host, validation
from .humo.audio_features import humo_bands, humo_bands_streamed
from .humo.pipeline import GUIDANCE_MODES, HUMO_DEFAULTS, HumoSettings, generate_humo_video
from .humo.whisper import (SAMPLE_RATE, hidden_frames, hidden_states_from_comfy, load_whisper_encoder,
                           whisper_window_states)
from .multitalk import audio_processing
from .nodes_audio import FPS, PRECISIONS, SAMPLES_PER_FRAME, encoding_progress, fit_length
from .nodes_infinitetalk import VAE_TYPE, WINDOWS_FOLDER, conditioning_from, preview_image
from .nodes_common import (CATEGORY, MAX_FRAMES_INPUT, MODEL_TYPE, SAVE_WINDOWS_INPUT, SEED_INPUT, NodeInputError,
                           VideoSamplerNode)
from .nodes_lowvram import compute_device_for
from .wanvideo.schedulers import SCHEDULERS
from .wanvideo.windows import to_uint8

log = logging.getLogger("wantalk")

WHISPER_TYPE = "WANTALK_WHISPER"
HUMO_EMBEDS_TYPE = "WANTALK_HUMO_EMBEDS"
NATIVE_WHISPER_SECONDS = 30  # ComfyUI's Whisper encoder sees only the first 30 s


@dataclass
class HumoEmbeds:
    """HuMo Whisper bands `[frames, 5, 1280]` at 25 fps, the reference images `[3, H, W]` in [-1, 1], and the
    16 kHz mono audio they follow (a ComfyUI AUDIO dict)."""
    bands: torch.Tensor
    references: list
    audio: dict


def references_from_image(images) -> list:
    """ComfyUI IMAGE `[N, H, W, 3]` in [0, 1] -> N tensors `[3, H, W]` in [-1, 1] (none for None)."""
    if images is None:
        return []
    images = validation.image("HuMo Embeds", "reference_images", images)
    validation.small_picture("HuMo Embeds", "reference_images", images)
    return [img[:, :, :3].permute(2, 0, 1).float().cpu() * 2 - 1 for img in images]


class WanTalkWhisperLoader:
    DESCRIPTION = ("Loads the Whisper-large-v3 audio encoder HuMo was trained with (HF-format .safetensors, e.g. "
                   "openai/whisper-large-v3 model.safetensors or ComfyUI's whisper_large_v3 file) from "
                   "models/audio_encoders. Only the encoder is used.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (host.model_files("audio_encoders"), {
                "tooltip": "Whisper-large-v3 from models/audio_encoders (the decoder, if present, is ignored)."}),
            "precision": (list(PRECISIONS), {
                "default": "fp16",
                "tooltip": "Compute precision of the 0.6B-parameter encoder. fp32 is the reference numerics; "
                           "fp16/bf16 halve its memory."}),
            "device": (["main_device", "cpu"], {
                "default": "main_device",
                "tooltip": "Where the encoder runs. cpu keeps GPU memory for the video model (slow: ~1 min per "
                           "minute of audio)."}),
        }}

    RETURN_TYPES = (WHISPER_TYPE,)
    RETURN_NAMES = ("whisper",)
    OUTPUT_TOOLTIPS = ("The Whisper encoder for HuMo Embeds (wantalk).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, precision, device):
        validation.widgets("Load Whisper", self.INPUT_TYPES(), {"precision": precision, "device": device})
        try:
            path = host.model_path("audio_encoders", model)
            target = host.torch_device() if device == "main_device" else torch.device("cpu")
            return (load_whisper_encoder(path, device=target, dtype=PRECISIONS[precision]),)
        except (FileNotFoundError, ValueError) as exc:
            raise NodeInputError("Load Whisper", "model", str(exc)) from None


class WanTalkHuMoEmbeds:
    DESCRIPTION = ("Speech and reference images -> HuMo conditioning: Whisper hidden states averaged into HuMo's "
                   "five bands at 25 fps, and the reference image(s) of the person. Also outputs the 16 kHz audio "
                   "the bands follow.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": ("AUDIO", {"tooltip": "The speech or song (any sample rate and channels; converted to "
                                    "16 kHz mono). Separate the vocals from music first for the best lip sync."}),
                "num_frames": ("INT", {"default": 0, "min": 0, "max": 100000,
                                       "tooltip": "Video length in frames at 25 fps. 0: the whole audio. Shorter "
                                                  "cuts the audio, longer pads it with silence."}),
            },
            "optional": {
                "whisper": (WHISPER_TYPE, {"tooltip": "The encoder from Load Whisper (wantalk); any length of "
                                           "audio, in 30 s chunks as HuMo does."}),
                "encoded_audio": ("AUDIO_ENCODER_OUTPUT", {
                    "tooltip": "Alternative to whisper: ComfyUI's Audio Encoder Encode output with "
                               "whisper_large_v3. It covers the first 30 s of audio only."}),
                "reference_images": ("IMAGE", {
                    "tooltip": "The person (or subjects) to show: each image is fitted into the frame on white and "
                               "becomes one reference latent frame. Without it use guidance 'ta'."}),
            },
        }

    RETURN_TYPES = (HUMO_EMBEDS_TYPE, "AUDIO", "INT")
    RETURN_NAMES = ("humo_embeds", "audio", "num_frames")
    OUTPUT_TOOLTIPS = ("Audio bands and reference images for the HuMo Sampler (wantalk).",
                       "The 16 kHz mono audio the bands follow, cut or padded to the video length.",
                       "Number of video frames the audio covers at 25 fps.")
    FUNCTION = "embed"
    CATEGORY = CATEGORY

    def embed(self, audio, num_frames, whisper=None, encoded_audio=None, reference_images=None):
        node = "HuMo Embeds"
        validation.widgets(node, self.INPUT_TYPES(), {"num_frames": num_frames})
        try:
            track = audio_processing.to_mono_16k(validation.audio_scale(node, "audio", audio), name="audio")
        except ValueError as exc:
            raise NodeInputError(node, "audio", str(exc)) from None
        validation.speech_level(node, "audio", track)
        if whisper is not None:
            validation.audio_encoder(node, "whisper", whisper, "whisper")
            # encoded window by window in the try below, each reduced to the bands as it comes (bounded memory)
            windows = whisper_window_states(whisper, track, progress=encoding_progress())
        elif encoded_audio is not None:
            try:
                hidden = hidden_states_from_comfy(encoded_audio)
            except ValueError as exc:
                raise NodeInputError(node, "encoded_audio", str(exc)) from None
            if track.shape[0] > NATIVE_WHISPER_SECONDS * SAMPLE_RATE:
                log.warning("wantalk: HuMo Embeds: ComfyUI's Whisper output covers the first %d s of %.1f s of "
                            "audio; the rest is silent for HuMo. Use Load Whisper (wantalk) for long audio.",
                            NATIVE_WHISPER_SECONDS, track.shape[0] / SAMPLE_RATE)
        else:
            raise NodeInputError(node, "whisper", "connect the encoder from Load Whisper (wantalk), or ComfyUI's "
                                 "Audio Encoder Encode output (whisper_large_v3) to encoded_audio.")
        try:
            bands = (humo_bands_streamed((w.float().cpu() for w in windows), hidden_frames(track.shape[0]))
                     if whisper is not None else humo_bands(hidden.float().cpu()))
        except ValueError as exc:
            raise NodeInputError(node, "whisper" if whisper is not None else "encoded_audio", str(exc)) from None
        validation.finite(node, "whisper" if whisper is not None else "encoded_audio", bands, "band values")
        if num_frames > 0:
            bands, track = fit_length(bands, num_frames), fit_length(track, num_frames * SAMPLES_PER_FRAME)
        frames = bands.shape[0]
        track = fit_length(track, frames * SAMPLES_PER_FRAME)
        embeds = HumoEmbeds(bands, references_from_image(reference_images),
                            {"waveform": track[None, None].float(), "sample_rate": SAMPLE_RATE})
        return (embeds, embeds.audio, frames)


class WanTalkHuMoSampler(VideoSamplerNode):
    DESCRIPTION = ("Generates a HuMo video of the whole audio (text + reference image + audio): windows of 97 frames, "
                   "each later window continued from the last frames of the previous one. Outputs frames, the "
                   "matching audio and the fps for Create Video.")

    @classmethod
    def INPUT_TYPES(cls):
        d = HUMO_DEFAULTS
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "HuMo-17B or HuMo-1.7B (Load Wan Model (wantalk) with a HuMo "
                                       "file)."}),
                "vae": (VAE_TYPE, {"tooltip": "The Wan 2.1 VAE (Load Wan VAE (wantalk))."}),
                "humo_embeds": (HUMO_EMBEDS_TYPE, {"tooltip": "From HuMo Embeds (wantalk); sets the video length."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt from CLIP Text Encode with umT5-XXL (Load CLIP, "
                                              "type 'wan'); describe the person, the scene and the action."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt (unused by guidance 'none')."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Video width, a multiple of 16 (HuMo: 832x480 or 1280x720)."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Video height, a multiple of 16."}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 200,
                                  "tooltip": "Denoising steps per window (official: 50; 6-8 with a distill LoRA)."}),
                "shift": ("FLOAT", {"default": d.shift, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Timestep shift of the flow schedule (official: 5)."}),
                "scheduler": (sorted(SCHEDULERS), {"default": d.scheduler,
                                                   "tooltip": "Sampler. unipc is the official one."}),
                "guidance": (list(GUIDANCE_MODES), {
                    "default": d.guidance,
                    "tooltip": "tia: text + image + audio guidance, 3 passes (official, with a reference image). "
                               "ta: no reference image, 3 passes. audio_cfg: 2 passes, text_scale ignored (for "
                               "distilled models). none: 1 pass (distilled models at scale 1)."}),
                "text_scale": ("FLOAT", {"default": d.text_scale, "min": 0.0, "max": 30.0, "step": 0.1,
                                         "tooltip": "Text guidance (official 5.0; lowered by 2 once t <= 980 in "
                                                    "tia, as HuMo does)."}),
                "audio_scale": ("FLOAT", {"default": d.audio_scale, "min": 0.0, "max": 30.0, "step": 0.1,
                                          "tooltip": "Audio guidance (official 5.5): higher follows the speech "
                                                     "more closely."}),
                "seed": SEED_INPUT,
                "frame_window": ("INT", {"default": d.frames, "min": 5, "max": 1001, "step": 4,
                                         "tooltip": "Frames per window (1 + 4k). HuMo is trained with 97 (3.9 s)."}),
                "motion_frames": ("INT", {"default": d.motion_frames, "min": 1, "max": 97, "step": 4,
                                          "tooltip": "Frames each later window continues from (1 + 4k). Long audio "
                                                     "only; a wantalk extension (HuMo itself makes one window)."}),
                "max_frames": MAX_FRAMES_INPUT,
                "save_windows": SAVE_WINDOWS_INPUT,
            },
            "optional": {
                "image_scale": ("FLOAT", {"default": d.image_scale, "min": 0.0, "max": 30.0, "step": 0.1,
                                          "tooltip": "HuMo-1.7B with guidance tia only: reference image guidance "
                                                     "(official 4.0; the 1.7B official text/audio scales are 7.5)."}),
            },
        }


    def sample(self, model, vae, humo_embeds, positive, negative, width, height, steps, shift, scheduler, guidance,
               text_scale, audio_scale, seed, frame_window, motion_frames, max_frames, save_windows,
               image_scale=HUMO_DEFAULTS.image_scale):
        node = "HuMo Sampler"
        validation.widgets(node, self.INPUT_TYPES(), locals())
        validation.shift(node, "shift", shift)
        validation.wan_model(node, "model", model, "humo")
        validation.wan_vae(node, "vae", vae)
        validation.of_type(node, "humo_embeds", humo_embeds, HumoEmbeds, "HuMo Embeds (wantalk)")
        for reference in humo_embeds.references:
            if isinstance(reference, torch.Tensor):
                validation.finite(node, "humo_embeds", reference, "reference image values")
        if width % 16 or height % 16:
            raise NodeInputError(node, "width/height", f"{width}x{height} is not a multiple of 16; use e.g. 832x480.")
        settings = HumoSettings(frames=frame_window, motion_frames=motion_frames, steps=steps, shift=shift,
                                scheduler=scheduler, guidance=guidance, text_scale=text_scale,
                                audio_scale=audio_scale, image_scale=image_scale, seed=seed, max_frames=max_frames)
        try:
            settings.validate()
        except ValueError as exc:
            raise NodeInputError(node, "frame_window/motion_frames", str(exc)) from None
        device = compute_device_for(model, node)
        text = conditioning_from(model, positive, negative, None, device, node)
        bar = host.ProgressBar(1)

        def on_step(window, windows, step, steps_per_window):
            host.check_interrupt()
            bar.total = windows * steps_per_window
            bar.update(1)

        resume_dir = os.path.join(host.output_directory(), WINDOWS_FOLDER) if save_windows else None  # + run key
        try:
            frames = generate_humo_video(model, vae, text, humo_embeds.bands, humo_embeds.references, height=height,
                                         width=width, settings=settings, resume_dir=resume_dir, on_step=on_step)
        except ValueError as exc:
            raise NodeInputError(node, "humo_embeds/model", str(exc)) from None
        except OSError as exc:
            raise validation.windows_folder_error(node, resume_dir, exc) from None
        finally:
            host.soft_empty_cache()
        if frames.shape[0]:
            bar.update(0, preview=preview_image(to_uint8(frames[-1])))
        waveform = humo_embeds.audio["waveform"][..., :frames.shape[0] * SAMPLES_PER_FRAME]
        return (frames, {"waveform": waveform, "sample_rate": humo_embeds.audio["sample_rate"]},
                float(FPS))


NODE_CLASS_MAPPINGS = {"WanTalkWhisperLoader": WanTalkWhisperLoader,
                       "WanTalkHuMoEmbeds": WanTalkHuMoEmbeds,
                       "WanTalkHuMoSampler": WanTalkHuMoSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"WanTalkWhisperLoader": "Load Whisper (wantalk)",
                              "WanTalkHuMoEmbeds": "HuMo Embeds (wantalk)",
                              "WanTalkHuMoSampler": "HuMo Sampler (wantalk)"}
