r"""iPNDM (improved pseudo numerical methods, Zhang & Chen 2023, App. / Liu et al. 2022's PNDM with a first-order
warm-up instead of Runge-Kutta): fixed-coefficient Adams-Bashforth on the noise prediction in the EDM noise level.

In :math:`y = x/a`, :math:`\sigma = s/a` (:mod:`.lms`), with :math:`d_i = \hat\varepsilon(x_i, t_i)`:

.. math::

    y_{i+1} = y_i + (\sigma_{i+1} - \sigma_i)\,\bar d_i,\qquad
    \bar d_i = d_i,\ \tfrac{3d_i - d_{i-1}}{2},\ \tfrac{23d_i - 16d_{i-1} + 5d_{i-2}}{12},\
    \tfrac{55d_i - 59d_{i-1} + 37d_{i-2} - 9d_{i-3}}{24}

(orders 1-4 by history length, capped at ``max_order``). This is k-diffusion's ``sample_ipndm`` (x + (sigma_next -
sigma) d in its VE variables) and diffusers' ``IPNDMScheduler`` step (a DDIM step with the combined eps, its
``_get_prev_sample``), on any Gaussian path. The coefficients are those of a *uniform* step: on a grid that is not
uniform in sigma the combination :math:`(\sigma_{i+1}-\sigma_i)\bar d_i` differs from
:math:`\int d\,d\sigma` by :math:`-\tfrac1{12}\varphi''\,d'\,k^3` per step (grid :math:`\sigma = \varphi(i/N)`,
k = 1/N), so the method is of **order 2** on smooth non-uniform grids (Karras, log-SNR) and of order ``max_order``
only on sigma-uniform grids. It is nevertheless accurate at 10-20 NFE (the higher-order terms dominate there).

1 NFE per step, deterministic, default grid "karras" (k-diffusion's).
"""

from __future__ import annotations

from .exponential import Point
from .lms import SigmaMultistep

#: Adams-Bashforth coefficients of a uniform step, newest first
AB_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class IPNDM(SigmaMultistep):
    r"""iPNDM (Zhang & Chen 2023): fixed Adams-Bashforth coefficients on eps in sigma (module docstring).

    Declared order 2 for ``max_order`` >= 2 (the uniform-step coefficients on a non-uniform grid; see the module
    docstring), 1 for ``max_order=1``. 1 NFE per step, deterministic.

    Options (k-diffusion's default):
        max_order: 1..4 (default 4).
    """

    name = "ipndm"
    options = {"max_order": 4}

    def validate(self) -> None:
        self._check_choice("max_order", (1, 2, 3, 4))

    def configure(self) -> None:
        """Order 2 (1 for max_order 1): the fixed coefficients' consistency order on non-uniform grids."""
        self.order = 1.0 if self.opts["max_order"] == 1 else 2.0

    def max_order(self) -> int:
        return int(self.opts["max_order"])

    def weights(self, p0: Point, p1: Point, nodes: list[Point]) -> list[float]:
        d = self.rho(p1) - self.rho(p0)
        return [d * c for c in AB_COEFFICIENTS[len(nodes)]]
