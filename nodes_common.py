"""What the node modules share: the category, the custom model type, the error that names node and input, and the
outputs and run inputs of the video samplers."""
from __future__ import annotations

CATEGORY = "wantalk"
MODEL_TYPE = "WANTALK_MODEL"


class NodeInputError(ValueError):
    """An error that names the node and the input, says what was expected and what to do."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"[wantalk {node}] input '{input_name}': {message}")


SEED_INPUT = ("INT", {"default": 42, "min": 0, "max": 2**63 - 1, "tooltip": "Noise seed (window k uses seed + k)."})
MAX_FRAMES_INPUT = ("INT", {"default": 0, "min": 0, "max": 100000,
                            "tooltip": "Stop after this many frames (0 = the whole audio). Handy for a quick test "
                                       "of a long clip."})
SAVE_WINDOWS_INPUT = ("BOOLEAN", {"default": False,
                                  "tooltip": "Write each finished window to output/wantalk_windows/, so a crashed or "
                                             "cancelled run with the same inputs resumes from the last finished "
                                             "window."})


class VideoSamplerNode:
    """Outputs of the samplers: frames, the audio cut to the video, and the frame rate, for Create Video."""
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("images", "audio", "fps")
    OUTPUT_TOOLTIPS = ("The video frames.", "The audio cut to the video length (16 kHz mono).",
                       "Frame rate of the video (25).")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
