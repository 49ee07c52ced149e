r"""DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``): a deterministic DPM-Solver++(2S) step
(Lu et al. 2022b, Alg. 1 with r = 1/2) down to :math:`\sigma_\downarrow`, then fresh noise up to :math:`\sigma_1`.

In :math:`y = x/a`, :math:`\sigma = s/a = e^{-\lambda}`, from :math:`\sigma_0` to :math:`\sigma_1`, the ancestral split
(k-diffusion's ``get_ancestral_step``; Song et al. 2021's DDIM noise with eta) is

.. math::

    \sigma_\uparrow = \min\Big(\sigma_1,\ \eta\,\sqrt{\sigma_1^2(\sigma_0^2 - \sigma_1^2)/\sigma_0^2}\Big),\qquad
    \sigma_\downarrow = \sqrt{\sigma_1^2 - \sigma_\uparrow^2},

and with :math:`h = \lambda_\downarrow - \lambda_0`, :math:`\lambda_s = \lambda_0 + h/2`,

.. math::

    u = \frac{\sigma_s}{\sigma_0} y - (e^{-h/2} - 1)\hat x_0(y, \sigma_0),\qquad
    y_1 = \frac{\sigma_\downarrow}{\sigma_0} y - (e^{-h} - 1)\hat x_0(u, \sigma_s) + s_\text{noise}\sigma_\uparrow z,

:math:`x_1 = a_1 y_1`. 2 NFE per step, one normal draw. eta = 0 is DPM-Solver++(2S) (order 2, deterministic); eta > 0
is an ancestral sampler of the reverse SDE family (weak order 2 measured on Gaussian data). On every SDE with the semilinear view.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import SingleStepper, StepResult, coef


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(sigma_down, sigma_up) of k-diffusion's ``get_ancestral_step`` (float64 tensors)."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    up = torch.minimum(sigma_to, eta * torch.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return torch.sqrt(sigma_to**2 - up**2), up


def check_finite_log_snr(name: str, sde: Any, grid: torch.Tensor) -> None:
    """The sigma-space steppers need a finite log-SNR at every grid time (sigma = s/a in (0, inf))."""
    lam = sde.log_snr(grid.detach().to(device="cpu", dtype=torch.float64))
    if not bool(torch.isfinite(lam).all()):
        bad = int((~torch.isfinite(lam)).nonzero()[0])
        raise ValueError(
            f"solver {name!r} needs a finite log-SNR at every grid time; t = {float(grid[bad]):.6g} has lambda = "
            f"{float(lam[bad])}: use t_end > 0 (e.g. sde.eps) and start below a point where a(t) = 0"
        )


def check_eta_noise(name: str, opts: dict) -> None:
    eta, s_noise = opts["eta"], opts["s_noise"]
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (0.0 <= eta <= 1.0):
        raise ValueError(f"eta must lie in [0, 1] for solver {name!r}, got {eta!r}")
    if isinstance(s_noise, bool) or not isinstance(s_noise, (int, float)) or not (0.0 <= s_noise < math.inf):
        raise ValueError(f"s_noise must be a finite number >= 0 for solver {name!r}, got {s_noise!r}")


class DPMSolverPP2SAncestral(SingleStepper):
    r"""DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``; update rule in the module docstring).

    Order 2 with eta = 0 (deterministic), weak order 2 otherwise (exact-law probe on Gaussian data); 2 NFE per step, one draw per step.

    Options (k-diffusion's defaults):
        eta: the ancestral noise fraction in [0, 1] (default 1).
        s_noise: scale of the injected noise (default 1).
    """

    name = "dpmpp_2s_ancestral"
    requires = frozenset({"semilinear"})
    default_grid = "karras"
    nfe_per_step = 2
    options = {"eta": 1.0, "s_noise": 1.0}

    def validate(self) -> None:
        check_eta_noise(self.name, self.opts)

    def configure(self) -> None:
        """Order 2: the ODE order with eta = 0, the weak order with eta > 0 (measured by the exact-law probe on
        Gaussian data, where the ancestral noise is the exact conditional law of the linear part)."""
        self.stochastic = float(self.opts["eta"]) > 0 and float(self.opts["s_noise"]) > 0
        self.order = 2.0
        self.strong_order = 0.5 if self.stochastic else None

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> None:
        check_finite_log_snr(self.name, self.sde, grid)

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        sde = self.sde
        t0, t1 = t0.to(torch.float64), t1.to(torch.float64)
        la0, lam0 = sde.log_alpha(t0), sde.log_snr(t0)
        la1, lam1 = sde.log_alpha(t1), sde.log_snr(t1)
        s0, s1 = torch.exp(-lam0), torch.exp(-lam1)  # EDM sigma = s / a
        down, up = ancestral_step(s0, s1, float(self.opts["eta"]))
        lam_d = -torch.log(down)
        h = lam_d - lam0
        lam_s = lam0 + 0.5 * h
        t_s = sde.t_from_log_snr(lam_s)
        la_s, lam_s = sde.log_alpha(t_s), sde.log_snr(t_s)  # the model's time, and its exact log-SNR
        pred = self.den.predict(x, t0)
        y = x / coef(torch.exp(la0), x)
        u = coef(torch.exp(lam0 - lam_s), x) * y - coef(torch.expm1(lam0 - lam_s), x) * pred.x0
        x0_s = self.den.predict(coef(torch.exp(la_s), x) * u, t_s).x0
        y1 = coef(torch.exp(lam0 - lam_d), x) * y - coef(torch.expm1(-h), x) * x0_s
        if self.stochastic:
            z = self.require_noise(noise)[0]
            y1 = y1 + coef(float(self.opts["s_noise"]) * up, x) * z
        return StepResult(x=coef(torch.exp(la1), x) * y1, x0=pred.x0)
