"""Solvers: one name -> class table. A new solver is one module plus one line here."""

from __future__ import annotations

from .base import SolverError, Stepper, StepResult
from .ddim import DDIM, DDPM
from .euler import Euler

SOLVERS: dict[str, type[Stepper]] = {
    "euler": Euler,
    "ddim": DDIM,
    "ddpm": DDPM,
}


def available() -> list[str]:
    """The solver names accepted by ``sdeflow.sample(solver=...)``."""
    return sorted(SOLVERS)


__all__ = ["SOLVERS", "available", "Stepper", "StepResult", "SolverError"]
