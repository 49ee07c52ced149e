r"""DPM-Solver-1/2/3 (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
Around 10 Steps"): singlestep exponential integrators of the probability-flow ODE in log-SNR, fixed or adaptive.

With :math:`h = \lambda_1 - \lambda_0` and :math:`\hat\varepsilon` the noise prediction (:mod:`.exponential`),

* DPM-Solver-1: :math:`x_1 = \frac{a_1}{a_0}x_0 - s_1(e^h - 1)\hat\varepsilon(x_0)` (= DDIM, eta = 0);
* DPM-Solver-2 (Alg. 1, r1 = 1/2): :math:`u = \frac{a_{s}}{a_0}x_0 - s_s(e^{r_1h}-1)\hat\varepsilon_0`,
  :math:`x_1 = \frac{a_1}{a_0}x_0 - s_1(e^h-1)\hat\varepsilon_0 - \frac{s_1}{2r_1}(e^h-1)(\hat\varepsilon(u) -
  \hat\varepsilon_0)`;
* DPM-Solver-3 (Alg. 2, r1 = 1/3, r2 = 2/3): two stages, the second with the :math:`\varphi_2` correction from the
  first, the final step with the :math:`\varphi_2` correction from the second.

Order k with k NFE per step. ``solver_type="taylor"`` swaps the published 2-node weight :math:`(e^h-1)/(2r_1)` for
the exact :math:`\varphi_2` one and uses the full quadratic through all three stages for DPM-Solver-3 (the reference
code's "taylor" type). ``predict_x0=True`` integrates the data prediction instead (DPM-Solver++(2S)/(3S), Lu et al.
2022b).

NFE budget (the paper's "DPM-Solver-fast", Sec. 3.4): order 3 takes K = NFE//3 + 1 steps ordered
``[3]*(K-2) + [2, 1]`` if NFE % 3 == 0, ``[3]*(K-1) + [1]`` if 1, ``[3]*(K-1) + [2]`` if 2; order 2 takes
``[2]*K`` (NFE even) or ``[2]*(K-1) + [1]``; the outer grid has K steps. Exactly NFE net calls.

Adaptive (Sec. 3.4, Alg. 4/5, ``adaptive=True``): DPM-Solver-12 (order=2: the 1st-order step and DPM-Solver-2 share
the evaluations, 2 NFE per step) or DPM-Solver-23 (order=3: DPM-Solver-2 with r1 = 1/3 and DPM-Solver-3, 3 NFE per
step); the difference is the embedded error estimate, and :func:`sdeflow.solve_adaptive` picks a step size per sample
(the reference code uses one for the whole batch, so the hardest sample sets everyone's cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import EmbeddedStepper, MultistepStepper, StepResult
from .control import Tolerances
from .exponential import FORMS, THRESHOLD_OPTIONS, ExponentialStepper, Form, History, Point, multistep_orders
from .window import MultistepEvaluator, OverRanks, WindowEvaluator


@dataclass(frozen=True)
class Plan:
    """A singlestep scheme as data: stage positions in log-SNR (fractions of h), the nodes each stage interpolates
    (0 = the step's start, j = stage j), and one or two final updates (high order first; a second is the embedded
    lower-order solution of the adaptive pairs)."""

    r: tuple[float, ...]
    stage_nodes: tuple[tuple[int, ...], ...]
    stage_rules: tuple[str, ...]
    finals: tuple[tuple[tuple[int, ...], str], ...]

    def __post_init__(self) -> None:  # the table validates itself
        seq = (0.0,) + self.r + (1.0,)
        ok = len(self.r) == len(self.stage_nodes) == len(self.stage_rules)
        ok &= all(a < b for a, b in zip(seq[:-1], seq[1:]))  # stages strictly inside (0, 1), increasing
        ok &= all(nodes[0] == 0 and max(nodes) < j for j, nodes in enumerate(self.stage_nodes, start=1))
        ok &= all(nodes[0] == 0 and max(nodes) <= len(self.r) for nodes, _ in self.finals)
        if not ok:
            raise ValueError(f"inconsistent singlestep plan {self}")


_PLANS: dict[tuple[int, str], Plan] = {
    (1, "dpmsolver"): Plan((), (), (), (((0,), "taylor"),)),
    (2, "dpmsolver"): Plan((0.5,), ((0,),), ("taylor",), (((0, 1), "bh2"),)),
    (2, "taylor"): Plan((0.5,), ((0,),), ("taylor",), (((0, 1), "taylor"),)),
    (3, "dpmsolver"): Plan((1 / 3, 2 / 3), ((0,), (0, 1)), ("taylor", "taylor"), (((0, 2), "taylor"),)),
    (3, "taylor"): Plan((1 / 3, 2 / 3), ((0,), (0, 1)), ("taylor", "taylor"), (((0, 1, 2), "taylor"),)),
}
_PLANS[(1, "taylor")] = _PLANS[(1, "dpmsolver")]
# adaptive pairs: (high, low) share the stages (Lu et al. 2022, Alg. 4 and 5)
_ADAPTIVE: dict[int, Plan] = {
    2: Plan((0.5,), ((0,),), ("taylor",), (((0, 1), "bh2"), ((0,), "taylor"))),
    3: Plan((1 / 3, 2 / 3), ((0,), (0, 1)), ("taylor", "taylor"), (((0, 2), "taylor"), ((0, 1), "bh2"))),
}


def nfe_split(nfe: int, order: int) -> list[int]:
    """The paper's per-step orders for an NFE budget (Lu et al. 2022, Sec. 3.4); they sum to ``nfe``."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if order == 3:
        k = nfe // 3 + 1
        if nfe % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        return [3] * (k - 1) + ([1] if nfe % 3 == 1 else [2])
    if order == 2:
        return [2] * (nfe // 2) + ([1] if nfe % 2 else [])
    return [1] * nfe


@dataclass
class SinglestepState:
    i: int
    plan: list[int]


class DPMSolver(ExponentialStepper, EmbeddedStepper):
    r"""DPM-Solver-1/2/3, Lu et al. 2022: singlestep exponential integrator in log-SNR (fixed grid or adaptive).

    Update rules in the module docstring. Order k = ``order``, k NFE per step; ``adaptive=True`` runs DPM-Solver-12
    (order 2) or -23 (order 3) with a per-sample step size (rtol/atol). Works on every SDE with the semilinear view.

    Options:
        order: 1, 2 or 3.
        solver_type: ``"dpmsolver"`` (the paper's algorithms) or ``"taylor"`` (exact phi weights, see module).
        predict_x0: integrate the data prediction (DPM-Solver++(kS)) instead of the noise prediction.
        adaptive, rtol, atol, h0: the adaptive variant and its tolerances (paper defaults 0.05 / 0.0078, for data
            in [-1, 1]) and first step size (default: the driver's).
        thresholding, threshold_ratio, threshold_max: dynamic thresholding of x0 (needs ``predict_x0=True``).
    """

    grid_from_path = True
    name = "dpm_solver"
    starts_at_zero_signal = False  # singlestep stages at lambda_0 + r h are undefined when lambda_0 = -inf
    _nfe_plan: list[int] | None = None
    options = {
        "order": 3,
        "solver_type": "dpmsolver",
        "predict_x0": False,
        "adaptive": False,
        "rtol": 0.05,
        "atol": 0.0078,
        "h0": None,
        **THRESHOLD_OPTIONS,
    }

    def validate(self) -> None:
        self._check_choice("order", (1, 2, 3))
        self._check_choice("solver_type", ("dpmsolver", "taylor"))
        self._check_bool("predict_x0")
        self._check_bool("adaptive")
        if self.opts["adaptive"]:
            if self.opts["order"] == 1:
                raise ValueError(
                    "order=1 has no embedded pair; adaptive=True needs order 2 (DPM-Solver-12) or 3 (DPM-Solver-23)"
                )
            for k in ("rtol", "atol"):
                if not (isinstance(self.opts[k], (int, float)) and self.opts[k] > 0):
                    raise ValueError(f"{k} must be a positive number, got {self.opts[k]!r}")
        self._check_threshold()

    # ---------------------------------------------------------------- declared properties
    def configure(self) -> None:
        """Order k with k NFE per step; the embedded lower solution of the adaptive pairs (DPM-Solver-12: 1, -23: 2)
        sets the controller's exponent 1/(error_order + 1)."""
        self.order = float(self.opts["order"])
        self.nfe_per_step = int(self.opts["order"])
        self.error_order = self.order - 1.0

    @property
    def tolerances(self) -> Tolerances | None:
        o = self.opts
        return Tolerances(float(o["rtol"]), float(o["atol"]), o["h0"]) if o["adaptive"] else None

    # ---------------------------------------------------------------- step plan
    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        """K outer steps for an NFE budget (the paper's split, remembered for :meth:`init`)."""
        if not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
        self._nfe_plan = nfe_split(nfe, int(self.opts["order"]))
        return len(self._nfe_plan)

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> SinglestepState:
        """The per-step orders: the NFE split of the last :meth:`num_steps` call when the grid has that many steps,
        else ``order`` at every step (a user grid). Caches the grid's and the stages' semilinear coordinates."""
        self.check_grid(grid)
        steps = grid.numel() - 1
        plan = self._nfe_plan if self._nfe_plan is not None and len(self._nfe_plan) == steps else None
        self._nfe_plan = None
        if plan is None:
            plan = [int(self.opts["order"])] * steps
        pts = [self.view.point(t) for t in grid.detach().to(device="cpu", dtype=torch.float64).unbind(0)]
        # the stage log-SNRs exactly as step() computes them (python floats), so the cached times are hits
        stage = [p0.lam + r * (p1.lam - p0.lam) for p0, p1, k in zip(pts[:-1], pts[1:], plan) for r in self._plan(k).r]
        missing = [float(lam) for lam in stage if not self.view.has_log_snr(float(lam))]
        if missing:
            self.view.prefill_log_snr(torch.tensor(missing, dtype=torch.float64))
        return SinglestepState(0, plan)

    def _plan(self, k: int) -> Plan:
        if self.opts["adaptive"]:
            return _ADAPTIVE[k]
        return _PLANS[(k, self.opts["solver_type"])]

    # ---------------------------------------------------------------- the step
    def run_plan(self, x: torch.Tensor, p0: Point, p1: Point, plan: Plan) -> tuple[list[torch.Tensor], Any]:
        """Evaluate the stages of ``plan`` from p0 and return its final updates (and the prediction at p0)."""
        f0, pred = self.evaluate(x, p0)
        nodes = [(p0, f0)]
        h = p1.lam - p0.lam
        for r, stage_nodes, rule in zip(plan.r, plan.stage_nodes, plan.stage_rules):
            ps = self.view.at_log_snr(p0.lam + r * h, p0.t)
            u = self.update(x, p0, ps, [nodes[n] for n in stage_nodes], rule)[0]
            nodes.append((ps, self.evaluate(u, ps)[0]))
        finals = [self.update(x, p0, p1, [nodes[n] for n in fn], rule)[0] for fn, rule in plan.finals]
        return finals, pred

    def step(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: Any) -> StepResult:
        """A grid step at the order of the NFE plan of :meth:`init` (``order`` at every step without it)."""
        if not isinstance(state, SinglestepState):
            return self.single_step(t0, t1, x, noise)
        res = self._run(t0, t1, x, self._plan(state.plan[state.i]))
        res.state = SinglestepState(state.i + 1, state.plan)
        return res

    def single_step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        return self._run(t0, t1, x, _PLANS[(int(self.opts["order"]), self.opts["solver_type"])])

    def step_with_error(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> StepResult:
        """DPM-Solver-12 / -23 (Alg. 4/5): the high-order result and its difference to the embedded lower one."""
        order = int(self.opts["order"])
        if order not in _ADAPTIVE:
            raise ValueError("order=1 has no embedded pair: step_with_error needs order 2 or 3")
        p0, p1 = self.view.point(t0), self.view.point(t1)
        (high, low), pred = self.run_plan(x, p0, p1, _ADAPTIVE[order])
        return StepResult(x=high, error=high - low, x0=pred.x0)

    def _run(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, plan: Plan) -> StepResult:
        (x1,), pred = self.run_plan(x, self.view.point(t0), self.view.point(t1), plan)
        return StepResult(x=x1, x0=pred.x0)


class DPMSolverPP(ExponentialStepper, MultistepStepper):
    r"""Multistep DPM-Solver++(2M)/(3M), Lu et al. 2022b ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models"), in data prediction; SDE-DPM-Solver++(2M) with ``sde=True``.

    From the last k data predictions :math:`\hat x_0` at :math:`\lambda_i, \lambda_{i-1}, \dots`, with
    :math:`h = \lambda_{i+1} - \lambda_i`, :math:`r = h_{i}/h`:

    * (1): :math:`x_{i+1} = \frac{s_{i+1}}{s_i}x_i + a_{i+1}(1 - e^{-h})\hat x_0^{(i)}` (= DDIM);
    * (2M, Alg. 2): :math:`x_{i+1} = \frac{s_{i+1}}{s_i}x_i + a_{i+1}(1-e^{-h})\big[(1+\tfrac1{2r})\hat x_0^{(i)}
      - \tfrac1{2r}\hat x_0^{(i-1)}\big]` (``solver_type="midpoint"``; ``"taylor"``: the exact
      :math:`\varphi_2` weight);
    * (3M): the quadratic through three predictions, integrated exactly (:mod:`.exponential`);
    * SDE (``sde=True``): :math:`x_{i+1} = \frac{s_{i+1}}{s_i}e^{-h}x_i + a_{i+1}(1-e^{-2h})[\dots] +
      s_{i+1}\sqrt{1-e^{-2h}}\,z`, z from the driver's noise source.
    * SDE-DPM-Solver++(3M) (``sde=True, order=3``, k-diffusion's ``sample_dpmpp_3m_sde`` with eta = 1): the
      quadratic through the last three :math:`\hat x_0` integrated exactly against :math:`e^{-2(h-\tau)}`. k-diffusion
      weights the second divided difference by :math:`-(\varphi_2/h_\eta - 1/2)` where the exact weight is twice
      that (the same factor as its ODE 3M, see docs/solvers.md); the step is otherwise its update.

    Order k (warm-up: step i has order min(k, i+1); ``lower_order_final`` on grids of fewer than 15 steps: the last
    steps drop to the number of steps left), 1 NFE per step. Dynamic thresholding of :math:`\hat x_0` (Saharia et al. 2022) with ``thresholding=True``.

    Options:
        order: 1, 2 or 3 (with sde=True too: SDE-DPM-Solver++(3M)).
        solver_type: ``"midpoint"`` (the paper's 2M) or ``"taylor"``.
        lower_order_final: below 15 steps, drop to lower order on the last steps (stabilizes few-step sampling).
        sde: SDE-DPM-Solver++ (stochastic, one normal draw per step).
        thresholding, threshold_ratio, threshold_max: dynamic thresholding (ratio-quantile of |x0|, data bound).
    """

    grid_from_path = True
    name = "dpm_solver++"
    nfe_per_step = 1
    state_type = History
    options = {
        "order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "sde": False,
        **THRESHOLD_OPTIONS,
    }

    def validate(self) -> None:
        self._check_choice("order", (1, 2, 3))
        self._check_choice("solver_type", ("midpoint", "taylor"))
        self._check_bool("lower_order_final")
        self._check_bool("sde")
        self._check_threshold()

    @property
    def form(self) -> Form:
        return FORMS["x0_sde" if self.opts["sde"] else "x0"]

    def configure(self) -> None:
        """Order k; with sde=True the weak order min(k, 2) (exact moments on Gaussian data show it, see the tests)
        and strong order 1."""
        self.stochastic = bool(self.opts["sde"])
        # SDE-3M: weak order 2 (the exact-law probe measures 2.03; the interpolated predictions carry earlier noise)
        self.order = float(min(self.opts["order"], 2) if self.stochastic else self.opts["order"])
        self.strong_order = 1.0 if self.stochastic else None

    @property
    def rule(self) -> str:
        return "bh2" if self.opts["solver_type"] == "midpoint" else "taylor"

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> History:
        self.check_grid(grid)
        order = int(self.opts["order"])
        plan = multistep_orders(grid.numel() - 1, order, bool(self.opts["lower_order_final"]))
        return History(0, plan, [], points=self.grid_points(grid))

    def window_evaluator(self, x: torch.Tensor, grid: torch.Tensor, over_ranks: OverRanks = None) -> WindowEvaluator:
        """One net call for the window's model outputs, step j's older nodes from the same round (Picard)."""
        return MultistepEvaluator(self, grid, over_ranks, self.init(x, grid))

    def step(self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: Any) -> StepResult:
        hist = self.check_state(state)
        p0, p1 = hist.step_points(self.view, t0, t1)
        f0, pred = self.evaluate(x, p0)
        nodes = [(p0, f0), *hist.nodes]
        k = min(hist.plan[hist.i], len(nodes))
        z = self.require_noise(noise)[0] if self.stochastic else None
        x1, _ = self.update(x, p0, p1, nodes[:k], self.rule, z)
        new = History(hist.i + 1, hist.plan, nodes[: int(self.opts["order"]) - 1], points=hist.points)
        return StepResult(x=x1, state=new, x0=lambda: pred.x0)
