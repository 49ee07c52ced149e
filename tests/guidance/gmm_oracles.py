r"""Exact guidance oracles of a Gaussian mixture whose components are the classes (test helpers).

For :math:`x_0 \sim \sum_k w_k N(\mu_k, \mathrm{diag}(\sigma_k^2))` and the path :math:`x_t = a x_0 + s\varepsilon`,
component k diffuses to :math:`N(a\mu_k, \mathrm{diag}(v_k))`, :math:`v_k = a^2\sigma_k^2 + s^2`, so

* the exact posterior (Bayes): :math:`\log p(k\mid x_t) = \log w_k + \log N(x_t;\ a\mu_k, v_k) - \log p_t(x_t)`;
* the exact per-class noise prediction :math:`\varepsilon_k = s\,(x - a\mu_k)/v_k` (Tweedie), and the mixture's
  :math:`\sum_k p(k\mid x_t)\,\varepsilon_k`.

Written from the mixture's public parameters (``means``, ``stds``, ``weights``) alone, independently of
:class:`sdeflow.GaussianMixture`'s own marginal code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sdeflow import GaussianMixture
from sdeflow.denoiser import convert
from sdeflow.guidance import as_labels
from sdeflow.sdes import GaussianSDE


def _components(gmm: GaussianMixture, sde: GaussianSDE, x: torch.Tensor, t: torch.Tensor):
    """x (B, *shape), t scalar or (B,): logits log w_k + log N_k (B, K), diff x - a mu_k (B, K, d), v_k (B|1, K, d),
    and a, s shaped (B|1, 1, 1)."""
    p = dict(dtype=x.dtype, device=x.device)
    t = torch.as_tensor(t, **p)
    a = sde.alpha(t).to(**p).reshape(-1, 1, 1)
    s = sde.sigma(t).to(**p).reshape(-1, 1, 1)
    xf = x.reshape(x.shape[0], gmm.d)
    mu, sd, w = gmm.means.to(**p), gmm.stds.to(**p), gmm.weights.to(**p)
    var = a * a * sd[None] ** 2 + s * s
    diff = xf[:, None, :] - a * mu[None]
    logn = -0.5 * (diff * diff / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1)
    return torch.log(w)[None] + logn, diff, var, a, s


def gmm_class_logits(gmm: GaussianMixture, sde: GaussianSDE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact noise-aware classifier ``classifier(x, t) -> logits (B, K)`` (unnormalised log posterior)."""

    def classifier(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _components(gmm, sde, x, t)[0]

    return classifier


def gmm_conditional_net(gmm: GaussianMixture, sde: GaussianSDE, prediction: str = "eps") -> Callable[..., torch.Tensor]:
    """The exact class-conditional net ``net(x, t, y)``: component y's exact ``prediction`` target for y in 0..K-1,
    the whole mixture's for the null class y = K (or y=None). Has ``num_classes = K``."""

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        labels = as_labels(gmm.K if y is None else y, x)
        logits, diff, var, a, s = _components(gmm, sde, x, t)
        eps_k = s * diff / var  # (B, K, d)
        eps_mix = (torch.softmax(logits, dim=1)[..., None] * eps_k).sum(1, keepdim=True)
        table = torch.cat([eps_k, eps_mix], dim=1)  # (B, K + 1, d)
        eps = table.gather(1, labels[:, None, None].expand(-1, 1, gmm.d)).squeeze(1).reshape(x.shape)
        if prediction == "eps":
            return eps
        shape = (-1,) + (1,) * (x.ndim - 1)
        return convert(eps, x, a.reshape(shape), s.reshape(shape), "eps", prediction)

    net.num_classes = gmm.K  # type: ignore[attr-defined]
    return net
