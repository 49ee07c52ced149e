"""Solvers: one name -> class table. A new solver is one module plus one line here."""

from __future__ import annotations

from ..parallel import Parallel
from .adaptive_sde import AdaptiveSDE
from .base import SolverError, Stepper, StepResult
from .ddim import DDIM, DDPM
from .dpm_solver import DPMSolver, DPMSolverPP
from .euler import Euler, EulerMaruyama
from .external import TorchSDE
from .heun import Heun
from .pc import PredictorCorrector
from .rk import RK45
from .unipc import UniPC

SOLVERS: dict[str, type[Stepper]] = {
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
    "parallel": Parallel,
}


def available() -> list[str]:
    """The solver names accepted by ``sdeflow.sample(solver=...)``."""
    return sorted(SOLVERS)


__all__ = ["SOLVERS", "available", "Stepper", "StepResult", "SolverError"]
