r"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models"):
stochastic Adams predictor-corrector in data prediction, with a stochasticity schedule :math:`\tau(t)`.

The SDE family of the paper (eq. 7, data-prediction form) has, with :math:`K = 1 + \tau^2`,
:math:`h = \lambda_{i+1} - \lambda_i`, an exactly integrated linear part and Gaussian part:

.. math::

    x_{i+1} = \frac{s_{i+1}}{s_i}e^{-\tau^2 h} x_i + K a_{i+1}\int_0^h e^{-K(h-u)} P(\lambda_i + u)\,du
              + s_{i+1}\sqrt{1 - e^{-2\tau^2 h}}\; \xi_i,

where P interpolates data predictions :math:`\hat x_0` (Lagrange, integrated exactly by
:func:`~sdeflow.solvers.exponential.quadrature` with kappa = -K; tau = 0 is DPM-Solver++'s ODE form, tau = 1 the
SDE-DPM-Solver++ form).

* SA-Predictor (eq. 14) of order p: P through the last p predictions :math:`\lambda_i, \lambda_{i-1}, \dots`.
* SA-Corrector (eq. 16) of order c (``corrector_order=0``: none, the bare predictor): once the model has been evaluated at the predicted :math:`\tilde x_{i+1}`, redo
  the step from :math:`x_i` with P through :math:`\lambda_{i+1}, \lambda_i, \dots` (c points) and the *same*
  noise :math:`\xi_i`. The evaluation is never redone (free, like UniPC) and the last step has no corrector.

With two interpolation points the first moment :math:`\int_0^h e^{-K(h-u)}u\,du` is replaced by :math:`h^2/2`, the
"bh1" form (diffusers' "modification that does not influence the convergence order similar to UniPC", in the
predictor and the corrector). Warm-up: predictor min(p, i + 1), corrector min(c, i + 2) points; with
``lower_order_final`` on grids of fewer than 15 steps the last steps use at most the steps left (diffusers applies
this at every grid size).

:math:`\tau(t)`: ``tau`` (a float, applied on ``tau_window`` = (lo, hi) fractions of [0, T], zero outside: diffusers'
default is 1 on timesteps 200..800 of 1000) or a callable t -> tau. 1 NFE per step, one draw per step. Declared order
min(p + 1, c) (p without corrector) with tau = 0 (ODE order), min(p + 1, c, 2) otherwise (weak order: measured 2 for p = 3, c = 4 on
Gaussian data); the defaults p = c = 2 give 2. On every SDE with the semilinear view.

**The noise-level family.** The paper's SDE is :math:`dx = [f x - \tfrac{1+\tau^2}2 g^2\nabla\log p_t]dt +
\tau g\,d\bar w`: the probability-flow ODE's family with sampler noise :math:`s_u = \tau g \ge 0` (the seed notes'
Gaussian-path family), every member with the same marginals. ``tau`` as a callable is any :math:`s_u(t)/g(t)`
schedule: tau = 0 is the ODE (with ``corrector_order=0``: UniP-p with B(h) = h), tau = 1 the reverse SDE
(``predictor_order=1, corrector_order=0``: SDE-DPM-Solver++(1) = DDPM posterior sampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import MultistepStepper, StepResult
from .exponential import FORMS, ExponentialStepper, Form, Point, lincomb, quadrature


@dataclass
class SAState:
    """Step index, predictor and corrector order plans, (point, x0) nodes newest first, and what the corrector of
    the last step needs: its start state, point, noise, tau and corrector order."""

    i: int
    pred_plan: list[int]
    corr_plan: list[int]
    nodes: list[tuple[Point, torch.Tensor]] = field(default_factory=list)
    x_prev: torch.Tensor | None = None
    p_prev: Point | None = None
    z_prev: torch.Tensor | None = None
    tau_prev: float = 0.0


class SASolver(ExponentialStepper, MultistepStepper):
    r"""SA-Solver (Xue et al. 2023): stochastic Adams predictor (order p) and corrector (order c) in data
    prediction (update rule in the module docstring).

    Order min(p + 1, c) (tau = 0) or weak order min(p + 1, c, 2), 1 NFE per step, one draw per step.

    Options (diffusers' ``SASolverScheduler`` defaults):
        predictor_order: p in 1..4 (default 2).
        corrector_order: c in 1..4 (default 2), or 0: the bare SA-Predictor (order p).
        tau: a float >= 0 (default 1) or a callable ``t -> tau`` (float time).
        tau_window: (lo, hi) in [0, 1]: a float tau applies for lo T <= t <= hi T (default (0.2, 0.8)).
        lower_order_final: below 15 steps, lower orders on the last steps (default True).
    """

    name = "sa_solver"
    starts_at_zero_signal = False  # its coefficients have no lambda = -inf limit here: start below T on such paths
    nfe_per_step = 1
    state_type = SAState
    options = {
        "predictor_order": 2,
        "corrector_order": 2,
        "tau": 1.0,
        "tau_window": (0.2, 0.8),
        "lower_order_final": True,
    }

    def validate(self) -> None:
        self._check_choice("predictor_order", (1, 2, 3, 4))
        self._check_choice("corrector_order", (0, 1, 2, 3, 4))
        self._check_bool("lower_order_final")
        tau = self.opts["tau"]
        if not callable(tau) and (
            isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 <= tau < math.inf)
        ):
            raise ValueError(f"tau must be a finite number >= 0 or a callable t -> tau, got {tau!r}")
        w = self.opts["tau_window"]
        ok = isinstance(w, Sequence) and len(w) == 2 and all(isinstance(v, (int, float)) for v in w)
        if not ok or not (0.0 <= w[0] <= w[1] <= 1.0):
            raise ValueError(f"tau_window must be (lo, hi) with 0 <= lo <= hi <= 1, got {w!r}")

    def configure(self) -> None:
        """ODE order min(p + 1, c) with tau = 0; weak order min(p + 1, c, 2) when stochastic (the exact-law probe
        on Gaussian data measures 2 for p = 3, c = 4 with tau = 1: the interpolated predictions carry the noise of
        earlier steps). Strong order: not declared (tau != 1 is another SDE than the reverse SDE)."""
        p, c = int(self.opts["predictor_order"]), int(self.opts["corrector_order"])
        tau = self.opts["tau"]
        self.stochastic = callable(tau) or float(tau) > 0
        k = min(p + 1, c) if c > 0 else p
        self.order = float(min(k, 2) if self.stochastic else k)

    @property
    def form(self) -> Form:
        return FORMS["x0"]

    def tau_at(self, t: torch.Tensor) -> float:
        """tau(t) for a scalar grid time."""
        tau = self.opts["tau"]
        tf = float(t)
        if callable(tau):
            v = float(tau(tf))
        else:
            lo, hi = self.opts["tau_window"]
            T = float(self.sde.T)
            v = float(tau) if lo * T <= tf <= hi * T else 0.0
        if not (v >= 0.0 and math.isfinite(v)):
            raise ValueError(f"tau({tf:.6g}) = {v!r}: tau must be a finite number >= 0")
        return v

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> SAState:
        self.check_grid(grid)
        n = grid.numel() - 1
        p, c = int(self.opts["predictor_order"]), int(self.opts["corrector_order"])
        lower = bool(self.opts["lower_order_final"]) and n < 15
        pred = [min(p, i + 1, n - i) if lower else min(p, i + 1) for i in range(n)]
        corr = [min(c, i + 2, n - i + 1) if lower else min(c, i + 2) for i in range(n)]
        return SAState(0, pred, corr)

    def sa_coefficients(self, p0: Point, p1: Point, nodes: Sequence[Point], tau: float) -> tuple[list[float], float]:
        """[c_x, K a_1 w_0, K a_1 w_1, ...] and the noise std of one SA update (float64, memoized per step)."""
        key = ("sa", tau, p0.lam, p1.lam, *(q.lam for q in nodes))
        hit = self.view.coefficients.get(key)
        if hit is not None:
            return hit
        K = 1.0 + tau * tau
        h = float(p1.lam) - float(p0.lam)
        r = [(float(q.lam) - float(p0.lam)) / h for q in nodes]
        w = quadrature(r, h, -K, "bh1" if len(nodes) == 2 else "taylor")
        cx = math.exp(float(p1.ls) - float(p0.ls) - tau * tau * h)
        a1 = math.exp(float(p1.la))
        std = math.exp(float(p1.ls)) * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
        out = ([cx] + [K * a1 * float(wm) for wm in w], std)
        self.view.coefficients[key] = out
        return out

    def sa_update(
        self,
        x: torch.Tensor,
        p0: Point,
        p1: Point,
        nodes: Sequence[tuple[Point, torch.Tensor]],
        tau: float,
        z: torch.Tensor | None,
    ) -> torch.Tensor:
        c, std = self.sa_coefficients(p0, p1, [q for q, _ in nodes], tau)
        terms = list(zip(c, [x] + [f for _, f in nodes]))
        if std > 0:
            if z is None:
                raise ValueError(f"solver {self.name!r} is stochastic: the driver must pass noise")
            terms.append((std, z))
        return lincomb(terms)

    def step(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: Any) -> StepResult:
        st = self.check_state(state)
        p0, p1 = self.view.point(t0), self.view.point(t1)
        f0, pred = self.evaluate(x, p0)
        if st.x_prev is not None and st.p_prev is not None and self.opts["corrector_order"] > 0:
            # SA-Corrector: redo the last step from x_prev with the new evaluation as the node at its end
            k = st.corr_plan[st.i - 1]
            cnodes = [(p0, f0), *st.nodes][:k]
            x = self.sa_update(st.x_prev, st.p_prev, p0, cnodes, st.tau_prev, st.z_prev)
        nodes = [(p0, f0), *st.nodes]
        tau = self.tau_at(p0.t)
        z = self.require_noise(noise)[0] if self.stochastic else None
        x1 = self.sa_update(x, p0, p1, nodes[: st.pred_plan[st.i]], tau, z)
        keep = max(int(self.opts["predictor_order"]), int(self.opts["corrector_order"]) - 1)
        new = SAState(st.i + 1, st.pred_plan, st.corr_plan, nodes[:keep], x, p0, z, tau)
        return StepResult(x=x1, state=new, x0=pred.x0)
