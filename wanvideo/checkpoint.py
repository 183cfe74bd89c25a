"""Reading checkpoint files tensor by tensor, and recognising what a file is.

One reader for every model part: safetensors are memory-mapped and read one tensor at a time; `.pt/.bin`
files are opened with `weights_only=True` (and mmap) only.
"""
from __future__ import annotations

import json
import os
import struct

import torch

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says what was found and what to do."""


def _safetensors_header(path: str) -> dict:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"'{path}' is not a safetensors file: it has only {size} bytes.")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"'{path}' is not a valid safetensors file (header length {n} does not fit a "
                                  f"{size}-byte file). Is it a pickle `.pt/.bin`, or a corrupt download?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"'{path}' has a corrupt safetensors header ({exc}); download the file again.") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"'{path}' is truncated: its header describes {8 + n + end} bytes but the file has "
                              f"{size}. The download or copy is incomplete; fetch the file again.")
    return header


class CheckpointReader:
    """Uniform access to a checkpoint's tensors without loading them all: keys, shapes, dtypes, get(key)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint '{path}' does not exist.")
        self.path = path
        self._st = None
        self._sd = None
        with open(path, "rb") as f:
            looks_safetensors = f.read(9)[8:9] == b"{"
        if looks_safetensors or path.endswith((".safetensors", ".sft")):
            self._open_safetensors()
        else:
            self._open_pickle()

    def _open_safetensors(self):
        from safetensors import safe_open
        header = _safetensors_header(self.path)
        self.metadata = header.get("__metadata__") or {}
        self._shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        self._dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
        try:
            self._st = safe_open(self.path, framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"'{self.path}' could not be opened as safetensors: {exc}") from None

    def _open_pickle(self):
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"'{self.path}' is neither safetensors nor a weights-only torch checkpoint "
                                  f"({type(exc).__name__}: {str(exc)[:200]}). Use a .safetensors file.") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"'{self.path}' does not hold a plain state dict of tensors.")
        self._sd = sd
        self.metadata = {}
        self._shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self._dtypes = {k: str(v.dtype) for k, v in sd.items()}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        if self._sd is not None:
            return self._sd[key]
        return self._st.get_tensor(key)

    def nbytes(self) -> int:
        return os.path.getsize(self.path)


def strip_prefix(keys: list[str]) -> str:
    """The prefix shared by the model keys of a file (`model.diffusion_model.` etc.), or ''."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "blocks.") or k.startswith(prefix + "patch_embedding.") for k in keys):
            return prefix
    for prefix in PREFIXES:  # add-on files (InfiniteTalk / HuMo weights only)
        if keys and sum(k.startswith(prefix) for k in keys) == len(keys):
            return prefix
    return ""


def describe_foreign(keys: list[str]) -> str | None:
    """If the keys belong to a known model that is NOT a Wan DiT, say which and where it belongs."""
    ks = set(keys)
    has = lambda frag: any(frag in k for k in ks)
    if has("condition_embedder.") or has("attn1.to_q") or has("scale_shift_table"):
        return ("a diffusers-format Wan transformer (keys like 'blocks.0.attn1.to_q'). Use the original-format single "
                "file instead, e.g. Comfy-Org's repackaged 'wan2.1_i2v_480p_14B_bf16.safetensors'")
    if has("decoder.upsamples.") or has("encoder.downsamples."):
        return "a Wan VAE; load it with the VAE loader (models/vae)"
    if has("token_embedding.weight") and has("ffn.gate") or has("encoder.block.0.layer.0.SelfAttention") or has("shared.weight"):
        return "a T5 text encoder; load it with ComfyUI's CLIPLoader (type 'wan') from models/text_encoders"
    if has("visual.transformer.") or has("vision_model.encoder.") or has("visual.cls_embedding"):
        return "a CLIP vision model; load it with ComfyUI's CLIPVisionLoader from models/clip_vision"
    if has("feature_projection.") or has("feature_extractor.conv_layers"):
        return "a wav2vec2 audio encoder; load it with the audio encoder loader (models/audio_encoders)"
    if has("encoder.conv1.weight") and has("embed_positions"):
        return "a Whisper audio encoder; load it with the Whisper loader (models/audio_encoders)"
    if has("audio_proj.") and not has("patch_embedding.weight"):
        return ("InfiniteTalk/MultiTalk or HuMo add-on weights only; choose the Wan 2.1 I2V 14B model as the "
                "diffusion model and give this file as the add-on (extra weights) input")
    if has("lora_A") or has("lora_down") or has("lora_up"):
        return "a LoRA; load it with the LoRA loader (models/loras)"
    return None
