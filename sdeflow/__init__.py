"""sdeflow: score-based diffusion models as a numerical-solver problem.

The core (SDEs and paths, the Denoiser, solvers, ``sample``) is imported with the package; everything else
(likelihood, nets, training, guidance, interop, grid fitting) is imported on first use of its name (PEP 562), so that
``import sdeflow`` stays cheap next to ``import torch`` (docs/architecture.md has the measurement).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import solvers
from .analytic import GaussianMixture
from .denoiser import Denoiser, Prediction
from .integrate import solve, solve_adaptive
from .sampling import sample
from .sdes import VESDE, VPSDE, DiscreteVPSDE, EDMPath, FlowMatchingPath, GaussianPath, GaussianSDE, SubVPSDE
from .solvers.record import SampleResult

__version__ = "0.1.0"

#: public name -> the module that defines it (imported when the name is first used)
_LAZY: dict[str, str] = {
    "log_likelihood": "sdeflow.likelihood",
    "LikelihoodResult": "sdeflow.likelihood",
    "UniformDequantization": "sdeflow.likelihood",
    "MLPScoreNet": "sdeflow.nets",
    "UNet": "sdeflow.nets",
    "DenoisingScoreMatching": "sdeflow.training",
    "Trainer": "sdeflow.training",
    "load_denoiser": "sdeflow.training",
    "ConditionalDenoiser": "sdeflow.guidance",
    "ClassifierFreeGuidance": "sdeflow.guidance",
    "ConditioningGuidance": "sdeflow.guidance",
    "ClassifierGuidance": "sdeflow.guidance",
    "NoiseAwareClassifier": "sdeflow.guidance",
    "ClassifierLoss": "sdeflow.guidance",
    "train_classifier": "sdeflow.guidance",
    "encode": "sdeflow.guidance",
    "decode": "sdeflow.guidance",
    "slerp": "sdeflow.guidance",
    "interpolate": "sdeflow.guidance",
    "from_diffusers": "sdeflow.integrations",
    "from_edm": "sdeflow.integrations",
    "diffusers_grid": "sdeflow.integrations",
    "optimize_grid": "sdeflow.grid_opt",
    "fit_grid": "sdeflow.grid_opt",
    "EDMPreconditioning": "sdeflow.preconditioning",
    "edm_denoiser": "sdeflow.preconditioning",
    "EDMLoss": "sdeflow.training.losses",
    "divergence": "sdeflow.divergence",
    "DivergenceResult": "sdeflow.divergence",
    "ddpm_vlb": "sdeflow.vlb",
    "continuous_vlb": "sdeflow.vlb",
    "VLBResult": "sdeflow.vlb",
}

__all__ = [
    "VESDE",
    "VPSDE",
    "Denoiser",
    "DiscreteVPSDE",
    "EDMPath",
    "FlowMatchingPath",
    "GaussianMixture",
    "GaussianPath",
    "GaussianSDE",
    "Prediction",
    "SampleResult",
    "SubVPSDE",
    "sample",
    "solve",
    "solve_adaptive",
    "solvers",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdeflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from .divergence import DivergenceResult, divergence
    from .grid_opt import fit_grid, optimize_grid
    from .guidance import (
        ClassifierFreeGuidance,
        ClassifierGuidance,
        ClassifierLoss,
        ConditionalDenoiser,
        ConditioningGuidance,
        NoiseAwareClassifier,
        decode,
        encode,
        interpolate,
        slerp,
        train_classifier,
    )
    from .integrations import diffusers_grid, from_diffusers, from_edm
    from .likelihood import LikelihoodResult, UniformDequantization, log_likelihood
    from .nets import MLPScoreNet, UNet
    from .preconditioning import EDMPreconditioning, edm_denoiser
    from .training import DenoisingScoreMatching, Trainer, load_denoiser
    from .training.losses import EDMLoss
    from .vlb import VLBResult, continuous_vlb, ddpm_vlb
