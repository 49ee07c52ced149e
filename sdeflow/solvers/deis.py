r"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"): multistep exponential
integrators of the probability-flow ODE with a polynomial extrapolation of the noise prediction.

In the scaled state :math:`y = x/a` and the EDM noise level :math:`\rho = s/a = e^{-\lambda}` the probability-flow ODE
is :math:`dy/d\rho = \hat\varepsilon` (Zhang & Chen 2023, eq. 12 with the exponential integrator's exact linear part),
so from :math:`t_i` to :math:`t_{i+1}`

.. math::

    x_{i+1} = \frac{a_{i+1}}{a_i} x_i + a_{i+1} \sum_{j=0}^{k-1} C_{ij}\,\hat\varepsilon_{i-j},\qquad
    C_{ij} = \int_{\rho_i}^{\rho_{i+1}} L_j(\cdot)\,d\rho,

with :math:`L_j` the Lagrange basis through the last k evaluations. Where the polynomial lives is the variant:

* ``solver_type="logrho"`` (diffusers' ``DEISMultistepScheduler``, its only implemented type): :math:`L_j` is a
  polynomial in :math:`\log\rho = -\lambda`. This is the exponential integrator in log-SNR with the noise prediction
  (kappa = +1 in :mod:`.exponential`) and the *exact* moments at every order: the same quadrature as
  ``dpm_solver``'s "taylor" type, with earlier grid points as nodes. diffusers' closed-form ``ind_fn``
  antiderivatives are these integrals (checked to 1e-12 in the tests).
* ``solver_type="tab"`` (the paper's tAB-DEIS, eq. 15): :math:`L_j` is a polynomial in the time t, and
  :math:`C_{ij} = \int_{t_i}^{t_{i+1}} \tfrac{d\rho}{dt} L_j(t)\,dt`, computed by 16-point Gauss-Legendre quadrature
  in :math:`\lambda` (:math:`t(\lambda)` is smooth where :math:`\rho(t)` has a square-root end point), once per
  step and grid.

Order k = ``order`` (1: DDIM), 1 NFE per step, warm-up min(k, i + 1) and ``lower_order_final`` below 15 steps as in
diffusers. Deterministic; every SDE with the semilinear view (VP, sub-VP, VE, discrete VP, flow paths).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._utils import gauss_legendre
from .base import MultistepStepper, StepResult
from .exponential import FORMS, ExponentialStepper, Form, History, Point, lagrange_basis, lincomb, multistep_orders

GL_POINTS = 16  #: Gauss-Legendre points of the tAB quadrature


class DEIS(ExponentialStepper, MultistepStepper):
    r"""DEIS-k (Zhang & Chen 2023): multistep exponential integrator on the noise prediction (update rule in the
    module docstring).

    Order k, 1 NFE per step, deterministic.

    Options (diffusers' defaults):
        order: 1, 2 or 3 (diffusers' ``solver_order``, default 2).
        solver_type: ``"logrho"`` (diffusers: polynomial in log rho, exact in log-SNR) or ``"tab"`` (the paper's
            tAB-DEIS: polynomial in t).
        lower_order_final: below 15 steps, drop to lower order on the last steps (diffusers' default True).
    """

    grid_from_path = True
    name = "deis"
    starts_at_zero_signal = False  # the noise form has no limit at lambda = -inf (a(T) = 0)
    nfe_per_step = 1
    state_type = History
    options = {"order": 2, "solver_type": "logrho", "lower_order_final": True}

    def validate(self) -> None:
        self._check_choice("order", (1, 2, 3))
        self._check_choice("solver_type", ("logrho", "tab"))
        self._check_bool("lower_order_final")

    def configure(self) -> None:
        """Order k."""
        self.order = float(self.opts["order"])
        self._tab: dict[tuple[float, ...], list[float]] = {}

    @property
    def form(self) -> Form:
        return FORMS["eps"]

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> History:
        self.check_grid(grid)
        order = int(self.opts["order"])
        return History(0, multistep_orders(grid.numel() - 1, order, bool(self.opts["lower_order_final"])), [])

    def tab_weights(self, p0: Point, p1: Point, nodes: list[Point]) -> list[float]:
        r""":math:`a_1 C_j = -a_1\int_{\lambda_0}^{\lambda_1} e^{-\lambda} L_j(t(\lambda))\,d\lambda` with
        :math:`L_j` the Lagrange basis in t through the node times (float64, memoized per step)."""
        ts = [float(q.t) for q in nodes]
        key = (float(p0.lam), float(p1.lam), *ts)
        hit = self._tab.get(key)
        if hit is not None:
            return hit
        lam0, lam1 = float(p0.lam), float(p1.lam)
        gl_nodes, gl_weights = gauss_legendre(GL_POINTS)
        lam = 0.5 * (lam1 - lam0) * gl_nodes + 0.5 * (lam1 + lam0)
        t = self.sde.t_from_log_snr(lam)
        # scale t around the step's start so the monomial basis stays well conditioned
        scale = ts[0] - float(p1.t) if ts[0] != float(p1.t) else 1.0
        r = [(ti - ts[0]) / scale for ti in ts]
        u = (t - ts[0]) / scale
        basis = lagrange_basis(r)
        a1 = math.exp(float(p1.la))
        out = []
        for c in basis:
            poly = sum(float(cj) * u**j for j, cj in enumerate(c))
            integral = 0.5 * (lam1 - lam0) * float((gl_weights * torch.exp(-lam) * poly).sum())
            out.append(-a1 * integral)
        if len(self._tab) > 65536:
            self._tab.clear()
        self._tab[key] = out
        return out

    def step(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: Any) -> StepResult:
        hist = self.check_state(state)
        p0, p1 = self.view.point(t0), self.view.point(t1)
        f0, pred = self.evaluate(x, p0)
        nodes = [(p0, f0), *hist.nodes]
        k = min(hist.plan[hist.i], len(nodes))
        if self.opts["solver_type"] == "logrho" or k == 1:  # one node: both are the exact DDIM step
            x1 = self.update(x, p0, p1, nodes[:k], "taylor")[0]
        else:
            w = self.tab_weights(p0, p1, [q for q, _ in nodes[:k]])
            cx = math.exp(float(p1.la) - float(p0.la))
            x1 = lincomb([(cx, x), *zip(w, [f for _, f in nodes[:k]])])
        new = History(hist.i + 1, hist.plan, nodes[: int(self.opts["order"]) - 1])
        return StepResult(x=x1, state=new, x0=pred.x0)
