"""The one place that talks to ComfyUI.

Everything else in the pack is plain Python. When ComfyUI is importable we use its model folders,
memory management, progress bars and interrupt flag; otherwise plain fallbacks keep the pack usable
from scripts and tests.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("wantalk")

try:  # ComfyUI is optional: tests and scripts run without it.
    import folder_paths as _folder_paths  # type: ignore
    import comfy.model_management as _mm  # type: ignore
    import comfy.utils as _comfy_utils  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _folder_paths = None
    _mm = None
    _comfy_utils = None

IN_COMFYUI = _folder_paths is not None

# Fallback model folders for use outside ComfyUI: $WANTALK_MODELS/<kind>, default ./models/<kind>.
_FALLBACK_ROOT = os.environ.get("WANTALK_MODELS", os.path.join(os.getcwd(), "models"))


class Interrupted(Exception):
    """Raised when the user pressed Cancel; callers stop cleanly and keep finished work."""


def model_files(kind: str) -> list[str]:
    """Files of one model folder kind (`diffusion_models`, `vae`, `loras`, `audio_encoders`, ...)."""
    if _folder_paths is not None:
        try:
            return list(_folder_paths.get_filename_list(kind))
        except Exception:
            return []
    folder = os.path.join(_FALLBACK_ROOT, kind)
    if not os.path.isdir(folder):
        return []
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def model_path(kind: str, name: str) -> str:
    """Absolute path of a file chosen from a model folder list (or an absolute path as given)."""
    if os.path.isabs(name) and os.path.exists(name):
        return name
    if _folder_paths is not None:
        path = _folder_paths.get_full_path(kind, name)
        if path:
            return path
    path = os.path.join(_FALLBACK_ROOT, kind, name)
    if os.path.exists(path):
        return path
    raise FileNotFoundError(f"{kind} file '{name}' was not found; put it in the ComfyUI models/{kind} folder.")


def output_directory() -> str:
    if _folder_paths is not None:
        return _folder_paths.get_output_directory()
    return os.path.join(os.getcwd(), "output")


def torch_device() -> torch.device:
    """The device ComfyUI computes on (or CUDA if available, else CPU)."""
    if _mm is not None:
        return _mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    if _mm is not None:
        return _mm.unet_offload_device()
    return torch.device("cpu")


def free_memory(bytes_needed: int, device: torch.device) -> None:
    """Ask ComfyUI to unload other models so that `bytes_needed` fit on `device`."""
    if _mm is not None:
        try:
            _mm.free_memory(bytes_needed, device)
        except Exception as exc:  # never fail a run because the host could not free memory
            log.warning("wantalk: ComfyUI could not free %d bytes: %s", bytes_needed, exc)


def soft_empty_cache() -> None:
    if _mm is not None:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_interrupt() -> None:
    """Raise `Interrupted` (or ComfyUI's own exception) when the user cancelled the run."""
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()


class ProgressBar:
    """ComfyUI's progress bar when available, with optional preview image; a silent counter otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.current = 0
        self._bar = _comfy_utils.ProgressBar(total) if _comfy_utils is not None else None

    def update(self, n: int = 1, preview=None) -> None:
        self.current += n
        if self._bar is not None:
            if preview is not None:
                self._bar.update_absolute(self.current, self.total, preview)
            else:
                self._bar.update_absolute(self.current, self.total)
