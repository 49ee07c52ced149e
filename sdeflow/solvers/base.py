r"""The Stepper contract: a solver is a small class with ``init`` and ``step``; ONE driver owns the time loop.

A stepper advances the reverse-time dynamics of a :class:`~sdeflow.Denoiser` from ``t0`` to ``t1 < t0``. It never
draws randomness (the driver passes standard-normal ``noise``, shape ``(noise_draws, *x.shape)``, the first draw being
the normalized Brownian increment over [t1, t0]) and never loops over time (the driver in
:mod:`sdeflow.integrate` does, for fixed grids and adaptive stepping alike). ``t0``/``t1`` are float64 tensors, scalar
or batched along the leading axis of x (per-sample times: adaptive per-sample stepping and parallel-in-time sampling
rely on this).

Class attributes declare what a test proves: ``order`` (ODE / weak order, fitted empirically by the parametrized order
test), ``strong_order`` (None for ODE-only solvers), ``stochastic``, ``nfe_per_step``, ``requires``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._utils import append_dims
from ..denoiser import Denoiser, Prediction

__all__ = ["Stepper", "StepResult", "SolverError", "CAPABILITIES"]


class SolverError(RuntimeError):
    """A solve went wrong in a way the user must see (non-finite state or model output, step-size underflow)."""


@dataclass
class StepResult:
    """What one step returns.

    Attributes:
        x: the state at t1.
        x_mean: the state at t1 without the last noise injection (= x for deterministic steps).
        error: an embedded local-error estimate like x, or None (the driver then uses step doubling if adaptive).
        state: the stepper's carried state (multistep history, FSAL cache), or None.
        x0: the data prediction made during the step (the callback payload's ``x0``), or None.
    """

    x: torch.Tensor
    x_mean: torch.Tensor | None = None
    error: torch.Tensor | None = None
    state: Any = None
    x0: torch.Tensor | None = None


# capability name -> (SDE method it needs, what it means)
CAPABILITIES: dict[str, str] = {
    "semilinear": "alpha, sigma, log_snr and t_from_log_snr (the exponential-integrator view)",
    "reverse_sde": "drift coefficient f(t) and diffusion g(t)^2 of the forward SDE",
}
_CAPABILITY_METHODS = {
    "semilinear": ("alpha", "sigma", "log_snr", "t_from_log_snr"),
    "reverse_sde": ("f", "g2"),
}


class Stepper:
    """Base class of every solver. Subclasses set the class attributes and implement :meth:`step`.

    Args:
        denoiser: the model (any :class:`~sdeflow.Denoiser`).
        **options: solver options; unknown names raise a ValueError that lists the allowed ones.
    """

    name: ClassVar[str] = "stepper"
    order: ClassVar[float] = 1.0
    strong_order: ClassVar[float | None] = None
    stochastic: ClassVar[bool] = False
    nfe_per_step: ClassVar[int] = 1
    requires: ClassVar[frozenset[str]] = frozenset({"reverse_sde"})
    #: order of the embedded solution behind step()'s ``error`` (the PI controller's exponent is 1/(error_order + 1));
    #: None: the error estimate is of the step's own order (step doubling).
    error_order: ClassVar[float | None] = None
    default_grid: ClassVar[str] = "uniform"
    #: "fixed" (the driver walks a grid), "adaptive" (the driver runs its step-size controller; step() must return an
    #: error estimate or the driver uses step doubling) or "external" (``integrate(x, grid, noise=, callback=,
    #: return_trajectory=, progress=)`` runs the whole solve and returns a SampleResult: the torchdiffeq / scipy /
    #: torchsde bridges).
    mode: ClassVar[str] = "fixed"
    #: option name -> default; the constructor validates user options against this.
    options: ClassVar[dict[str, Any]] = {}

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

    # ------------------------------------------------------------------ hooks
    def validate(self) -> None:
        """Check option values (raise ValueError naming the option and the allowed values)."""

    @property
    def noise_draws(self) -> int:
        """How many standard-normal tensors like x one step consumes (0 for deterministic steppers)."""
        return 1 if self.stochastic else 0

    def num_steps(self, nfe: int) -> int:
        """Number of grid steps that spend at most ``nfe`` net calls."""
        steps = int(nfe) // self.nfe_per_step
        if steps < 1:
            raise ValueError(f"nfe={nfe} is too small for solver {self.name!r}: it needs at least {self.nfe_per_step}")
        return steps

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> Any:
        """State carried across steps (multistep history, FSAL cache). ``grid`` is the float64 time grid."""
        return None

    def step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: torch.Tensor | None
    ) -> StepResult:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pieces for subclasses
    def coef(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A float64 time coefficient (scalar or (B,)) cast to x's dtype and broadcast against x."""
        return append_dims(v.to(device=x.device, dtype=x.dtype), x.ndim)

    def ode_velocity(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Prediction]:
        r"""Probability-flow velocity :math:`f x - \tfrac12 g^2 \nabla\log p_t` (one net call) and the prediction."""
        pred = self.den.predict(x, t)
        s = self.coef(self.sde.sigma(t), x)
        score = -pred.eps / s
        return self.sde.probability_flow_drift(x, t, score), pred

    def reverse_sde_drift(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, Prediction]:
        r"""Reverse-SDE drift :math:`f x - g^2 \nabla\log p_t` (one net call) and the prediction."""
        pred = self.den.predict(x, t)
        s = self.coef(self.sde.sigma(t), x)
        return self.sde.reverse_drift(x, t, -pred.eps / s), pred

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.opts.items())
        return f"{type(self).__name__}({opts})"


def check_unit_interval(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
