"""Wan 2.1's flow DPM-Solver++ 2M (midpoint, lower_order_final, final sigma 0) on the `get_sampling_sigmas`
schedule. At sigma 1 the log-SNR is -inf, which makes the first two steps first order exactly as officially."""
import torch

from .base import FlowScheduler
from .tables import sampling_sigmas_table


class DPMPlusPlusScheduler(FlowScheduler):
    name = "dpm++"

    def __init__(self, steps: int, shift: float):
        timesteps, sigmas = sampling_sigmas_table(steps, shift)
        super().__init__(timesteps, sigmas)

    def reset(self):
        super().reset()
        self._previous_x0 = None

    def _update(self, velocity, index, latent):
        x0 = latent - self.sigmas[index] * velocity
        previous, self._previous_x0 = self._previous_x0, x0
        sigma_t, sigma_s = self.sigmas[index + 1], self.sigmas[index]
        lambda_s = self._lambda(index)
        h = self._lambda(index + 1) - lambda_s
        weight = (1 - sigma_t) * (torch.exp(-h) - 1.0)
        x_t = (sigma_t / sigma_s) * latent - weight * x0
        if previous is None or index == len(self) - 1:  # first order: warm-up and final step
            return x_t
        r0 = (lambda_s - self._lambda(index - 1)) / h
        return x_t - 0.5 * weight * ((1.0 / r0) * (x0 - previous))

