r"""EDM / k-diffusion denoisers :math:`D(x;\sigma)` as sdeflow Denoisers (Karras et al. 2022).

EDM's networks (``VPPrecond``, ``VEPrecond``, ``EDMPrecond`` of NVlabs/edm) and k-diffusion's ``Denoiser`` wrappers
are called as ``net(x, sigma, class_labels)`` on the variance-exploding path :math:`x = x_0 + \sigma\varepsilon`
and return the denoised image :math:`D(x;\sigma) \approx E[x_0 | x]`. That is sdeflow's ``prediction="x0"`` on
:class:`~sdeflow.sdes.EDMPath` (a = 1, s = t: sdeflow's time is sigma, from sigma_max down to sigma_min or 0), the
net receiving t = sigma as its time argument, so every sdeflow solver runs on the model and EDM's grids are sdeflow
grids (the Karras rho = 7 ramp is ``grid="karras"``; k-diffusion's sigmas, final 0 included, are a tensor grid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..denoiser import Denoiser
from ..sdes import EDMPath

__all__ = ["from_edm", "EDMNet"]


class EDMNet:
    """``net(x, sigma, class_labels)`` as a sdeflow net ``(x, sigma, y=None, **kwargs)``; labels bound with
    ``class_labels=`` go to every call (one-hot or integer, as the network expects) as the third positional argument;
    without labels the net is called ``net(x, sigma, **kwargs)`` (k-diffusion's ``Denoiser`` takes its conditioning
    as keywords: pass them per call)."""

    def __init__(self, net: Callable[..., Any], class_labels: torch.Tensor | None = None) -> None:
        if not callable(net):
            raise TypeError(f"net must be callable net(x, sigma, class_labels), got {type(net).__name__}")
        self.net, self.class_labels = net, class_labels

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> Any:
        labels = y if y is not None else kwargs.pop("class_labels", self.class_labels)
        if labels is None:  # unconditional: net(x, sigma) suits EDM's Precond and k-diffusion's Denoiser alike
            return self.net(x, sigma, **kwargs)
        return self.net(x, sigma, labels, **kwargs)


def from_edm(
    net: Callable[..., Any],
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    *,
    class_labels: torch.Tensor | None = None,
) -> Denoiser:
    r"""A :class:`~sdeflow.Denoiser` for an EDM / k-diffusion denoiser ``net(x, sigma, class_labels) -> D(x; sigma)``.

    Args:
        net: the preconditioned network (EDM's ``*Precond`` modules, k-diffusion's ``Denoiser``), called with x,
            sigma of shape (batch,) and the class labels (None for unconditional models).
        sigma_min, sigma_max: the noise range (EDM's defaults 0.002 and 80): the path is
            ``EDMPath(sigma_min, sigma_max)``, T = sigma_max, ``sde.eps`` = sigma_min (the default final time).
        class_labels: labels passed to every call (or pass ``y=`` / ``class_labels=`` per call).

    EDM's Algorithm 1 is ``sf.sample(den, "heun", grid=sigmas)`` with ``sigmas`` the rho = 7 ramp from sigma_max to
    sigma_min followed by 0 (k-diffusion's ``get_sigmas_karras``), as a float64 tensor.
    """
    return Denoiser(EDMNet(net, class_labels), EDMPath(sigma_min, sigma_max), "x0", time_input="t")
