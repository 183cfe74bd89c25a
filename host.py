"""The one place that talks to ComfyUI.

Everything else in the pack is plain Python. When ComfyUI is importable we use its model folders,
memory management, progress bars and interrupt flag; otherwise plain fallbacks keep the pack usable
from scripts and tests.
"""
from __future__ import annotations

import contextlib
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

# Model folders outside ComfyUI: <root>/<kind>; root $WANTALK_MODELS, default ./models (`using_models_root` moves it).
_models_root = os.environ.get("WANTALK_MODELS", os.path.join(os.getcwd(), "models"))


@contextlib.contextmanager
def using_models_root(root: str):
    """Outside ComfyUI, resolve model names in `root`/<kind> inside the block (scripts and tests that bring their
    own model folders); the previous root comes back after it. ComfyUI's own folders are unaffected."""
    global _models_root
    previous, _models_root = _models_root, os.fspath(root)
    try:
        yield
    finally:
        _models_root = previous


class Interrupted(Exception):
    """Raised when the user pressed Cancel; callers stop cleanly and keep finished work."""


def model_files(kind: str) -> list[str]:
    """Files of one model folder kind (`diffusion_models`, `vae`, `loras`, `audio_encoders`, ...)."""
    if _folder_paths is not None:
        try:
            names = list(_folder_paths.get_filename_list(kind))
        except Exception:
            return []
        return names + sorted(set(_gguf_names(kind)) - set(names)) if kind in GGUF_KINDS else names
    folder = os.path.join(_models_root, kind)
    if not os.path.isdir(folder):
        return []
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


GGUF_KINDS = ("diffusion_models", "model_patches")  # folders whose GGUF files the loader reads (models, add-ons)


def _gguf_names(kind: str) -> list[str]:
    """GGUF files in ComfyUI's folders of `kind` (its lists carry only the torch extensions; city96's GGUF
    models sit in models/unet or models/diffusion_models)."""
    try:
        folders = _folder_paths.get_folder_paths(kind)
    except Exception:
        return []
    out = []
    for folder in folders:
        for root, _, files in os.walk(folder):
            out += [os.path.relpath(os.path.join(root, n), folder) for n in files if n.lower().endswith(".gguf")]
    return out


class ModelPathError(FileNotFoundError):
    """A model name that does not name a file inside the model folders (absolute, or leaving the folder)."""


def _inside_folder_name(kind: str, name) -> str:
    """`name` as a relative path that stays inside a model folder, or ModelPathError: a value that passed the
    combo check only through the API or a `*` link must not open an arbitrary readable file."""
    if not isinstance(name, str) or not name.strip():
        raise ModelPathError(f"{kind} file name {name!r} is empty; choose a file from the models/{kind} list.")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or os.path.splitdrive(name)[0] or ".." in parts:
        raise ModelPathError(f"{kind} file name '{name}' points outside the models/{kind} folder (absolute paths "
                             f"and '..' are refused); put the file in models/{kind} and choose it from the list.")
    return os.path.normpath(name)


def model_path(kind: str, name: str) -> str:
    """Absolute path of a file chosen from a model folder list: resolved only inside ComfyUI's folders of that
    kind (outside ComfyUI: $WANTALK_MODELS/<kind>)."""
    relative = _inside_folder_name(kind, name)
    if _folder_paths is not None:
        path = _folder_paths.get_full_path(kind, relative)
        if path:
            return path
    path = os.path.abspath(os.path.join(_models_root, kind, relative))  # inside: `relative` has no '..'
    if os.path.isfile(path):
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


def on_unload_all_models(callback) -> None:
    """Call `callback` whenever ComfyUI unloads all models (its free-memory request); nothing outside ComfyUI.
    ComfyUI has no hook for this, so its `unload_all_models` is wrapped (call once per callback)."""
    if _mm is None:
        return
    original = _mm.unload_all_models

    def unload_all_models(*args, **kwargs):
        callback()
        return original(*args, **kwargs)

    _mm.unload_all_models = unload_all_models


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


WARNING_EVENT = "wantalk.warning"  # shown as a toast by web/wantalk_warnings.js


def warn_user(message: str) -> None:
    """A warning the user should see although the run goes on: logged, and in ComfyUI shown under the running node
    (PromptServer.send_progress_text, as ComfyUI's own nodes do) and as a toast (the custom event WARNING_EVENT,
    which the pack's front-end extension turns into `app.extensionManager.toast.add`; ComfyUI has no built-in
    server-side toast). Outside ComfyUI, or when the server is not running, only logged."""
    log.warning(message)
    if _folder_paths is None:
        return
    try:
        from comfy_execution.utils import get_executing_context  # type: ignore
        from server import PromptServer  # type: ignore
        context = get_executing_context()
        server = getattr(PromptServer, "instance", None)
        if context is not None and server is not None:
            server.send_progress_text(f"warning: {message}", context.node_id)
            server.send_sync(WARNING_EVENT, {"message": message, "node": context.node_id},
                             getattr(server, "client_id", None))
    except Exception as exc:  # pragma: no cover - depends on the ComfyUI version; the log line is already out
        log.debug("wantalk: could not show the warning in ComfyUI: %s", exc)
