r"""Denoising score matching (Vincent 2011; Song & Ermon 2019; Ho et al. 2020) for eps, x0, v, score and flow nets.

For :math:`x_t = a(t) x_0 + s(t)\varepsilon` every objective here is a weighted regression of one *target space*
:math:`\mathcal S \in \{\varepsilon, x_0, v, \nabla\log p, u\}`:

.. math:: \mathcal L = \frac{1}{T-\epsilon}\int_\epsilon^T w(t)\;
          \mathbb E\,\tfrac1d\big\|\hat{\mathcal S}_\theta(x_t, t) - \mathcal S(x_0, \varepsilon, t)\big\|^2\,dt,

where :math:`\hat{\mathcal S}_\theta` is the net's output converted into :math:`\mathcal S` through the Denoiser's one
conversion table (:func:`sdeflow.denoiser.convert`), and :math:`d` the number of values per sample. Weightings:

=============  ====================  ========================  ===============================================
weighting      space                 :math:`w(t)`              reference
=============  ====================  ========================  ===============================================
``simple``     the net's own output  1                         Ho et al. 2020 (for eps: :math:`L_{simple}`)
``likelihood`` score                 :math:`g(t)^2`            Song, Durkan, Murray & Ermon 2021 (NLL bound)
``min_snr``    x0                    :math:`\min(\mathrm{SNR}, \gamma)`  Hang et al. 2023, :math:`\gamma = 5`
=============  ====================  ========================  ===============================================

``min_snr`` in x0 space reproduces Hang et al.'s per-target weights: :math:`\min(\mathrm{SNR},\gamma)/\mathrm{SNR}`
for eps, :math:`\min(\mathrm{SNR},\gamma)` for x0 and :math:`\min(\mathrm{SNR},\gamma)/(\mathrm{SNR}+1)` for v
(:math:`\mathrm{SNR} = a^2/s^2 = e^{2\lambda}`).

Flow matching (Lipman et al. 2023; Liu et al. 2023, rectified flow): a ``"flow"`` net regresses the path's velocity
:math:`u = a'(t)x_0 + s'(t)\varepsilon = \mathrm{d}x_t/\mathrm{d}t` (with ``simple``), which on
:class:`~sdeflow.sdes.FlowMatchingPath` (a = 1 - t, s = t) is :math:`\varepsilon - x_0`, the conditional
flow-matching loss :math:`\mathbb E\|\hat u_\theta(x_t, t) - (\varepsilon - x_0)\|^2` with :math:`t \sim U[\epsilon, 1]`
(T = 1 is included: every term is finite there). The other weightings convert it through the table's flow row.
With ``likelihood``, :math:`\tfrac d2 (T-\epsilon)\mathcal L` is the
score-matching term of the negative log-likelihood bound (Song, Durkan et al. 2021, Thm. 1) up to a
model-independent constant.

Time sampling. ``"uniform"``: :math:`t\sim U[\epsilon, T]`. ``"importance"``: the density
:math:`p(t)\propto g(t)^2/s(t)^2`, which makes the likelihood weight constant in eps space (Song, Durkan et al.
2021, Sec. 5). Since :math:`g^2 = \mathrm{d}s^2/\mathrm{d}t - 2 f s^2` and :math:`f = \mathrm{d}\log a/\mathrm{d}t`,
:math:`g^2/s^2 = -2\,\mathrm{d}\lambda/\mathrm{d}t`: the importance density is *uniform in log-SNR*, sampled exactly
for every SDE as :math:`t = \lambda^{-1}(u)`, :math:`u\sim U[\lambda(T), \lambda(\epsilon)]`. Each sample carries the
ratio :math:`1/((T-\epsilon)p(t)) = 2 s^2 \Delta\lambda / (g^2 (T-\epsilon))`, so every combination of weighting and
sampling estimates the same :math:`\mathcal L` without bias. Both need a finite log-SNR at :math:`t_{max}`
(and the likelihood weight :math:`g^2` is infinite where a = 0): on a path that reaches :math:`a(T) = 0` (the flow
path) their default :math:`t_{max}` is :math:`T - \epsilon`. ``stratified=True`` puts one uniform draw in each of B
equal strata of [0, 1) before the map to t (lower variance, same expectation).

:class:`EDMLoss` is the EDM objective (Karras et al. 2022): x0 space, weight
:math:`\lambda(\sigma) = (\sigma^2+\sigma_{data}^2)/(\sigma\sigma_{data})^2` of the noise level
:math:`\sigma = s/a`, and :math:`\ln\sigma \sim N(P_{mean}, P_{std}^2)` truncated to the path's range; it follows
the same draw / per_sample protocol, so the Trainer runs it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .._utils import check_choice, check_positive
from ..denoiser import ALL_PREDICTIONS, Denoiser, Prediction, convert, to_target
from ..sdes import GaussianSDE

__all__ = ["DenoisingScoreMatching", "EDMLoss", "DSMDraw", "WEIGHTINGS", "TIME_SAMPLINGS", "OBJECTIVES"]

WEIGHTINGS = ("simple", "likelihood", "min_snr")
TIME_SAMPLINGS = ("uniform", "importance")
#: the loss classes a run config can name in ``config["loss"]["objective"]`` (absent: ``"dsm"``)
OBJECTIVES = ("dsm", "edm")


def _finite_log_snr(sde: GaussianSDE, t: float) -> bool:
    return math.isfinite(float(sde.log_snr(torch.tensor(t, dtype=torch.float64))))


class DSMDraw(NamedTuple):
    """One draw of the DSM estimator: times (B,) float64, noise and x_t like x0, importance ratios (B,) float64."""

    t: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    ratio: torch.Tensor


class DenoisingScoreMatching:
    """The DSM objective (module docstring) for a net of any prediction type, weighting and time sampling.

    Args:
        sde: the Gaussian path.
        prediction: what the net outputs, ``"eps" | "x0" | "v" | "score" | "flow"`` (the velocity a' x0 + s' eps).
        weighting: ``"simple" | "likelihood" | "min_snr"``.
        time_sampling: ``"uniform"`` in [t_min, T] or ``"importance"`` (uniform in log-SNR).
        stratified: stratify the batch's uniform draws.
        t_min: smallest training time (defaults to ``sde.eps``); t_max defaults to ``sde.T`` (``T - eps`` for the
            likelihood weighting or importance sampling on a path with a(T) = 0, where the log-SNR is infinite).
        min_snr_gamma: gamma of the min-SNR weighting.
        p_uncond: probability of replacing a label by the null class (classifier-free guidance training).

    Every random draw comes from the ``generator`` passed to :meth:`draw` / :meth:`__call__`, in the order: t, noise,
    label dropout.
    """

    def __init__(
        self,
        sde: GaussianSDE,
        prediction: str = "eps",
        weighting: str = "simple",
        time_sampling: str = "uniform",
        stratified: bool = False,
        t_min: float | None = None,
        t_max: float | None = None,
        min_snr_gamma: float = 5.0,
        p_uncond: float = 0.0,
    ) -> None:
        if not isinstance(sde, GaussianSDE):
            raise TypeError(f"sde must be a GaussianSDE, got {type(sde).__name__}")
        check_choice("prediction", prediction, ALL_PREDICTIONS)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
        needs_finite_snr = weighting == "likelihood" or time_sampling == "importance"
        self.t_min = float(sde.eps if t_min is None else t_min)
        if t_max is None:  # a(T) = 0 (the flow path): lambda(T) = -inf, g(T)^2 = inf; stop eps short of T there
            t_max = sde.T - sde.eps if needs_finite_snr and not _finite_log_snr(sde, sde.T) else sde.T
        self.t_max = float(t_max)
        if not 0.0 < self.t_min < self.t_max <= sde.T:
            raise ValueError(
                f"t_min and t_max must satisfy 0 < t_min < t_max <= T={sde.T}, got {self.t_min}, {self.t_max}"
            )
        if needs_finite_snr and not _finite_log_snr(sde, self.t_max):
            what = "weighting='likelihood'" if weighting == "likelihood" else "time_sampling='importance'"
            raise ValueError(
                f"{what} needs a finite log-SNR at t_max, but the path has a(t_max) = 0 at t_max={self.t_max}: "
                f"pass t_max < {self.t_max} (the default is T - eps = {sde.T - sde.eps})"
            )
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
        self.sde, self.prediction, self.weighting = sde, prediction, weighting
        self.time_sampling, self.stratified = time_sampling, bool(stratified)
        self.min_snr_gamma, self.p_uncond = float(min_snr_gamma), float(p_uncond)
        self.space = {"simple": prediction, "likelihood": "score", "min_snr": "x0"}[weighting]
        self._lam_hi = float(sde.log_snr(self.t_min))  # lambda is decreasing: lambda(t_min) is the largest
        self._lam_lo = float(sde.log_snr(self.t_max))

    # ------------------------------------------------------------------ random draws
    def _uniform(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
        if self.stratified:
            u = (torch.arange(batch, dtype=torch.float64, device=device) + u) / batch
        return u

    def sample_time(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Times t (B,) and importance ratios 1/((T-eps) p(t)) (B,), both float64."""
        device = torch.device(device)
        u = self._uniform(batch, generator, device)
        if self.time_sampling == "uniform":
            t = self.t_min + (self.t_max - self.t_min) * u
            return t, torch.ones_like(t)
        lam = self._lam_hi + (self._lam_lo - self._lam_hi) * u
        t = self.sde.t_from_log_snr(lam).clamp(self.t_min, self.t_max)
        s2 = self.sde.sigma(t) ** 2
        ratio = 2 * s2 * (self._lam_hi - self._lam_lo) / (self.sde.g2(t) * (self.t_max - self.t_min))
        return t, ratio

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> DSMDraw:
        """Times, noise and the noised data x_t = a x0 + s noise for a batch x0 of shape (B, *data_shape)."""
        t, ratio = self.sample_time(x0.shape[0], generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return DSMDraw(t, noise, self.sde.marginal(x0, t, noise), ratio)

    def drop_labels(
        self, y: torch.Tensor | None, num_classes: int | None, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """Replace each label by the null class ``num_classes`` with probability ``p_uncond``."""
        if y is None or self.p_uncond == 0.0:
            return y
        if num_classes is None:
            raise ValueError("p_uncond > 0 needs a class-conditional net (one with a num_classes attribute)")
        drop = torch.rand(y.shape, generator=generator, dtype=torch.float64, device=y.device) < self.p_uncond
        return torch.where(drop, torch.full_like(y, num_classes), y)

    # ------------------------------------------------------------------ the objective
    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) of the weighting (module table), float64, shape of t."""
        if self.weighting == "simple":
            return torch.ones_like(t)
        if self.weighting == "likelihood":
            return self.sde.g2(t)
        snr = torch.exp(2 * self.sde.log_snr(t))
        return torch.clamp(snr, max=self.min_snr_gamma)

    def per_sample(
        self,
        net: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
        draw: DSMDraw | None = None,
        **net_kwargs: Any,
    ) -> torch.Tensor:
        """Per-sample weighted losses (B,): w(t) * ratio * mean over data dims of the squared error in the space.

        ``net`` is a net (wrapped here in a :class:`~sdeflow.denoiser.Denoiser`) or a Denoiser (its ``time_input``
        is honoured). ``draw`` fixes (t, noise, x_t) instead of drawing them from ``generator``.
        """
        den = net if isinstance(net, Denoiser) else Denoiser(net, self.sde, self.prediction)
        if den.prediction != self.prediction:
            raise ValueError(f"the Denoiser predicts {den.prediction!r} but the loss was built for {self.prediction!r}")
        if draw is None:
            draw = self.draw(x0, generator)
        y = self.drop_labels(y, getattr(den.net, "num_classes", None), generator)
        if y is not None:
            net_kwargs = {**net_kwargs, "y": y}
        t, x_t = draw.t, draw.x_t
        out = den.raw(x_t, t, **net_kwargs).to(x_t.dtype)  # autocast may hand back half precision
        a, s = den.coefficients(x_t, t)
        d: dict[str, torch.Tensor] = {}
        if "flow" in (self.prediction, self.space):  # the velocity's row of the table needs a'(t), s'(t)
            d["da"], d["ds"] = den.derivatives(x_t, t)
        pred = convert(out, x_t, a, s, self.prediction, self.space, **d)
        target = to_target(Prediction(x0, draw.noise), self.space, a, s, **d)
        err = (pred - target).square().reshape(x0.shape[0], -1).mean(dim=1)
        return (self.weight(t) * draw.ratio).to(err.dtype) * err

    def __call__(
        self,
        net: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
        **net_kwargs: Any,
    ) -> torch.Tensor:
        """The batch estimate of the objective (a scalar)."""
        return self.per_sample(net, x0, generator, y, **net_kwargs).mean()

    def config(self) -> dict[str, Any]:
        """The constructor arguments as plain primitives (for checkpoints)."""
        return {
            "prediction": self.prediction,
            "weighting": self.weighting,
            "time_sampling": self.time_sampling,
            "stratified": self.stratified,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "min_snr_gamma": self.min_snr_gamma,
            "p_uncond": self.p_uncond,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"DenoisingScoreMatching({args})"


class EDMLoss(DenoisingScoreMatching):
    r"""The EDM training objective (Karras, Aittala, Aila & Laine 2022, eq. 2, 8 and Table 1, "Ours"):

    .. math:: \mathcal L = \mathbb E_{\ln\sigma\sim N(P_{mean}, P_{std}^2)}\;\lambda(\sigma)\;
              \mathbb E\,\tfrac1d\big\|D_\theta(x_0 + \sigma n;\sigma) - x_0\big\|^2,\qquad
              \lambda(\sigma) = \frac{\sigma^2 + \sigma_{data}^2}{(\sigma\,\sigma_{data})^2},

    with :math:`P_{mean} = -1.2`, :math:`P_{std} = 1.2`, :math:`\sigma_{data} = 0.5` by default. On a path
    :math:`x_t = a x_0 + s\varepsilon` the noise level is :math:`\sigma = s/a` (``sde.edm_sigma``): each sample's
    :math:`\sigma` is drawn log-normally, mapped to :math:`t = \sigma^{-1}(\sigma)` (``sde.t_from_edm_sigma``), and
    :math:`x_t = a(t)x_0 + s(t)n`; since :math:`D(x_t/a;\sigma) = E[x_0|x_t]` is the same regression, the loss is the
    x0-space squared error of the net's prediction (any prediction type, converted through the Denoiser's table)
    weighted by :math:`\lambda(\sigma(t))`.

    With :class:`sdeflow.preconditioning.EDMPreconditioning` (``prediction="x0"``), :math:`\lambda = 1/c_{out}^2` and
    the loss is a unit-weighted regression of the raw net F onto :math:`(x_0 - c_{skip}\hat x)/c_{out}` at every
    noise level (Karras et al. 2022, eq. 8). For data :math:`N(0, \sigma_{data}^2 I)` the exact denoiser
    :math:`\sigma_{data}^2\hat x/(\sigma^2+\sigma_{data}^2)` scores exactly 1 at every sigma.

    **The path's range.** The log-normal is truncated to the path's noise levels
    :math:`[\sigma(t_{min}), \sigma(t_{max})]` (exactly, by inverse-CDF sampling of the truncated normal in
    :math:`\ln\sigma`), so every time lies in the range the path and the samplers use. For the default VP path
    (sigma from 0.0105 to 152) this removes 0.26% of the mass, all of it below the smallest sigma; for the default
    VE (0.01 to 50), 0.23%; see :attr:`truncated_mass`.

    Args:
        sde: the Gaussian path.
        prediction: what the net outputs, ``"x0"`` for an EDM-preconditioned net (default), or ``"eps" | "v" |
            "score"`` (the weight stays in x0 space).
        sigma_data: :math:`\sigma_{data}`, the data's per-coordinate standard deviation.
        p_mean, p_std: mean and standard deviation of :math:`\ln\sigma`.
        stratified: stratify the batch's uniform draws before the inverse CDF.
        t_min, t_max: the path's time range (defaults ``sde.eps`` and ``sde.T``), the truncation above.
        p_uncond: label dropout for classifier-free guidance.

    Every sample's importance ratio is 1: the objective *is* the expectation under the (truncated) log-normal.
    """

    def __init__(
        self,
        sde: GaussianSDE,
        prediction: str = "x0",
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        stratified: bool = False,
        t_min: float | None = None,
        t_max: float | None = None,
        p_uncond: float = 0.0,
    ) -> None:
        super().__init__(sde, prediction, "simple", "uniform", stratified, t_min, t_max, p_uncond=p_uncond)
        check_positive("sigma_data", sigma_data)
        check_positive("p_std", p_std)
        if not math.isfinite(p_mean):
            raise ValueError(f"p_mean must be finite, got {p_mean}")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        self.space = "x0"
        self.sigma_min = float(sde.edm_sigma(self.t_min))
        self.sigma_max = float(sde.edm_sigma(self.t_max))
        z = torch.tensor([self.sigma_min, self.sigma_max], dtype=torch.float64).log().sub(self.p_mean) / self.p_std
        self._cdf_lo, self._cdf_hi = (float(v) for v in torch.special.ndtr(z))
        if not self._cdf_hi - self._cdf_lo > 1e-12:
            raise ValueError(
                f"the log-normal (p_mean={p_mean}, p_std={p_std}) puts no mass on the path's noise levels "
                f"[{self.sigma_min:.4g}, {self.sigma_max:.4g}]"
            )

    @property
    def truncated_mass(self) -> float:
        """The log-normal's probability outside the path's noise levels (removed by the truncation)."""
        return 1.0 - (self._cdf_hi - self._cdf_lo)

    def sample_sigma(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Noise levels (B,) float64 from the log-normal truncated to [sigma(t_min), sigma(t_max)]."""
        u = self._uniform(batch, generator, torch.device(device))
        z = torch.special.ndtri(self._cdf_lo + (self._cdf_hi - self._cdf_lo) * u)
        return torch.exp(self.p_mean + self.p_std * z).clamp(self.sigma_min, self.sigma_max)

    def sample_time(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Times t = sigma^{-1}(sigma) (B,) for log-normal sigma, and unit importance ratios (B,), both float64."""
        sigma = self.sample_sigma(batch, generator, device)
        t = self.sde.t_from_edm_sigma(sigma).clamp(self.t_min, self.t_max)
        return t, torch.ones_like(t)

    def sigma_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        r""":math:`\lambda(\sigma) = (\sigma^2 + \sigma_{data}^2)/(\sigma\sigma_{data})^2` (Karras et al. 2022, Table 1)."""
        sd2 = self.sigma_data**2
        return (sigma * sigma + sd2) / (sigma * sigma * sd2)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(sigma(t)) in x0 space, float64, shape of t."""
        return self.sigma_weight(self.sde.edm_sigma(t))

    def config(self) -> dict[str, Any]:
        """The constructor arguments as plain primitives, with ``objective="edm"`` (for checkpoints)."""
        return {
            "objective": "edm",
            "prediction": self.prediction,
            "sigma_data": self.sigma_data,
            "p_mean": self.p_mean,
            "p_std": self.p_std,
            "stratified": self.stratified,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "p_uncond": self.p_uncond,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "objective")
        return f"EDMLoss({args})"
