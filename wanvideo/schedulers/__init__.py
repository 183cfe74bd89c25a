"""Flow-matching samplers of Wan 2.1 and InfiniteTalk behind one interface (see base.FlowScheduler)."""
from .base import FlowScheduler
from .dpmpp import DPMPlusPlusScheduler
from .euler import EulerScheduler, infinitetalk_euler, plain_euler
from .tables import infinitetalk_times, sampling_sigmas_table, shift_sigmas, unipc_table
from .unipc import UniPCScheduler

SCHEDULERS = {
    "unipc": UniPCScheduler,
    "dpm++": DPMPlusPlusScheduler,
    "euler": plain_euler,
    "infinitetalk_euler": infinitetalk_euler,
}


def make_scheduler(name: str, steps: int, shift: float) -> FlowScheduler:
    """A fresh scheduler for one sampling run."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](steps, shift)


__all__ = ["FlowScheduler", "UniPCScheduler", "DPMPlusPlusScheduler", "EulerScheduler", "SCHEDULERS",
           "make_scheduler", "shift_sigmas", "unipc_table", "sampling_sigmas_table", "infinitetalk_times"]
