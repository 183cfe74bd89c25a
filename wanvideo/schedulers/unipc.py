"""Wan 2.1's flow-matching UniPC (bh2, order 2, predict_x0, lower_order_final, final sigma 0): the default solver
of Wan I2V and HuMo. Scalars are float32 0-d tensors combined in the official order, so results match the
official scheduler to the last bits (see tests/test_schedulers.py)."""
import torch

from .base import FlowScheduler
from .tables import unipc_table

ORDER = 2


class UniPCScheduler(FlowScheduler):
    name = "unipc"

    def __init__(self, steps: int, shift: float):
        timesteps, sigmas = unipc_table(steps, shift)
        super().__init__(timesteps, sigmas)

    def reset(self):
        super().reset()
        self._x0 = []             # data predictions of the last ORDER steps, oldest first: (sigma index, x0)
        self._last_sample = None  # the sample the previous predictor started from (the corrector redoes that step)
        self._last_order = 0

    def _update(self, velocity, index, latent):
        x0 = latent - self.sigmas[index] * velocity  # converted from the UNcorrected sample, as officially
        if self._last_sample is not None:  # UniC: correct the previous step now that x0 at `index` is known
            latent = self._bh_update(self._last_sample, index, self._x0, self._last_order, x0_target=x0)
        self._x0 = (self._x0 + [(index, x0)])[-ORDER:]
        order = min(ORDER, len(self) - index, len(self._x0))  # warm-up and lower order on the final step
        self._last_sample, self._last_order = latent, order
        return self._bh_update(latent, index + 1, self._x0, order)

    def _bh_update(self, x, target, history, order, x0_target=None):
        """UniP (x0_target None) or UniC update of `x` from the sigma of history[-1] to sigmas[target], using the
        last `order` data predictions; UniC also uses the prediction at the target."""
        source, m0 = history[-1]
        sigma_t, sigma_s = self.sigmas[target], self.sigmas[source]
        alpha_t = 1 - sigma_t
        lambda_s = self._lambda(source)
        h = self._lambda(target) - lambda_s
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)  # bh2
        x_t = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0
        d1 = rk = None
        if order == 2:
            older, m1 = history[-2]
            rk = (self._lambda(older) - lambda_s) / h
            d1 = (m1 - m0) / rk
        if x0_target is None:
            return x_t if d1 is None else x_t - alpha_t * b_h * (0.5 * d1)
        d1_t = x0_target - m0
        if d1 is None:
            return x_t - alpha_t * b_h * (0 + 0.5 * d1_t)
        rhos = self._corrector_weights(hh, h_phi_1, b_h, rk)
        return x_t - alpha_t * b_h * (rhos[0] * d1 + rhos[1] * d1_t)

    @staticmethod
    def _corrector_weights(hh, h_phi_1, b_h, rk):
        """Order-2 UniC weights: solve [[1, 1], [rk, 1]] rho = b with b_k = k! * phi_{k+1}(hh) * hh / B(h)."""
        h_phi_k = h_phi_1 / hh - 1
        b1 = h_phi_k * 1 / b_h
        h_phi_k = h_phi_k / hh - 1 / 2
        b2 = h_phi_k * 2 / b_h
        r = torch.stack([torch.ones(2), torch.tensor([rk, 1.0])])
        return torch.linalg.solve(r, torch.tensor([b1, b2]))
