"""Resumable runs: a run key that covers everything that determines the frames, and a window store that never
reuses a stale or damaged window and can be shared by two processes.

The key folds in the full content of the weights in memory (every parameter and buffer, LoRA factors included,
as raw bits: one read, no sample that a change can slip past), the VAE's weights, dtype and config, the unmerged
LoRA strengths, every runtime setting and input tensor, the identities of the model's files (size, mtime and a
digest of the header and sampled blocks) and a caller's `run_identity` text (e.g. the CLIP encoder in use). Each
window file carries the key, its index, shape and a checksum of its frames; a file that fails any check is re-run
with a warning naming it. Writes go to a unique temporary name and are renamed into place; a lock per folder makes
concurrent runs take turns per window, so the second one loads what the first has written instead of computing it
again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, is_dataclass

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("wantalk")

HEADER_BYTES = 1 << 20        # file identity: the safetensors/GGUF header lives here
SAMPLED_BLOCKS = 16           # ... plus this many blocks spread over the file
BLOCK_BYTES = 1 << 16
STORE_VERSION = "2"


def _digest() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=16)


# ---------------------------------------------------------------------------------------------- identities

def file_identity(path: str) -> str:
    """Name, size, mtime and a blake2b of the first MiB and 16 evenly spread 64 KiB blocks of a model file:
    cheap for a 30 GB checkpoint, and any rewrite changes at least the mtime."""
    stat = os.stat(path)
    h = _digest()
    with open(path, "rb") as f:
        h.update(f.read(HEADER_BYTES))
        for i in range(SAMPLED_BLOCKS):
            f.seek(stat.st_size * i // SAMPLED_BLOCKS)
            h.update(f.read(BLOCK_BYTES))
    return f"{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns}:{h.hexdigest()}"


def tensor_digest(t: torch.Tensor, h) -> None:
    """Feed the raw bits of `t` into `h` as 8 int64 partial sums over consecutive eighths, computed where the
    tensor lives (a GPU reduction for GPU weights, nothing copied whole): any single changed element changes its
    eighth's sum, so the digest."""
    t = t.detach()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel() == 0 or t.device.type == "meta":
        return
    flat = t.contiguous().reshape(-1)
    try:
        bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    except (KeyError, RuntimeError, TypeError):
        bits = flat.float()       # exotic storage (tensor subclasses): its values stand in for its bits
    rows = min(8, bits.numel())
    head = bits[:bits.numel() // rows * rows].reshape(rows, -1)
    sums = head.sum(dim=1, dtype=torch.int64 if not bits.is_floating_point() else torch.float64)
    tail = bits[head.numel():].sum(dtype=sums.dtype).reshape(1)
    h.update(torch.cat([sums, tail]).cpu().numpy().tobytes())


def module_digest(module: torch.nn.Module) -> str:
    """Full-content digest of every parameter and buffer (non-persistent ones too: unmerged LoRA factors)."""
    h = _digest()
    seen = set()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name in seen or t is None:
            continue
        seen.add(name)
        h.update(name.encode())
        tensor_digest(t, h)
    return h.hexdigest()


def lora_identity(model) -> str:
    """Unmerged LoRAs (`model.unmerged_loras`): their strengths and, per patched layer, each term's LoRA index and
    alpha/rank scale (the factors themselves are buffers, covered by `module_digest`)."""
    loras = getattr(model, "unmerged_loras", None)
    if loras is None:
        return "no-unmerged-lora"
    terms = sorted((name, tuple(getattr(m, "terms", ()))) for name, m in model.named_modules() if hasattr(m, "terms"))
    return json.dumps({"strengths": list(loras.strengths), "terms": terms}, default=str)


def vae_identity(vae) -> str:
    """The VAE's weights (full content), compute dtype and config."""
    return "|".join([module_digest(vae), str(getattr(vae, "dtype", "")), str(getattr(vae, "config", ""))])


def model_identity(model) -> str:
    """Everything about a diffusion model that determines its output: config, quantization, attention and compute
    settings, the full weight content and the unmerged LoRA state; plus its source files when the loader
    recorded them (`model.source_paths`)."""
    report = getattr(model, "quant_report", None)
    parts = [str(getattr(model, "cfg", "")), str(report.summary() if report is not None else ""),
             str(getattr(model, "attention_mode", "")), str(getattr(model, "compute_dtype", "")),
             module_digest(model), lora_identity(model)]
    parts += [file_identity(p) for p in getattr(model, "source_paths", ()) or () if os.path.isfile(p)]
    return "|".join(parts)


def run_key(settings, *tensors, text: str = "") -> str:
    """Key of a run: a settings dataclass (every field), tensors (shape, dtype, content) and free text."""
    h = _digest()
    h.update(STORE_VERSION.encode())
    h.update(json.dumps(asdict(settings) if is_dataclass(settings) else settings, sort_keys=True, default=str).encode())
    h.update(text.encode())
    for t in tensors:
        h.update(b"none" if t is None else b"tensor")
        if t is not None:
            tensor_digest(t, h)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- the store

class _FolderLock:
    """An exclusive lock on `<folder>/.lock` (fcntl on POSIX, msvcrt on Windows); polls so a waiting run logs."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")

    @contextlib.contextmanager
    def held(self):
        with open(self.path, "a+b") as f:
            self._acquire(f)
            try:
                yield
            finally:
                self._release(f)

    @staticmethod
    def _acquire(f) -> None:
        warned = False
        while True:
            try:
                if os.name == "nt":
                    import msvcrt
                    f.seek(0)
                    msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if not warned:
                    log.info("wantalk: another run is writing the windows folder %s; waiting for its window",
                             os.path.dirname(f.name))
                    warned = True
                time.sleep(0.2)

    @staticmethod
    def _release(f) -> None:
        if os.name == "nt":
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class WindowStore:
    """Finished windows of one run (`<root>/<key>/window_0003.safetensors`, uint8 frames). `shape` is the
    `(frames, H, W, 3)` every window must have; a file with another key, shape, dtype or checksum, or one
    that does not parse, is reported and computed again. Without a root nothing is stored."""

    def __init__(self, root: str | None, key: str, shape: tuple):
        self.key, self.shape = key, tuple(shape)
        self.folder = os.path.join(root, key[:24]) if root else None
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)
            self._lock = _FolderLock(self.folder)

    def path(self, index: int) -> str:
        return os.path.join(self.folder, f"window_{index:04d}.safetensors")

    def load(self, index: int) -> torch.Tensor | None:
        if not self.folder or not os.path.isfile(self.path(index)):
            return None
        path = self.path(index)
        try:
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            frames = load_file(path)["frames"]
            problem = self._problem(index, frames, meta)
        except Exception as exc:  # any damage: truncated, empty, garbage, missing key
            problem = f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
        if problem:
            log.warning("wantalk: stored window file %s is damaged or stale (%s); computing that window again",
                        path, problem)
            return None
        return frames

    def _problem(self, index: int, frames: torch.Tensor, meta: dict) -> str:
        if meta.get("key") != self.key or meta.get("index") != str(index):
            return "written by another run"
        if frames.dtype != torch.uint8 or tuple(frames.shape) != self.shape:
            return f"{frames.dtype} {tuple(frames.shape)} instead of uint8 {self.shape}"
        if meta.get("checksum") != checksum(frames):
            return "checksum mismatch"
        return ""

    def save(self, index: int, frames: torch.Tensor) -> None:
        if not self.folder:
            return
        frames = frames.contiguous()
        tmp = f"{self.path(index)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            save_file({"frames": frames}, tmp, metadata={"key": self.key, "index": str(index),
                                                        "checksum": checksum(frames)})
            os.replace(tmp, self.path(index))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @contextlib.contextmanager
    def turn(self):
        """Hold the folder while one window is computed and saved (re-check `load` inside: another run may have
        written it meanwhile)."""
        if not self.folder:
            yield
            return
        with self._lock.held():
            yield


def checksum(frames: torch.Tensor) -> str:
    return hashlib.blake2b(frames.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
