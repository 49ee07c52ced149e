"""Euler on the probability-flow ODE."""

from __future__ import annotations

import torch

from .base import Stepper, StepResult


class Euler(Stepper):
    r"""Euler's method on the probability-flow ODE (Song et al. 2021, eq. 13).

    .. math:: x_{t_1} = x_{t_0} + (t_1 - t_0)\,[f(t_0) x_{t_0} - \tfrac12 g(t_0)^2 \nabla\log p_{t_0}(x_{t_0})]

    Order 1, 1 NFE per step, deterministic.
    """

    name = "euler"
    order = 1.0
    nfe_per_step = 1

    def step(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state, noise) -> StepResult:
        v, pred = self.ode_velocity(x, t0)
        x1 = x + self.coef(t1 - t0, x) * v
        return StepResult(x=x1, x_mean=x1, state=state, x0=pred.x0)
