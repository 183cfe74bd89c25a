"""wantalk: audio-driven talking video (InfiniteTalk, MultiTalk, HuMo) on Wan 2.1 for ComfyUI."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # web/wantalk_warnings.js: the pack's run-time warnings as toasts
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
