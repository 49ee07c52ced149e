"""Parallel-in-time sampling (ParaDiGMS, Shih et al. 2023): the public home of the Picard driver, which lives in
:mod:`sdeflow.solvers.picard` beside the steppers it wraps (see that module for the method)."""

from __future__ import annotations

from .solvers.picard import (
    AUTO_MAX_WINDOW,
    AutoWindow,
    Parallel,
    choose_window,
    measure_call_costs,
    picard_solve,
    prior_overhead,
    step_noise_variance,
    window_evaluator,
)

__all__ = [
    "AUTO_MAX_WINDOW",
    "AutoWindow",
    "Parallel",
    "choose_window",
    "measure_call_costs",
    "picard_solve",
    "prior_overhead",
    "step_noise_variance",
    "window_evaluator",
]
