r"""Linear multistep in the EDM noise level (k-diffusion's ``sample_lms``, Karras et al. 2022's variables).

In the scaled state :math:`y = x/a` and :math:`\sigma = s/a = e^{-\lambda}` the probability-flow ODE of every Gaussian
path is :math:`dy/d\sigma = \hat\varepsilon = (y - \hat x_0)/\sigma` (Karras et al. 2022, eq. 4 with s(t) = 1; it
is k-diffusion's ``to_d``). The variable-step Adams-Bashforth method of order k integrates the Lagrange polynomial
through the last k derivatives exactly:

.. math::

    y_{i+1} = y_i + \sum_{j=0}^{k-1} c_{ij}\, d_{i-j},\qquad
    c_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} \prod_{m\ne j} \frac{\sigma - \sigma_{i-m}}{\sigma_{i-j} - \sigma_{i-m}}
    \,d\sigma,

and :math:`x_{i+1} = a_{i+1} y_{i+1}`. k-diffusion computes :math:`c_{ij}` with ``scipy.integrate.quad``; here the
polynomial's moments are exact (:func:`~sdeflow.solvers.exponential.quadrature` with kappa = 0). Warm-up: step i uses
min(k, i + 1) points, as k-diffusion (no lower-order final steps).

Order k = ``order`` (k-diffusion's default 4), 1 NFE per step, deterministic, default grid "karras". On every SDE with
the semilinear view. It is not A-stable: on coarse grids of stiff problems (few steps from a large sigma_max) the
order-4 method can overshoot, as k-diffusion's does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import MultistepStepper, StepResult
from .exponential import FORMS, ExponentialStepper, Form, History, Point, lincomb, quadrature


class SigmaMultistep(ExponentialStepper, MultistepStepper):
    """Shared pieces of the multistep methods in (y = x/a, sigma = s/a): the noise prediction at each grid time, the
    history of (point, eps) pairs and the update :math:`x_1 = (a_1/a_0)x_0 + a_1\\sum_j c_j\\hat\\varepsilon_j`."""

    nfe_per_step = 1
    state_type = History
    default_grid = "karras"
    starts_at_zero_signal = False  # sigma = s / a is infinite where a(T) = 0

    @property
    def form(self) -> Form:
        return FORMS["eps"]

    @staticmethod
    def rho(p: Point) -> float:
        """:math:`\\sigma = s/a = e^{-\\lambda}` at a grid point."""
        return math.exp(float(p.ls) - float(p.la))

    def max_order(self) -> int:
        raise NotImplementedError

    def weights(self, p0: Point, p1: Point, nodes: list[Point]) -> list[float]:
        """The :math:`c_j` of the update (multiplying the eps of ``nodes``, newest first)."""
        raise NotImplementedError

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> History:
        self.check_grid(grid)
        k = self.max_order()
        return History(0, [min(k, i + 1) for i in range(grid.numel() - 1)], [])

    def step(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: Any) -> StepResult:
        hist = self.check_state(state)
        p0, p1 = self.view.point(t0), self.view.point(t1)
        pred = self.predict(x, p0)
        nodes = [(p0, pred.eps), *hist.nodes]
        k = min(hist.plan[hist.i], len(nodes))
        c = self.weights(p0, p1, [q for q, _ in nodes[:k]])
        a1 = math.exp(float(p1.la))
        x1 = lincomb([(math.exp(float(p1.la) - float(p0.la)), x), *((a1 * cj, f) for cj, (_, f) in zip(c, nodes))])
        return StepResult(x=x1, state=History(hist.i + 1, hist.plan, nodes[: self.max_order() - 1]), x0=pred.x0)


class LMS(SigmaMultistep):
    r"""Linear multistep of order k in sigma (k-diffusion's ``sample_lms``): variable-step Adams-Bashforth on
    :math:`dy/d\sigma = \hat\varepsilon` with exactly integrated Lagrange coefficients (module docstring).

    Order k, 1 NFE per step, deterministic.

    Options (k-diffusion's defaults):
        order: 1..4 (default 4).
    """

    name = "lms"
    options = {"order": 4}

    def validate(self) -> None:
        self._check_choice("order", (1, 2, 3, 4))

    def configure(self) -> None:
        """Order k."""
        self.order = float(self.opts["order"])

    def max_order(self) -> int:
        return int(self.opts["order"])

    def weights(self, p0: Point, p1: Point, nodes: list[Point]) -> list[float]:
        """:math:`c_j = \\int_{\\sigma_0}^{\\sigma_1} L_j(\\sigma)d\\sigma` (memoized per step on the shared view)."""
        key = ("lms", p0.lam, p1.lam, *(q.lam for q in nodes))
        hit = self.view.coefficients.get(key)
        if hit is not None:
            return list(hit)
        r0, r1 = self.rho(p0), self.rho(p1)
        h = r1 - r0
        r = [(self.rho(q) - r0) / h for q in nodes]
        w = [float(v) for v in quadrature(r, h, 0.0)]
        self.view.coefficients[key] = tuple(w)
        return w
