"""The one interface the sampling loop sees: a table of DiT timesteps plus `step(velocity, index, latent)`.

A scheduler instance is ONE run: multistep solvers keep their history inside it, and `reset()` (or a new instance)
starts the next run. Solver arithmetic is float32 whatever the latent dtype, as in the official code."""
import torch


class FlowScheduler:
    """Base of the flow-matching samplers. `timesteps` ([steps] float32) is what the DiT receives at each index,
    `sigmas` ([steps+1] float32, last 0) the noise level of the latent before each step and at the end."""

    name = "flow"

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor):
        self.timesteps = timesteps.to(torch.float32)
        self.sigmas = sigmas.to(torch.float32)
        self.reset()

    def __len__(self) -> int:
        return len(self.timesteps)

    def reset(self):
        """Forget the history of the previous run."""
        self._next_index = None

    def step(self, velocity: torch.Tensor, index: int, latent: torch.Tensor) -> torch.Tensor:
        """Advance `latent` from sigmas[index] to sigmas[index+1] given the model's flow velocity (noise - data).
        A run may start at any index (then multistep solvers warm up with first order, like the official
        `set_begin_index`), but must then go on index by index."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: step index {index} is outside 0..{len(self) - 1}")
        if self._next_index is not None and index != self._next_index:
            raise RuntimeError(f"{self.name}: expected step index {self._next_index}, got {index}; "
                               "call reset() (or build a new scheduler) before starting another run")
        if velocity.shape != latent.shape:
            raise ValueError(f"{self.name}: velocity shape {tuple(velocity.shape)} does not match the latent "
                             f"shape {tuple(latent.shape)}")
        out = self._update(velocity.float(), index, latent.float())
        self._next_index = index + 1
        return out.to(latent.dtype)

    def _update(self, velocity: torch.Tensor, index: int, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _lambda(self, index: int) -> torch.Tensor:
        """log-SNR log(alpha) - log(sigma) with alpha = 1 - sigma, as a float32 scalar tensor (per index, not
        vectorised, so the rounding is that of the official solvers); -inf at sigma 1, +inf at sigma 0."""
        sigma = self.sigmas[index]
        return torch.log(1 - sigma) - torch.log(sigma)
