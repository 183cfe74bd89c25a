"""Hosting the worker pack from the sampler's (ComfyUI's) single process: one live pack at a time, kept across
prompts while the model and the GPUs stay the same, stopped at exit or when the host asks to free memory; and the
stand-in model the samplers drive."""
from __future__ import annotations

import atexit

from .layout import Layout
from .pack import WorkerPack

_live: dict[tuple, WorkerPack] = {}


def recipe_of(model) -> dict:
    """How the workers load `model` again; refuses models that the recipe would not reproduce."""
    recipe = getattr(model, "load_recipe", None)
    if recipe is None:
        raise ValueError("this model was not loaded by the wantalk model loader, so the GPU workers cannot load it; "
                         "connect 'Load Wan Model (wantalk)' directly")
    if getattr(model, "unmerged_loras", None) is not None:
        raise ValueError("unmerged LoRAs are not carried to the GPU workers; load the LoRAs with lora_mode 'merge'")
    return recipe


def pack_for(model, devices: list[str], layout: Layout) -> WorkerPack:
    """The live pack on these devices, set up for this model split as `layout`. The pack (and the model its
    workers hold) is kept across prompts; another device set stops it first (one pack at a time)."""
    recipe = recipe_of(model)
    key = tuple(devices)
    if key not in _live:
        stop_all()
        _live.clear()
        _live[key] = WorkerPack(list(devices))
    _live[key].configure(layout, recipe)
    return _live[key]


def stop_all() -> None:
    """Stop every worker (exit, ComfyUI's free-memory request); the next run starts them again."""
    for pack in _live.values():
        pack.stop()


atexit.register(stop_all)


class ParallelModel:
    """Stands in for the WanModel in the sampler's process: the guidance passes of each step run on the worker pack
    that `pack()` returns (looked up at every step, so a pack stopped or replaced in between is never used);
    everything else (config, audio projection, weights identity) is the local model's, which runs no forward here.
    `check_interrupt` is polled while the workers compute."""

    block_runner = "multi-GPU workers"  # not None: the samplers' automatic block swap leaves this model alone

    def __init__(self, model, pack, check_interrupt=None):
        self.model, self.pack, self.check_interrupt = model, pack, check_interrupt

    def __getattr__(self, name):
        return getattr(self.model, name)

    def run_passes(self, latent, timestep, passes: dict) -> dict:
        return self.pack().run_passes(latent, timestep, passes, self.check_interrupt)

    def forward_batched(self, x, t, context, clip_fea=None, y=None, audio=None, seq_lens=None):
        """One pass on the workers (callers that wrap the model, e.g. HuMo-1.7B's reference latents)."""
        if seq_lens is not None:
            raise ValueError("seq_lens is not supported by the multi-GPU workers")
        args = {"context": context, "clip_fea": clip_fea, "y": y, "audio": audio}
        return self.run_passes(x, t, {"cond": args})["cond"]
