r"""DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``): a two-stage stochastic DPM-Solver++ step, each stage an
ancestral DPM-Solver++(1) step with eta noise (:func:`~sdeflow.solvers.dpmpp_ancestral.ancestral_step`).

In :math:`y = x/a`, :math:`\sigma = e^{-\lambda}`, with :math:`h = \lambda_1 - \lambda_0`,
:math:`\lambda_s = \lambda_0 + r h`, :math:`F = 1/(2r)`:

.. math::

    (\sigma_d, \sigma_u) &= \mathrm{ancestral}(\sigma_0, \sigma_s, \eta),\quad
    u = \frac{\sigma_d}{\sigma_0} y - (e^{\lambda_0 - \lambda_d} - 1)\hat x_0(y,\sigma_0)
        + s_\text{noise}\sigma_u z_s, \\
    (\sigma_d', \sigma_u') &= \mathrm{ancestral}(\sigma_0, \sigma_1, \eta),\quad
    y_1 = \frac{\sigma_d'}{\sigma_0} y - (e^{\lambda_0 - \lambda_d'} - 1)\big[(1-F)\hat x_0(y, \sigma_0)
        + F\hat x_0(u, \sigma_s)\big] + s_\text{noise}\sigma_u' z_1,

:math:`x_1 = a_1 y_1`. The two draws are increments of one Brownian path in the variable sigma (k-diffusion's
default ``BrownianTreeNoiseSampler``): :math:`z_1` is the normalized increment over :math:`[\sigma_1, \sigma_0]`
(the driver's draw 0) and :math:`z_s` the one over :math:`[\sigma_s, \sigma_0]`, from the Brownian bridge,
:math:`z_s = \sqrt f\,z_1 + \sqrt{1-f}\,z'` with :math:`f = (\sigma_0 - \sigma_s)/(\sigma_0 - \sigma_1)` and
:math:`z'` the driver's draw 1.

2 NFE per step, 2 draws. eta = 0 is DPM-Solver++(2S) with stage r (order 2, deterministic); eta > 0 is a stochastic
sampler of weak order 2 (measured by the exact-law probe on Gaussian data). On every SDE with the semilinear view.
"""

from __future__ import annotations

import torch

from .base import SingleStepper, StepResult, coef
from .dpmpp_ancestral import ancestral_step, check_eta_noise, check_finite_log_snr


class DPMSolverPPSDE(SingleStepper):
    r"""DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``; update rule in the module docstring).

    Order 2 with eta = 0, weak order 2 with eta > 0; 2 NFE per step, 2 draws per step.

    Options (k-diffusion's defaults):
        eta: ancestral noise fraction in [0, 1] (default 1).
        s_noise: noise scale (default 1).
        r: the stage's fraction of the log-SNR step, in (0, 1) (default 1/2).
    """

    name = "dpmpp_sde"
    requires = frozenset({"semilinear"})
    default_grid = "karras"
    nfe_per_step = 2
    options = {"eta": 1.0, "s_noise": 1.0, "r": 0.5}

    def validate(self) -> None:
        check_eta_noise(self.name, self.opts)
        r = self.opts["r"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r < 1.0):
            raise ValueError(f"r must lie in (0, 1) for solver 'dpmpp_sde', got {r!r}")

    def configure(self) -> None:
        """Order 2: ODE order with eta = 0, weak order with eta > 0 (exact-law probe on Gaussian data)."""
        self.stochastic = float(self.opts["eta"]) > 0 and float(self.opts["s_noise"]) > 0
        self.order = 2.0
        self.strong_order = 0.5 if self.stochastic else None

    @property
    def noise_draws(self) -> int:
        return 2 if self.stochastic else 0

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> None:
        check_finite_log_snr(self.name, self.sde, grid)

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        sde, eta, sn, r = self.sde, float(self.opts["eta"]), float(self.opts["s_noise"]), float(self.opts["r"])
        t0, t1 = t0.to(torch.float64), t1.to(torch.float64)
        la0, lam0 = sde.log_alpha(t0), sde.log_snr(t0)
        la1, lam1 = sde.log_alpha(t1), sde.log_snr(t1)
        t_s = sde.t_from_log_snr(lam0 + r * (lam1 - lam0))
        la_s, lam_s = sde.log_alpha(t_s), sde.log_snr(t_s)
        s0, s_s, s1 = torch.exp(-lam0), torch.exp(-lam_s), torch.exp(-lam1)
        fac = 1.0 / (2.0 * r)
        pred = self.den.predict(x, t0)
        y = x / coef(torch.exp(la0), x)
        z1 = zs = None
        if self.stochastic:
            z = self.require_noise(noise)
            f = (s0 - s_s) / (s0 - s1)
            z1 = z[0]
            zs = coef(torch.sqrt(f), x) * z[0] + coef(torch.sqrt(1.0 - f), x) * z[1]
        # stage 1: ancestral DPM-Solver++(1) to sigma_s
        d, u_ = ancestral_step(s0, s_s, eta)
        lam_d = -torch.log(d)
        u = coef(d / s0, x) * y - coef(torch.expm1(lam0 - lam_d), x) * pred.x0
        if zs is not None:
            u = u + coef(sn * u_, x) * zs
        x0_s = self.den.predict(coef(torch.exp(la_s), x) * u, t_s).x0
        # stage 2: to sigma_1 with the combined data prediction
        d, u_ = ancestral_step(s0, s1, eta)
        lam_d = -torch.log(d)
        x0_d = (1.0 - fac) * pred.x0 + fac * x0_s
        y1 = coef(d / s0, x) * y - coef(torch.expm1(lam0 - lam_d), x) * x0_d
        if z1 is not None:
            y1 = y1 + coef(sn * u_, x) * z1
        return StepResult(x=coef(torch.exp(la1), x) * y1, x0=pred.x0)
