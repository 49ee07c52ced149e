"""sdeflow.adams: the variable-step PEC Adams pair, against closed forms (polynomial integrals, a linear ODE)."""

from __future__ import annotations

import math

import pytest
import torch

from sdeflow.adams import adams_integrate, lagrange_integrals
from sdeflow.solvers.base import SolverError

F64 = torch.float64


def test_lagrange_integrals_integrate_polynomials_exactly() -> None:
    """The weights integrate every polynomial of degree < k through k unequal nodes exactly: int_a^b s^m ds."""
    nodes = [-0.7, -0.25, 0.0, 0.4, 1.3]
    a, b = 0.1, 0.9
    w = lagrange_integrals(nodes, a, b)
    for m in range(len(nodes)):
        exact = (b ** (m + 1) - a ** (m + 1)) / (m + 1)
        assert abs(sum(wi * u**m for wi, u in zip(w, nodes)) - exact) < 1e-13
    # one node: the rectangle rule; two nodes at the ends: the trapezoid rule
    assert lagrange_integrals([0.3], 0.0, 2.0) == pytest.approx([2.0])
    assert lagrange_integrals([0.0, 2.0], 0.0, 2.0) == pytest.approx([1.0, 1.0])


def _linear_ode():
    """y' = A(u) y with a rotation-plus-decay generator: y(u) = exp(-u^2/2) R(u) y0, R(u) the rotation by u, and a
    second part z' = cos(u) with z(u) = sin(u) (a tuple state, like the likelihood's [x, Delta])."""

    def f(u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        y, _ = state
        rot = torch.stack([-y[:, 1], y[:, 0]], dim=1)
        return (-u * y + rot, torch.cos(u).expand(y.shape[0]))

    y0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], dtype=F64)

    def exact(u: float) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = math.cos(u), math.sin(u)
        R = torch.tensor([[c, -s], [s, c]], dtype=F64)
        return math.exp(-(u**2) / 2) * y0 @ R.T, torch.full((2,), math.sin(u), dtype=F64)

    return f, (y0, torch.zeros(2, dtype=F64)), exact


@pytest.mark.parametrize("order", [3, 4])
def test_fixed_grid_converges_at_order_k_plus_1(order: int) -> None:
    """PEC with an order-k predictor and an order-(k+1) corrector has global order k + 1 on a grid whose first steps
    are small enough for the start-up (quadratic grid: the first step is O(h^2))."""
    f, y0, exact = _linear_ode()
    u1 = 2.0
    errs = []
    for n in (24, 48):
        grid = u1 * torch.linspace(0, 1, n + 1, dtype=F64) ** 2
        y, stats = adams_integrate(f, y0, 0.0, u1, grid=grid, order=order)
        assert stats == {"evaluations": n + 1, "accepted": n, "rejected": 0}
        ey, ez = exact(u1)
        errs.append(max(float((y[0] - ey).abs().max()), float((y[1] - ez).abs().max())))
    fitted = math.log2(errs[0] / errs[1])
    assert order + 1 - 0.5 < fitted < order + 1 + 1.0, (order, errs, fitted)


def test_adaptive_error_follows_the_tolerance_and_runs_backwards() -> None:
    """The controller bounds local errors: the global error of this rotating solution is 10-30x the tolerance (dopri5:
    about 1x, at 2-3x the evaluations) and falls with it at the method's order."""
    f, y0, exact = _linear_ode()
    last, errs = None, []
    for tol in (1e-4, 1e-6, 1e-8):
        y, stats = adams_integrate(f, y0, 0.0, 2.0, rtol=tol, atol=tol)
        ey, _ = exact(2.0)
        err = float((y[0] - ey).abs().max())
        errs.append(err)
        assert err < 100 * tol, (tol, err)
        assert stats["evaluations"] == stats["accepted"] + stats["rejected"] + 1
        if last is not None:
            assert stats["evaluations"] > last
        last = stats["evaluations"]
    assert errs[0] / errs[1] > 30 and errs[1] / errs[2] > 30
    # from 2 back to 0 recovers y0 (backwards the decay becomes growth by e^2: errors grow with it)
    ey, ez = exact(2.0)
    back, _ = adams_integrate(f, (ey, ez), 2.0, 0.0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(back[0], y0[0], rtol=0, atol=1e-5)


def test_failures_are_named() -> None:
    f, y0, _ = _linear_ode()
    with pytest.raises(ValueError, match="order must be an integer in 1..6"):
        adams_integrate(f, y0, 0.0, 1.0, order=7)
    with pytest.raises(SolverError, match="max_num_steps=3"):
        adams_integrate(f, y0, 0.0, 1.0, rtol=1e-10, atol=1e-10, max_num_steps=3)

    def blows_up(u: torch.Tensor, state):
        return (state[0] / (0.5 - u), state[1])

    with pytest.raises(SolverError, match="not finite|underflow"):
        adams_integrate(blows_up, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6)
