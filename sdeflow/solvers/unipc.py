r"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models").

A multistep exponential integrator (the predictor UniP-p) plus a corrector UniC that costs no extra model evaluation:
the evaluation made at the start of the next step, :math:`f(\tilde x_{i+1}, \lambda_{i+1})`, is added as an
interpolation node at :math:`r = 1` and the last step is redone from :math:`x_i`,

.. math::

    x^c_{i+1} = c_x x_i + c_\text{out}\Big[h\varphi_1(\kappa h) f_i + B(h) \sum_{m} a_m \frac{f_m - f_i}{r_m}\Big],

with the :math:`a_m` solving :math:`\sum_m a_m r_m^{n-1} = n!\,h\varphi_{n+1}(\kappa h)/B(h)` (eq. 9 of the paper;
nodes :math:`r_m` = earlier log-SNRs and, for the corrector, 1). With a single difference node the paper takes
:math:`a_1 = 1/2`, and only there does :math:`B` matter: ``variant="bh1"`` :math:`B(h) = h`, ``"bh2"``
:math:`B(h) = e^{h}-1` (in the form's sign convention). Every other case is the exact polynomial quadrature of
:mod:`.exponential`, which equals the solved system since B cancels.

The predictor of order p uses p model outputs (warm-up: step i uses min(p, i+1); ``lower_order_final`` on grids of
fewer than 15 steps: the last steps use at most the number of steps left); the corrector raises the order by one: declared order p + 1 (p without the
corrector). The evaluation at the corrected point is never redone, and the final step has no corrector (it would need
one more NFE). 1 NFE per step. The callback payload's x at a grid time is the predicted state; its corrected value is
the start of the next step.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import MultistepStepper, StepResult
from .exponential import THRESHOLD_OPTIONS, ExponentialStepper, History, multistep_orders


class UniPC(ExponentialStepper, MultistepStepper):
    r"""UniPC-p with UniC, Zhao et al. 2023 (predictor-corrector multistep, B(h) variants bh1/bh2).

    Order p + 1 with the corrector (p = ``order`` in 1..3), 1 NFE per step (the corrector reuses the next step's
    evaluation). Data prediction by default (``predict_x0=False``: noise prediction).

    Options:
        order: the predictor order p, 1, 2 or 3.
        variant: ``"bh1"`` (B(h) = h) or ``"bh2"`` (B(h) = e^h - 1).
        predict_x0: integrate the data prediction (the paper's default) or the noise prediction.
        corrector: apply UniC (free); False gives the bare predictor UniP-p.
        lower_order_final: below 15 steps, drop to lower order on the last steps (stabilizes few-step sampling).
        thresholding, threshold_ratio, threshold_max: dynamic thresholding of x0 (data prediction only).
    """

    grid_from_path = True
    name = "unipc"
    nfe_per_step = 1
    state_type = History
    options = {
        "order": 2,
        "variant": "bh2",
        "predict_x0": True,
        "corrector": True,
        "lower_order_final": True,
        **THRESHOLD_OPTIONS,
    }

    def validate(self) -> None:
        self._check_choice("order", (1, 2, 3))
        self._check_choice("variant", ("bh1", "bh2"))
        for name in ("predict_x0", "corrector", "lower_order_final"):
            self._check_bool(name)
        self._check_threshold()

    def configure(self) -> None:
        """Order p + 1 with the corrector, p without."""
        self.order = float(self.opts["order"] + (1 if self.opts["corrector"] else 0))

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> History:
        self.check_grid(grid)
        order = int(self.opts["order"])
        plan = multistep_orders(grid.numel() - 1, order, bool(self.opts["lower_order_final"]))
        return History(0, plan, [], points=self.grid_points(grid))

    def step(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: Any) -> StepResult:
        hist = self.check_state(state)
        rule = str(self.opts["variant"])
        p0, p1 = hist.step_points(self.view, t0, t1)
        f0, pred = self.evaluate(x, p0)
        if self.opts["corrector"] and hist.x_prev is not None and hist.p_prev is not None:
            # UniC: redo the previous step from its corrected start with the new evaluation as the node r = 1
            x = self.update(hist.x_prev, hist.p_prev, p0, hist.nodes[: hist.prev_order] + [(p0, f0)], rule)[0]
        nodes = [(p0, f0)] + hist.nodes
        k = min(hist.plan[hist.i], len(nodes))
        x1 = self.update(x, p0, p1, nodes[:k], rule)[0]
        new = History(
            hist.i + 1,
            hist.plan,
            nodes[: int(self.opts["order"])],
            x_prev=x,
            p_prev=p0,
            prev_order=k,
            points=hist.points,
        )
        return StepResult(x=x1, state=new, x0=lambda: pred.x0)
