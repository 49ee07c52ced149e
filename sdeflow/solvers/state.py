"""Carried state shared by the steppers and the drivers that batch them (kept apart from :mod:`.base` so that the
window evaluators can use it without importing the stepper types)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GridCache"]


@dataclass(frozen=True)
class GridCache:
    """The state of a single stepper on a fixed grid: every step's coefficients, computed once per grid in float64
    (python floats), and the index of the next step. It changes the cost of a step, never its result: the same step
    without it (:meth:`SingleStepper.single_step`) gives the same state up to rounding."""

    coefs: tuple[tuple[float, ...], ...]
    i: int = 0

    def next(self) -> GridCache:
        return GridCache(self.coefs, self.i + 1)

    @property
    def here(self) -> tuple[float, ...]:
        return self.coefs[self.i]
