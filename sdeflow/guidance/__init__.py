r"""Guidance: conditioning and guidance as Denoiser wrappers, a noise-aware classifier, ODE inversion.

* :mod:`.wrappers`: :class:`ConditionalDenoiser`, :class:`ClassifierFreeGuidance` (Ho & Salimans 2021),
  :class:`ClassifierGuidance` (Dhariwal & Nichol 2021): each *is* a :class:`~sdeflow.Denoiser`, so every solver takes it.
* :mod:`.classifier`: :class:`NoiseAwareClassifier` :math:`p_\phi(y\mid x_t, t)`, its :class:`ClassifierLoss` and
  :func:`train_classifier`.
* :mod:`.inversion`: :func:`encode` / :func:`decode` along the probability-flow ODE (DDIM inversion, Song, Meng &
  Ermon 2021), :func:`slerp` and :func:`interpolate` between latents.

The classifier names load on first use (they import :mod:`sdeflow.training`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .inversion import decode, encode, interpolate, slerp
from .wrappers import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    ConditionalDenoiser,
    ConditioningGuidance,
    DenoiserWrapper,
    Labels,
    as_labels,
    classifier_log_prob_grad,
    guidance_rescale,
)

__all__ = [
    "Labels",
    "as_labels",
    "DenoiserWrapper",
    "ConditionalDenoiser",
    "ClassifierFreeGuidance",
    "ConditioningGuidance",
    "guidance_rescale",
    "ClassifierGuidance",
    "classifier_log_prob_grad",
    "NoiseAwareClassifier",
    "ClassifierLoss",
    "train_classifier",
    "encode",
    "decode",
    "slerp",
    "interpolate",
]

# the classifier module subclasses the training loss, so it pulls in sdeflow.training (about 0.1 s): loaded on first use
_LAZY = {"NoiseAwareClassifier": "classifier", "ClassifierLoss": "classifier", "train_classifier": "classifier"}

if TYPE_CHECKING:
    from .classifier import ClassifierLoss, NoiseAwareClassifier, train_classifier


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
