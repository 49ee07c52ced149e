r"""Heun's method in the EDM parametrization, Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithms 1 and 2), on any Gaussian path.

For :math:`x_t = a(t) x_0 + s(t)\varepsilon` the scaled state :math:`\tilde x = x/a` and the noise level
:math:`\sigma = s/a = e^{-\lambda}` turn the probability-flow ODE into EDM's eq. 4 with unit scaling,

.. math:: \frac{d\tilde x}{d\sigma} = \frac{\tilde x - D(\tilde x;\sigma)}{\sigma} = \hat\varepsilon(x, t(\sigma)),

so one step from :math:`(t_0,\sigma_0)` to :math:`(t_1,\sigma_1)` is, with :math:`d_0 = \hat\varepsilon(x_0, t_0)`,

.. math:: \tilde x' = \tilde x_0 + (\sigma_1 - \sigma_0)\,d_0, \qquad
          \tilde x_1 = \tilde x_0 + (\sigma_1 - \sigma_0)\,\tfrac12\big(d_0 + \hat\varepsilon(a_1\tilde x', t_1)\big),

and :math:`x_1 = a_1\tilde x_1`. Algorithm 1 takes the Euler step :math:`\tilde x'` on the last step (EDM steps to
sigma = 0 there, where the correction is undefined), so N steps cost 2N - 1 NFE.

Algorithm 2 ("churn") first raises the noise level: :math:`\gamma = \min(S_\text{churn}/N, \sqrt2 - 1)` when
:math:`S_{tmin} \le \sigma_0 \le S_{tmax}` (else 0), :math:`\hat\sigma = \sigma_0(1+\gamma)` (capped at
:math:`\sigma(T)`, beyond which the model is not defined), :math:`\tilde x \leftarrow \tilde x +
\sqrt{\hat\sigma^2 - \sigma_0^2}\,S_\text{noise}\,z`, then takes the Heun step from :math:`\hat\sigma` to
:math:`\sigma_1`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import SingleStepper, StepResult
from .window import HeunEvaluator, OverRanks, WindowEvaluator


class Heun(SingleStepper):
    r"""EDM Heun sampler, Karras et al. 2022, Algorithm 1 (deterministic) and Algorithm 2 (``S_churn > 0``).

    Order 2; with churn also weak order 2 (with S_noise = 1 the injection maps :math:`p_{\sigma_0}` to
    :math:`p_{\hat\sigma}` exactly, so only the Heun step errs; the weak-order test confirms 2). 2 NFE per step,
    Euler on the last step of a grid (2N - 1 NFE for N steps); called without the state of :meth:`init` (adaptive
    driver, :meth:`single_step`) every step is a full Heun step. Default grid ``"karras"`` (rho = 7). Options: ``S_churn`` >= 0, ``S_tmin``, ``S_tmax`` (the sigma = s/a range where churn
    applies), ``S_noise`` (noise inflation, 1 = none). With churn, one standard-normal draw per step.
    """

    name = "heun"
    order = 2.0
    nfe_per_step = 2
    default_grid = "karras"
    options = {"S_churn": 0.0, "S_tmin": 0.0, "S_tmax": math.inf, "S_noise": 1.0}

    def validate(self) -> None:
        o = self.opts
        for k in ("S_churn", "S_tmin", "S_tmax", "S_noise"):
            if not float(o[k]) >= 0:
                raise ValueError(f"{k} must be >= 0, got {o[k]!r}")
        if not float(o["S_tmin"]) <= float(o["S_tmax"]):
            raise ValueError(f"S_tmin must be <= S_tmax, got S_tmin={o['S_tmin']}, S_tmax={o['S_tmax']}")

    def configure(self) -> None:
        self.stochastic = float(self.opts["S_churn"]) > 0

    def num_steps(self, nfe: int) -> int:
        """N steps cost 2N - 1 NFE (Euler last step): N = (nfe + 1) // 2."""
        if int(nfe) < 1:
            raise ValueError(f"nfe={nfe} is too small for solver {self.name!r}: it needs at least 1")
        return (int(nfe) + 1) // 2

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> dict:
        """The step counter (the last step is Euler) and the step count N (churn's gamma = S_churn / N)."""
        return {"i": 0, "n": grid.numel() - 1}

    def window_evaluator(self, x: torch.Tensor, grid: torch.Tensor, over_ranks: OverRanks = None) -> WindowEvaluator:
        """Every step but the last (Euler) is a full Heun step: batched with step 0's state."""
        return HeunEvaluator(self, grid, over_ranks, self.init(x, grid))

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        """A full Heun step (2 NFE) without churn: the adaptive driver's step (churn needs the grid's N)."""
        if self.stochastic:
            raise ValueError("heun with S_churn > 0 needs the step count N (gamma = S_churn / N): run it on a grid")
        return self._heun(t0, t1, x, None, None, last=False)

    def step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: torch.Tensor | None
    ) -> StepResult:
        if not isinstance(state, dict):
            raise ValueError("heun's grid step needs the state of init(x, grid) (step counter: the last step is Euler)")
        res = self._heun(t0, t1, x, state, noise, last=state["i"] == state["n"] - 1)
        res.state = {"i": state["i"] + 1, "n": state["n"]}
        return res

    def _heun(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: torch.Tensor | None, last: bool
    ) -> StepResult:
        sde = self.sde
        sig0, sig1 = sde.edm_sigma(t0), sde.edm_sigma(t1)
        xt = x / self.coef(sde.alpha(t0), x)  # the scaled state x / a
        if self.stochastic:
            z = self.require_noise(noise)[0]
            o = self.opts
            gamma = min(float(o["S_churn"]) / state["n"], math.sqrt(2.0) - 1.0)
            in_range = (sig0 >= float(o["S_tmin"])) & (sig0 <= float(o["S_tmax"]))
            sig_hat = torch.minimum(sig0 * (1.0 + gamma * in_range.to(sig0.dtype)), sde.edm_sigma(sde.T))
            sig_hat = torch.maximum(sig_hat, sig0)
            t0 = torch.where(sig_hat > sig0, sde.t_from_edm_sigma(sig_hat), t0)
            xt = xt + self.coef(torch.sqrt(sig_hat**2 - sig0**2) * float(o["S_noise"]), x) * z
            sig0 = sig_hat
        dsig = self.coef(sig1 - sig0, x)
        pred0 = self.den.predict(xt * self.coef(sde.alpha(t0), x), t0)
        a1 = self.coef(sde.alpha(t1), x)
        xt1 = xt + dsig * pred0.eps
        if last:
            return StepResult(x=a1 * xt1, x0=pred0.x0)
        pred1 = self.den.predict(a1 * xt1, t1)
        return StepResult(x=a1 * (xt + dsig * 0.5 * (pred0.eps + pred1.eps)), x0=pred1.x0)
