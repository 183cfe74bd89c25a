"""Checks of node inputs at the node boundary, so that a bad input is refused before any work, naming the node and
the input, what was expected and what to do (`NodeInputError`), and a probable mistake is warned about (log and
ComfyUI) without refusing. A wrong video with no error is the worst outcome: every tensor is checked once here.

Decisions:
- A uint8 IMAGE is converted (divided by 255) with a warning: its dtype states the 0..255 scale, so the
  conversion is exact, not a guess. A float IMAGE with values far above 1 is refused: it is not a ComfyUI IMAGE
  (0..1) and its scale cannot be known. Small overshoots (resampling ringing) are clipped with a warning.
- Integer PCM audio is normalised by its dtype's full scale (again stated by the dtype); float audio with peaks
  far above 1 is refused (integer PCM stored as float: the scale is unknown).
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from . import host
from .nodes_common import NodeInputError
from .wanvideo.checkpoint import nonfinite_count

IMAGE_SLACK = 0.02          # overshoot of resampled images that is clipped (with a warning) rather than refused
IMAGE_SCALE_LIMIT = 2.0     # beyond this a float IMAGE is on another scale (0..255): refused
SMALL_IMAGE_SIDE = 64       # a start/reference image smaller than this is probably a mistake
AUDIO_PEAK_LIMIT = 4.0      # float audio beyond this is integer PCM stored as float: refused
SILENT_RMS = 1e-4           # -80 dBFS: audio this quiet is silence, not speech


def warn(node: str, message: str) -> None:
    """A probable mistake: logged and shown on the node in ComfyUI; the run goes on."""
    host.warn_user(f"[wantalk {node}] {message}")


# ---- widget values ----------------------------------------------------------------------------------------------

def number(node: str, name: str, value, low=None, high=None, *, integer: bool = False) -> None:
    """`value` must be a finite number (a whole one for integer=True) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NodeInputError(node, name, f"expected a number, got {value!r} ({type(value).__name__}).")
    if not isinstance(value, numbers.Integral):  # ints of any size are finite (10**400 has no float)
        if not math.isfinite(value):
            raise NodeInputError(node, name, f"is {value}; give a finite number.")
        if integer and not float(value).is_integer():
            raise NodeInputError(node, name, f"expected a whole number, got {value!r}.")
    if integer and not isinstance(value, int):  # 32.0 or numpy.int64 would fail deep inside (slices, seeds)
        raise NodeInputError(node, name, f"expected a whole number (Python int), got {value!r} "
                             f"({type(value).__name__}); pass int(value).")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if low is not None and high is not None else (
            f"at least {low}" if low is not None else f"at most {high}")
        raise NodeInputError(node, name, f"must be {bounds}, got {value}.")


def shift(node: str, name: str, value) -> None:
    """The flow schedule's timestep shift must be above 0 (the widget's minimum 0 would fail in the scheduler)."""
    if value <= 0:
        raise NodeInputError(node, name, f"must be above 0 (Wan uses 3-5, HuMo 5, InfiniteTalk 7 at 480p and 11 at "
                             f"720p), got {value}.")


def choice(node: str, name: str, value, choices) -> None:
    if value not in choices:
        raise NodeInputError(node, name, f"unknown value {value!r}; choose one of {', '.join(map(str, choices))}.")


def widgets(node: str, input_types: dict, values: dict) -> None:
    """Check every widget value in `values` (e.g. a node's `locals()`) against the node's own INPUT_TYPES: INT and
    FLOAT within their min/max and finite, combos among their choices, BOOLEAN a bool. Called first thing by a
    node, so each bad value is reported against its own input (ComfyUI checks this for the UI, not for API
    prompts, links from `*` outputs or plain Python calls)."""
    specs = {**input_types.get("required", {}), **input_types.get("optional", {})}
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None or value is None:
            continue
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, (list, tuple)):
            choice(node, name, value, kind)
        elif kind in ("INT", "FLOAT"):
            number(node, name, value, options.get("min"), options.get("max"), integer=kind == "INT")
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            raise NodeInputError(node, name, f"expected true or false, got {value!r}.")
        elif kind == "STRING" and not isinstance(value, str):
            raise NodeInputError(node, name, f"expected text, got {value!r} ({type(value).__name__}).")


# ---- tensors ----------------------------------------------------------------------------------------------------

def finite(node: str, name: str, tensor: torch.Tensor, what: str = "values") -> torch.Tensor:
    """Refuse NaN/inf: they turn the whole video black (or into noise) without any error. One reduction, no
    tensor-sized temporary (a dubbing video can be gigabytes)."""
    bad = nonfinite_count(tensor)
    if bad:
        raise NodeInputError(node, name, f"contains {bad} NaN/inf {what} of {tensor.numel()}; the node that made "
                             f"it produced invalid numbers (re-run or replace it).")
    return tensor


def finite_range(node: str, name: str, tensor: torch.Tensor, what: str) -> tuple[float, float]:
    """(min, max) of a non-empty `tensor`, refusing NaN/inf as `finite` does: one pass over the tensor (the
    extrema of a tensor with NaN/inf are not finite), the exact count only for a tensor about to be refused."""
    low, high = (float(v) for v in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        finite(node, name, tensor, what)
    return low, high


def image(node: str, name: str, picture) -> torch.Tensor:
    """A ComfyUI IMAGE `[batch, height, width, 3 or 4]` as float in 0..1 (see the module docstring)."""
    if not isinstance(picture, torch.Tensor):
        raise NodeInputError(node, name, f"expected an IMAGE tensor [batch, height, width, 3], got "
                             f"{type(picture).__name__}.")
    shape = tuple(picture.shape)
    if picture.dim() != 4:
        raise NodeInputError(node, name, f"expected an IMAGE [batch, height, width, 3], got shape {shape}.")
    if shape[-1] not in (3, 4):
        if shape[1] in (1, 3, 4):
            raise NodeInputError(node, name, f"has shape {shape}: channels first [batch, channels, height, width]; "
                                 f"a ComfyUI IMAGE is channels last [batch, height, width, 3] (use "
                                 f"image.permute(0, 2, 3, 1)).")
        raise NodeInputError(node, name, f"expected an IMAGE [batch, height, width, 3], got shape {shape}.")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise NodeInputError(node, name, f"is empty (shape {shape}); connect at least one image.")
    if picture.dtype == torch.uint8:
        warn(node, f"input '{name}' is uint8 (0..255); converted to a float IMAGE in 0..1.")
        return picture.float().div_(255)  # in place: no second video-sized temporary
    if not picture.is_floating_point():
        raise NodeInputError(node, name, f"has dtype {picture.dtype}; a ComfyUI IMAGE is float in 0..1.")
    low, high = finite_range(node, name, picture, "pixels")
    if high > IMAGE_SCALE_LIMIT or low < -IMAGE_SCALE_LIMIT:
        raise NodeInputError(node, name, f"has values from {low:g} to {high:g}; a ComfyUI IMAGE is in 0..1 (this "
                             f"looks like 0..255: divide by 255, or load it with Load Image).")
    if high > 1 + IMAGE_SLACK or low < -IMAGE_SLACK:
        warn(node, f"input '{name}' has values from {low:.3f} to {high:.3f}, outside 0..1; they are clipped.")
        return picture.clamp(0, 1)
    return picture


def lora_chain(node: str, name: str, lora) -> tuple:
    """The `(path, strength)` pairs of a WanTalk LoRA chain (empty for None), or an error naming the input."""
    if lora is None:
        return ()
    if not isinstance(lora, (tuple, list)) or not all(
            isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) for item in lora):
        raise NodeInputError(node, name, f"expected the output of a WanTalk LoRA node, got {lora!r:.80}.")
    return tuple((path, strength) for path, strength in lora)


def windows_folder_error(node: str, resume_dir: str | None, exc: OSError) -> Exception:
    """An OSError on the resumable windows folder (a file in its place, no permission, no space) as an error on
    'save_windows'; any other OSError is returned unchanged, to be raised as it was."""
    if resume_dir is None:
        return exc
    where, folder = os.path.abspath(os.fspath(getattr(exc, "filename", None) or "")), os.path.abspath(resume_dir)
    if where != folder and not where.startswith(folder + os.sep):  # not a sibling sharing the name's prefix
        return exc
    return NodeInputError(node, "save_windows", f"the windows folder '{resume_dir}' cannot be used ({exc}); remove "
                          f"what is in its place, fix its permissions or free disk space, or turn save_windows off.")


def small_picture(node: str, name: str, picture: torch.Tensor) -> None:
    height, width = picture.shape[1:3]
    if min(height, width) < SMALL_IMAGE_SIDE:
        warn(node, f"input '{name}' is only {width}x{height} pixels; it is enlarged to the video size and the "
             f"person will be blurry. Use a picture of at least the video size.")


def clip_features(node: str, name: str, features) -> torch.Tensor:
    """CLIP vision penultimate hidden states `[batch, tokens, width]`, finite."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or not features.numel():
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise NodeInputError(node, name, f"expected CLIP vision features [1, 257, 1280] (CLIP Vision Encode with "
                             f"clip_vision_h), got {shape}.")
    return finite(node, name, features, "feature values")


# ---- audio ------------------------------------------------------------------------------------------------------

def audio_scale(node: str, name: str, audio):
    """A ComfyUI AUDIO whose waveform is float in about -1..1: integer PCM normalised by its dtype's full scale,
    float audio far beyond 1 refused. Other malformed input is left to the audio preparation's own checks."""
    if not isinstance(audio, dict) or not isinstance(audio.get("waveform"), torch.Tensor):
        return audio
    waveform = audio["waveform"]
    if waveform.dtype == torch.bool:
        raise NodeInputError(node, name, "the waveform is boolean; expected float samples in -1..1.")
    if not waveform.is_floating_point():
        full_scale = float(torch.iinfo(waveform.dtype).max) + 1
        host.log.info("wantalk %s: input '%s' is %s PCM; normalised by %d", node, name, waveform.dtype, full_scale)
        if waveform.dtype == torch.uint8:  # 8-bit PCM (WAV) is unsigned, centred on 128
            return {**audio, "waveform": waveform.float().sub_(128).div_(128)}
        return {**audio, "waveform": waveform.float().div_(full_scale)}
    peak = max(map(abs, finite_range(node, name, waveform, "samples"))) if waveform.numel() else 0.0
    if peak > AUDIO_PEAK_LIMIT:
        raise NodeInputError(node, name, f"has float samples up to {peak:.4g}; ComfyUI AUDIO is float in -1..1. "
                             f"This looks like integer PCM stored as float: divide by 32768 (16-bit) or 2**31 "
                             f"(32-bit), or load it with ComfyUI's Load Audio.")
    return audio


def speech_level(node: str, name: str, track: torch.Tensor) -> None:
    """Warn when the (16 kHz mono) audio is silent: the mouth will not move."""
    rms = float(torch.linalg.vector_norm(track.float())) / track.numel() ** 0.5 if track.numel() else 0.0
    if rms < SILENT_RMS:
        warn(node, f"input '{name}' is silent (RMS {rms:.1e}); the video will show no speech. Check the audio "
             f"file and the volume.")


# ---- parts wired together ---------------------------------------------------------------------------------------

def model_kind(model) -> str:
    """'infinitetalk', 'humo' or 'plain' (a Wan model without audio layers), from the loaded model's config."""
    audio = getattr(getattr(model, "cfg", None), "audio", None)
    if audio is None:
        return "plain"
    if hasattr(audio, "audio_window"):
        return "infinitetalk"
    if hasattr(audio, "bands"):
        return "humo"
    return type(audio).__name__


_WANTS = {"infinitetalk": "a Wan 2.1 I2V 14B model with InfiniteTalk/MultiTalk weights (Load Wan Model (wantalk) "
                          "with addon_model, or a combined file)",
          "humo": "a HuMo model (HuMo-17B or HuMo-1.7B file in Load Wan Model (wantalk))"}
_OTHER_SAMPLER = {"infinitetalk": "InfiniteTalk Sampler (wantalk)", "humo": "HuMo Sampler (wantalk)"}
_KIND_NAMES = {"infinitetalk": "an InfiniteTalk/MultiTalk model", "humo": "a HuMo model"}


def wan_model(node: str, name: str, model, kind: str):
    """Refuse a model of another kind than the sampler drives, saying which sampler the given one belongs to."""
    if not hasattr(model, "cfg") or not hasattr(model, "blocks"):
        raise NodeInputError(node, name, f"expected the model from Load Wan Model (wantalk), got "
                             f"{type(model).__name__}.")
    found = model_kind(model)
    if found == kind and (kind != "infinitetalk" or model.cfg.model_type == "i2v"):
        return model
    if found == kind:
        what = "a text-to-video model with InfiniteTalk weights; InfiniteTalk needs the I2V model"
    elif found in _OTHER_SAMPLER:
        what = f"{_KIND_NAMES[found]}; use it with {_OTHER_SAMPLER[found]}"
    else:
        what = f"a plain Wan {model.cfg.model_type.upper()} model without audio layers"
    raise NodeInputError(node, name, f"this is {what}. Expected {_WANTS[kind]}.")


def wan_vae(node: str, name: str, vae):
    from .wanvideo.vae import WanVAE
    if not isinstance(vae, WanVAE):
        raise NodeInputError(node, name, f"expected the Wan 2.1 VAE from Load Wan VAE (wantalk), got "
                             f"{type(vae).__name__}.")
    return vae


def audio_encoder(node: str, name: str, encoder, kind: str):
    """kind 'wav2vec2' (InfiniteTalk) or 'whisper' (HuMo): refuse the other encoder, which would give features
    of the wrong layout."""
    from .humo.whisper import WhisperEncoder
    from .multitalk.wav2vec2 import Wav2Vec2Encoder
    expected = {"wav2vec2": (Wav2Vec2Encoder, "the wav2vec2 encoder from Load wav2vec2 (wantalk); InfiniteTalk was "
                                            "trained with chinese-wav2vec2-base"),
                "whisper": (WhisperEncoder, "the Whisper encoder from Load Whisper (wantalk); HuMo was trained with "
                                            "Whisper-large-v3")}
    cls, what = expected[kind]
    if not isinstance(encoder, cls):
        raise NodeInputError(node, name, f"got {type(encoder).__name__}; expected {what}.")
    return encoder


def of_type(node: str, name: str, value, cls: type, made_by: str):
    """Refuse an object of another kind (e.g. HuMo embeds on an InfiniteTalk input), saying where it comes from."""
    if not isinstance(value, cls):
        raise NodeInputError(node, name, f"got {type(value).__name__}; expected the output of {made_by}.")
    return value


def speakers_fit(node: str, name: str, model, speakers: int) -> None:
    """Warn when two speakers go to what looks like the single-speaker InfiniteTalk model: both have the same
    layout (nothing in the weights tells them apart), only the published file and folder names say 'single'."""
    if speakers < 2:
        return
    singles = [p for p in getattr(model, "source_paths", ())
               if "single" in os.path.basename(p).lower() or "single" in os.path.basename(os.path.dirname(p)).lower()]
    if singles:
        warn(node, f"input '{name}' has two speakers but the model was loaded from '{singles[0]}', which looks like "
             f"the single-speaker InfiniteTalk model; use the multi-speaker weights (e.g. "
             f"Wan2_1-InfiniteTalk_Multi_14B) for two people.")
