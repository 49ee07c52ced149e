r"""Adaptive reverse-SDE solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast When Generating Data with
Score-Based Models", Algorithm 1), with a step size per sample.

From :math:`x` at :math:`t` with step :math:`h` and one Brownian increment :math:`\sqrt h\,z` shared by both
evaluations (reverse-time drift :math:`F(x, t) = f(t)x - g(t)^2\nabla\log p_t(x)`, integrated towards t = 0):

.. math::

    x' = x - h F(x, t) + g(t)\sqrt h z                      \quad\text{(Euler-Maruyama)}

    \tilde x = x - h F(x', t-h) + g(t-h)\sqrt h z, \qquad x'' = \tfrac12(x' + \tilde x)
    \quad\text{(improved Euler)}

The step is accepted when :math:`E = \lVert (x' - x'')/\delta \rVert_2/\sqrt n \le 1` with
:math:`\delta = \max(\epsilon_{abs}, \epsilon_{rel}\max(|x'|, |x_{prev}|))` (per sample), the state advances to the
extrapolated :math:`x''`, and the next step is :math:`h \leftarrow \theta h E^{-r}` (:math:`\theta = 0.9`, r = 0.9,
accepted or not). The paper's :math:`x'_{prev}` (the previous step's EM proposal) is taken as the current state
:math:`x` here: the driver passes no per-sample history, and both equal the state at t up to the local error.

2 NFE per step (every round evaluates the active samples twice, rejected steps included). The error norm and the
controller are this stepper's :meth:`AdaptiveSDE.error_norm` and :attr:`AdaptiveSDE.controller`, which
:func:`sdeflow.solve_adaptive` uses in place of its defaults. Weak order 1; strong order 1 (additive noise).
Defaults ``rtol=0.05, atol=0.0078`` are the paper's for data in [-1, 1]; scale ``atol`` with the data.
"""

from __future__ import annotations

import torch

from .base import EmbeddedStepper, StepResult
from .control import PIController, Tolerances


class AdaptiveSDE(EmbeddedStepper):
    r"""Jolicoeur-Martineau et al. 2021, Algorithm 1: EM / improved-Euler pair on the reverse SDE, adaptive per sample.

    Update rule, error norm and controller in the module docstring. 2 NFE per step, weak order 1.

    Options:
        rtol, atol: the paper's :math:`\epsilon_{rel}`, :math:`\epsilon_{abs}`.
        h0: the first step size (paper: 0.01).
        safety: :math:`\theta` (0.9).
        exponent: r in :math:`E^{-r}` (0.9; the paper finds 0.5 to 1 works).
    """

    name = "adaptive_sde"
    order = 1.0
    strong_order = 1.0
    stochastic = True
    nfe_per_step = 2
    requires = frozenset({"reverse_sde"})
    error_order = 1.0  # the driver divides beta1 by error_order + 1 = 2, so beta1 = 2r gives the paper's E^{-r}
    options = {"rtol": 0.05, "atol": 0.0078, "h0": 0.01, "safety": 0.9, "exponent": 0.9}

    def validate(self) -> None:
        for k in ("rtol", "atol", "h0", "safety", "exponent"):
            v = self.opts[k]
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")):
                raise ValueError(f"{k} must be a positive finite number, got {v!r}")
        if not self.opts["safety"] <= 1.0:
            raise ValueError(f"safety must lie in (0, 1], got {self.opts['safety']}")

    @property
    def tolerances(self) -> Tolerances:
        return Tolerances(float(self.opts["rtol"]), float(self.opts["atol"]), float(self.opts["h0"]))

    @property
    def controller(self) -> PIController:
        r""":math:`h \leftarrow \theta h E^{-r}` as a :class:`~sdeflow.solvers.control.PIController` (integral part
        only; the driver's exponent is beta1/(error_order + 1), error_order = 1)."""
        r = float(self.opts["exponent"])
        return PIController(
            safety=float(self.opts["safety"]), beta1=2.0 * r, beta2=0.0, factor_min=1e-3, factor_max=1e3
        )

    def error_norm(
        self, err: torch.Tensor, x_old: torch.Tensor, x_new: torch.Tensor, rtol: float, atol: float
    ) -> torch.Tensor:
        r"""The paper's norm, per sample: :math:`\lVert \mathrm{err}/\delta\rVert_2/\sqrt n` with
        :math:`\delta = \max(\epsilon_{abs}, \epsilon_{rel}\max(|x'|, |x|))`, :math:`x' = x'' + \mathrm{err}`.
        Non-finite -> inf. Shape (B,), float64."""
        x_em = x_new + err
        delta = torch.clamp(rtol * torch.maximum(x_em.abs(), x_old.abs()), min=atol)
        r = (err / delta).reshape(err.shape[0], -1).pow(2).mean(1).sqrt()
        return torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf"))).to(torch.float64)

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        """The improved-Euler step (the extrapolated x'')."""
        res = self.step_with_error(t0, t1, x, noise)
        res.error = None
        return res

    def step_with_error(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        z = self.require_noise(noise)[0]
        dt = self.coef(t1 - t0, x)
        sqrt_h = torch.sqrt((t0 - t1).abs())
        F0, pred = self.reverse_sde_drift(x, t0)
        x_em = x + dt * F0 + self.coef(self.sde.diffusion(t0) * sqrt_h, x) * z
        F1, _ = self.reverse_sde_drift(x_em, t1)
        g_mean = 0.5 * (self.sde.diffusion(t0) + self.sde.diffusion(t1)) * sqrt_h
        x_ie = x + dt * (0.5 * (F0 + F1)) + self.coef(g_mean, x) * z  # = (x' + x~)/2
        return StepResult(x=x_ie, error=x_em - x_ie, x0=pred.x0)
