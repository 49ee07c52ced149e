"""sdeflow: score-based diffusion models as a numerical-solver problem."""

from .analytic import GaussianMixture
from .denoiser import Denoiser, Prediction
from .sdes import VESDE, VPSDE, DiscreteVPSDE, GaussianPath, GaussianSDE, SubVPSDE

__version__ = "0.1.0"

__all__ = [
    "GaussianSDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "DiscreteVPSDE",
    "GaussianPath",
    "Denoiser",
    "Prediction",
    "GaussianMixture",
]

from . import solvers
from .integrate import solve, solve_adaptive
from .sampling import sample
from .solvers.record import SampleResult

__all__ += ["solvers", "sample", "solve", "solve_adaptive", "SampleResult"]

from .likelihood import LikelihoodResult, UniformDequantization, log_likelihood  # noqa: E402

__all__ += ["log_likelihood", "LikelihoodResult", "UniformDequantization"]

from .nets import MLPScoreNet, UNet  # noqa: E402
from .training import DenoisingScoreMatching, Trainer, load_denoiser  # noqa: E402

__all__ += ["MLPScoreNet", "UNet", "DenoisingScoreMatching", "Trainer", "load_denoiser"]

from .guidance import (  # noqa: E402
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

__all__ += [
    "ConditionalDenoiser",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "NoiseAwareClassifier",
    "ClassifierLoss",
    "train_classifier",
    "encode",
    "decode",
    "slerp",
    "interpolate",
]
