"""Host-RAM planning for long videos: what a run will hold in RAM, checked before the first step.

The window loop keeps only the last motion frames (uint8) between windows and writes each finished window straight
into the one float32 IMAGE tensor ComfyUI receives (4 bytes per output value, the least an IMAGE can take). That
output grows with the video's length (4.8 MB per 832x480 frame: about 7.2 GB per minute at 25 fps), so a run whose
output and one window's working set do not fit in the available RAM is refused before sampling, with the longest
`max_frames` that fits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .memory_plan import GIB, MemoryPlanError

log = logging.getLogger("wantalk")

OUTPUT_BYTES_PER_VALUE = 4      # float32 IMAGE
WINDOW_BYTES_PER_VALUE = 56     # one decoded window on the host: float32 copies (decode, permute, clamp), the
                                # colour match's float64 Lab temporaries (about 5 live), the uint8 window
USABLE_FRACTION = 0.9           # of the RAM the OS reports available


class HostMemoryError(MemoryPlanError):
    """The run's output and working set will not fit in host RAM; the message says what to change."""


@dataclass(frozen=True)
class HostPlan:
    output_frames: int             # frames of the returned video
    height: int
    width: int
    window_frames: int             # frames decoded at once
    extra_bytes: int = 0           # other inputs the run holds (conditioning video, audio features)

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * 3 * OUTPUT_BYTES_PER_VALUE

    @property
    def window_bytes(self) -> int:
        return self.window_frames * self.height * self.width * 3 * WINDOW_BYTES_PER_VALUE

    @property
    def total(self) -> int:
        return self.output_frames * self.frame_bytes + self.window_bytes + self.extra_bytes


def available_bytes() -> int | None:
    """RAM the OS can give without swapping (psutil when installed, else /proc/meminfo); None when unknown."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(plan: HostPlan, available: int | None = None) -> None:
    """Raise HostMemoryError when `plan` cannot fit; log and go on when the available RAM is unknown."""
    available = available_bytes() if available is None else available
    if available is None:
        log.info("wantalk: host RAM unknown on this system; the run holds about %.1f GiB", plan.total / GIB)
        return
    usable = int(available * USABLE_FRACTION)
    if plan.total <= usable:
        return
    fits = max(0, (usable - plan.window_bytes - plan.extra_bytes) // plan.frame_bytes)
    raise HostMemoryError(
        f"wantalk: this video needs {plan.total / GIB:.1f} GiB of RAM ({plan.output_frames} frames of "
        f"{plan.width}x{plan.height} as ComfyUI's float32 IMAGE: {plan.output_frames * plan.frame_bytes / GIB:.1f} "
        f"GiB, plus {plan.window_bytes / GIB:.1f} GiB to decode one window) but {available / GIB:.1f} GiB is "
        f"available. Change one of: max_frames to at most {fits} and continue the video with a second sampler "
        f"(previous_frames), with save_windows on so finished windows are kept; a smaller width/height; or close "
        f"other programs.")
