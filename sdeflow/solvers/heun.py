r"""Heun's method in the EDM parametrization, Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithms 1 and 2), on any Gaussian path.

For :math:`x_t = a(t) x_0 + s(t)\varepsilon` the scaled state :math:`\tilde x = x/a` and the noise level
:math:`\sigma = s/a = e^{-\lambda}` turn the probability-flow ODE into EDM's eq. 4 with unit scaling,

.. math:: \frac{d\tilde x}{d\sigma} = \frac{\tilde x - D(\tilde x;\sigma)}{\sigma} = \hat\varepsilon(x, t(\sigma)),

so one step from :math:`(t_0,\sigma_0)` to :math:`(t_1,\sigma_1)` is, with :math:`d_0 = \hat\varepsilon(x_0, t_0)`,

.. math:: \tilde x' = \tilde x_0 + (\sigma_1 - \sigma_0)\,d_0, \qquad
          \tilde x_1 = \tilde x_0 + (\sigma_1 - \sigma_0)\,\tfrac12\big(d_0 + \hat\varepsilon(a_1\tilde x', t_1)\big),

and :math:`x_1 = a_1\tilde x_1`. Algorithm 1 (line 6, "if :math:`\sigma_{i+1} \ne 0`") takes the Euler step
:math:`\tilde x'` on a step to sigma = 0, where the correction :math:`\hat\varepsilon(\cdot, t_1)` is undefined; like
Algorithm 1 and k-diffusion's ``sample_heun`` this solver takes it there only: on a grid that ends where
:math:`s(t_\text{end}) = 0` (EDM's sigmas with their final 0, t_end = 0 on a path with s(0) = 0) N steps cost
2N - 1 NFE, on any other grid (the default t_end = ``sde.eps`` > 0) every step is a full Heun step and N steps cost 2N.

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

from .base import SingleStepper, StepResult, prediction_affine
from .state import HeunCoefficients, memo_per_grid
from .window import HeunEvaluator, OverRanks, WindowEvaluator


class Heun(SingleStepper):
    r"""EDM Heun sampler, Karras et al. 2022, Algorithm 1 (deterministic) and Algorithm 2 (``S_churn > 0``).

    Order 2; with churn also weak order 2 (with S_noise = 1 the injection maps :math:`p_{\sigma_0}` to
    :math:`p_{\hat\sigma}` exactly, so only the Heun step errs; the weak-order test confirms 2). 2 NFE per step;
    the last step of a grid that ends at sigma = s/a = 0 is an Euler step (2N - 1 NFE for N steps there, 2N on any
    other grid: :meth:`num_steps` takes the grid's end); called without the state of :meth:`init` (adaptive driver,
    :meth:`single_step`) every step is a full Heun step. Default grid ``"karras"`` (rho = 7). Options: ``S_churn`` >= 0, ``S_tmin``, ``S_tmax`` (the sigma = s/a range where churn
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

    def ends_at_zero_sigma(self, t_end: float | None = None) -> bool:
        """Whether a grid ending at ``t_end`` (default ``sde.eps``) ends where sigma = s/a = 0: its last step is then
        an Euler step (Algorithm 1, line 6)."""
        t = float(self.sde.eps if t_end is None else t_end)
        return float(self.sde.edm_sigma(torch.tensor(t, dtype=torch.float64))) == 0.0

    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        """The most steps that spend at most ``nfe`` NFE on a grid ending at ``t_end`` (default ``sde.eps``):
        N = nfe // 2 (2N NFE), or N = (nfe + 1) // 2 where sigma(t_end) = 0 (2N - 1 NFE, the last step Euler). An odd
        budget on a grid ending at sigma > 0 leaves one call unspent (``res.nfe`` reports what was spent)."""
        euler_last = self.ends_at_zero_sigma(t_end)
        need = 1 if euler_last else 2
        if int(nfe) < need:
            where = "" if euler_last else " on a grid that ends at sigma = s/a > 0 (one full Heun step)"
            raise ValueError(f"nfe={nfe} is too small for solver {self.name!r}: it needs at least {need}{where}")
        return (int(nfe) + 1) // 2 if euler_last else int(nfe) // 2

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> HeunCoefficients:
        return memo_per_grid(self.den, (type(self), repr(self.opts)), grid, lambda: self._coefficients(grid))

    def _coefficients(self, grid: torch.Tensor) -> HeunCoefficients:
        r"""Every step's constants once per grid (N = their count, churn's gamma = S_churn/N), and whether the last
        step is an Euler step (the grid ends at sigma = s/a = 0).

        With :math:`\hat\varepsilon = r x + u\,\mathrm{out}` and :math:`\hat x_0 = p x + q\,\mathrm{out}`
        (:func:`~sdeflow.solvers.base.prediction_affine`) the deterministic step is
        :math:`x' = \tfrac{a_1}{a_0} x + a_1\Delta\sigma\,\hat\varepsilon_0`,
        :math:`x_1 = x' + \tfrac12 a_1\Delta\sigma\,(\hat\varepsilon_1 - \hat\varepsilon_0)`. Rows hold
        (a1/a0, a1 dsigma, r0, u0, r1, u1, p0, q0, p1, q1), or are empty where the table's conversion does not apply
        (then every step takes the general path)."""
        g = grid.detach().to(device="cpu", dtype=torch.float64)
        n = g.numel() - 1
        euler_last = float(self.sde.edm_sigma(g[-1])) == 0.0
        # the Euler step to sigma = 0 reads nothing at its end, where eps = (x - a x0) / s is undefined: its
        # (r1, u1, p1, q1) are unused zeros, so that EDM's sigmas (final 0) keep the table for every step
        aff0, aff1 = prediction_affine(self.den, g[:-1]), prediction_affine(self.den, g[1:-1] if euler_last else g[1:])
        if self.stochastic or aff0 is None or aff1 is None:
            return HeunCoefficients(((),) * n, 0, euler_last)
        if euler_last:
            z = torch.zeros(1, dtype=torch.float64)
            aff1 = (torch.cat([aff1[0], z]), torch.cat([aff1[1], z]), torch.cat([aff1[2], z]), torch.cat([aff1[3], z]))
        sde = self.sde
        a0, a1 = sde.alpha(g[:-1]), sde.alpha(g[1:])
        dsig = sde.edm_sigma(g[1:]) - sde.edm_sigma(g[:-1])
        (p0, q0, r0, u0), (p1, q1, r1, u1) = aff0, aff1
        rows = torch.stack([a1 / a0, a1 * dsig, r0, u0, r1, u1, p0, q0, p1, q1], 1)
        ok = torch.isfinite(rows).all(1).tolist()  # a step from sigma = inf (a(T) = 0) takes the general path
        coefs = tuple(tuple(r) if good else () for r, good in zip(rows.tolist(), ok))
        return HeunCoefficients(coefs, 0, euler_last)

    def window_evaluator(self, x: torch.Tensor, grid: torch.Tensor, over_ranks: OverRanks = None) -> WindowEvaluator:
        """Every full Heun step is batched with step 0's state; a last Euler step (sigma = 0 at the end) runs alone."""
        return HeunEvaluator(self, grid, over_ranks, self.init(x, grid))

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        """A full Heun step (2 NFE) without churn: the adaptive driver's step (churn needs the grid's N)."""
        if self.stochastic:
            raise ValueError("heun with S_churn > 0 needs the step count N (gamma = S_churn / N): run it on a grid")
        return self._heun(t0, t1, x, 0, None, euler=False)

    def step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: torch.Tensor | None
    ) -> StepResult:
        if not isinstance(state, HeunCoefficients):
            raise ValueError(
                "heun's grid step needs the state of init(x, grid) (step counter, and whether the last step is Euler)"
            )
        n = len(state.coefs)
        euler = state.euler_last and state.i == n - 1  # the step to sigma = 0
        row = state.here
        if row and t0.ndim == 0:
            res = self._fast(t0, t1, x, row, euler)
        else:
            res = self._heun(t0, t1, x, n, noise, euler)
        res.state = state.next()
        return res

    def _fast(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, row: tuple[float, ...], euler: bool
    ) -> StepResult:
        ca, c0, r0, u0, r1, u1, p0, q0, p1, q1 = row
        out0 = self.den.raw(x, t0)
        eps0 = torch.add(x * r0, out0, alpha=u0)
        xp = torch.add(x * ca, eps0, alpha=c0)
        if euler:
            return StepResult(x=xp, x0=lambda: torch.add(x * p0, out0, alpha=q0))
        out1 = self.den.raw(xp, t1)
        eps1 = torch.add(xp * r1, out1, alpha=u1)
        x1 = torch.add(xp, eps1.sub_(eps0), alpha=0.5 * c0)
        return StepResult(x=x1, x0=lambda: torch.add(xp * p1, out1, alpha=q1))

    def _heun_in_t(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, euler: bool) -> StepResult:
        r"""Heun in t on the velocity :math:`a'\hat x_0 + s'\hat\varepsilon`, for a step that starts where
        :math:`\sigma = s/a` is infinite (a(T) = 0: the flow-matching path at t = 1, where the scaled state x/a does
        not exist; diffusers' FlowMatchHeun steps the same way, in its sigma = t). Churn is skipped there."""
        v0, pred0 = self.ode_velocity(x, t0)
        h = self.coef(t1 - t0, x)
        xp = x + h * v0
        if euler:
            return StepResult(x=xp, x0=pred0.x0)
        v1, pred1 = self.ode_velocity(xp, t1)
        return StepResult(x=x + 0.5 * h * (v0 + v1), x0=pred1.x0)

    def _heun(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, n: int, noise: torch.Tensor | None, euler: bool
    ) -> StepResult:
        sde = self.sde
        sig0, sig1 = sde.edm_sigma(t0), sde.edm_sigma(t1)
        if not (bool(torch.isfinite(sig0).all()) and bool(torch.isfinite(sig1).all())):
            return self._heun_in_t(t0, t1, x, euler)
        xt = x / self.coef(sde.alpha(t0), x)  # the scaled state x / a
        if self.stochastic:
            z = self.require_noise(noise)[0]
            o = self.opts
            gamma = min(float(o["S_churn"]) / n, math.sqrt(2.0) - 1.0)
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
        if euler:
            return StepResult(x=a1 * xt1, x0=pred0.x0)
        pred1 = self.den.predict(a1 * xt1, t1)
        return StepResult(x=a1 * (xt + dsig * 0.5 * (pred0.eps + pred1.eps)), x0=pred1.x0)
