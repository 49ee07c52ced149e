r"""One model contract: a net and a Gaussian path, converted through ONE table.

With :math:`x_t = a x_0 + s\varepsilon`, a net predicting any of the four targets determines the pair
:math:`(\hat x_0, \hat\varepsilon)` and hence all the others:

=========  =====================================================  ==============================================
target     :math:`\hat x_0`                                         :math:`\hat\varepsilon`
=========  =====================================================  ==============================================
eps        :math:`(x - s\,\hat\varepsilon)/a`                      net output
x0         net output                                              :math:`(x - a\hat x_0)/s`
score      :math:`(x + s^2 \hat{\nabla})/a`                        :math:`-s\,\hat\nabla`
v          :math:`\hat a\,x/r - \hat s\,\hat v`                    :math:`\hat s\,x/r + \hat a\,\hat v`
=========  =====================================================  ==============================================

with :math:`r = \sqrt{a^2 + s^2}`, :math:`\hat a = a/r`, :math:`\hat s = s/r`. The *velocity* v is Salimans & Ho's
(2022) :math:`v = \hat a\,\varepsilon - \hat s\,x_0`, the derivative of the rescaled path :math:`x_t/r = \hat a x_0 +
\hat s\varepsilon` with respect to its angle :math:`\phi = \operatorname{atan}(s/a)`. For VP paths r = 1 and this is
exactly their v; for VE paths (a = 1) it is :math:`(\varepsilon - \sigma x_0)/\sqrt{1+\sigma^2}`, the EDM "F" target
with sigma_data = 1 up to sign; for sub-VP it is the same angle construction. The score is
:math:`\nabla\log p_t(x) = -\hat\varepsilon / s` (Tweedie / Vincent 2011).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._utils import TimeLike, append_dims, as_time, batch_time, check_choice, check_time
from .sdes import GaussianSDE

__all__ = ["Denoiser", "Prediction", "PREDICTIONS", "convert"]

PREDICTIONS = ("eps", "x0", "v", "score")


class Prediction(NamedTuple):
    """The denoiser's two canonical outputs at (x, t): the data estimate and the noise estimate."""

    x0: torch.Tensor
    eps: torch.Tensor


def _scales(a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = torch.sqrt(a * a + s * s)
    return a / r, s / r, r


def _from_eps(out, x, a, s):
    return Prediction((x - s * out) / a, out)


def _from_x0(out, x, a, s):
    return Prediction(out, (x - a * out) / s)


def _from_score(out, x, a, s):
    return Prediction((x + s * s * out) / a, -s * out)


def _from_v(out, x, a, s):
    ah, sh, r = _scales(a, s)
    xr = x / r
    return Prediction(ah * xr - sh * out, sh * xr + ah * out)


_TABLE: dict[str, Callable[..., Prediction]] = {"eps": _from_eps, "x0": _from_x0, "score": _from_score, "v": _from_v}


def _to_target(pred: Prediction, target: str, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if target == "eps":
        return pred.eps
    if target == "x0":
        return pred.x0
    if target == "score":
        return -pred.eps / s
    ah, sh, _ = _scales(a, s)
    return ah * pred.eps - sh * pred.x0


def convert(
    out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, source: str, target: str
) -> torch.Tensor:
    """Convert a prediction ``out`` of type ``source`` at x_t = a x0 + s eps into type ``target``.

    ``a`` and ``s`` broadcast against x (use :func:`sdeflow._utils.append_dims`).
    """
    check_choice("source", source, PREDICTIONS)
    check_choice("target", target, PREDICTIONS)
    return _to_target(_TABLE[source](out, x, a, s), target, a, s)


class Denoiser:
    r"""A net plus a Gaussian path: every prediction type, one net call each, with an NFE counter.

    Args:
        net: any callable ``net(x, t, **kwargs) -> tensor like x`` (an ``nn.Module`` or a plain function).
        sde: the :class:`~sdeflow.sdes.GaussianSDE` the net was trained on.
        prediction: what the net outputs: ``"eps" | "x0" | "v" | "score"`` (see the module table).
        time_input: how the net sees time: ``"t"`` (continuous t, shape (batch,)), ``"index"`` (discrete models:
            ``t*N - 1`` for a :class:`~sdeflow.sdes.DiscreteVPSDE` with N steps, so DDPM/diffusers nets work
            unchanged), or a callable mapping the float t tensor to the net's time argument.

    ``nfe`` counts net calls; a batched call counts once. Methods take x of shape (batch, *data_shape) and t scalar or
    (batch,).
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        sde: GaussianSDE,
        prediction: str = "eps",
        time_input: str | Callable[[torch.Tensor], torch.Tensor] = "t",
    ) -> None:
        if not callable(net):
            raise TypeError(f"net must be callable net(x, t), got {type(net).__name__}")
        if not isinstance(sde, GaussianSDE):
            raise TypeError(f"sde must be a GaussianSDE, got {type(sde).__name__}")
        check_choice("prediction", prediction, PREDICTIONS)
        if isinstance(time_input, str):
            check_choice("time_input", time_input, ["t", "index"])
            if time_input == "index" and not hasattr(sde, "N"):
                raise ValueError('time_input="index" needs a discrete SDE with N steps (DiscreteVPSDE)')
        elif not callable(time_input):
            raise ValueError('time_input must be "t", "index" or a callable')
        self.net, self.sde, self.prediction, self.time_input = net, sde, prediction, time_input
        self.nfe = 0

    def reset_nfe(self) -> None:
        """Set the net-call counter back to zero."""
        self.nfe = 0

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time argument the net receives for float time t."""
        if self.time_input == "t":
            return t
        if self.time_input == "index":
            return t * self.sde.N - 1
        return self.time_input(t)

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        """One counted net call, returning the net's own output (of type ``self.prediction``)."""
        t = as_time(t, x)
        check_time(t, self.sde.T)  # also when no conversion (hence no sde.alpha call) follows; CPU only, no sync
        tb = batch_time(t, x)
        out = self.net(x, self.net_time(tb), **kwargs)
        self.nfe += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"net output must be a tensor of the input's shape {tuple(x.shape)}, got {shape}")
        return out

    def coefficients(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(a(t), s(t)) cast to x's dtype and broadcast against x."""
        t = as_time(t, x)
        a = append_dims(self.sde.alpha(t).to(device=x.device, dtype=x.dtype), x.ndim)
        s = append_dims(self.sde.sigma(t).to(device=x.device, dtype=x.dtype), x.ndim)
        return a, s

    def predict(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> Prediction:
        """(x0_hat, eps_hat) from ONE net call."""
        out = self.raw(x, t, **kwargs)
        a, s = self.coefficients(x, t)
        return _TABLE[self.prediction](out, x, a, s)

    def _target(self, x: torch.Tensor, t: TimeLike, target: str, **kwargs: Any) -> torch.Tensor:
        out = self.raw(x, t, **kwargs)
        if target == self.prediction:
            return out
        a, s = self.coefficients(x, t)
        return _to_target(_TABLE[self.prediction](out, x, a, s), target, a, s)

    def eps(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        """Noise prediction eps_hat(x, t)."""
        return self._target(x, t, "eps", **kwargs)

    def x0(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        """Data prediction x0_hat(x, t) = E[x0 | x_t = x] for a perfect model (Tweedie)."""
        return self._target(x, t, "x0", **kwargs)

    def score(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        """Score estimate grad_x log p_t(x) = -eps_hat / s(t)."""
        return self._target(x, t, "score", **kwargs)

    def v(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        """Velocity prediction (module docstring)."""
        return self._target(x, t, "v", **kwargs)

    def __repr__(self) -> str:
        return f"Denoiser(prediction={self.prediction!r}, sde={self.sde!r}, nfe={self.nfe})"
