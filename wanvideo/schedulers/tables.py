"""Timestep/sigma tables of the official samplers, computed with the same dtypes and operation order as the
official code so that the integer timesteps the DiT sees are identical (truncation makes them sensitive to the
last bit: 999.8 -> 999)."""
import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
# Wan's training schedule ends at sigma 1 - 1/1000; the official scheduler reads it back from a float32 tensor.
WAN_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def shift_sigmas(sigmas, shift: float):
    """The flow-matching shift `shift*s / (1 + (shift-1)*s)`; works on floats, numpy arrays and tensors alike
    (keeping their dtype), in the official operation order."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check(steps: int, shift: float):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (Wan uses 3-5, InfiniteTalk 7-11), got {shift!r}")


def _with_final_zero(sigmas64: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([sigmas64, [0.0]]).astype(np.float32))


def unipc_table(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan `FlowUniPCMultistepScheduler.set_timesteps`: sigmas from linspace(0.999, 0) (so the first is 0.9998 at
    shift 5, not 1). Returns (int64 timesteps [steps], float32 sigmas [steps+1] ending in 0)."""
    _check(steps, shift)
    sigmas = shift_sigmas(np.linspace(WAN_SIGMA_MAX, 0.0, steps + 1)[:-1], shift)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return timesteps, _with_final_zero(sigmas)


def sampling_sigmas_table(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan `get_sampling_sigmas` as fed to the DPM++ scheduler: sigmas from linspace(1, 0), so the first is exactly
    1. Returns (int64 timesteps [steps], float32 sigmas [steps+1] ending in 0)."""
    _check(steps, shift)
    sigmas = shift_sigmas(np.linspace(1.0, 0.0, steps + 1)[:steps], shift)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return timesteps, _with_final_zero(sigmas)


def infinitetalk_times(steps: int, shift: float) -> torch.Tensor:
    """InfiniteTalk's own float32 times: linspace(1000, 1, steps) + [0], each shifted on t/1000. Returns float32
    [steps+1]; the first `steps` entries go to the DiT unchanged (not truncated), the first is exactly 1000."""
    _check(steps, shift)
    times = torch.from_numpy(np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps, dtype=np.float32))
    times = torch.cat([times, torch.zeros(1)])
    return shift_sigmas(times / NUM_TRAIN_TIMESTEPS, shift) * NUM_TRAIN_TIMESTEPS
