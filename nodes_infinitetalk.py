"""InfiniteTalk nodes: the VAE loader, precomputed text/CLIP embeddings, and the long-video sampler.

The sampler is a thin shell over `multitalk.long_video.generate_long_video`: it fits the start image (and the
speaker masks) to the requested size, bridges ComfyUI's CONDITIONING / CLIP_VISION_OUTPUT into our
`Conditioning`, reports progress and honours Cancel, and returns IMAGE frames plus the matching AUDIO and fps
for ComfyUI's Create Video -> Save Video.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import host, validation
from .multitalk.conditioning import speaker_masks
from .multitalk.long_video import CONTINUATIONS, LongVideoSettings, generate_long_video, window_starts
from .nodes_audio import AUDIO_EMBEDS_TYPE, FPS, SAMPLES_PER_FRAME, AudioEmbeds
from .nodes_common import (CATEGORY, MAX_FRAMES_INPUT, MODEL_TYPE, SAVE_WINDOWS_INPUT, SEED_INPUT, NodeInputError,
                           VideoSamplerNode)
from .nodes_lowvram import compute_device_for
from .wanvideo.sampling import Conditioning
from .wanvideo.schedulers import SCHEDULERS
from .wanvideo.vae import load_wan_vae

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

def resize_center_crop(x: torch.Tensor, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """`[C, h, w]` scaled so that it covers `height` x `width`, then centre-cropped (the official
    resize_and_centercrop; bilinear with antialiasing like PIL, or nearest for masks)."""
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale)))
    if mode == "bilinear":
        x = F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    else:
        x = F.interpolate(x[None].float(), size=size, mode="nearest")[0]
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, top:top + height, left:left + width]


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
        validation.conditioning_tensor(node, name, tensor)
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
                "default": "bf16",
                "tooltip": "VAE compute precision. bf16 halves memory; fp32 is the official numerics (slower, "
                           "more memory at 720p)."}),
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
        stem = os.path.basename(name.strip()).removesuffix(".safetensors")
        if not stem:
            raise NodeInputError(node, "name", "give a file name, e.g. 'my_prompt'.")
        tensors = {"positive": first_tensor(positive, node, "positive"),
                   "negative": first_tensor(negative, node, "negative")}
        if clip_vision_output is not None:
            tensors["clip_vision"] = clip_vision_output["penultimate_hidden_states"][:1]
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
        path = os.path.join(host.output_directory(), EMBEDDINGS_FOLDER, os.path.basename(embeddings))
        if not os.path.isfile(path):
            raise NodeInputError(node, "embeddings", f"'{path}' does not exist; create it with Save Embeddings.")
        tensors = load_file(path)
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
                "start_image": ("IMAGE", {"tooltip": "The person (or two people) to animate; the first frame of "
                                          "the video. Resized to cover width x height and centre-cropped."}),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Video width, a multiple of 16. InfiniteTalk is trained at 480p "
                                             "(832x480, 480x832, 640x640)."}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Video height, a multiple of 16."}),
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
                    "tooltip": "CLIP Vision Encode of the start image (clip_vision_h.safetensors, crop 'center'). "
                               "The official pipeline always uses it."}),
                "continuation": (list(CONTINUATIONS), {
                    "default": "infinitetalk",
                    "tooltip": "How each window continues the last one. infinitetalk (official InfiniteTalk): the "
                               "last motion_frames frames are pinned clean at every step, the start image stays "
                               "the condition. multitalk (official MultiTalk long-video mode, set motion_frames "
                               "25): the last frames become the condition and are blended in noised at each step "
                               "(freer motion, more drift); connect clip_vision to re-encode each window's last "
                               "frame as the official does, else the start image's CLIP features are kept."}),
                "clip_vision": ("CLIP_VISION", {
                    "tooltip": "Only for continuation 'multitalk': the CLIP vision model (Load CLIP Vision, "
                               "clip_vision_h) to encode the last motion frame of each window."}),
            },
        }


    def sample(self, model, vae, audio_embeds, positive, negative, start_image, width, height, steps, shift,
               scheduler, text_scale, audio_scale, seed, frame_window, motion_frames, color_correction, max_frames,
               save_windows, clip_vision_output=None, continuation="infinitetalk", clip_vision=None):
        node = "InfiniteTalk Sampler"
        validation.widgets(node, self.INPUT_TYPES(), locals())
        validation.wan_model(node, "model", model, "infinitetalk")
        validation.wan_vae(node, "vae", vae)
        validation.of_type(node, "audio_embeds", audio_embeds, AudioEmbeds, "Audio Embeds (wantalk)")
        if width % 16 or height % 16:
            raise NodeInputError(node, "width/height", f"{width}x{height} is not a multiple of 16; use e.g. 832x480.")
        settings = LongVideoSettings(frame_window=frame_window, motion_frames=motion_frames, steps=steps,
                                     shift=shift, scheduler=scheduler, text_scale=text_scale, audio_scale=audio_scale,
                                     seed=seed, color_correction=color_correction, max_frames=max_frames,
                                     continuation=continuation)
        try:
            settings.validate()
        except ValueError as exc:
            raise NodeInputError(node, "frame_window/motion_frames/continuation", str(exc)) from None
        device = compute_device_for(model, node)
        image = self._start_image(start_image, height, width, node)
        talk = audio_embeds.talk
        talk = type(talk)(talk.features, self._masks(talk, start_image, height, width, node))
        text = conditioning_from(model, positive, negative, clip_vision_output, device, node)
        total = min(talk.num_frames, max_frames) if max_frames > 0 else talk.num_frames
        windows = len(window_starts(total, frame_window, motion_frames))
        bar = host.ProgressBar(windows * steps)

        def on_step(window, _windows, step, _steps):
            host.check_interrupt()
            bar.update(1)

        def on_window(window, frames):
            bar.update((window + 1) * steps - bar.current, preview=preview_image(frames[-1]))

        resume_dir = os.path.join(host.output_directory(), WINDOWS_FOLDER) if save_windows else None  # + run key
        try:
            frames = generate_long_video(model, vae, image, talk, text, settings, resume_dir=resume_dir,
                                         encode_clip=self._clip_encoder(clip_vision, model, node),
                                         on_step=on_step, on_window=on_window)
        except NodeInputError:
            raise
        except ValueError as exc:
            raise NodeInputError(node, "audio_embeds/model", str(exc)) from None
        finally:
            host.soft_empty_cache()
        waveform = audio_embeds.audio["waveform"][..., :frames.shape[0] * SAMPLES_PER_FRAME]
        audio = {"waveform": waveform, "sample_rate": audio_embeds.audio["sample_rate"]}
        return (frames, audio, float(FPS))

    @staticmethod
    def _clip_encoder(clip_vision, model, node: str):
        """`[3, H, W]` frame in [-1, 1] -> CLIP features with ComfyUI's CLIP vision model (straight resize to its
        input size, like the official encoder), or None without one."""
        if clip_vision is None:
            return None

        def encode(frame):
            pixels = ((frame.permute(1, 2, 0)[None].float() + 1) / 2).clamp(0, 1)
            features = clip_vision.encode_image(pixels, crop=False)["penultimate_hidden_states"][:1]
            if not model.cfg.image_branch or features.shape[-1] != model.cfg.clip_dim:
                raise NodeInputError(node, "clip_vision", f"CLIP features of width {features.shape[-1]} do not fit "
                                     f"this model; use clip_vision_h.safetensors with an I2V model.")
            return features
        return encode

    @staticmethod
    def _start_image(start_image: torch.Tensor, height: int, width: int, node: str) -> torch.Tensor:
        picture = validation.single_image(node, "start_image", start_image)
        picture = picture[0, :, :, :3].permute(2, 0, 1).float().cpu()
        return resize_center_crop(picture, height, width).clamp(0, 1) * 2 - 1

    @staticmethod
    def _masks(talk, start_image: torch.Tensor, height: int, width: int, node: str) -> torch.Tensor | None:
        """Speaker masks at the video size: the drawn ones, cropped like the image, or the official halves."""
        if len(talk.features) < 2:
            return None
        if talk.masks is None:
            return speaker_masks(height, width)
        if tuple(talk.masks.shape[-2:]) != tuple(start_image.shape[1:3]):
            raise NodeInputError(node, "audio_embeds", f"the speaker masks are {tuple(talk.masks.shape[-2:])} but "
                                 f"the start image is {tuple(start_image.shape[1:3])}; draw the masks on the start "
                                 f"image.")
        return resize_center_crop(talk.masks, height, width, mode="nearest")


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
