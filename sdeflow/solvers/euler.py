r"""Euler on the probability-flow ODE and Euler-Maruyama on the reverse SDE (Song et al. 2021)."""

from __future__ import annotations

import torch

from ..denoiser import Prediction
from .base import AffineGridStepper, SingleStepper, Solver, StepResult, prediction_affine


class Euler(AffineGridStepper):
    r"""Euler's method on the probability-flow ODE (Song et al. 2021, eq. 13).

    .. math:: x_{t_1} = x_{t_0} + (t_1 - t_0)\,[f(t_0) x_{t_0} - \tfrac12 g(t_0)^2 \nabla\log p_{t_0}(x_{t_0})]

    Order 1, 1 NFE per step, deterministic.
    """

    name = "euler"
    order = 1.0
    nfe_per_step = 1

    def grid_rows(self, g: torch.Tensor) -> torch.Tensor | None:
        r"""Every step's constants: with :math:`\hat x_0 = p x + q\,\mathrm{out}`,
        :math:`\hat\varepsilon = r x + u\,\mathrm{out}` (:func:`~sdeflow.solvers.base.prediction_affine`) the velocity
        :math:`a'\hat x_0 + s'\hat\varepsilon` gives :math:`x_1 = (1 + h(a'p + s'r))\,x + h(a'q + s'u)\,\mathrm{out}`
        (h = t1 - t0)."""
        aff = prediction_affine(self.den, g[:-1])
        if aff is None:
            return None
        p, q, r, u = aff
        t0, h = g[:-1], g[1:] - g[:-1]
        da, ds = self.sde.d_alpha(t0), self.sde.d_sigma(t0)  # velocity a' x0 + s' eps (base.probability_flow_velocity)
        return torch.stack([1.0 + h * (da * p + ds * r), h * (da * q + ds * u), torch.zeros_like(h), p, q], 1)

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        v, pred = self.ode_velocity(x, t0)
        return StepResult(x=x + self.coef(t1 - t0, x) * v, x0=pred.x0)


def euler_maruyama_update(
    stepper: Solver, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Prediction]:
    r"""One Euler-Maruyama step of the reverse SDE from t0 down to t1 < t0 (one net call).

    :math:`\bar x = x + (t_1 - t_0)[f(t_0) x - g(t_0)^2 \nabla\log p_{t_0}(x)]`,
    :math:`x_1 = \bar x + g(t_0)\sqrt{t_0 - t_1}\,z`, where z is the normalized Brownian increment over [t1, t0].

    Returns (x1, x_mean, prediction); shared by :class:`EulerMaruyama` and the "euler_maruyama" predictor of
    :class:`~sdeflow.solvers.pc.PredictorCorrector`.
    """
    drift, pred = stepper.reverse_sde_drift(x, t0)
    h = t0 - t1
    mean = x - stepper.coef(h, x) * drift
    x1 = mean + stepper.coef(torch.sqrt(stepper.sde.g2(t0) * h), x) * z
    return x1, mean, pred


class EulerMaruyama(SingleStepper):
    r"""Euler-Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6; Anderson 1982).

    .. math:: x_{t_1} = x_{t_0} + (t_1 - t_0)\,[f(t_0) x_{t_0} - g(t_0)^2 \nabla\log p_{t_0}(x_{t_0})]
              + g(t_0)\sqrt{t_0 - t_1}\; z

    Weak order 1. The reverse SDE has *additive* noise (g depends on t only), for which Euler-Maruyama coincides with
    Milstein and has strong order 1 (Kloeden & Platen 1992, §10.3); both orders are fitted by tests. 1 NFE per step,
    one standard-normal draw per step (the normalized Brownian increment). Use it as the reference SDE sampler; it
    needs many steps (hundreds) for good samples.
    """

    name = "euler_maruyama"
    order = 1.0
    strong_order = 1.0
    stochastic = True
    nfe_per_step = 1

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        x1, _, pred = euler_maruyama_update(self, t0, t1, x, self.require_noise(noise)[0])
        return StepResult(x=x1, x0=pred.x0)
