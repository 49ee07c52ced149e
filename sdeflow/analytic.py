r"""Exact oracle: a Gaussian mixture and its exact diffusion marginals, scores and denoisers.

For data :math:`x_0 \sim \sum_k w_k N(\mu_k, \mathrm{diag}(\sigma_k^2))` and any Gaussian path
:math:`x_t = a x_0 + s\varepsilon`, the marginal is again a mixture,

.. math:: p_t(x) = \sum_k w_k\, N\big(x;\ a\mu_k,\ \mathrm{diag}(a^2\sigma_k^2 + s^2)\big),

with responsibilities :math:`r_k(x) = \mathrm{softmax}_k(\log w_k + \log N_k(x))` (log-sum-exp, stable far from every
mean), exact score :math:`\nabla\log p_t = -\sum_k r_k (x - a\mu_k)/v_k`, and exact posterior mean
(Tweedie) :math:`E[x_0|x_t] = \sum_k r_k (\mu_k + a\sigma_k^2 (x - a\mu_k)/v_k)`. Tests and benchmarks use it to
measure solver error with no model error at all.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ._utils import TimeLike, append_dims, as_time
from .denoiser import Denoiser
from .sdes import GaussianSDE

__all__ = ["GaussianMixture"]


def _float64(name: str, value: Any) -> torch.Tensor:
    """A real float64 tensor from ``value``, or TypeError naming the argument."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be a tensor or a (nested) sequence of real numbers, got {value!r}")
    if isinstance(value, torch.Tensor) and (value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
    if isinstance(value, complex):
        raise TypeError(f"{name} must be real, got {value!r}")
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor or a (nested) sequence of real numbers ({err})") from err


class GaussianMixture:
    """A mixture of K diagonal Gaussians in d dimensions (the tests' and benchmarks' oracle).

    Args:
        means: (K, d) component means.
        stds: (K,) isotropic or (K, d) diagonal standard deviations, all > 0.
        weights: (K,) non-negative, summing to 1. Defaults to uniform.

    Data passed in may have any shape (batch, *data_shape) with prod(data_shape) = d.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | float,
        weights: torch.Tensor | None = None,
    ) -> None:
        means = _float64("means", means)
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d) with K, d >= 1, got {tuple(means.shape)}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        K, d = means.shape
        stds = _float64("stds", stds)
        if stds.ndim == 0:
            stds = stds.expand(K)
        if stds.shape == (K,):
            stds = stds[:, None].expand(K, d)
        if stds.shape != (K, d):
            raise ValueError(f"stds must have shape (K,) = ({K},) or (K, d) = ({K}, {d}), got {tuple(stds.shape)}")
        if not bool((stds > 0).all()) or not bool(torch.isfinite(stds).all()):
            raise ValueError("stds must be positive and finite")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = _float64("weights", weights)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape (K,) = ({K},), got {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError(f"weights must be finite, got {weights.tolist()}")
        if bool((weights < 0).any()):
            raise ValueError(f"weights must be non-negative, got {weights.tolist()}")
        if abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got sum {float(weights.sum())}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        self.means, self.stds, self.weights = means, stds.contiguous(), weights
        self.K, self.d = K, d

    # ------------------------------------------------------------------ sampling and densities
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """n samples of shape (n, d)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        gdev = generator.device if generator is not None else (device or "cpu")
        if n == 0:  # torch.multinomial rejects n = 0
            return torch.empty(0, self.d, dtype=dtype, device=device if device is not None else gdev)
        k = torch.multinomial(self.weights.to(gdev), n, replacement=True, generator=generator)
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64, device=gdev)
        x = self.means.to(gdev)[k] + self.stds.to(gdev)[k] * z
        return x.to(dtype=dtype, device=device if device is not None else gdev)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():  # an integer x would cast the means and stds to integers
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.d:
            raise ValueError(
                f"x must have shape (batch, *data_shape) with {self.d} values per sample, got {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.d)

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt, dev = x.dtype, x.device
        return self.means.to(dev, dt), self.stds.to(dev, dt), self.weights.to(dev, dt)

    def _components(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
        """x (B, d); a, s scalar or (B,). Returns logits (B, K), diff (B, K, d), var (B or 1, K, d)."""
        mu, sd, w = self._params(x)
        a = a.to(dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        s = s.to(dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        var = a * a * sd[None] ** 2 + s * s
        diff = x[:, None, :] - a * mu[None]
        logn = -0.5 * (diff * diff / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1)
        return torch.log(w)[None] + logn, diff, var

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log p_0(x0) of the mixture itself, shape (batch,)."""
        xf = self._flat(x0)
        one = torch.ones((), dtype=x0.dtype, device=x0.device)
        logits, _, _ = self._components(xf, one, 0 * one)
        return torch.logsumexp(logits, dim=1)

    def _as(self, x: torch.Tensor, t: TimeLike, sde: GaussianSDE):
        xf = self._flat(x)
        if not isinstance(sde, GaussianSDE):
            raise TypeError(f"sde must be a GaussianSDE, got {type(sde).__name__}")
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            t = as_time(t, x)  # a python number: a float64 time on x's device
        a, s = sde.alpha(t), sde.sigma(t)  # validates t (type, finite, in [0, T])
        if a.ndim != 0 and a.shape != (xf.shape[0],):
            raise ValueError(f"t must be a scalar or have shape (batch,) = ({xf.shape[0]},), got {tuple(a.shape)}")
        return xf, a, s

    def marginal_log_prob(self, x: torch.Tensor, t: TimeLike, sde: GaussianSDE) -> torch.Tensor:
        """log p_t(x) of the diffused mixture under ``sde``, shape (batch,)."""
        xf, a, s = self._as(x, t, sde)
        logits, _, _ = self._components(xf, a, s)
        return torch.logsumexp(logits, dim=1)

    def _eps_x0(
        self, x: torch.Tensor, t: TimeLike, sde: GaussianSDE
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eps, x0, score) predictions; the score is -sum_k r_k (x - a mu_k)/v_k, finite at s = 0 where -eps/s is
        0/0."""
        xf, a, s = self._as(x, t, sde)
        logits, diff, var = self._components(xf, a, s)
        # softmax written out (torch.softmax's thread pool costs ~ms per call on small CPU batches); the max is
        # subtracted first so that far from every mean (logits ~ -1e6) float32 keeps the logits' differences exact
        z = logits - logits.amax(dim=1, keepdim=True)
        r = torch.exp(z - torch.logsumexp(z, dim=1, keepdim=True))[..., None]
        mu, sd, _ = self._params(xf)
        ab = a.to(dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        sb = s.to(dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        rdv = r * diff / var
        eps = (sb * rdv).sum(1)
        x0 = (r * mu[None] + ab * sd[None] ** 2 * rdv).sum(1)
        return eps.reshape(x.shape), x0.reshape(x.shape), -rdv.sum(1).reshape(x.shape)

    def score(self, x: torch.Tensor, t: TimeLike, sde: GaussianSDE) -> torch.Tensor:
        """Exact score grad_x log p_t(x), shape like x."""
        return self._eps_x0(x, t, sde)[2]

    def eps(self, x: torch.Tensor, t: TimeLike, sde: GaussianSDE) -> torch.Tensor:
        """Exact noise prediction E[eps | x_t = x] = -s(t) score."""
        return self._eps_x0(x, t, sde)[0]

    def x0(self, x: torch.Tensor, t: TimeLike, sde: GaussianSDE) -> torch.Tensor:
        """Exact posterior mean E[x0 | x_t = x]."""
        return self._eps_x0(x, t, sde)[1]

    def denoiser(self, sde: GaussianSDE, prediction: str = "eps") -> Denoiser:
        """A :class:`Denoiser` with exact predictions (the net returns the exact ``prediction`` target)."""
        from .denoiser import convert

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = self.eps(x, t, sde)
            if prediction == "eps":
                return eps
            tt = as_time(t, x)
            a = append_dims(sde.alpha(tt).to(dtype=x.dtype, device=x.device), x.ndim)
            s = append_dims(sde.sigma(tt).to(dtype=x.dtype, device=x.device), x.ndim)
            return convert(eps, x, a, s, "eps", prediction)

        return Denoiser(net, sde, prediction=prediction)

    def mean(self) -> torch.Tensor:
        """Mixture mean (d,)."""
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        """Mixture covariance (d, d)."""
        m = self.mean()
        second = (
            self.weights[:, None, None]
            * (torch.diag_embed(self.stds**2) + self.means[:, :, None] * self.means[:, None, :])
        ).sum(0)
        return second - m[:, None] * m[None, :]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, d={self.d})"
