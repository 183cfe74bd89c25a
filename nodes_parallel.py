"""Multi-GPU node: runs the sampler's denoising on worker processes, one per GPU (`wanvideo.parallel`). It sits
between the model loader and the sampler; the rest of the graph is unchanged."""
from __future__ import annotations

import logging

import torch

from . import host, validation
from .nodes_common import CATEGORY, MODEL_TYPE, NodeInputError
from .wanvideo.parallel import hosting
from .wanvideo.parallel.layout import Layout

log = logging.getLogger("wantalk")
NODE = "Multi-GPU"


def parse_devices(text: str, available: int) -> list[str]:
    """`"0,1,2"` -> `["cuda:0", "cuda:1", "cuda:2"]`; `cpu` entries (tests, scripts) stay `cpu`."""
    devices = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item == "cpu":
            devices.append("cpu")
            continue
        if not item.isdigit() or int(item) >= available:
            have = f"it has {available} CUDA GPUs: 0..{available - 1}" if available else "it has no CUDA GPU"
            raise NodeInputError(NODE, "gpus", f"'{item}' is not a GPU index of this machine ({have}); write e.g. "
                                 f"0,1, or remove this node")
        devices.append(f"cuda:{item}")
    if len(devices) < 2:
        raise NodeInputError(NODE, "gpus", f"name at least two GPUs (e.g. 0,1), got {text!r}; for one GPU remove "
                             f"this node")
    if "cpu" in devices and any(d != "cpu" for d in devices):
        raise NodeInputError(NODE, "gpus", f"{text!r} mixes GPUs and cpu; name GPUs only (cpu entries are for tests)")
    if len({d for d in devices if d != "cpu"}) != len([d for d in devices if d != "cpu"]):
        raise NodeInputError(NODE, "gpus", f"a GPU is named twice in {text!r}; name each GPU once")
    return devices


def choose_layout(count: int, guidance_groups: int, heads: int) -> Layout:
    """`guidance_groups` 0 (auto): 3 groups when the count divides by 3 (InfiniteTalk's and HuMo's 3 passes run
    at once), else all GPUs in one sequence group."""
    groups = guidance_groups or (3 if count % 3 == 0 else 1)
    if count % groups:
        raise NodeInputError(NODE, "guidance_groups", f"{count} GPUs cannot form {groups} equal groups; choose a "
                             f"divisor of {count} (or 0 for automatic)")
    layout = Layout(groups, count // groups)
    if heads % layout.sequence:
        raise NodeInputError(NODE, "gpus/guidance_groups", f"each guidance group splits the model's {heads} heads "
                             f"over its {layout.sequence} GPUs, which needs a divisor of {heads}; use another GPU "
                             f"count or more guidance groups (Wan 14B: 40 heads, so 2, 4, 5 or 8 GPUs per group)")
    return layout


class WanTalkMultiGPU:
    DESCRIPTION = ("Makes one video on several GPUs of this machine. Guidance groups run the 2 or 3 guidance "
                   "passes of each step at once; the GPUs of a group split every forward by sequence "
                   "parallelism. Each GPU holds the whole model (its own worker process loads it with the same "
                   "settings as the loader; load the loader's copy to 'offload_device' to keep GPU 0 free). The "
                   "workers stay loaded across prompts; Cancel stops them at the next transformer block.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "The model from Load Wan Model (wantalk)."}),
                "gpus": ("STRING", {"default": "0,1",
                                    "tooltip": "CUDA GPU indices, comma-separated (e.g. 0,1 or 0,1,2,3)."}),
                "guidance_groups": ("INT", {
                    "default": 0, "min": 0, "max": 8,
                    "tooltip": "How many groups of GPUs run guidance passes side by side; the GPUs of each group "
                               "split the sequence. 0: automatic (3 groups when the GPU count divides by 3, which "
                               "suits InfiniteTalk's and HuMo's 3 passes; else one group)."}),
            },
        }

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model, sampled on the chosen GPUs (connect it to the sampler).",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY

    def configure(self, model, gpus, guidance_groups):
        if isinstance(model, hosting.ParallelModel):
            raise NodeInputError(NODE, "model", "this model already runs on several GPUs; use one Multi-GPU node")
        if not hasattr(model, "cfg") or not hasattr(model, "blocks"):
            raise NodeInputError(NODE, "model", f"expected the model from Load Wan Model (wantalk), got "
                                 f"{type(model).__name__}")
        validation.widgets(NODE, self.INPUT_TYPES(), {"gpus": gpus, "guidance_groups": guidance_groups})
        devices = parse_devices(gpus, torch.cuda.device_count())
        layout = choose_layout(len(devices), guidance_groups, model.cfg.num_heads)
        try:
            hosting.recipe_of(model)
        except ValueError as exc:
            raise NodeInputError(NODE, "model", str(exc)) from None
        if any(p.device.type == "cuda" for p in model.parameters()):
            log.info("wantalk %s: the loader's copy of the model is on the GPU; the workers load their own copies, "
                     "so load it to 'offload_device' to leave that memory free", NODE)
        log.info("wantalk %s: %d GPUs, %d guidance group(s) x %d sequence", NODE, len(devices), layout.guidance,
                 layout.sequence)
        return (hosting.ParallelModel(model, lambda: hosting.pack_for(model, devices, layout),
                                      host.check_interrupt),)


host.on_unload_all_models(hosting.stop_all)  # ComfyUI's free-memory request stops the workers

NODE_CLASS_MAPPINGS = {"WanTalkMultiGPU": WanTalkMultiGPU}
NODE_DISPLAY_NAME_MAPPINGS = {"WanTalkMultiGPU": "Multi-GPU (wantalk)"}
