"""LoRA selection node: picks a file from ComfyUI's `loras` folder with a strength; chainable. The model loader
applies the chain (merged before quantization, or at run time)."""
from __future__ import annotations

from . import host, validation
from .nodes_common import CATEGORY, NodeInputError
from .wanvideo.lora import check_lora_file

LORA_TYPE = "WANTALK_LORA"


class WanTalkLoraSelect:
    DESCRIPTION = ("Chooses a Wan 2.1 LoRA (e.g. the lightx2v step-distill LoRA for 4-8 step InfiniteTalk) and its "
                   "strength. Chain several through prev_lora; connect the last one to the model loader's lora input.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (host.model_files("loras"), {
                    "tooltip": "LoRA file from models/loras. Published Wan LoRA formats are recognised from their "
                               "keys (diffusion_model.* lora_A/B or lora_down/up, kohya lora_unet_*, diffusers "
                               "transformer.*)."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "Multiplies the LoRA's change to the weights. 1.0 for distill LoRAs; 0 disables it."}),
            },
            "optional": {
                "prev_lora": (LORA_TYPE, {
                    "tooltip": "LoRAs selected before this one (from another WanTalk LoRA node); all are applied."}),
            },
        }

    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The LoRA chain, for the lora input of Load Wan Model (wantalk) or another WanTalk LoRA.",)
    FUNCTION = "select"
    CATEGORY = CATEGORY

    def select(self, lora, strength, prev_lora=None):
        validation.widgets("WanTalk LoRA", self.INPUT_TYPES(), {"strength": strength})
        try:
            path = host.model_path("loras", lora)
            check_lora_file(path)
        except (FileNotFoundError, ValueError) as exc:
            raise NodeInputError("WanTalk LoRA", "lora", str(exc)) from None
        return (validation.lora_chain("WanTalk LoRA", "prev_lora", prev_lora) + ((path, float(strength)),),)


NODE_CLASS_MAPPINGS = {"WanTalkLoraSelect": WanTalkLoraSelect}
NODE_DISPLAY_NAME_MAPPINGS = {"WanTalkLoraSelect": "WanTalk LoRA"}
