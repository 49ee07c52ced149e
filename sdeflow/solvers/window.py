r"""Batched-over-time evaluators: the maps :math:`\Phi_j` of a window of steps in one batched call, which the Picard
driver (:mod:`sdeflow.solvers.picard`) iterates. A stepper hands out its own through
:meth:`~sdeflow.solvers.base.Stepper.window_evaluator`: the generic one for single steppers, EDM Heun's (its state
counts steps) and DPM-Solver++(kM)'s (the multistep history from the same round).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .state import GridCoefficients, HeunCoefficients

__all__ = ["WindowEvaluator", "StepEvaluator", "HeunEvaluator", "MultistepEvaluator", "flat", "noise_flat"]

#: ``over_ranks(fn, *args)``: evaluate fn on the arguments split along their window axis (across distributed ranks)
#: and gather the outputs; None evaluates ``fn(*args)`` here.
OverRanks = Callable[..., tuple] | None


def flat(v: torch.Tensor) -> torch.Tensor:
    """(w, B, *d) -> (w·B, *d)."""
    return v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])


def noise_flat(z: torch.Tensor | None) -> torch.Tensor | None:
    """(w, draws, B, *d) -> (draws, w·B, *d), the layout ``Stepper.step`` takes."""
    if z is None:
        return None
    return z.transpose(0, 1).reshape(z.shape[1], z.shape[0] * z.shape[2], *z.shape[3:])


class WindowEvaluator:
    r"""Evaluates the maps :math:`\Phi_j` of a window of a stepper (``__call__``) and advances carried histories when
    steps are accepted (:meth:`accept`).

    Attributes:
        parallel_steps: the steps [0, parallel_steps) that Picard may batch; the rest run one by one afterwards.
    """

    def __init__(self, stepper: Any, grid: torch.Tensor, over_ranks: OverRanks = None, state: Any = None) -> None:
        self.stepper, self.grid, self.state = stepper, grid, state
        self.over_ranks = over_ranks
        self.parallel_steps = grid.numel() - 1

    def split(self, fn: Callable[..., tuple], *args: torch.Tensor | None) -> tuple:
        return fn(*args) if self.over_ranks is None else self.over_ranks(fn, *args)

    def __call__(
        self, xs: torch.Tensor, begin: int, t0: torch.Tensor, t1: torch.Tensor, z: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """xs (w, B, *d) at steps begin..begin+w-1, t0/t1 (w,) float64, z (w, draws, B, *d) -> (Phi(xs), x0 or None)."""
        raise NotImplementedError

    def accept(self, count: int) -> None:
        """The first ``count`` steps of the last evaluated window are final (multistep histories advance)."""


class StepEvaluator(WindowEvaluator):
    """A single stepper: ``step`` on the W·B states at once with per-element times, the same state for every step
    (a :class:`~sdeflow.solvers.base.GridCoefficients` is per step: batched steps run without it, a step on its own with
    its own entry, so W = 1 reproduces the sequential run bit for bit)."""

    def state_at(self, i: int) -> Any:
        """The state step i receives when it runs on its own (the sequential tail)."""
        if isinstance(self.state, GridCoefficients):
            return GridCoefficients(self.state.coefs, i)
        return self.state

    @property
    def batched_state(self) -> Any:
        return None if isinstance(self.state, GridCoefficients) else self.state

    def __call__(self, xs, begin, t0, t1, z):
        if xs.shape[0] == 1:  # one step (every rank takes it itself): scalar host times, exactly the sequential call
            i = begin
            res = self.stepper.step(
                self.grid[i], self.grid[i + 1], xs[0], self.state_at(i), None if z is None else z[0]
            )
            x0 = res.data_prediction()
            return res.x[None], None if x0 is None else x0[None]
        return self.split(self._batched, xs, t0, t1, z)

    def _batched(self, xs, t0, t1, z):
        B = xs.shape[1]
        state = self.batched_state
        res = self.stepper.step(t0.repeat_interleave(B), t1.repeat_interleave(B), flat(xs), state, noise_flat(z))
        y = res.x.reshape(xs.shape)
        x0 = res.data_prediction()
        return y, None if x0 is None else x0.reshape(xs.shape)


class HeunEvaluator(StepEvaluator):
    """EDM Heun (Algorithm 1/2): its state (:class:`~sdeflow.solvers.state.HeunCoefficients`) counts steps and says
    whether the last step is an Euler step (the grid ends at sigma = 0); churn's gamma uses N. Every full Heun step is
    batched with the state of step 0; a last Euler step runs on its own after the Picard phase."""

    def __init__(self, stepper: Any, grid: torch.Tensor, over_ranks: OverRanks = None, state: Any = None) -> None:
        if not isinstance(state, HeunCoefficients):
            raise ValueError("HeunEvaluator needs heun's grid state (stepper.init(x, grid))")
        super().__init__(stepper, grid, over_ranks, state)
        self.parallel_steps = grid.numel() - (2 if state.euler_last else 1)

    def state_at(self, i: int) -> Any:
        return self.state.at(i)

    @property
    def batched_state(self) -> Any:
        """Step 0's state: a full Heun step with per-sample times (the general path; churn reads N from it)."""
        return self.state.at(0)


class MultistepEvaluator(WindowEvaluator):
    r"""DPM-Solver++(kM) (Lu et al. 2022b) in a Picard window: ONE net call gives the model outputs :math:`f_j` at
    every state of the window; step j's update takes the nodes :math:`(\lambda_{j-m}, f_{j-m})`, m < k_j, from the
    same round (or, before the window, from the accepted steps), with the stepper's own per-step order plan and
    quadrature (:meth:`~sdeflow.solvers.exponential.ExponentialStepper.update`). At the fixed point this is exactly
    the sequential recursion."""

    def __init__(self, stepper: Any, grid: torch.Tensor, over_ranks: OverRanks = None, state: Any = None) -> None:
        super().__init__(stepper, grid, over_ranks, state)
        self.keep = int(stepper.opts["order"]) - 1  # nodes carried from step to step
        self.hist: list[tuple[int, torch.Tensor]] = []  # (step index, f) of accepted steps, oldest first
        self.last: torch.Tensor | None = None  # f of the last evaluated window, (w, B, *d)
        self.begin = 0

    def _history(self, i: int) -> Any:
        view = self.stepper.view
        nodes = [(view.point(self.grid[j]), f) for j, f in reversed(self.hist)]
        return type(self.state)(i, self.state.plan, nodes)

    def __call__(self, xs, begin, t0, t1, z):
        self.begin = begin
        if xs.shape[0] == 1:  # the sequential step itself, with the accepted history
            res = self.stepper.step(
                self.grid[begin], self.grid[begin + 1], xs[0], self._history(begin), None if z is None else z[0]
            )
            self.last = res.state.nodes[0][1][None] if res.state.nodes else None
            x0 = res.data_prediction()
            return res.x[None], None if x0 is None else x0[None]
        f, x0 = self.split(self._outputs, xs, t0)
        self.last = f
        w, B = xs.shape[:2]
        view = self.stepper.view
        tg = self.grid.to(device=xs.device, dtype=torch.float64)
        H = len(self.hist)
        F = torch.cat([torch.stack([h for _, h in self.hist]), f]) if H else f  # (H + w, B, *d)
        T = torch.cat([tg[begin - H : begin], t0])  # times of F's rows
        plan = self.state.plan
        orders = [min(plan[begin + j], H + j + 1) for j in range(w)]
        y = torch.empty_like(xs)
        for k in sorted(set(orders)):
            sel = torch.tensor([j for j in range(w) if orders[j] == k], device=xs.device)
            nodes = [(view.point(T[H + sel - m].repeat_interleave(B)), flat(F[H + sel - m])) for m in range(k)]
            p1 = view.point(t1[sel].repeat_interleave(B))
            zk = None if z is None else noise_flat(z[sel])[0]
            x1, _ = self.stepper.update(flat(xs[sel]), nodes[0][0], p1, nodes, self.stepper.rule, zk)
            y[sel] = x1.reshape(len(sel), B, *xs.shape[2:])
        return y, x0

    def _outputs(self, xs, t0):
        B = xs.shape[1]
        f, pred = self.stepper.evaluate(flat(xs), self.stepper.view.point(t0.repeat_interleave(B)))
        return f.reshape(xs.shape), pred.x0.reshape(xs.shape)

    def accept(self, count: int) -> None:
        if self.keep <= 0 or self.last is None:
            return
        self.hist = (self.hist + [(self.begin + j, self.last[j]) for j in range(count)])[-self.keep :]
