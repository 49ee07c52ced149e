"""Carried state shared by the steppers and the drivers that batch them (kept apart from :mod:`.base` so that the
window evaluators can use it without importing the stepper types)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GridCoefficients", "HeunCoefficients", "memo_per_grid"]

_MEMO: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = weakref.WeakKeyDictionary()
_MEMO_MAX = 256


def memo_per_grid(owner: Any, key: tuple, grid: torch.Tensor, build: Callable[[], Any]) -> Any:
    """``build()`` once per (owner, key, grid values): a fixed grid's coefficients are computed once, also across
    ``sample()`` calls that sample batch after batch on the same grid. ``owner`` (the denoiser) holds the memo weakly."""
    try:
        table = _MEMO.setdefault(owner, {})
    except TypeError:  # not weakly referenceable: no memo
        return build()
    k = (*key, tuple(grid.detach().cpu().tolist()))
    hit = table.get(k)
    if hit is None:
        if len(table) >= _MEMO_MAX:
            table.clear()
        hit = table[k] = build()
    return hit


@dataclass(frozen=True)
class GridCoefficients:
    """The state of a single stepper on a fixed grid: every step's coefficients, computed once per grid in float64
    (python floats), and the index of the next step. It changes the cost of a step, never its result: the same step
    without it (:meth:`SingleStepper.single_step`) gives the same state up to rounding."""

    coefs: tuple[tuple[float, ...], ...]
    i: int = 0

    def next(self) -> GridCoefficients:
        return GridCoefficients(self.coefs, self.i + 1)

    @property
    def here(self) -> tuple[float, ...]:
        return self.coefs[self.i]


@dataclass(frozen=True)
class HeunCoefficients(GridCoefficients):
    """EDM Heun's :class:`GridCoefficients`, and whether the grid's last step is an Euler step: it ends where
    sigma = s/a = 0, where the Heun correction is undefined (Karras et al. 2022, Algorithm 1, line 6)."""

    euler_last: bool = False

    def next(self) -> HeunCoefficients:
        return HeunCoefficients(self.coefs, self.i + 1, self.euler_last)

    def at(self, i: int) -> HeunCoefficients:
        """The state of step i on the same grid."""
        return HeunCoefficients(self.coefs, i, self.euler_last)
