"""Low-VRAM node: block swap on a loaded Wan model (a thin wrapper over `wanvideo.block_swap`)."""
from __future__ import annotations

import logging

import torch

from . import host, validation
from .nodes_common import CATEGORY, MODEL_TYPE, NodeInputError
from .wanvideo import block_swap, memory_plan

log = logging.getLogger("wantalk")


class WanTalkBlockSwap:
    DESCRIPTION = ("Runs a Wan model that does not fit in VRAM: the last N transformer blocks stay in pinned CPU "
                   "memory and stream to the GPU just before they run, overlapped with compute. Load the model "
                   "with load_device 'offload_device'. Before sampling, the peak VRAM is planned and a clear "
                   "message says what to change if it will not fit.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "The model from Load Wan Model (wantalk)."}),
                "blocks_to_swap": ("INT", {
                    "default": -1, "min": -1, "max": 48,
                    "tooltip": "How many of the last transformer blocks stream from CPU memory (Wan 14B has 40). "
                               "-1: automatic, from the free VRAM and the video size at the first step. More "
                               "blocks: less VRAM; speed is nearly unchanged while the copies hide behind compute."}),
                "prefetch": ("INT", {
                    "default": 1, "min": 0, "max": 4,
                    "tooltip": "Blocks copied ahead of the running one. 1 is enough on PCIe 4/5; each extra one "
                               "costs one block of VRAM. 0 saves a block of VRAM but copies do not overlap."}),
            },
        }

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model, set up to swap blocks (re-running with other settings reconfigures it "
                       "in place; weights are never duplicated).",)
    FUNCTION = "configure"
    CATEGORY = CATEGORY

    def configure(self, model, blocks_to_swap, prefetch):
        node = "Block Swap"
        validation.widgets(node, self.INPUT_TYPES(), {"blocks_to_swap": blocks_to_swap, "prefetch": prefetch})
        device = host.torch_device()
        if device.type != "cuda":
            raise NodeInputError(node, "model", f"block swap streams weights to a CUDA GPU; the compute device "
                                 f"here is {device.type}. Remove this node.")
        blocks = len(model.blocks)
        if blocks_to_swap > blocks:
            raise NodeInputError(node, "blocks_to_swap", f"the model has {blocks} blocks; choose 0..{blocks} "
                                 f"or -1 for automatic.")
        if blocks_to_swap >= 0:
            self._check_weights_fit(model, blocks_to_swap, prefetch, device, node)
        try:
            block_swap.configure_block_swap(model, blocks_to_swap, device=device, prefetch=prefetch,
                                            make_room=lambda n: host.free_memory(n, device))
        except torch.cuda.OutOfMemoryError:
            raise NodeInputError(node, "blocks_to_swap", "the resident blocks do not fit in VRAM: swap more "
                                 "blocks, or -1 for automatic.") from None
        return (model,)

    @staticmethod
    def _check_weights_fit(model, n: int, prefetch: int, device, node: str) -> None:
        """Weights alone (no activations yet: the video size is known at the first step) must fit now."""
        sizes = memory_plan.ModelBytes.of(model)
        plan = memory_plan.plan_memory(model.cfg, sizes, memory_plan.RunSettings(0, audio=False),
                                       blocks_to_swap=n, prefetch=prefetch)
        on_device = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                        if t.device.type == "cuda")
        host.free_memory(max(0, plan.peak - on_device), device)
        try:
            plan.check(memory_plan.available_vram(device) + on_device)
        except memory_plan.MemoryPlanError as exc:
            raise NodeInputError(node, "blocks_to_swap", f"{exc}\n(or -1 for automatic)") from None


def compute_device_for(model, node: str) -> torch.device:
    """Where the sampler runs `model`. A model left on the CPU (load_device offload_device) without a Block Swap
    node gets automatic block swap when there is a CUDA GPU, instead of running on the CPU."""
    device = next(model.parameters()).device
    target = host.torch_device()
    if device.type == "cpu" and target.type == "cuda" and model.block_runner is None:
        log.info("wantalk %s: the model is in CPU memory and no Block Swap node is connected: using automatic "
                 "block swap", node)
        WanTalkBlockSwap().configure(model, -1, 1)
        device = next(model.parameters()).device
    return device


NODE_CLASS_MAPPINGS = {"WanTalkBlockSwap": WanTalkBlockSwap}
NODE_DISPLAY_NAME_MAPPINGS = {"WanTalkBlockSwap": "WanTalk Block Swap"}
