r"""Adaptive Runge-Kutta on the probability-flow ODE: Dormand & Prince 1980, "A family of embedded Runge-Kutta
formulae" (DOPRI5), through torchdiffeq, scipy or sdeflow's own per-sample driver.

The probability-flow ODE :math:`dx/dt = f(t) x - \tfrac12 g(t)^2\nabla\log p_t(x)` (Song et al. 2021, eq. 13) is
integrated from T down to t_end to a tolerance, as in the score-SDE reference code (``scipy`` RK45, rtol = atol =
1e-5). Backends:

* ``"torchdiffeq"`` (default): ``torchdiffeq.odeint(method="dopri5")`` on the whole batch (one step size for the
  batch, RMS error norm over all elements); NFE, accepted and rejected steps come from torchdiffeq's step callbacks.
* ``"scipy"``: ``scipy.integrate.DOP853`` (Hairer's 8(5,3) pair) in float64 on the flattened batch, a reference-grade
  backend (CPU, one host transfer per evaluation).
* ``"sdeflow"``: this module's Dormand-Prince step driven by :func:`sdeflow.integrate.solve_adaptive`, one step size
  *per sample* with the PI controller on the embedded 4th-order error estimate.

The stepper is an :class:`~sdeflow.solvers.base.EmbeddedStepper`: on a fixed grid (:func:`sdeflow.integrate.solve`)
the step is plain DOPRI5, order 5, 6 NFE per step (the 7th, FSAL stage only serves the error estimate and is skipped
there); :meth:`RK45.step_with_error` adds it. For the torchdiffeq and scipy backends :meth:`RK45.integrator` hands
the sampling layer the whole-span bridge (:mod:`sdeflow.solvers.bridges`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as Fr
from typing import Any

import torch

from .._utils import check_choice
from ..noise import NoiseSource
from .base import EmbeddedStepper, Integrator, StepResult
from .bridges import ODE_BACKENDS, integrate_scipy, integrate_torchdiffeq
from .control import Tolerances, check_tolerances
from .record import Callback, SampleResult


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit embedded Runge-Kutta tableau; validates its own consistency conditions at construction.

    Attributes:
        c: nodes (s,); a: lower-triangular stage weights (s rows of length i); b: weights of the propagated solution;
        b_err: weights of the embedded solution (the error estimate is h * sum (b - b_err)_i k_i).
    """

    c: tuple
    a: tuple
    b: tuple
    b_err: tuple
    order: int
    error_order: int

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError("a must be strictly lower triangular with one row per stage")
        if len(self.b) != s or len(self.b_err) != s:
            raise ValueError("b and b_err need one weight per stage")
        for i, row in enumerate(self.a):  # row-sum condition c_i = sum_j a_ij
            if sum(row) != self.c[i]:
                raise ValueError(f"row {i} of a does not sum to c[{i}]")
        for w in (self.b, self.b_err):  # order-1 and order-2 conditions
            if sum(w) != 1 or sum(bi * ci for bi, ci in zip(w, self.c)) != Fr(1, 2):
                raise ValueError("weights violate the order conditions sum b = 1, sum b c = 1/2")

    @property
    def stages(self) -> int:
        return len(self.c)


#: Dormand & Prince (1980), RK5(4)7M: 5th-order propagation, 4th-order embedded solution, first-same-as-last.
DOPRI5 = ButcherTableau(
    c=(Fr(0), Fr(1, 5), Fr(3, 10), Fr(4, 5), Fr(8, 9), Fr(1), Fr(1)),
    a=(
        (),
        (Fr(1, 5),),
        (Fr(3, 40), Fr(9, 40)),
        (Fr(44, 45), Fr(-56, 15), Fr(32, 9)),
        (Fr(19372, 6561), Fr(-25360, 2187), Fr(64448, 6561), Fr(-212, 729)),
        (Fr(9017, 3168), Fr(-355, 33), Fr(46732, 5247), Fr(49, 176), Fr(-5103, 18656)),
        (Fr(35, 384), Fr(0), Fr(500, 1113), Fr(125, 192), Fr(-2187, 6784), Fr(11, 84)),
    ),
    b=(Fr(35, 384), Fr(0), Fr(500, 1113), Fr(125, 192), Fr(-2187, 6784), Fr(11, 84), Fr(0)),
    b_err=(Fr(5179, 57600), Fr(0), Fr(7571, 16695), Fr(393, 640), Fr(-92097, 339200), Fr(187, 2100), Fr(1, 40)),
    order=5,
    error_order=4,
)

BACKENDS = (*ODE_BACKENDS, "sdeflow")


class RK45(EmbeddedStepper):
    r"""Adaptive Dormand-Prince (DOPRI5) on the probability-flow ODE (Dormand & Prince 1980; Song et al. 2021 use it
    as their black-box ODE sampler).

    Step (fixed grid): :math:`k_i = v(x + h\sum_{j<i} a_{ij}k_j,\ t_0 + c_i h)`, :math:`x_1 = x + h\sum_i b_i k_i`,
    h = t1 - t0 < 0, v the probability-flow velocity; order 5, 6 NFE per step. Called by the adaptive driver (no
    state, :meth:`step_with_error`) it also returns the embedded error :math:`h\sum_i (b_i - \hat b_i) k_i` (7 NFE).

    Options: ``backend`` in {"torchdiffeq", "scipy", "sdeflow"} (see the module docstring), ``rtol``, ``atol``
    (default 1e-5, the score-SDE code's), ``h0`` (first step, sdeflow backend). ``sample()`` ignores ``nfe`` for this
    solver; ``res.stats`` reports nfe, accepted and rejected steps.
    """

    name = "rk45"
    order = 5.0
    error_order = 4.0
    nfe_per_step = 6
    default_grid = "karras"  # for fixed-grid use (solve()); adaptive backends only take the grid's output times
    options = {"backend": "torchdiffeq", "rtol": 1e-5, "atol": 1e-5, "h0": None, "max_steps": 20_000}
    tableau = DOPRI5

    def validate(self) -> None:
        check_choice("backend", self.opts["backend"], BACKENDS)
        check_tolerances(self.opts["rtol"], self.opts["atol"])
        m = self.opts["max_steps"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {m!r}")

    @property
    def tolerances(self) -> Tolerances:
        return Tolerances(float(self.opts["rtol"]), float(self.opts["atol"]), self.opts["h0"])

    def integrator(self) -> Integrator | None:
        """The torchdiffeq / scipy bridge for those backends; None for "sdeflow" (the adaptive driver steps it)."""
        return None if self.opts["backend"] == "sdeflow" else ODEBridge(self)

    def integrate(
        self,
        x: torch.Tensor,
        grid: torch.Tensor,
        noise: NoiseSource | None = None,
        callback: Callback | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> SampleResult:
        """Whole-span solve through the torchdiffeq or scipy backend (outputs at ``grid``)."""
        bridge = self.integrator()
        if bridge is None:
            raise ValueError('backend="sdeflow" is stepped by sdeflow.integrate.solve_adaptive, not integrated here')
        return bridge.integrate(x, grid, noise, callback, return_trajectory, progress)

    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        """Adaptive: the budget is not used; the grid only holds the output times (T and t_end)."""
        return 1

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        return self._dopri(t0, t1, x, with_error=False)

    def step_with_error(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        return self._dopri(t0, t1, x, with_error=True)

    def _dopri(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, with_error: bool) -> StepResult:
        tab = self.tableau
        h = t1 - t0
        hx = self.coef(h, x)
        ks: list[torch.Tensor] = []
        x0_pred = None
        n_stages = tab.stages if with_error else tab.stages - 1
        x1 = x
        for i in range(n_stages):
            xi = x
            for aij, kj in zip(tab.a[i], ks):
                if aij:
                    xi = xi + hx * (float(aij) * kj)
            if i == tab.stages - 1:
                x1 = xi  # FSAL: the last stage's input is the 5th-order solution
            v, pred = self.ode_velocity(xi, t0 + float(tab.c[i]) * h)
            ks.append(v)
            if i == 0:
                x0_pred = pred.x0
        if not with_error:
            x1 = x
            for bi, ki in zip(tab.b, ks):
                if bi:
                    x1 = x1 + hx * (float(bi) * ki)
            return StepResult(x=x1, x0=x0_pred)
        err = torch.zeros_like(x)
        for bi, ei, ki in zip(tab.b, tab.b_err, ks):
            if bi != ei:
                err = err + float(bi - ei) * ki
        return StepResult(x=x1, error=hx * err, x0=x0_pred)


class ODEBridge(Integrator):
    """The probability-flow ODE of an :class:`RK45` configuration through torchdiffeq's dopri5 or scipy's DOP853."""

    name = "rk45"
    requires = frozenset({"reverse_sde"})

    def __init__(self, rk: RK45) -> None:
        self.rk = rk
        super().__init__(rk.den)
        self.opts = dict(rk.opts)
        self.order, self.nfe_per_step = rk.order, rk.nfe_per_step

    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        """Adaptive: the budget is not used; the grid only holds the output times (T and t_end)."""
        return 1

    def integrate(
        self,
        x: torch.Tensor,
        grid: torch.Tensor,
        noise: NoiseSource | None = None,
        callback: Callback | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> SampleResult:
        o = self.opts
        fn: Any = integrate_scipy if o["backend"] == "scipy" else integrate_torchdiffeq
        return fn(
            self.den,
            x,
            grid,
            float(o["rtol"]),
            float(o["atol"]),
            h0=o["h0"],
            max_steps=int(o["max_steps"]),
            callback=callback,
            return_trajectory=return_trajectory,
            progress=progress,
        )
