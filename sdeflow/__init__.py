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
from .sdes import VESDE, VPSDE, DiscreteVPSDE, GaussianPath, GaussianSDE, SubVPSDE
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
    "ClassifierGuidance": "sdeflow.guidance",
    "NoiseAwareClassifier": "sdeflow.guidance",
    "ClassifierLoss": "sdeflow.guidance",
    "train_classifier": "sdeflow.guidance",
    "encode": "sdeflow.guidance",
    "decode": "sdeflow.guidance",
    "slerp": "sdeflow.guidance",
    "interpolate": "sdeflow.guidance",
}

__all__ = [
    "VESDE",
    "VPSDE",
    "Denoiser",
    "DiscreteVPSDE",
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
    from .guidance import (
        ClassifierFreeGuidance,
        ClassifierGuidance,
        ClassifierLoss,
        ConditionalDenoiser,
        NoiseAwareClassifier,
        decode,
        encode,
        interpolate,
        slerp,
        train_classifier,
    )
    from .likelihood import LikelihoodResult, UniformDequantization, log_likelihood
    from .nets import MLPScoreNet, UNet
    from .training import DenoisingScoreMatching, Trainer, load_denoiser
