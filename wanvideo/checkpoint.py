"""Reading checkpoint files tensor by tensor, and recognising what a file is.

One reader for every model part: safetensors are memory-mapped and read one tensor at a time; `.pt/.bin`
files are opened with `weights_only=True` (and mmap) only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct

import torch

log = logging.getLogger("wantalk")

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
    _check_header_layout(path, header)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"'{path}' is truncated: its header describes {8 + n + end} bytes but the file has "
                              f"{size}. The download or copy is incomplete; fetch the file again.")
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header_layout(path: str, header) -> None:
    """The header must be what the safetensors format says (a JSON object of tensor entries with a dtype, a shape
    and two data offsets, and an optional string-to-string `__metadata__`), so a crafted or damaged header is
    refused here with the file's name instead of failing deep inside with a KeyError."""
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' has a safetensors header that is a JSON {type(header).__name__}, not an "
                              f"object of tensors; the file is damaged or not a checkpoint.")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"'{path}': the safetensors '__metadata__' must map names to strings; the header is "
                              f"damaged.")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(shape, list) and all(_is_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"'{path}': the header entry of tensor '{key}' is not a safetensors entry "
                                  f"(expected dtype, shape and two increasing data_offsets, got {str(entry)[:120]}); "
                                  f"the file is damaged or crafted. Download it again.")


class CheckpointReader:
    """Uniform access to a checkpoint's tensors without loading them all: keys, shapes, dtypes, get(key)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint '{path}' does not exist.")
        self.path = path
        self._st = None
        self._sd = None
        with open(path, "rb") as f:
            start = f.read(9)
        if start[:4] == b"GGUF":  # GGUF models are read by wanvideo.gguf; anything else here takes safetensors
            raise CheckpointError(f"'{path}' is a GGUF file; only Load Wan Model reads GGUF (diffusion models and "
                                  f"add-ons). Use the .safetensors release of this file.")
        looks_safetensors = start[8:9] == b"{"
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

    def dtype_name(self, key: str) -> str:
        """The stored dtype as the file names it, without reading the tensor (safetensors `F8_E4M3`, a pickle's
        `torch.float8_e4m3fn`)."""
        return self._dtypes[key]

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


# ---- finiteness of the weights, checked as they stream in ----------------------------------------------------------

# fp8 bytes whose exponent bits are all ones (e4m3fn: NaN only, e5m2: inf and NaN), by their low 7 bits.
_FP8_NONFINITE_BITS = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def _may_hold_nonfinite(tensor: torch.Tensor) -> bool:
    """One or two plain reductions, the cheapest that see every NaN/inf (bench/finite_check.py): a sum in the
    tensor's own dtype (accumulated in float32; NaN and inf propagate, an overflow only sends us to the exact
    count), and for fp8 the largest byte as int8 and as uint8 (positive and negative non-finite codes are the
    largest of each)."""
    if tensor.dtype in _FP8_NONFINITE_BITS:
        bits = _FP8_NONFINITE_BITS[tensor.dtype]
        return int(tensor.view(torch.int8).amax()) >= bits or int(tensor.view(torch.uint8).amax()) >= 0x80 | bits
    return not bool(torch.isfinite(tensor.sum()))


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/inf values `tensor` holds. The common (finite) case costs one or two reductions on the tensor's
    device; only a suspicious tensor is counted element by element."""
    if tensor.numel() == 0 or not (tensor.is_floating_point() and _may_hold_nonfinite(tensor)):
        return 0
    if tensor.dtype in _FP8_NONFINITE_BITS:
        bits = _FP8_NONFINITE_BITS[tensor.dtype]
        return int(((tensor.view(torch.uint8) & bits) == bits).sum())
    return int((~torch.isfinite(tensor)).sum())  # 0 when only the sum overflowed (large but finite values)


def checked_tensor(tensor: torch.Tensor, key: str, source: str, device=None, error=CheckpointError) -> torch.Tensor:
    """`tensor` (moved to `device` when it holds floats, so the check runs where the weights load), refused with
    its name and file when it holds NaN/inf: such weights turn every video black without any error."""
    if device is not None and tensor.is_floating_point():
        tensor = tensor.to(device)
    bad = nonfinite_count(tensor)
    if bad:
        raise error(f"{source}: tensor '{key}' holds {bad} non-finite (NaN/inf) values of "
                    f"{tensor.numel()}; the file is damaged (or saved from a diverged training run). Download it "
                    f"again or use another file.")
    return tensor


# ---- config hints that belong to a checkpoint ----------------------------------------------------------------------

# key -> (type, lowest, highest): a crafted num_heads 0 divides by zero, a text_len of 1e12 allocates terabytes.
CONFIG_HINT_BOUNDS = {"num_heads": (int, 1, 1024), "text_len": (int, 1, 4096), "eps": (float, 1e-12, 1e-2)}


def validated_hints(hints: dict, source: str) -> dict:
    """The known config keys of `hints`, each checked against its bounds."""
    out = {}
    for key, (kind, low, high) in CONFIG_HINT_BOUNDS.items():
        if key not in hints:
            continue
        value = hints[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number and (kind is float or float(value).is_integer()) and low <= value <= high):
            raise CheckpointError(f"{source}: config value {key}={value!r} is out of bounds (expected "
                                  f"{'a whole number' if kind is int else 'a number'} from {low:g} to {high:g}); "
                                  f"fix or remove it.")
        out[key] = kind(value)
    return out


def _own_config_file(path: str) -> str | None:
    """The config beside `path` that names it, `<name>.config.json`. A plain config.json beside it names no file:
    in a shared model folder it would change every model there, so it is ignored (with a warning)."""
    folder, name = os.path.split(os.path.abspath(path))
    named = os.path.join(folder, os.path.splitext(name)[0] + ".config.json")
    if os.path.isfile(named):
        return named
    shared = os.path.join(folder, "config.json")
    if os.path.isfile(shared):
        log.warning("wantalk: '%s' is ignored for '%s': a config.json names no model file. To give this file "
                    "num_heads/text_len/eps, name the config '%s'.", shared, name, os.path.basename(named))
    return None


def config_hints(path: str, metadata: dict | None) -> dict:
    """num_heads / text_len / eps that belong to the checkpoint at `path`: its own safetensors metadata 'config',
    then the config beside it that names it (`_own_config_file`); validated, and logged when used."""
    hints = {}
    raw = (metadata or {}).get("config")
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            hints.update(validated_hints(parsed, f"'{path}' (metadata 'config')"))
        else:  # another tool's notion of 'config' (e.g. a training YAML): nothing wantalk reads
            log.warning("wantalk: '%s': metadata 'config' is not a JSON object; ignored.", path)
    side = _own_config_file(path)
    if side:
        try:
            with open(side, encoding="utf-8") as f:
                parsed = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"'{side}', the config of '{path}', cannot be read ({exc}); fix or remove "
                                  f"it.") from None
        if not isinstance(parsed, dict):
            raise CheckpointError(f"'{side}', the config of '{path}', is not a JSON object; fix or remove it.")
        hints.update(validated_hints(parsed, f"'{side}'"))
    if hints:
        log.info("wantalk: '%s': config values from the file's own metadata/config: %s", os.path.basename(path),
                 hints)
    return hints
