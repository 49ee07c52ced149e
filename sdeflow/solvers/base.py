r"""The solver contract: capabilities are types.

A *solver* is a configured numerical method on one :class:`~sdeflow.Denoiser`. What a driver may do with it is said by
its type, never by a string:

===================  ==================================================================================================
type                 what it can do (and which driver runs it)
===================  ==================================================================================================
:class:`Stepper`     one step on a fixed grid: ``state = init(x, grid)``, then ``step(t0, t1, x, state, noise)``
                     (:func:`sdeflow.integrate.solve`)
:class:`SingleStepper`  a step that depends on ``(t0, t1, x, noise)`` only, with per-sample times allowed:
                     ``single_step``. The adaptive driver makes a deterministic one adaptive by step doubling, the
                     Picard driver batches it over a window of steps.
:class:`EmbeddedStepper`  a single stepper that also returns an embedded error estimate (``step_with_error``), with
                     the order of that estimate and optionally its paper's controller and error norm
                     (:func:`sdeflow.integrate.solve_adaptive`)
:class:`MultistepStepper`  a stepper whose history is explicit state: ``init`` creates it, ``step`` requires it
                     (stepping without it raises: it would silently be a lower-order method)
:class:`Integrator`  a whole-span solve: ``integrate(x, grid, ...)`` (the torchdiffeq / scipy / torchsde bridges and
                     the Picard driver around any stepper)
===================  ==================================================================================================

A stepper never draws randomness (the driver passes standard-normal ``noise`` of shape ``(noise_draws, *x.shape)``,
the first draw being the normalized Brownian increment over [t1, t0]) and never loops over time. ``t0``/``t1`` are
float64 tensors, scalar or batched along the leading axis of x (per-sample times).

The declared orders (``order``, ``strong_order``), ``stochastic`` and ``nfe_per_step`` are attributes of the
*configured instance*: :meth:`Solver.configure` sets them from the options (DPM-Solver's ``order=2`` is a second-order
method), and that instance value is what the empirical order tests fit. Options are validated at construction:
unknown names and bad values raise a ValueError naming the option and the allowed values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._utils import append_dims
from ..denoiser import Denoiser, Prediction, convert
from .state import GridCoefficients, memo_per_grid

if TYPE_CHECKING:
    from ..noise import NoiseSource
    from .control import PIController, Tolerances
    from .record import Callback, SampleResult
    from .window import WindowEvaluator

__all__ = [
    "CAPABILITIES",
    "AffineGridStepper",
    "EmbeddedStepper",
    "GridCoefficients",
    "Integrator",
    "MultistepStepper",
    "SingleStepper",
    "Solver",
    "SolverError",
    "StepResult",
    "Stepper",
    "prediction_affine",
    "probability_flow_velocity",
    "reverse_sde_drift",
]


class SolverError(RuntimeError):
    """A solve went wrong in a way the user must see (non-finite state or model output, step-size underflow)."""


@dataclass
class StepResult:
    """What one step returns.

    Attributes:
        x: the state at t1.
        error: the embedded local-error estimate (same shape as x) of :meth:`EmbeddedStepper.step_with_error`, else None.
        state: the stepper's carried state (multistep history, per-grid plan), or None.
        x0: the data prediction made during the step (the callback payload's ``x0``), or None. A fast grid step may
            give a zero-argument function instead, evaluated only when someone reads it (:meth:`data_prediction`).
    """

    x: torch.Tensor
    error: torch.Tensor | None = None
    state: Any = None
    x0: torch.Tensor | Callable[[], torch.Tensor] | None = None

    def data_prediction(self) -> torch.Tensor | None:
        """The step's x0 prediction (evaluating a deferred one)."""
        return self.x0() if callable(self.x0) else self.x0


def prediction_affine(
    den: Denoiser, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    r"""Float64 (p, q, r, u) with :math:`\hat x_0 = p\,x + q\,\mathrm{out}` and :math:`\hatarepsilon = r\,x +
    u\,\mathrm{out}` at the times t (any shape), where out is the net's raw output: every prediction type of the
    conversion table is linear in (x, out), so the coefficients are the conversions of unit inputs. None for a
    Denoiser subclass that overrides ``predict`` or ``coefficients`` (it is then always called through predict).

    This lets a fixed-grid step combine x and the raw output with per-step constants computed once per grid."""
    cls = type(den)
    if cls.predict is not Denoiser.predict or cls.coefficients is not Denoiser.coefficients:
        return None
    t = t.to(torch.float64)
    sde = den.sde
    a, s = sde.alpha(t), sde.sigma(t)
    kw: dict[str, torch.Tensor] = {}
    if den.prediction == "flow":
        kw = {"da": sde.d_alpha(t), "ds": sde.d_sigma(t)}
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    src = den.prediction
    p, q = convert(zero, one, a, s, src, "x0", **kw), convert(one, zero, a, s, src, "x0", **kw)
    r, u = convert(zero, one, a, s, src, "eps", **kw), convert(one, zero, a, s, src, "eps", **kw)
    out = (p, q, r, u)
    if not all(bool(torch.isfinite(v).all()) for v in out):
        return None  # e.g. s = 0 at a grid end: the general path raises its own clear error there
    return out


# capability name -> what the SDE must provide
CAPABILITIES: dict[str, str] = {
    "semilinear": "alpha, sigma, log_snr and t_from_log_snr (the exponential-integrator view)",
    "reverse_sde": "drift coefficient f(t) and diffusion g(t)^2 of the forward SDE",
}
_CAPABILITY_METHODS = {
    "semilinear": ("alpha", "sigma", "log_snr", "t_from_log_snr"),
    "reverse_sde": ("f", "g2"),
}


def coef(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 time coefficient (scalar or (B,)) cast to x's dtype and broadcast against x."""
    return append_dims(v.to(device=x.device, dtype=x.dtype), x.ndim)


def probability_flow_velocity(den: Denoiser, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Prediction]:
    r"""Probability-flow velocity, one net call, and the prediction: the one PF-ODE right-hand side of sampling and
    likelihood.

    For a Gaussian path :math:`x_t = a x_0 + s\varepsilon` the PF-ODE :math:`f x - \tfrac12 g^2\nabla\log p_t`
    (Song et al. 2021, eq. 13) equals :math:`a'(t)\,\hat x_0 + s'(t)\,\hat\varepsilon` (substitute
    :math:`f = a'/a`, :math:`g^2 = 2 s s' - 2 f s^2`, :math:`\nabla\log p_t = -\hat\varepsilon/s` and
    :math:`x = a\hat x_0 + s\hat\varepsilon`): the flow-matching velocity (Lipman et al. 2023). This form stays
    finite where a(t) = 0 (the flow path at t = 1, where f and g^2 are infinite)."""
    pred = den.predict(x, t)
    sde = den.sde
    return coef(sde.d_alpha(t), x) * pred.x0 + coef(sde.d_sigma(t), x) * pred.eps, pred


def reverse_sde_drift(den: Denoiser, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Prediction]:
    r"""Reverse-SDE drift :math:`f(t) x - g(t)^2 \nabla\log p_t(x)` (Anderson 1982; Song et al. 2021, eq. 6), one net
    call, and the prediction."""
    pred = den.predict(x, t)
    score = -pred.eps / coef(den.sde.sigma(t), x)
    return den.sde.reverse_drift(x, t, score), pred


class Solver:
    """A configured numerical method on one denoiser: options, declared orders, the grid it prefers.

    Subclasses set ``name``, ``options`` (name -> default), ``requires`` and ``default_grid`` on the class, and the
    declared properties either on the class (fixed) or in :meth:`configure` (option-dependent).

    Args:
        denoiser: the model (any :class:`~sdeflow.Denoiser`).
        **options: solver options; unknown names raise a ValueError that lists the allowed ones.
    """

    name: ClassVar[str] = "solver"
    #: option name -> default; the constructor validates user options against this.
    options: ClassVar[dict[str, Any]] = {}
    requires: ClassVar[frozenset[str]] = frozenset({"reverse_sde"})
    #: the grid kind sample() uses when none is given (a configured instance may choose another)
    default_grid: str = "uniform"

    # declared per configured instance (class values are the defaults; configure() may change them)
    #: ODE order (deterministic) or weak order (stochastic), checked by the parametrized order test
    order: float = 1.0
    #: strong order on a fixed Brownian path (None for ODE solvers)
    strong_order: float | None = None
    stochastic: bool = False
    #: network evaluations per grid step
    nfe_per_step: int = 1

    def __init__(self, denoiser: Denoiser, **options: Any) -> None:
        if not isinstance(denoiser, Denoiser):
            raise TypeError(f"denoiser must be a sdeflow.Denoiser, got {type(denoiser).__name__}")
        unknown = set(options) - set(self.options)
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"unknown option(s) {sorted(unknown)} for solver {self.name!r}; allowed: {allowed}")
        self.den = denoiser
        self.sde = denoiser.sde
        self.opts: dict[str, Any] = {**self.options, **options}
        for cap in self.requires:
            missing = [m for m in _CAPABILITY_METHODS.get(cap, ()) if not callable(getattr(self.sde, m, None))]
            if missing:
                raise ValueError(
                    f"solver {self.name!r} requires {cap} ({CAPABILITIES[cap]}); sde {type(self.sde).__name__} lacks "
                    f"{missing}"
                )
        self.validate()
        self.configure()

    # ------------------------------------------------------------------ hooks
    def validate(self) -> None:
        """Check option values (raise ValueError naming the option and the allowed values)."""

    def configure(self) -> None:
        """Set the instance's declared ``order``, ``strong_order``, ``stochastic``, ``nfe_per_step`` from the options."""

    @property
    def noise_draws(self) -> int:
        """How many standard-normal tensors like x one step consumes (0 for deterministic solvers)."""
        return 1 if self.stochastic else 0

    @property
    def tolerances(self) -> Tolerances | None:
        """The tolerances of an adaptive configuration (the sampling layer then runs the adaptive driver and ignores
        ``nfe``), or None: the solver walks a grid whose size comes from the NFE budget."""
        return None

    def integrator(self) -> Integrator | None:
        """The whole-span integrator that runs this configuration (itself for an :class:`Integrator`, a bridge for
        RK45's torchdiffeq / scipy backends), or None: a driver of sdeflow's steps it."""
        return None

    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        """Number of grid steps that spend at most ``nfe`` net calls on a grid ending at ``t_end`` (default
        ``sde.eps``; only a solver whose cost depends on where the grid ends reads it: heun's last step is an Euler
        step only where sigma(t_end) = 0)."""
        steps = int(nfe) // self.nfe_per_step
        if steps < 1:
            raise ValueError(f"nfe={nfe} is too small for solver {self.name!r}: it needs at least {self.nfe_per_step}")
        return steps

    # ------------------------------------------------------------------ shared pieces for subclasses
    def coef(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A float64 time coefficient (scalar or (B,)) cast to x's dtype and broadcast against x."""
        return coef(v, x)

    def ode_velocity(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Prediction]:
        """:func:`probability_flow_velocity` of this solver's denoiser."""
        return probability_flow_velocity(self.den, x, t)

    def reverse_sde_drift(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Prediction]:
        """:func:`reverse_sde_drift` of this solver's denoiser."""
        return reverse_sde_drift(self.den, x, t)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.opts.items())
        return f"{type(self).__name__}({opts})"


class Stepper(Solver):
    """One step on a fixed grid; the driver owns the time loop (:func:`sdeflow.integrate.solve`)."""

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> Any:
        """State carried across the steps of ``grid`` (the float64 time grid): multistep history, a per-grid plan."""
        return None

    def step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: torch.Tensor | None
    ) -> StepResult:
        """One step from t0 to t1 with the state of :meth:`init` (or of the previous step)."""
        raise NotImplementedError

    def window_evaluator(self, x: torch.Tensor, grid: torch.Tensor, over_ranks: Any = None) -> WindowEvaluator:
        """The batched-over-time evaluator of this stepper for the Picard driver (:mod:`sdeflow.parallel`): the maps
        of a window of steps in one batched call. Raises a ValueError for a stepper whose carried state cannot be
        batched over time."""
        raise ValueError(
            f"base solver {self.name!r} carries a state across steps that the Picard window cannot batch; supported: "
            "single-step solvers, 'heun' and 'dpm_solver++'"
        )

    def require_noise(self, noise: torch.Tensor | None) -> torch.Tensor:
        """The driver's noise for a stochastic step (ValueError when the driver passed none)."""
        if noise is None:
            raise ValueError(f"solver {self.name!r} is stochastic: the driver must pass noise")
        return noise


class SingleStepper(Stepper):
    """A stepper whose step depends on (t0, t1, x, noise) only; per-sample times (B,) are allowed.

    Subclasses implement :meth:`single_step`; :meth:`step` forwards to it (a subclass whose grid step differs, e.g.
    EDM Heun's final Euler step, overrides :meth:`step`).
    """

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        raise NotImplementedError

    def step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: torch.Tensor | None
    ) -> StepResult:
        res = self.single_step(t0, t1, x, noise)
        res.state = state
        return res

    def window_evaluator(self, x: torch.Tensor, grid: torch.Tensor, over_ranks: Any = None) -> WindowEvaluator:
        from .window import StepEvaluator

        state = self.init(x, grid)
        if state is not None and not isinstance(state, GridCoefficients):  # a per-grid plan (DPM-Solver's NFE split)
            return super().window_evaluator(x, grid, over_ranks)
        return StepEvaluator(
            self, grid, over_ranks, state
        )  # batched steps run without a GridCoefficients (single_step)


class AffineGridStepper(SingleStepper):
    r"""A single stepper whose grid step is affine in (x, net output): :math:`x_1 = c_x x + c_o\,\mathrm{out} +
    \sigma z` with per-step constants (DDIM / DDPM, Euler). Subclasses give the constants of every step of a grid in
    :meth:`grid_rows` (columns c_x, c_o, sigma, p, q, where :math:`\hat x_0 = p x + q\,\mathrm{out}` is the callback's
    data prediction); this class memoizes them per grid and takes the step with one or two fused tensor ops. Without
    the table (per-sample times, a Denoiser whose conversion is not the table's) :meth:`single_step` runs."""

    def grid_rows(self, grid: torch.Tensor) -> torch.Tensor | None:
        """(steps, 5) float64 constants for the float64 CPU ``grid``, or None (the general step runs)."""
        raise NotImplementedError

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> GridCoefficients | None:
        return memo_per_grid(self.den, (type(self), repr(self.opts)), grid, lambda: self._table(grid))

    def _table(self, grid: torch.Tensor) -> GridCoefficients | None:
        rows = self.grid_rows(grid.detach().to(device="cpu", dtype=torch.float64))
        if rows is None or not bool(torch.isfinite(rows).all()):
            return None
        return GridCoefficients(tuple(map(tuple, rows.tolist())))

    def step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: torch.Tensor | None
    ) -> StepResult:
        if not isinstance(state, GridCoefficients):
            return self.single_step(t0, t1, x, noise)
        cx, co, sig, p, q = state.here
        out = self.den.raw(x, t0)
        x1 = torch.add(x * cx, out, alpha=co)
        if sig:
            x1 = x1.add_(self.require_noise(noise)[0], alpha=sig)
        return StepResult(x=x1, state=state.next(), x0=lambda: torch.add(x * p, out, alpha=q))


class EmbeddedStepper(SingleStepper):
    """A single stepper with an embedded error estimate: the adaptive driver's input.

    ``error_order`` is the order of the embedded (lower) solution: the PI controller's exponent is
    1/(error_order + 1). :meth:`controller` and :meth:`error_norm` may be overridden by a method that brings its
    paper's (e.g. Jolicoeur-Martineau et al. 2021).
    """

    error_order: float = 1.0

    def step_with_error(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        """One step returning ``StepResult.error`` (an estimate of the local error, like x)."""
        raise NotImplementedError

    @property
    def controller(self) -> PIController:
        from .control import PIController

        return PIController()

    def error_norm(
        self, err: torch.Tensor, x_old: torch.Tensor, x_new: torch.Tensor, rtol: float, atol: float
    ) -> torch.Tensor:
        from .control import error_norm

        return error_norm(err, x_old, x_new, rtol, atol)


class MultistepStepper(Stepper):
    """A stepper whose multistep history is explicit state: :meth:`init` creates it and :meth:`step` requires it.

    Stepping without the state raises (it would silently become the first-order method while declaring a higher
    order); the adaptive driver refuses multistep steppers.
    """

    state_type: ClassVar[type] = object

    def check_state(self, state: Any) -> Any:
        if not isinstance(state, self.state_type):
            raise ValueError(
                f"solver {self.name!r} is a multistep method: step() needs the state that init(x, grid) returns "
                f"(got {type(state).__name__}); without its history it would be a first-order method"
            )
        return state


class Integrator(Solver):
    """A whole-span solve: the bridges to torchdiffeq / scipy / torchsde and the Picard driver around a stepper."""

    def integrator(self) -> Integrator:
        return self

    def integrate(
        self,
        x: torch.Tensor,
        grid: torch.Tensor,
        noise: NoiseSource | None = None,
        callback: Callback | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> SampleResult:
        """Integrate from ``grid[0]`` to ``grid[-1]`` (the grid's times are output times; fixed-step integrators step
        on it). Returns a :class:`~sdeflow.solvers.record.SampleResult`."""
        raise NotImplementedError


def check_unit_interval(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
