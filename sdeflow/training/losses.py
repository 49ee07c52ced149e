r"""Denoising score matching (Vincent 2011; Song & Ermon 2019; Ho et al. 2020) for eps, x0, v and score nets.

For :math:`x_t = a(t) x_0 + s(t)\varepsilon` every objective here is a weighted regression of one *target space*
:math:`\mathcal S \in \{\varepsilon, x_0, v, \nabla\log p\}`:

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
(:math:`\mathrm{SNR} = a^2/s^2 = e^{2\lambda}`). With ``likelihood``, :math:`\tfrac d2 (T-\epsilon)\mathcal L` is the
score-matching term of the negative log-likelihood bound (Song, Durkan et al. 2021, Thm. 1) up to a
model-independent constant.

Time sampling. ``"uniform"``: :math:`t\sim U[\epsilon, T]`. ``"importance"``: the density
:math:`p(t)\propto g(t)^2/s(t)^2`, which makes the likelihood weight constant in eps space (Song, Durkan et al.
2021, Sec. 5). Since :math:`g^2 = \mathrm{d}s^2/\mathrm{d}t - 2 f s^2` and :math:`f = \mathrm{d}\log a/\mathrm{d}t`,
:math:`g^2/s^2 = -2\,\mathrm{d}\lambda/\mathrm{d}t`: the importance density is *uniform in log-SNR*, sampled exactly
for every SDE as :math:`t = \lambda^{-1}(u)`, :math:`u\sim U[\lambda(T), \lambda(\epsilon)]`. Each sample carries the
ratio :math:`1/((T-\epsilon)p(t)) = 2 s^2 \Delta\lambda / (g^2 (T-\epsilon))`, so every combination of weighting and
sampling estimates the same :math:`\mathcal L` without bias. ``stratified=True`` puts one uniform draw in each of B
equal strata of [0, 1) before the map to t (lower variance, same expectation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .._utils import check_choice
from ..denoiser import PREDICTIONS, Denoiser, Prediction, _to_target, convert
from ..sdes import GaussianSDE

__all__ = ["DenoisingScoreMatching", "DSMDraw", "WEIGHTINGS", "TIME_SAMPLINGS"]

WEIGHTINGS = ("simple", "likelihood", "min_snr")
TIME_SAMPLINGS = ("uniform", "importance")


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
        prediction: what the net outputs, ``"eps" | "x0" | "v" | "score"``.
        weighting: ``"simple" | "likelihood" | "min_snr"``.
        time_sampling: ``"uniform"`` in [t_min, T] or ``"importance"`` (uniform in log-SNR).
        stratified: stratify the batch's uniform draws.
        t_min: smallest training time (defaults to ``sde.eps``); t_max defaults to ``sde.T``.
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
        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
        self.t_min = float(sde.eps if t_min is None else t_min)
        self.t_max = float(sde.T if t_max is None else t_max)
        if not 0.0 < self.t_min < self.t_max <= sde.T:
            raise ValueError(
                f"t_min and t_max must satisfy 0 < t_min < t_max <= T={sde.T}, got {self.t_min}, {self.t_max}"
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
        pred = convert(out, x_t, a, s, self.prediction, self.space)
        target = _to_target(Prediction(x0, draw.noise), self.space, a, s)
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
