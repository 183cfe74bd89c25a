"""InfiniteTalk nodes: the VAE loader, precomputed text/CLIP embeddings, and the long-video sampler.

The sampler is a thin shell over `multitalk.long_video.generate_long_video`: it takes one image or a video to dub
(fitted, frame by frame as the engine reads them, to the official size bucket or a custom size, with the speaker
masks), optionally an earlier sampler's video to continue, bridges ComfyUI's CONDITIONING / CLIP_VISION_OUTPUT /
CLIP_VISION into our `Conditioning` and the official CLIP input, reports progress and honours Cancel, and returns
IMAGE frames plus the matching AUDIO and fps for ComfyUI's Create Video -> Save Video.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from . import host, validation
from .multitalk.buckets import CUSTOM, SIZES, closest_bucket, fit_frames
from .multitalk.clip_input import encode_official
from .multitalk.conditioning import speaker_masks
from .multitalk.long_video import CONTINUATIONS, LongVideoSettings, generate_long_video
from .nodes_audio import AUDIO_EMBEDS_TYPE, FPS, SAMPLES_PER_FRAME, AudioEmbeds
from .nodes_common import (CATEGORY, MAX_FRAMES_INPUT, MODEL_TYPE, SAVE_WINDOWS_INPUT, SEED_INPUT, NodeInputError,
                           VideoSamplerNode)
from .nodes_lowvram import compute_device_for
from .wanvideo.resume import checksum
from .wanvideo.sampling import Conditioning
from .wanvideo.schedulers import SCHEDULERS
from .wanvideo.vae import load_wan_vae
from .wanvideo.windows import WindowGeometry

VAE_TYPE = "WANTALK_VAE"
VAE_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EMBEDDINGS_FOLDER = "wantalk_embeddings"   # under ComfyUI's output folder
WINDOWS_FOLDER = "wantalk_windows"         # finished windows of resumable runs, under the output folder
PREVIEW_SIZE = 512


class ClipVisionEmbeds:
    """Stands in for ComfyUI's CLIP_VISION_OUTPUT (item and attribute access) for stored CLIP features."""

    def __init__(self, penultimate_hidden_states: torch.Tensor):
        self.penultimate_hidden_states = penultimate_hidden_states

    def __getitem__(self, key):
        return getattr(self, key)


# ---- plain helpers --------------------------------------------------------------------------------------------

def conditioning_video(node: str, name: str, video) -> torch.Tensor:
    """The conditioning frames as one IMAGE batch `[F, H, W, 3]` in 0..1: an IMAGE (one picture or a video's
    frames), or a list of IMAGEs / frames, which must share one size."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise NodeInputError(node, name, "is an empty list of frames; connect an image or a video's frames "
                                 "(Load Video -> Get Video Components).")
        parts = [validation.image(node, name, part[None] if isinstance(part, torch.Tensor) and part.dim() == 3
                                  else part) for part in video]
        for index, part in enumerate(parts):
            if part.shape[1:3] != parts[0].shape[1:3]:
                raise NodeInputError(node, name, f"frame {index} is {part.shape[2]}x{part.shape[1]} but frame 0 is "
                                     f"{parts[0].shape[2]}x{parts[0].shape[1]}; a video's frames must share one size "
                                     f"(resize them to one size first).")
        video = torch.cat(parts)
    else:
        video = validation.image(node, name, video)
    validation.small_picture(node, name, video)
    return video[..., :3]


class FittedFrames:
    """The conditioning video at the video size, a frame at a time: frame i is resized and centre-cropped (the
    official way) when the window engine reads it, in [-1, 1] `[3, H, W]`, so a long video is not copied whole."""

    def __init__(self, video: torch.Tensor, height: int, width: int):
        self.video, self.height, self.width = video, height, width

    def __len__(self) -> int:
        return self.video.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        frame = self.video[index].permute(2, 0, 1)[None].float().cpu()
        return fit_frames(frame, self.height, self.width)[0] * 2 - 1

    def engine_input(self):
        """What the window engine takes: the one fitted frame of an image, else this lazy view of the video."""
        return self[0] if len(self) == 1 else self


def first_tensor(conditioning, node: str, name: str) -> torch.Tensor:
    """The embedding `[1, L, dim]` of a ComfyUI CONDITIONING (its first entry)."""
    try:
        tensor = conditioning[0][0]
    except (IndexError, KeyError, TypeError):
        tensor = None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        raise NodeInputError(node, name, "expected a CONDITIONING from CLIP Text Encode with the umT5-XXL text "
                             "encoder (Load CLIP, type 'wan') or from Load Embeddings (wantalk).")
    return tensor[:1]


def preview_image(frame_uint8: torch.Tensor):
    """ComfyUI's preview tuple for one `[H, W, 3]` uint8 frame; None where Pillow is missing."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return ("JPEG", Image.fromarray(frame_uint8.numpy()), PREVIEW_SIZE)


def conditioning_from(model, positive, negative, clip_vision_output, device, node: str) -> Conditioning:
    """Our Conditioning from ComfyUI's CONDITIONING / CLIP_VISION_OUTPUT, checked against the model's sizes."""
    cfg = model.cfg
    context, negative_context = first_tensor(positive, node, "positive"), first_tensor(negative, node, "negative")
    for name, tensor in (("positive", context), ("negative", negative_context)):
        validation.finite(node, name, tensor, "embedding values")
        if tensor.shape[-1] != cfg.text_dim:
            raise NodeInputError(node, name, f"the text embedding has {tensor.shape[-1]} channels but the model "
                                 f"expects {cfg.text_dim} (umT5-XXL): load the text encoder with Load CLIP, "
                                 f"type 'wan' (umt5_xxl_fp8_e4m3fn_scaled.safetensors).")
    clip_fea = None
    if clip_vision_output is not None:
        try:
            clip_fea = clip_vision_output["penultimate_hidden_states"][:1]
        except (KeyError, AttributeError, TypeError):
            raise NodeInputError(node, "clip_vision_output", "expected the output of CLIP Vision Encode "
                                 "(clip_vision_h.safetensors).") from None
        validation.clip_features(node, "clip_vision_output", clip_fea)
        if not cfg.image_branch or clip_fea.shape[-1] != cfg.clip_dim:
            raise NodeInputError(node, "clip_vision_output", f"CLIP features of width {clip_fea.shape[-1]} do not "
                                 f"fit this model (expects {cfg.clip_dim if cfg.image_branch else 'none'}); use "
                                 f"clip_vision_h.safetensors with an I2V model.")
    return Conditioning(context.to(device), negative_context.to(device),
                        None if clip_fea is None else clip_fea.to(device))


# ---- nodes ----------------------------------------------------------------------------------------------------

class WanTalkVAELoader:
    DESCRIPTION = "Loads the Wan 2.1 video VAE (wan_2.1_vae.safetensors) from models/vae."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (host.model_files("vae"), {
                "tooltip": "The Wan 2.1 VAE from models/vae (wan_2.1_vae.safetensors or Wan2_1_VAE_bf16.safetensors;"
                           " not the Wan 2.2 VAE)."}),
            "precision": (list(VAE_PRECISIONS), {
                "default": "fp32",
                "tooltip": "VAE compute precision. fp32: the official numerics (default). Each window's motion "
                           "frames are decoded and re-encoded, so VAE rounding carries over: against fp32, bf16 is "
                           "off by about 2% (up to 7 of 255 levels), fp16 by 0.25% (about 1 level) "
                           "(docs/BENCHMARKS.md, bench/vae_drift.py). bf16/fp16 halve the VAE's memory."}),
        }}

    RETURN_TYPES = (VAE_TYPE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The Wan 2.1 VAE for the wantalk sampler.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, vae_name, precision):
        validation.widgets("Load Wan VAE", self.INPUT_TYPES(), {"precision": precision})
        try:
            path = host.model_path("vae", vae_name)
            return (load_wan_vae(path, device=host.torch_device(), dtype=VAE_PRECISIONS[precision]),)
        except (FileNotFoundError, ValueError) as exc:
            raise NodeInputError("Load Wan VAE", "vae_name", str(exc)) from None


def embedding_files() -> list[str]:
    folder = os.path.join(host.output_directory(), EMBEDDINGS_FOLDER)
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))


class WanTalkSaveEmbeddings:
    DESCRIPTION = ("Stores text (and CLIP vision) embeddings in output/wantalk_embeddings, so later runs can use "
                   "Load Embeddings (wantalk) and skip loading the 11 GB text encoder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The encoded prompt (CLIP Text Encode with umT5-XXL)."}),
                "negative": ("CONDITIONING", {"tooltip": "The encoded negative prompt."}),
                "name": ("STRING", {"default": "my_prompt", "tooltip": "File name (without extension) in "
                                    "output/wantalk_embeddings; an existing file of that name is replaced."}),
            },
            "optional": {
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "CLIP vision features of the start image, stored too (they depend on the image)."}),
            },
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY

    def save(self, positive, negative, name, clip_vision_output=None):
        node = "Save Embeddings"
        validation.widgets(node, self.INPUT_TYPES(), {"name": name})
        stem = os.path.basename(name.strip()).removesuffix(".safetensors")
        if not stem or stem in (".", "..") or "\0" in stem:
            raise NodeInputError(node, "name", f"give a file name, e.g. 'my_prompt' (got {name!r}).")
        tensors = {"positive": first_tensor(positive, node, "positive"),
                   "negative": first_tensor(negative, node, "negative")}
        if clip_vision_output is not None:
            try:
                tensors["clip_vision"] = clip_vision_output["penultimate_hidden_states"][:1]
            except (KeyError, AttributeError, TypeError):
                raise NodeInputError(node, "clip_vision_output", "expected the output of CLIP Vision Encode "
                                     "(clip_vision_h.safetensors).") from None
            validation.clip_features(node, "clip_vision_output", tensors["clip_vision"])
        inputs = {"positive": "positive", "negative": "negative", "clip_vision": "clip_vision_output"}
        for key, tensor in tensors.items():
            validation.finite(node, inputs[key], tensor)
        folder = os.path.join(host.output_directory(), EMBEDDINGS_FOLDER)
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, stem + ".safetensors"))
        return {}


class WanTalkLoadEmbeddings:
    DESCRIPTION = ("Loads precomputed text/CLIP embeddings (from Save Embeddings (wantalk)) instead of running the "
                   "text and CLIP vision encoders.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "embeddings": (embedding_files(), {
                "tooltip": "A .safetensors file in output/wantalk_embeddings with 'positive', 'negative' and "
                           "optionally 'clip_vision' tensors."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CLIP_VISION_OUTPUT")
    RETURN_NAMES = ("positive", "negative", "clip_vision_output")
    OUTPUT_TOOLTIPS = ("The stored prompt embedding.", "The stored negative prompt embedding.",
                       "The stored CLIP vision features (None when the file has none).")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, embeddings):
        node = "Load Embeddings"
        if not isinstance(embeddings, str) or not embeddings.strip():
            raise NodeInputError(node, "embeddings", f"choose a file from the list (got {embeddings!r}).")
        path = os.path.join(host.output_directory(), EMBEDDINGS_FOLDER, os.path.basename(embeddings))
        if not os.path.isfile(path):
            raise NodeInputError(node, "embeddings", f"'{path}' does not exist; create it with Save Embeddings.")
        try:
            tensors = load_file(path)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise NodeInputError(node, "embeddings", f"'{path}' cannot be read as safetensors ({exc}); save the "
                                 f"embeddings again with Save Embeddings.") from None
        missing = [k for k in ("positive", "negative") if k not in tensors]
        if missing:
            raise NodeInputError(node, "embeddings", f"'{path}' lacks {missing}; it was not written by Save "
                                 f"Embeddings (wantalk).")
        for key, tensor in tensors.items():
            validation.finite(node, "embeddings", tensor, f"values in '{key}' of '{path}'")
        clip = ClipVisionEmbeds(tensors["clip_vision"]) if "clip_vision" in tensors else None
        return ([[tensors["positive"], {}]], [[tensors["negative"], {}]], clip)


class WanTalkInfiniteTalkSampler(VideoSamplerNode):
    DESCRIPTION = ("Generates a talking video of the whole audio with InfiniteTalk/MultiTalk: overlapping windows "
                   "continued from their last frames, colour-matched to the start image. Outputs frames, the "
                   "matching audio and the fps for Create Video.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "Wan 2.1 I2V 14B with InfiniteTalk weights (Load Wan Model "
                                       "(wantalk) with addon_model, or a combined file)."}),
                "vae": (VAE_TYPE, {"tooltip": "The Wan 2.1 VAE (Load Wan VAE (wantalk))."}),
                "audio_embeds": (AUDIO_EMBEDS_TYPE, {"tooltip": "From Audio Embeds (wantalk); sets the video "
                                                     "length."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt from CLIP Text Encode with umT5-XXL (Load CLIP, "
                                              "type 'wan'), e.g. 'a woman is talking'."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt (used when text_scale is not 1)."}),
                "start_image": ("IMAGE", {"tooltip": "The person (or two people) to animate: one image "
                                          "(image-to-video), or a video's frames to dub (Load Video -> Get Video "
                                          "Components, or any IMAGE batch). Each window is conditioned on the "
                                          "video frame at its start time; the audio sets the length: a shorter "
                                          "video holds its last frame, a longer one is cut. Resized to cover the "
                                          "video size and centre-cropped."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Video width, a multiple of 16 (size 'custom' only; the "
                                             "infinitetalk sizes pick it). InfiniteTalk is trained at 480p "
                                             "(832x480, 480x832, 640x640)."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Video height, a multiple of 16 (size 'custom' only)."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 200,
                                  "tooltip": "Denoising steps per window (official: 40; 4-8 with a distill LoRA)."}),
                "shift": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Timestep shift of the flow schedule (official: 7 at 480p, 11 at "
                                               "720p)."}),
                "scheduler": (sorted(SCHEDULERS), {"default": "infinitetalk_euler",
                                                   "tooltip": "Sampler. infinitetalk_euler is the official one."}),
                "text_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                         "tooltip": "Text guidance. 1 skips the negative-prompt pass (faster, "
                                                    "for distilled LoRAs)."}),
                "audio_scale": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                          "tooltip": "Audio guidance: higher follows the speech more closely. "
                                                     "1 skips the no-audio pass."}),
                "seed": SEED_INPUT,
                "frame_window": ("INT", {"default": 81, "min": 5, "max": 1001, "step": 4,
                                         "tooltip": "Frames generated per window (1 + 4k). 81 is what the model "
                                                    "was trained with; smaller saves memory."}),
                "motion_frames": ("INT", {"default": 9, "min": 1, "max": 97, "step": 4,
                                          "tooltip": "Frames each window continues from (1 + 4k, official 9); "
                                                     "the overlap between windows."}),
                "color_correction": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                               "tooltip": "Strength of the per-frame colour match to the start "
                                                          "image (stops colour drift in long videos). 0 = off."}),
                "max_frames": MAX_FRAMES_INPUT,
                "save_windows": SAVE_WINDOWS_INPUT,
            },
            "optional": {
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "Precomputed CLIP features of a single start image (CLIP Vision Encode, or Load "
                               "Embeddings). Prefer clip_vision: the sampler then encodes what the official code "
                               "encodes (the cropped frame, whole, at 224). Used instead of clip_vision for one "
                               "image; for a video every window would keep these features."}),
                "continuation": (list(CONTINUATIONS), {
                    "default": "infinitetalk",
                    "tooltip": "How each window continues the last one. infinitetalk (official InfiniteTalk): the "
                               "last motion_frames frames are pinned clean at every step, the start image stays "
                               "the condition. multitalk (official MultiTalk long-video mode, set motion_frames "
                               "25): the last frames become the condition and are blended in noised at each step "
                               "(freer motion, more drift); connect clip_vision to re-encode each window's last "
                               "frame as the official does, else the start image's CLIP features are kept."}),
                "clip_vision": ("CLIP_VISION", {
                    "tooltip": "The CLIP vision model (Load CLIP Vision, clip_vision_h.safetensors). The sampler "
                               "encodes the official CLIP input itself: the start image cropped to the video "
                               "size, or, dubbing, each window's video frame; multitalk: each window's last motion "
                               "frame."}),
                "size": (list(SIZES), {
                    "default": CUSTOM,
                    "tooltip": "infinitetalk-480 / infinitetalk-720: the official size buckets, the one closest to "
                               "the start image's aspect ratio (e.g. 896x448 for 16:9 at 480; official shift 7 at "
                               "480, 11 at 720). custom: width x height."}),
                "video_fps": ("FLOAT", {
                    "default": 25.0, "min": 0.01, "max": 1000.0, "step": 0.001,
                    "tooltip": "Frame rate of start_image when it is a video (Get Video Components' fps); frames "
                               "are matched to the 25 fps output by time. Ignored for one image."}),
                "previous_frames": ("IMAGE", {
                    "tooltip": "Continue an earlier sampler's video (its images output, same size): its last "
                               "motion_frames frames start the first window. audio_embeds must then cover the "
                               "earlier video too (Audio Concat of the earlier and the new audio); only the new "
                               "frames and their audio are output: join them with Image Batch and Audio Concat."}),
                "apg": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Adaptive projected guidance (official --use_apg, momentum -0.75, norm threshold "
                               "55): steadier guidance at high text/audio scales. Off as in the official "
                               "default."}),
            },
        }


    def sample(self, model, vae, audio_embeds, positive, negative, start_image, width, height, steps, shift,
               scheduler, text_scale, audio_scale, seed, frame_window, motion_frames, color_correction, max_frames,
               save_windows, clip_vision_output=None, continuation="infinitetalk", clip_vision=None, size=CUSTOM,
               video_fps=25.0, previous_frames=None, apg=False):
        node = "InfiniteTalk Sampler"
        validation.widgets(node, self.INPUT_TYPES(), locals())
        validation.shift(node, "shift", shift)
        validation.wan_model(node, "model", model, "infinitetalk")
        validation.wan_vae(node, "vae", vae)
        validation.of_type(node, "audio_embeds", audio_embeds, AudioEmbeds, "Audio Embeds (wantalk)")
        if not audio_embeds.talk.features:
            raise NodeInputError(node, "audio_embeds", "holds no speaker's features; connect Audio Embeds (wantalk).")
        validation.speakers_fit(node, "audio_embeds", model, len(audio_embeds.talk.features))
        video = conditioning_video(node, "start_image", start_image)
        if size != CUSTOM:
            height, width = closest_bucket(size, *video.shape[1:3])
        if width % 16 or height % 16:
            raise NodeInputError(node, "width/height", f"{width}x{height} is not a multiple of 16; use e.g. 832x480.")
        settings = LongVideoSettings(frame_window=frame_window, motion_frames=motion_frames, steps=steps,
                                     shift=shift, scheduler=scheduler, text_scale=text_scale, audio_scale=audio_scale,
                                     seed=seed, color_correction=color_correction, max_frames=max_frames,
                                     continuation=continuation, apg=apg)
        try:
            settings.validate()
        except ValueError as exc:
            raise NodeInputError(node, "frame_window/motion_frames/continuation", str(exc)) from None
        if video.shape[0] > 1 and continuation != "infinitetalk":
            raise NodeInputError(node, "continuation", "dubbing a video needs continuation 'infinitetalk' (multitalk "
                                 "conditions each window on its own motion frames, not on the video).")
        previous = self._previous(previous_frames, motion_frames, height, width, node)
        device = compute_device_for(model, node)
        frames = FittedFrames(video, height, width).engine_input()
        talk = audio_embeds.talk
        talk = type(talk)(talk.features, self._masks(talk, video, height, width, node))
        text = conditioning_from(model, positive, negative, clip_vision_output, device, node)
        encode_clip = self._clip_encoder(clip_vision, model, node)
        if video.shape[0] > 1 and encode_clip is None and text.clip_fea is not None:
            validation.warn(node, "dubbing with clip_vision_output but no clip_vision: every window keeps those CLIP "
                            "features; connect clip_vision for the official per-window features.")
        total = min(talk.num_frames, max_frames) if max_frames > 0 else talk.num_frames
        skip = 0 if previous is None else previous.shape[0]
        if total <= skip:
            hint = ", or raise max_frames" if max_frames else ""
            raise NodeInputError(node, "audio_embeds", f"covers {total} frames but previous_frames already has "
                                 f"{skip}: when continuing, the audio covers the earlier video and the new part "
                                 f"(Concatenate Audio of the earlier and the new speech{hint}).")
        windows = len(WindowGeometry(frame_window, motion_frames, total, skip).starts)
        bar = host.ProgressBar(windows * steps)

        def on_step(window, _windows, step, _steps):
            host.check_interrupt()
            bar.update(1)

        def on_window(window, frames):
            bar.update((window + 1) * steps - bar.current, preview=preview_image(frames[-1]))

        resume_dir = os.path.join(host.output_directory(), WINDOWS_FOLDER) if save_windows else None
        run_identity = self._clip_identity(encode_clip, frames) if save_windows else ""
        try:
            out = generate_long_video(model, vae, frames, talk, text, settings, fps=video_fps,
                                      previous_frames=previous, encode_clip=encode_clip, resume_dir=resume_dir,
                                      run_identity=run_identity, on_step=on_step, on_window=on_window)
        except NodeInputError:
            raise
        except ValueError as exc:
            raise NodeInputError(node, "audio_embeds/model", str(exc)) from None
        except OSError as exc:
            raise validation.windows_folder_error(node, resume_dir, exc) from None
        finally:
            host.soft_empty_cache()
        first, last = skip * SAMPLES_PER_FRAME, (skip + out.shape[0]) * SAMPLES_PER_FRAME   # the new frames' audio
        waveform = audio_embeds.audio["waveform"][..., first:last]
        audio = {"waveform": waveform, "sample_rate": audio_embeds.audio["sample_rate"]}
        return (out, audio, float(FPS))

    @staticmethod
    def _previous(previous_frames, motion_frames: int, height: int, width: int, node: str):
        """The earlier video to continue, checked: at least motion_frames frames of this sampler's size."""
        if previous_frames is None:
            return None
        previous = validation.image(node, "previous_frames", previous_frames)[..., :3]
        if previous.shape[0] < motion_frames:
            raise NodeInputError(node, "previous_frames", f"has {previous.shape[0]} frames but continuing needs at "
                                 f"least motion_frames = {motion_frames}; connect the whole earlier video or lower "
                                 f"motion_frames.")
        if tuple(previous.shape[1:3]) != (height, width):
            raise NodeInputError(node, "previous_frames", f"is {previous.shape[2]}x{previous.shape[1]} but this "
                                 f"sampler makes {width}x{height}; give both samplers the same size (and the same "
                                 f"start image with an infinitetalk size).")
        return previous

    @staticmethod
    def _clip_encoder(clip_vision, model, node: str):
        """`[3, H, W]` frame in [-1, 1] -> the official CLIP features with ComfyUI's CLIP vision model, or None."""
        if clip_vision is None:
            return None

        def encode(frame):
            try:
                features = encode_official(clip_vision, frame)
            except (AttributeError, KeyError, TypeError, IndexError) as exc:
                raise NodeInputError(node, "clip_vision", f"expected the CLIP vision model from Load CLIP Vision "
                                     f"(clip_vision_h.safetensors), got {type(clip_vision).__name__} "
                                     f"({type(exc).__name__}: {exc}).") from None
            validation.clip_features(node, "clip_vision", features)
            if not model.cfg.image_branch or features.shape[-1] != model.cfg.clip_dim:
                raise NodeInputError(node, "clip_vision", f"CLIP features of width {features.shape[-1]} do not fit "
                                     f"this model; use clip_vision_h.safetensors with an I2V model.")
            return features
        return encode

    @staticmethod
    def _clip_identity(encode_clip, frames) -> str:
        """For the resume key: the CLIP model in use, seen through its features of the first frame."""
        if encode_clip is None:
            return ""
        features = encode_clip(frames if isinstance(frames, torch.Tensor) else frames[0])
        return "clip:" + checksum(features.float().cpu())

    @staticmethod
    def _masks(talk, video: torch.Tensor, height: int, width: int, node: str) -> torch.Tensor | None:
        """Speaker masks at the video size: the drawn ones, cropped like the first frame, or the official halves."""
        if len(talk.features) < 2:
            return None
        if talk.masks is None:
            return speaker_masks(height, width)
        if tuple(talk.masks.shape[-2:]) != tuple(video.shape[1:3]):
            raise NodeInputError(node, "audio_embeds", f"the speaker masks are {tuple(talk.masks.shape[-2:])} but "
                                 f"the start image is {tuple(video.shape[1:3])}; draw the masks on the start "
                                 f"image.")
        return fit_frames(talk.masks[None], height, width, mask=True)[0]


NODE_CLASS_MAPPINGS = {
    "WanTalkVAELoader": WanTalkVAELoader,
    "WanTalkLoadEmbeddings": WanTalkLoadEmbeddings,
    "WanTalkSaveEmbeddings": WanTalkSaveEmbeddings,
    "WanTalkInfiniteTalkSampler": WanTalkInfiniteTalkSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanTalkVAELoader": "Load Wan VAE (wantalk)",
    "WanTalkLoadEmbeddings": "Load Embeddings (wantalk)",
    "WanTalkSaveEmbeddings": "Save Embeddings (wantalk)",
    "WanTalkInfiniteTalkSampler": "InfiniteTalk Sampler (wantalk)",
}
