r"""DDIM (Song, Meng & Ermon 2021) and DDPM ancestral sampling (Ho et al. 2020) on any Gaussian path.

Both are the same update with different noise. With :math:`(\hat x_0, \hat\varepsilon)` predicted at :math:`t_0` and
the posterior variance of :math:`q(x_{t_1} | x_{t_0}, x_0)` for a Gaussian path (Kingma et al. 2021, eq. 30ff),

.. math:: \tilde\sigma^2 = s_1^2\,(1 - e^{2(\lambda_0 - \lambda_1)}),

the step is :math:`x_{t_1} = a_1\hat x_0 + \sqrt{s_1^2 - c^2}\,\hat\varepsilon + \sigma z` where

* DDIM(eta):        c = sigma = eta * tilde-sigma  (eta = 0: deterministic, the exact first-order exponential
  integrator = DPM-Solver-1; eta = 1: DDPM with the posterior variance);
* DDPM "beta_tilde": c = sigma = tilde-sigma;
* DDPM "beta":       c = tilde-sigma, sigma^2 = s_0^2 - (a_0 s_1/a_1)^2 (the forward transition variance; beta_t for
  VP paths, Ho et al. 2020's sigma_t^2 = beta_t choice).

For VP paths :math:`\tilde\sigma^2 = \tfrac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t`, DDIM's eq. 16.
"""

from __future__ import annotations

import torch

from .base import AffineGridStepper, GridCoefficients, StepResult, check_unit_interval, prediction_affine


def posterior_std(sde, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    r""":math:`\tilde\sigma = s_1\sqrt{1 - e^{2(\lambda_0-\lambda_1)}}`, float64, stable (expm1)."""
    return sde.sigma(t1) * torch.sqrt(-torch.expm1(2 * (sde.log_snr(t0) - sde.log_snr(t1))))


class DDIM(AffineGridStepper):
    r"""DDIM, Song, Meng & Ermon 2021 (eq. 12), generalized to any Gaussian path (VE included).

    :math:`x_{t_1} = a_1\hat x_0 + \sqrt{s_1^2 - c^2}\,\hat\varepsilon + c z`, :math:`c = \eta\tilde\sigma`.
    Order 1 (deterministic, eta = 0; weak order 1 otherwise), 1 NFE per step. Options: ``eta`` in [0, 1].
    """

    name = "ddim"
    order = 1.0
    nfe_per_step = 1
    requires = frozenset({"semilinear"})
    options = {"eta": 0.0}

    def validate(self) -> None:
        check_unit_interval("eta", float(self.opts["eta"]))

    def configure(self) -> None:
        self.stochastic = float(self.opts["eta"]) > 0
        self.strong_order = 0.5 if self.stochastic else None

    def noise_scales(self, t0: torch.Tensor, t1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, sigma): the eps-direction reduction and the injected noise std, float64."""
        c = float(self.opts["eta"]) * posterior_std(self.sde, t0, t1)
        return c, c

    def grid_rows(self, g: torch.Tensor) -> torch.Tensor | None:
        r"""Every step's constants: with :math:`\hat x_0 = p x + q\,\mathrm{out}`,
        :math:`\hat\varepsilon = r x + u\,\mathrm{out}` (:func:`~sdeflow.solvers.base.prediction_affine`) the step is
        :math:`x_1 = (a_1 p + k r) x + (a_1 q + k u)\,\mathrm{out} + \sigma z`, :math:`k = \sqrt{s_1^2 - c^2}`."""
        aff = prediction_affine(self.den, g[:-1])
        if aff is None:
            return None
        p, q, r, u = aff
        a1, s1 = self.sde.alpha(g[1:]), self.sde.sigma(g[1:])
        if self.stochastic:
            c, sig = self.noise_scales(g[:-1], g[1:])
        else:
            c = sig = torch.zeros_like(a1)
        k = torch.sqrt((s1**2 - c**2).clamp(min=0))
        return torch.stack([a1 * p + k * r, a1 * q + k * u, sig, p, q], 1)

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        pred = self.den.predict(x, t0)
        a1, s1 = self.sde.alpha(t1), self.sde.sigma(t1)
        if not self.stochastic:
            return StepResult(x=self.coef(a1, x) * pred.x0 + self.coef(s1, x) * pred.eps, x0=pred.x0)
        z = self.require_noise(noise)[0]
        c, sig = self.noise_scales(t0, t1)
        mean = self.coef(a1, x) * pred.x0 + self.coef(torch.sqrt(s1**2 - c**2), x) * pred.eps
        return StepResult(x=mean + self.coef(sig, x) * z, x0=pred.x0)


class DDPM(DDIM):
    r"""Ancestral sampling, Ho et al. 2020 (Algorithm 2), on any Gaussian path.

    Mean of :math:`q(x_{t_1}|x_{t_0}, \hat x_0)`, plus noise of variance ``variance="beta_tilde"`` (the posterior
    variance), ``"beta"`` (the forward transition variance :math:`s_0^2 - (a_0 s_1/a_1)^2`, = beta_t for VP) or
    ``"learned"``: improved DDPM's learned interpolation (Nichol & Dhariwal 2021, eq. 15), :math:`\log\sigma^2 =
    v\log\beta + (1-v)\log\tilde\beta` with v read from the net's extra C channels (a Denoiser with
    ``learned_variance=True``; :func:`sdeflow.vlb.predict_with_variance`). Weak order 1, 1 NFE per step.
    """

    name = "ddpm"
    options = {"variance": "beta_tilde"}

    def validate(self) -> None:
        if self.opts["variance"] not in ("beta_tilde", "beta", "learned"):
            raise ValueError(
                f"variance={self.opts['variance']!r} is not supported; allowed values: 'beta_tilde', 'beta', 'learned'"
            )
        if self.opts["variance"] == "learned" and not self.den.learned_variance:
            raise ValueError(
                "variance='learned' needs a Denoiser(..., learned_variance=True) whose net returns 2C channels"
            )

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> GridCoefficients | None:
        if self.opts["variance"] == "learned":
            return None  # the variance comes from the net at every step: the general step runs
        return super().init(x, grid)

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        if self.opts["variance"] != "learned":
            return super().single_step(t0, t1, x, noise)
        from ..vlb import interpolate_log_variance, predict_with_variance

        pred, v = predict_with_variance(self.den, x, t0)
        a1, s1 = self.sde.alpha(t1), self.sde.sigma(t1)
        c = posterior_std(self.sde, t0, t1)
        mean = self.coef(a1, x) * pred.x0 + self.coef(torch.sqrt((s1**2 - c**2).clamp(min=0)), x) * pred.eps
        if not bool((c > 0).all()):  # the final step to s = 0: no noise (ADM's nonzero_mask)
            return StepResult(x=mean, x0=pred.x0)
        ratio = torch.exp(self.sde.log_alpha(t0) - self.sde.log_alpha(t1)) * s1
        beta = (self.sde.sigma(t0) ** 2 - ratio**2).clamp(min=0)
        log_var = interpolate_log_variance(v, self.coef(torch.log(beta), v), self.coef(2 * torch.log(c), v))
        return StepResult(x=mean + torch.exp(0.5 * log_var) * self.require_noise(noise)[0], x0=pred.x0)

    def configure(self) -> None:
        self.stochastic, self.strong_order = True, 0.5

    def noise_scales(self, t0: torch.Tensor, t1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = posterior_std(self.sde, t0, t1)
        if self.opts["variance"] == "beta_tilde":
            return c, c
        ratio = torch.exp(self.sde.log_alpha(t0) - self.sde.log_alpha(t1)) * self.sde.sigma(t1)
        return c, torch.sqrt((self.sde.sigma(t0) ** 2 - ratio**2).clamp(min=0))
