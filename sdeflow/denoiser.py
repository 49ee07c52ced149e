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
flow       :math:`(s'x - s\hat u)/D`                               :math:`(a\hat u - a'x)/D`
=========  =====================================================  ==============================================

with :math:`r = \sqrt{a^2 + s^2}`, :math:`\hat a = a/r`, :math:`\hat s = s/r`, and for the flow row
:math:`D = a s' - s a'` (the determinant of the 2x2 system :math:`x = a x_0 + s\varepsilon`,
:math:`u = a' x_0 + s'\varepsilon`; :math:`D = -a s\,\lambda'(t) > 0`). The *velocity* v is Salimans & Ho's
(2022) :math:`v = \hat a\,\varepsilon - \hat s\,x_0`, the derivative of the rescaled path :math:`x_t/r = \hat a x_0 +
\hat s\varepsilon` with respect to its angle :math:`\phi = \operatorname{atan}(s/a)`. For VP paths r = 1 and this is
exactly their v; for VE paths (a = 1) it is :math:`(\varepsilon - \sigma x_0)/\sqrt{1+\sigma^2}`, the EDM "F" target
with sigma_data = 1 up to sign; for sub-VP it is the same angle construction. The score is
:math:`\nabla\log p_t(x) = -\hat\varepsilon / s` (Tweedie / Vincent 2011).

The *flow* target is the velocity of the path in sdeflow's own time, :math:`u = a'(t) x_0 + s'(t)\varepsilon =
\mathrm{d}x_t/\mathrm{d}t` (flow matching, Lipman et al. 2023; rectified flow, Liu et al. 2023); on
:class:`~sdeflow.sdes.FlowMatchingPath` (a = 1 - t, s = t) it is :math:`\varepsilon - x_0`, what SD3 / Flux
predict, and the table reads :math:`\hat x_0 = x - t\hat u`, :math:`\hat\varepsilon = x + (1-t)\hat u`. It is the
only row that needs the path's derivatives (:meth:`GaussianSDE.d_alpha`, :meth:`GaussianSDE.d_sigma`).

diffusers' names are accepted as aliases (:data:`ALIASES`): ``"epsilon"``, ``"sample"``, ``"v_prediction"``,
``"flow_prediction"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

import torch

from ._utils import TimeLike, append_dims, as_time, batch_time, check_choice, check_time
from .sdes import GaussianSDE

__all__ = ["Denoiser", "Prediction", "PREDICTIONS", "ALL_PREDICTIONS", "ALIASES", "canonical_prediction", "convert"]

#: the targets that convert into each other from (a, s) alone
PREDICTIONS = ("eps", "x0", "v", "score")
#: every target a Denoiser accepts: PREDICTIONS plus "flow", which also needs the derivatives (a', s')
ALL_PREDICTIONS = (*PREDICTIONS, "flow")
#: other libraries' names for the same targets (diffusers' ``prediction_type``)
ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}


def canonical_prediction(prediction: str, name: str = "prediction") -> str:
    """sdeflow's name of a prediction type given in sdeflow's or diffusers' spelling (ValueError otherwise)."""
    if isinstance(prediction, str) and prediction in ALIASES:
        return ALIASES[prediction]
    check_choice(name, prediction, list(ALL_PREDICTIONS) + list(ALIASES))
    return prediction


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


def _from_flow(out, x, a, s, da=None, ds=None):
    if da is None or ds is None:
        raise ValueError(
            "flow predictions need the path's derivatives a'(t), s'(t): call Denoiser.predict, or convert(..., da=, ds=)"
        )
    det = a * ds - s * da
    return Prediction((ds * x - s * out) / det, (a * out - da * x) / det)


#: prediction type -> ``f(out, x, a, s) -> Prediction``: the conversion table (flow needs the derivatives, see convert)
CONVERSIONS: dict[str, Callable[..., Prediction]] = {
    "eps": _from_eps,
    "x0": _from_x0,
    "score": _from_score,
    "v": _from_v,
    "flow": _from_flow,
}


def to_target(
    pred: Prediction,
    target: str,
    a: torch.Tensor,
    s: torch.Tensor,
    da: torch.Tensor | None = None,
    ds: torch.Tensor | None = None,
) -> torch.Tensor:
    if target == "flow":
        if da is None or ds is None:
            raise ValueError("the flow target needs the path's derivatives a'(t), s'(t): pass da= and ds=")
        return da * pred.x0 + ds * pred.eps
    if target == "eps":
        return pred.eps
    if target == "x0":
        return pred.x0
    if target == "score":
        return -pred.eps / s
    ah, sh, _ = _scales(a, s)
    return ah * pred.eps - sh * pred.x0


def convert(
    out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    source: str,
    target: str,
    *,
    da: torch.Tensor | None = None,
    ds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convert a prediction ``out`` of type ``source`` at x_t = a x0 + s eps into type ``target``.

    ``a`` and ``s`` (and, for ``"flow"``, the derivatives ``da`` = a'(t), ``ds`` = s'(t)) broadcast against x (use
    :func:`sdeflow._utils.append_dims`). diffusers' names (:data:`ALIASES`) are accepted.
    """
    source = canonical_prediction(source, "source")
    target = canonical_prediction(target, "target")
    if source == "flow":
        pred = _from_flow(out, x, a, s, da, ds)
    else:
        pred = CONVERSIONS[source](out, x, a, s)
    return to_target(pred, target, a, s, da, ds)


def _unwrap(out: Any) -> Any:
    """The tensor inside a model output: diffusers' ``UNet2DOutput``-style objects (``.sample``) and ``return_dict=
    False`` tuples (first element); anything else unchanged."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


class Denoiser:
    r"""A net plus a Gaussian path: every prediction type, one net call each, with an NFE counter.

    Args:
        net: any callable ``net(x, t, **kwargs)`` returning a tensor like x, or an object with a ``.sample`` tensor
            (diffusers' model outputs), or a tuple whose first element is that tensor (``return_dict=False``).
        sde: the :class:`~sdeflow.sdes.GaussianSDE` the net was trained on.
        prediction: what the net outputs: ``"eps" | "x0" | "v" | "score" | "flow"`` (ALL_PREDICTIONS) (see the module table), or
            diffusers' names ``"epsilon" | "sample" | "v_prediction" | "flow_prediction"``.
        time_input: how the net sees time: ``"t"`` (continuous t, shape (batch,)), ``"index"`` (discrete models:
            ``t*N - 1`` for a :class:`~sdeflow.sdes.DiscreteVPSDE` with N steps, so DDPM/diffusers nets work
            unchanged), or a callable mapping the float t tensor to the net's time argument.
        learned_variance: the net returns 2C channels for C data channels (improved DDPM's learned variance,
            Nichol & Dhariwal 2021; diffusers' ``variance_type="learned_range"``): the first C are the prediction,
            the rest is ignored (as diffusers' schedulers do).

    ``nfe`` counts net calls; a batched call counts once. Methods take x of shape (batch, *data_shape) and t scalar or
    (batch,).
    """

    def __init__(
        self,
        net: Callable[..., Any],
        sde: GaussianSDE,
        prediction: str = "eps",
        time_input: str | Callable[[torch.Tensor], torch.Tensor] = "t",
        *,
        learned_variance: bool = False,
    ) -> None:
        if not callable(net):
            raise TypeError(f"net must be callable net(x, t), got {type(net).__name__}")
        if not isinstance(sde, GaussianSDE):
            raise TypeError(f"sde must be a GaussianSDE, got {type(sde).__name__}")
        prediction = canonical_prediction(prediction)
        if isinstance(time_input, str):
            check_choice("time_input", time_input, ["t", "index"])
            if time_input == "index" and not hasattr(sde, "N"):
                raise ValueError('time_input="index" needs a discrete SDE with N steps (DiscreteVPSDE)')
        elif not callable(time_input):
            raise ValueError('time_input must be "t", "index" or a callable')
        if not isinstance(learned_variance, bool):
            raise ValueError(f"learned_variance must be True or False, got {learned_variance!r}")
        self.net, self.sde, self.prediction, self.time_input = net, sde, prediction, time_input
        self.learned_variance = learned_variance
        self.nfe = 0
        # net times of scalar CPU grid times, per (t, dtype, device): a sampling loop maps each grid time once
        self._net_times: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}

    def reset_nfe(self) -> None:
        """Set the net-call counter back to zero."""
        self.nfe = 0

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time argument the net receives for float time t."""
        if self.time_input == "t":
            return t
        if self.time_input == "index":
            return t * cast(int, self.sde.N) - 1  # type: ignore[attr-defined]  # checked in __init__
        return cast(Callable[[torch.Tensor], torch.Tensor], self.time_input)(t)

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        """One counted net call, returning the net's own output (of type ``self.prediction``)."""
        t = as_time(t, x)
        check_time(t, self.sde.T)  # also when no conversion (hence no sde.alpha call) follows; CPU only, no sync
        if t.ndim == 0 and t.device.type == "cpu" and not t.requires_grad:  # a grid time: its net time once
            key = (float(t), x.dtype, x.device)
            nt = self._net_times.get(key)
            if nt is None:
                if len(self._net_times) > 4096:
                    self._net_times.clear()
                nt = self.net_time(t.to(x.dtype).reshape(1)).to(x.device)
                self._net_times[key] = nt
            tb = nt.expand(x.shape[0])
        else:
            tb = self.net_time(batch_time(t, x))
        out = _unwrap(self.net(x, tb, **kwargs))
        self.nfe += 1
        if (
            self.learned_variance
            and isinstance(out, torch.Tensor)
            and out.ndim == x.ndim >= 2
            and out.shape[1] == 2 * x.shape[1]
            and out.shape[2:] == x.shape[2:]
        ):
            out = out[:, : x.shape[1]]
        if isinstance(out, torch.Tensor) and out.dtype != x.dtype and out.is_floating_point():
            out = out.to(x.dtype)  # a net in another precision (autocast, half weights): results in the samples' dtype
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            hint = ""
            if isinstance(out, torch.Tensor) and out.ndim == x.ndim >= 2 and out.shape[1] == 2 * x.shape[1]:
                hint = " (2C channels: a learned-variance net? pass learned_variance=True)"
            raise ValueError(f"net output must be a tensor of the input's shape {tuple(x.shape)}, got {shape}{hint}")
        return out

    def coefficients(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(a(t), s(t)) cast to x's dtype and broadcast against x."""
        t = as_time(t, x)
        a = append_dims(self.sde.alpha(t).to(device=x.device, dtype=x.dtype), x.ndim)
        s = append_dims(self.sde.sigma(t).to(device=x.device, dtype=x.dtype), x.ndim)
        return a, s

    def derivatives(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(a'(t), s'(t)) cast to x's dtype and broadcast against x (the flow row of the table needs them)."""
        t = as_time(t, x)
        da = append_dims(self.sde.d_alpha(t).to(device=x.device, dtype=x.dtype), x.ndim)
        ds = append_dims(self.sde.d_sigma(t).to(device=x.device, dtype=x.dtype), x.ndim)
        return da, ds

    def predict(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> Prediction:
        """(x0_hat, eps_hat) from ONE net call."""
        out = self.raw(x, t, **kwargs)
        a, s = self.coefficients(x, t)
        if self.prediction == "flow":
            return _from_flow(out, x, a, s, *self.derivatives(x, t))
        return CONVERSIONS[self.prediction](out, x, a, s)

    def _target(self, x: torch.Tensor, t: TimeLike, target: str, **kwargs: Any) -> torch.Tensor:
        out = self.raw(x, t, **kwargs)
        if target == self.prediction:
            return out
        a, s = self.coefficients(x, t)
        if self.prediction == "flow" or target == "flow":
            da, ds = self.derivatives(x, t)
            pred = (
                _from_flow(out, x, a, s, da, ds)
                if self.prediction == "flow"
                else CONVERSIONS[self.prediction](out, x, a, s)
            )
            return to_target(pred, target, a, s, da, ds)
        return to_target(CONVERSIONS[self.prediction](out, x, a, s), target, a, s)

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

    def flow(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        """Flow-matching velocity u = a'(t) x0_hat + s'(t) eps_hat (module docstring)."""
        return self._target(x, t, "flow", **kwargs)

    def __repr__(self) -> str:
        return f"Denoiser(prediction={self.prediction!r}, sde={self.sde!r}, nfe={self.nfe})"

    @contextmanager
    def rows(self, index: torch.Tensor) -> Iterator[None]:
        """Within the block the calls are for the rows ``index`` of the batch (a driver stepping a subset of the
        samples, e.g. per-sample adaptive stepping): per-sample inputs bound to the denoiser are sliced to them. The
        plain Denoiser holds none; :class:`BoundDenoiser` slices its keyword tensors."""
        yield

    def bind(self, **model_kwargs: Any) -> BoundDenoiser:
        """This denoiser with keyword inputs passed to the net on every call (conditioning tensors such as diffusers'
        ``encoder_hidden_states``, ``class_labels``): see :class:`BoundDenoiser`."""
        return BoundDenoiser(self, model_kwargs)


class BoundDenoiser(Denoiser):
    """A denoiser with keyword inputs bound to every net call: ``net(x, t, **model_kwargs)``.

    Tensors whose leading axis has the batch size B are per-sample: a call on a subset of the batch gets their rows
    (:meth:`Denoiser.rows`, used by the adaptive driver), and a call on k·B states stacked window-major (the Picard
    driver's batched steps) gets them repeated k times. Other values (scalars, 0-d tensors, objects, tensors without a
    batch axis such as a shared text embedding of batch 1) are passed unchanged. NFE is counted on the wrapped denoiser.
    """

    def __init__(self, base: Denoiser, model_kwargs: dict[str, Any]) -> None:
        if not isinstance(base, Denoiser):
            raise TypeError(f"base must be a sdeflow.Denoiser, got {type(base).__name__}")
        if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
            raise TypeError("model_kwargs must be a dict of keyword arguments for the net")
        self.base, self.model_kwargs = base, dict(model_kwargs)
        self.net, self.sde, self.prediction = base.net, base.sde, base.prediction
        self.time_input = base.time_input
        self.learned_variance = getattr(base, "learned_variance", False)  # wrappers may not carry it
        self._net_times = getattr(base, "_net_times", {})
        self._index: torch.Tensor | None = None
        sizes = {v.shape[0] for v in self.model_kwargs.values() if isinstance(v, torch.Tensor) and v.ndim >= 1}
        self.batch = max(sizes) if sizes else None

    @property  # the count lives on the wrapped denoiser
    def nfe(self) -> int:
        return self.base.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.base.nfe = value

    @contextmanager
    def rows(self, index: torch.Tensor) -> Iterator[None]:
        previous, self._index = self._index, index
        try:
            yield
        finally:
            self._index = previous

    def kwargs_for(self, x: torch.Tensor) -> dict[str, Any]:
        """The bound keywords for a call on x (sliced to the active rows, repeated for stacked windows)."""
        n, out = x.shape[0], {}
        for k, v in self.model_kwargs.items():
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == self.batch and self.batch != 1:
                if self._index is not None:
                    v = v[self._index.to(v.device)]
                if v.shape[0] != n:
                    if n % v.shape[0]:
                        raise ValueError(
                            f"model_kwargs[{k!r}] has {v.shape[0]} rows for a call on {n} samples: give one row per "
                            "sample of x_T"
                        )
                    v = v.repeat(n // v.shape[0], *([1] * (v.ndim - 1)))
            out[k] = v
        return out

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        return self.base.raw(x, t, **{**self.kwargs_for(x), **kwargs})

    def __repr__(self) -> str:
        return f"BoundDenoiser({self.base!r}, model_kwargs={sorted(self.model_kwargs)})"
