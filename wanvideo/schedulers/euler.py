"""Single-step flow Euler, `latent - v * dt`: plain on the Wan sampling sigmas, or InfiniteTalk's own sampler
whose float times start at exactly 1000 and whose dt = (t_i - t_{i+1}) / 1000 is taken on the times."""
import torch

from .base import FlowScheduler
from .tables import NUM_TRAIN_TIMESTEPS, infinitetalk_times, sampling_sigmas_table


class EulerScheduler(FlowScheduler):
    def __init__(self, name: str, timesteps: torch.Tensor, sigmas: torch.Tensor, dt: torch.Tensor):
        self.name = name
        self._dt = dt
        super().__init__(timesteps, sigmas)

    def _update(self, velocity, index, latent):
        return latent - velocity * self._dt[index]


def plain_euler(steps: int, shift: float) -> EulerScheduler:
    """Euler on `get_sampling_sigmas` (first sigma 1); the DiT gets float timesteps sigma * 1000."""
    sigmas = sampling_sigmas_table(steps, shift)[1]
    return EulerScheduler("euler", sigmas[:-1] * NUM_TRAIN_TIMESTEPS, sigmas, sigmas[:-1] - sigmas[1:])


def infinitetalk_euler(steps: int, shift: float) -> EulerScheduler:
    """InfiniteTalk's sampler (wan/multitalk.py): times from `infinitetalk_times`, sigmas = times / 1000."""
    times = infinitetalk_times(steps, shift)
    return EulerScheduler("infinitetalk_euler", times[:-1], times / NUM_TRAIN_TIMESTEPS,
                          (times[:-1] - times[1:]) / NUM_TRAIN_TIMESTEPS)
