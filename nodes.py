"""Collects the node classes of every `nodes_*.py` module into ComfyUI's mappings."""
from . import nodes_audio, nodes_humo, nodes_infinitetalk, nodes_lora, nodes_lowvram, nodes_model_loading
from . import nodes_parallel

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (nodes_model_loading, nodes_lora, nodes_audio, nodes_infinitetalk, nodes_humo, nodes_lowvram,
                nodes_parallel):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
