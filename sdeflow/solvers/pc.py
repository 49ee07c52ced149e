r"""Predictor-corrector sampling, Song et al. 2021 ("Score-Based Generative Modeling through SDEs", Algorithms 2-3).

One step from t0 to t1 < t0 is a *predictor* (a reverse-SDE step) followed by ``n_corrector`` *corrector* steps of
Langevin MCMC that target :math:`p_{t_1}` with the score at t1:

* predictor ``"euler_maruyama"``: :func:`~sdeflow.solvers.euler.euler_maruyama_update`.
* predictor ``"reverse_diffusion"`` (Song et al. 2021, eq. 46-47): with the forward transition of the Gaussian path
  over the step, :math:`x_{t_0} | x_{t_1} \sim N(\alpha x_{t_1}, G^2)`, :math:`\alpha = a_0/a_1`,
  :math:`G^2 = s_0^2 - \alpha^2 s_1^2 = a_0^2(\sigma_0^2 - \sigma_1^2)` (:math:`\sigma = s/a`; = beta_i for VP,
  :math:`\sigma_i^2 - \sigma_{i-1}^2` for VE),

  .. math:: x_{t_1} = (2 - \alpha)\,x_{t_0} + G^2\,\nabla\log p_{t_0}(x_{t_0}) + G\,z.

* predictor ``"none"``: the state stays, only the corrector runs (annealed Langevin dynamics, Song & Ermon 2019).
* corrector ``"langevin"`` (Algorithms 2 and 3): for j = 1..n_corrector, with the score :math:`s = \nabla\log
  p_{t_1}(x)` and a fresh normal z,

  .. math:: \epsilon = 2\alpha_c\,(r\,\|z\| / \|s\|)^2, \qquad x \leftarrow x + \epsilon s + \sqrt{2\epsilon}\,z,

  r = ``snr``, :math:`\alpha_c = (a_0/a_1)^2` (= :math:`1-\beta_i` in Algorithm 3 for VP and sub-VP, 1 for VE). The
  norms are per sample (the reference code averages them over the batch, which makes a sample depend on its
  neighbours). For Gaussian data the exact-score corrector's stationary variance is :math:`v(1 + \alpha_c r^2)` to
  leading order in 1/d (a test checks it): the corrector's bias does not vanish with the step count.

Weak order 1 without a corrector (strong order 1: additive noise); NFE per step: 1 (predictor, unless "none") +
``n_corrector``; ``1 + n_corrector`` standard-normal draws per step (draw 0, the Brownian increment, feeds the
predictor; draws 1.. the corrector).
"""

from __future__ import annotations

import torch

from .._utils import append_dims, check_choice
from .base import SingleStepper, StepResult
from .euler import euler_maruyama_update

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "none")
CORRECTORS = ("langevin", "none")


class PredictorCorrector(SingleStepper):
    r"""Predictor-corrector sampler, Song et al. 2021 (Algorithms 2-3), on any Gaussian path (VP, sub-VP, VE, ...).

    See the module docstring for the update rules. Options: ``predictor`` in {"euler_maruyama",
    "reverse_diffusion", "none"}, ``corrector`` in {"langevin", "none"}, ``snr`` > 0 (signal-to-noise ratio r of the
    Langevin step, 0.16 in the paper's CIFAR-10 runs), ``n_corrector`` >= 1 (Langevin steps per time step).
    Weak order 1 (predictor only), NFE per step ``[predictor != "none"] + n_corrector``.
    """

    name = "pc"
    order = 1.0
    stochastic = True
    options = {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16, "n_corrector": 1}

    def validate(self) -> None:
        o = self.opts
        check_choice("predictor", o["predictor"], PREDICTORS)
        check_choice("corrector", o["corrector"], CORRECTORS)
        if not (isinstance(o["n_corrector"], int) and o["n_corrector"] >= 1):
            raise ValueError(f"n_corrector must be an integer >= 1, got {o['n_corrector']!r}")
        if not float(o["snr"]) > 0:
            raise ValueError(f"snr must be > 0, got {o['snr']!r}")
        if o["predictor"] == "none" and o["corrector"] == "none":
            raise ValueError('predictor="none" and corrector="none" leave nothing to do; choose at least one')

    @property
    def n_langevin(self) -> int:
        """Corrector steps per time step (0 without a corrector)."""
        return int(self.opts["n_corrector"]) if self.opts["corrector"] == "langevin" else 0

    def configure(self) -> None:
        """NFE per step: one predictor call (unless "none") plus the corrector steps; strong order 1 for a predictor
        alone (additive noise), None with a corrector (it does not follow the Brownian path)."""
        self.nfe_per_step = (self.opts["predictor"] != "none") + self.n_langevin
        self.strong_order = 1.0 if self.n_langevin == 0 else None

    @property
    def noise_draws(self) -> int:
        return 1 + self.n_langevin

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        noise = self.require_noise(noise)
        predictor = self.opts["predictor"]
        x0 = None
        if predictor == "euler_maruyama":
            x, _, pred = euler_maruyama_update(self, t0, t1, x, noise[0])
            x0 = pred.x0
        elif predictor == "reverse_diffusion":
            pred = self.den.predict(x, t0)
            alpha = torch.exp(self.sde.log_alpha(t0) - self.sde.log_alpha(t1))
            G2 = self.sde.alpha(t0) ** 2 * (self.sde.edm_sigma(t0) ** 2 - self.sde.edm_sigma(t1) ** 2)
            score = -pred.eps / self.coef(self.sde.sigma(t0), x)
            mean = self.coef(2.0 - alpha, x) * x + self.coef(G2, x) * score
            x = mean + self.coef(torch.sqrt(G2), x) * noise[0]
            x0 = pred.x0
        if self.n_langevin:
            alpha_c = torch.exp(2 * (self.sde.log_alpha(t0) - self.sde.log_alpha(t1)))
            r = float(self.opts["snr"])
            s1 = self.coef(self.sde.sigma(t1), x)
            for j in range(self.n_langevin):
                pred = self.den.predict(x, t1)
                score = -pred.eps / s1
                z = noise[1 + j]
                ratio = _norm(z) / _norm(score).clamp_min(torch.finfo(x.dtype).tiny)
                eps = 2 * self.coef(alpha_c, x) * (r * ratio) ** 2
                x = x + eps * score + torch.sqrt(2 * eps) * z
                x0 = pred.x0
        return StepResult(x=x, x0=x0)


def _norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm, broadcast against v: shape (B, 1, ..., 1)."""
    return append_dims(v.reshape(v.shape[0], -1).norm(dim=1), v.ndim)
