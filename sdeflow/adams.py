r"""Variable-step Adams predictor-corrector in PEC mode for tuple states: one right-hand-side evaluation per step.

Written for the augmented probability-flow ODE of :func:`sdeflow.log_likelihood` (``method="adams"`` and the
fixed-grid ``solver="abm3"`` / ``"abm4"``), where every evaluation is a network call plus a divergence and a
Runge-Kutta method's 6 stages per step are the cost to beat.

**The step** (Hairer, Norsett & Wanner, *Solving ODEs I*, Sec. III.1 and III.5, variable-step Adams methods): with
the derivatives :math:`f_j = F(u_j, y_j)` at the last k nodes, the predictor (Adams-Bashforth of order k) integrates
the polynomial through them,

.. math:: y^P_{n+1} = y_n + \int_{u_n}^{u_{n+1}} P_k(s)\,ds,\qquad P_k(u_j) = f_j,\ j = n-k+1..n,

the one evaluation :math:`f^P_{n+1} = F(u_{n+1}, y^P_{n+1})` follows, and the corrector (Adams-Moulton of order
k + 1) integrates the polynomial through :math:`f_{n-k+1}, \dots, f_n, f^P_{n+1}`. The corrected value is kept and
:math:`f^P_{n+1}` enters the history without a second evaluation (PEC mode, as UniPC does for its corrector, Zhao
et al. 2023). The weights are the exact integrals of the Lagrange basis on the actual (unequal) nodes.

**Error control.** Once the history holds k + 1 points, the local error of the accepted order-(k+1) value is
estimated by its difference to the order-(k+2) corrector through one more history point (local extrapolation, no
extra evaluation), the step is accepted when the mixed RMS norm of that difference,
:math:`\max_{\text{parts}} \mathrm{RMS}(e / (\text{atol} + \text{rtol}\max(|y_n|, |y_{n+1}|)))` (torchdiffeq's
norm over the parts of a tuple state), is at most 1, and the next step is
:math:`h \cdot \min(5, \max(0.2, 0.9\,\mathrm{err}^{-1/(k+2)}))`. While the order ramps up from 1 (the first k steps)
the predictor-corrector difference is the estimate. This bounds the local error of the kept value (dopri5 bounds
that of its lower-order solution and keeps the higher-order one, which makes its global error close to the
tolerance): the global error at a given rtol / atol is larger than dopri5's, 10-30x the tolerance on the rotating
test ODE of ``tests/test_adams.py`` and 0.26x on the likelihood benchmark at 1e-5, so compare the two at measured
error, not at equal tolerance.

Measured on the likelihood ODE of a d = 64 Gaussian mixture (``benchmarks/likelihood.py --parts variables``;
docs/benchmarks.md, Likelihood): order 4 reaches the error of dopri5 at 0.55-0.65 of its evaluations on VP-type paths
(VP linear / cosine, sub-VP, DDPM schedules in ``variable="vp_time"``), but not on VE / EDM paths, whose error it
underestimates; orders 5 and 6 were no better than 4 (variable-step Adams-Bashforth loses stability as the order
grows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .solvers.base import SolverError

__all__ = ["adams_integrate", "lagrange_integrals"]

State = tuple[torch.Tensor, ...]
Func = Callable[[torch.Tensor, State], State]


def lagrange_integrals(nodes: Sequence[float], a: float, b: float) -> list[float]:
    r""":math:`\int_a^b \ell_j(s)\,ds` for the Lagrange basis :math:`\ell_j` on ``nodes`` (distinct), in float64.

    Written in the scaled variable :math:`\tau = (s - a)/(b - a)`: the monomial coefficients of each :math:`\ell_j`
    solve a Vandermonde system, and :math:`\int_0^1 \tau^m d\tau = 1/(m+1)`."""
    h = b - a
    tau = torch.tensor([(u - a) / h for u in nodes], dtype=torch.float64)
    k = tau.numel()
    V = tau[:, None] ** torch.arange(k, dtype=torch.float64)[None, :]  # V[j, m] = tau_j^m
    moments = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    # sum_j w_j tau_j^m = moments_m  <=>  V^T w = moments
    w = torch.linalg.solve(V.T, moments)
    return (w * h).tolist()


def _combine(y: State, weights: Sequence[float], derivs: Sequence[State]) -> State:
    out = []
    for i, yi in enumerate(y):
        acc = yi
        for w, f in zip(weights, derivs, strict=True):
            acc = acc + w * f[i]
        out.append(acc)
    return tuple(out)


def _error_norm(err: State, y0: State, y1: State, rtol: float, atol: float) -> torch.Tensor:
    """torchdiffeq's mixed RMS norm: the largest RMS over the parts of e / (atol + rtol max(|y0|, |y1|))."""
    parts = []
    for e, a, b in zip(err, y0, y1, strict=True):
        scale = atol + rtol * torch.maximum(a.abs(), b.abs())
        parts.append((e / scale).pow(2).mean().sqrt())
    return torch.stack(parts).max()


def adams_integrate(
    func: Func,
    y0: State,
    u0: float,
    u1: float,
    *,
    grid: torch.Tensor | None = None,
    order: int = 4,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_num_steps: int = 10_000,
) -> tuple[State, dict[str, int]]:
    r"""Integrate :math:`dy/du = F(u, y)` from u0 to u1 (either direction) with the PEC Adams pair of order
    (``order``, ``order`` + 1) (module docstring).

    Args:
        func: F(u, y) -> dy/du with u a float64 scalar tensor and y a tuple of tensors.
        y0: the state at u0.
        u0, u1: the ends.
        grid: fixed nodes from u0 to u1 (float64, monotone): take exactly these steps, no error control; None: adaptive.
        order: k, the predictor's order (1..6); the corrector has order k + 1.
        rtol, atol: tolerances of the adaptive mode.
        first_step: the first adaptive step (default 1e-3 of the span: the order ramps up from 1).
        max_num_steps: attempted steps before a :class:`~sdeflow.solvers.SolverError`.

    Returns:
        (state at u1, stats: ``evaluations``, ``accepted``, ``rejected``).
    """
    if not (isinstance(order, int) and 1 <= order <= 6):
        raise ValueError(f"order must be an integer in 1..6, got {order!r}")
    span = u1 - u0
    if span == 0:
        return y0, {"evaluations": 0, "accepted": 0, "rejected": 0}
    direction = 1.0 if span > 0 else -1.0

    def evaluate(u: float, y: State) -> State:
        return func(torch.tensor(u, dtype=torch.float64), y)

    y = y0
    u = u0
    hist: list[tuple[float, State]] = [(u0, evaluate(u0, y0))]
    stats = {"evaluations": 1, "accepted": 0, "rejected": 0}

    def pece(y: State, a: float, b: float) -> tuple[int, State, State, State]:
        """One predict-evaluate-correct step a -> b on the last ``order`` history points: (k, yp, f(b, yp), yc)."""
        k = min(order, len(hist))
        H = hist[-k:]
        yp = _combine(y, lagrange_integrals([p[0] for p in H], a, b), [p[1] for p in H])
        fp = evaluate(b, yp)
        stats["evaluations"] += 1
        Hc = [*H, (b, fp)]
        return k, yp, fp, _combine(y, lagrange_integrals([p[0] for p in Hc], a, b), [p[1] for p in Hc])

    if grid is not None:
        nodes = [float(g) for g in grid]
        for i in range(len(nodes) - 1):
            a, b = nodes[i], nodes[i + 1]
            _, _, fp, y = pece(y, a, b)
            hist = [*hist[-(order + 1) :], (b, fp)]
            stats["accepted"] += 1
        return y, stats

    h = abs(first_step) if first_step is not None else 1e-3 * abs(span)
    attempts = 0
    while direction * (u1 - u) > 1e-12 * abs(span):
        if attempts >= max_num_steps:
            raise SolverError(f"adams: max_num_steps={max_num_steps} reached at u={u} of [{u0}, {u1}]")
        attempts += 1
        remaining = abs(u1 - u)
        if h >= remaining or remaining - h < 0.1 * h:  # land exactly on u1 instead of a sliver step
            h = remaining
        un = u + direction * h
        k, yp, fp, yc = pece(y, u, un)
        if len(hist) > k:  # order-(k+2) corrector through one more point: the error of the kept order-(k+1) value
            H2 = [*hist[-(k + 1) :], (un, fp)]
            y2 = _combine(y, lagrange_integrals([p[0] for p in H2], u, un), [p[1] for p in H2])
            err_t, q = _error_norm(tuple(a - b for a, b in zip(yc, y2, strict=True)), y, yc, rtol, atol), k + 2
        else:  # ramping up: the predictor-corrector difference
            err_t, q = _error_norm(tuple(a - b for a, b in zip(yc, yp, strict=True)), y, yc, rtol, atol), k + 1
        err = float(err_t.detach())  # one host sync per step, as in torchdiffeq's controller
        if not math.isfinite(err):
            raise SolverError(f"adams: the state or its derivative is not finite at u={un}")
        factor = 0.9 * max(err, 1e-10) ** (-1.0 / q)
        if err <= 1.0:
            y, u = yc, un
            hist = [*hist[-(order + 1) :], (un, fp)]
            stats["accepted"] += 1
            h = h * min(5.0, max(0.2, factor))
        else:
            stats["rejected"] += 1
            h = h * min(1.0, max(0.2, factor))
        if h < 1e-14 * abs(span):
            raise SolverError(f"adams: step size underflow at u={u} of [{u0}, {u1}]")
    return y, stats
