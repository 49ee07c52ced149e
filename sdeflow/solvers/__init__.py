"""Solvers: the capability types (:mod:`.base`), one module per method, and the one name -> constructor table.

A new solver is one module plus one line in ``SOLVERS``. The table maps a name to a class, or to a small factory
where one name covers several configurations (``rk45``'s backends, ``parallel``'s base solver). This package imports
nothing above itself: the drivers (:mod:`sdeflow.integrate`) and the sampling layer (:mod:`sdeflow.sampling`) import
it, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..denoiser import Denoiser
from .adaptive_sde import AdaptiveSDE
from .base import (
    EmbeddedStepper,
    Integrator,
    MultistepStepper,
    SingleStepper,
    Solver,
    SolverError,
    Stepper,
    StepResult,
)
from .bridges import TorchSDE
from .control import PIController, Tolerances, error_norm
from .ddim import DDIM, DDPM
from .deis import DEIS
from .dpm_solver import DPMSolver, DPMSolverPP
from .dpmpp_ancestral import DPMSolverPP2SAncestral
from .dpmpp_sde import DPMSolverPPSDE
from .er_sde import ERSDE
from .euler import Euler, EulerMaruyama
from .heun import Heun
from .ipndm import IPNDM
from .lms import LMS
from .pc import PredictorCorrector
from .picard import Parallel
from .record import SampleResult
from .rk import RK45
from .sa_solver import SASolver
from .unipc import UniPC


def parallel(denoiser: Denoiser, base: str | Stepper = "ddim", **options: Any) -> Parallel:
    """``parallel``: the Picard driver around a base stepper given by name (its options among ``options``) or as
    an instance on the same denoiser."""
    own = {k: options.pop(k) for k in list(options) if k in Parallel.options}
    if isinstance(base, Stepper):
        if options:
            raise ValueError("pass base options to the base stepper's constructor, not with a stepper instance")
        stepper = base
    else:
        names = [n for n in STEPPERS if n not in ("parallel", "torchsde")]
        if not isinstance(base, str) or base not in names:
            raise ValueError(f"base={base!r} is not supported; allowed values: {', '.join(map(repr, sorted(names)))}")
        made = SOLVERS[base](denoiser, **options)
        if not isinstance(made, Stepper):
            raise ValueError(f"base={base!r} is not a fixed-grid stepper; parallel needs one")
        stepper = made
    return Parallel(denoiser, base=stepper, **own)


#: name -> the stepper class of every sdeflow-stepped method
STEPPERS: dict[str, type[Solver]] = {
    "euler": Euler,
    "ddim": DDIM,
    "ddpm": DDPM,
    "dpm_solver": DPMSolver,
    "dpm_solver++": DPMSolverPP,
    "unipc": UniPC,
    "adaptive_sde": AdaptiveSDE,
    "euler_maruyama": EulerMaruyama,
    "pc": PredictorCorrector,
    "heun": Heun,
    "rk45": RK45,
    "torchsde": TorchSDE,
    "deis": DEIS,
    "ipndm": IPNDM,
    "lms": LMS,
    "sa_solver": SASolver,
    "er_sde": ERSDE,
    "dpmpp_2s_ancestral": DPMSolverPP2SAncestral,
    "dpmpp_sde": DPMSolverPPSDE,
}

#: every name accepted by ``sdeflow.sample(solver=...)`` -> a constructor ``(denoiser, **options) -> Solver``
SOLVERS: dict[str, Callable[..., Solver]] = {**STEPPERS, "parallel": parallel}


def available() -> list[str]:
    """The solver names accepted by ``sdeflow.sample(solver=...)``."""
    return sorted(SOLVERS)


__all__ = [
    "SOLVERS",
    "STEPPERS",
    "EmbeddedStepper",
    "Integrator",
    "MultistepStepper",
    "PIController",
    "SampleResult",
    "SingleStepper",
    "Solver",
    "SolverError",
    "StepResult",
    "Stepper",
    "Tolerances",
    "available",
    "error_norm",
    "parallel",
]
