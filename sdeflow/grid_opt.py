r"""Fitted sampling grids: the time steps of a given solver at a given NFE budget, optimised for a given model.

At low NFE the time grid, not the solver formula, decides the error, and the best grid depends on the model (where
its probability-flow trajectories bend). :func:`optimize_grid` fits the grid of a fixed-grid deterministic solver to
the model by minimising the final error against a high-accuracy reference solve of the same model from the same
starting noises:

.. math:: \min_{T = t_0 > t_1 > \dots > t_S = t_\text{end}}\ \mathrm{RMS}\big(\Phi_{t_{0:S}}(x_T) - x^\star(x_T)\big),

with :math:`\Phi` the solver on the grid and :math:`x^\star` the reference (a fine DPM-Solver++(3M) solve in float64,
its own error estimated from a half-resolution solve and reported). Two methods, both gradient-free (they call
only :func:`sdeflow.integrate.solve`, so every fixed-grid deterministic solver works, multistep ones included):

* ``method="dp"`` (global): dynamic programming over a fine candidate set of times along the reference trajectories,
  as in optimal stepsize distillation (OSS, Zhou et al. 2025, "Optimal Stepsize for Diffusion Sampling"): the cost of
  a step :math:`\tau_i \to \tau_j` is the RMS error of ONE solver step from the reference state at :math:`\tau_i`
  against the reference state at :math:`\tau_j`, and the DP finds the S-step path of least summed cost
  (:math:`O(S M^2)` for M candidates). One step from a reference state ignores a multistep solver's history, so the
  DP grid is then refined by coordinate descent on the *true* end error (``refine=True``: each interior knot in turn,
  golden-section search between its neighbours, the solver run end to end; started from the DP path and from the
  best built-in grid), as DMN does with its local-error objective (Xue et al. 2024, "Accelerating Diffusion
  Sampling with Optimized Time Steps").
* ``method="local"`` (cheap): golden-section coordinate descent on a two-parameter family scored by the true end
  error. With :math:`\sigma = e^{-\lambda}` (the EDM noise level, Karras et al. 2022), times are uniform in the
  Box-Cox transform :math:`\phi_q(\sigma) = (\sigma^q - 1)/q` (:math:`q = 0`: uniform in log-SNR, DPM-Solver's
  grid; :math:`q = 1/\rho`: EDM's :math:`\rho` ramp) after a power warp :math:`u \mapsto u^p` of the step index
  fraction. About 30 solves.

The fitting noises (when not given) are drawn by :func:`stratified_noises`: ``n`` of a pool of ``16 n`` prior
draws, the hardest quarter always in and the rest weighted, because at few NFE the RMS error over many noises is
dominated by a few per cent of them (see the function). Both methods start from the best of the built-in grids
(:data:`sdeflow.grids.GRIDS`) and keep every grid that improved the best error. Optionally a fraction of the noises
(``validation``) stays out of the search and picks, of those grids, the one returned (early stopping); the result is
never worse, on all the fitting noises, than the solver's default grid. Everything is deterministic given the generator (a fixed seed when None).

Measured (docs/benchmarks.md, "Optimized time grids"): on exact-score mixtures in d = 2 and 64, fitted grids cut
the default grids' error 1.3-9x at NFE 4-10 on held-out noises.

:func:`fit_grid` returns a :class:`GridFit` (the grid, the errors, the cost in NFE and seconds); :func:`optimize_grid`
returns its grid. :class:`GridCache` memoises fits per (model fingerprint, solver, options, NFE, fit settings), in
memory and optionally as JSON files; :func:`save_grid` / :func:`load_grid` write and read one grid with the SDE's
description.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .denoiser import Denoiser
from .grids import GRIDS, check_grid, time_grid
from .integrate import solve
from .sampling import make_stepper
from .solvers.base import SolverError, Stepper

__all__ = [
    "GridFit",
    "METHODS",
    "Reference",
    "reference_solve",
    "stratified_noises",
    "fit_grid",
    "optimize_grid",
    "model_fingerprint",
    "GridCache",
    "save_grid",
    "load_grid",
]

METHODS = ("dp", "local")
F64 = torch.float64
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_FORMAT = "sdeflow.grid/1"


@dataclass
class GridFit:
    """The result of :func:`fit_grid`.

    Attributes:
        grid: the fitted float64 grid, decreasing from ``sde.T`` to ``t_end``.
        error: RMS end error of the solver on ``grid`` against the reference, on all the fitting noises (the
            searched part and the validation part).
        default_error: the same on the solver's default grid (``error <= default_error`` always).
        default_grid: the solver's default grid at this budget.
        solver, options, nfe, method: what was fitted.
        n: number of fitting noises.
        reference_nfe: net calls of the reference solve (and its half-resolution check).
        reference_error: estimated RMS error of the reference itself (Richardson, from the half-resolution solve).
        fit_nfe: net calls of this call (the reference's included unless it was passed in).
        evaluations: end-to-end solves of the solver made while fitting.
        seconds: wall time of the fit.
        history: (evaluation index, best error so far on the searched noises) whenever the best improved.
    """

    grid: torch.Tensor
    error: float
    default_error: float
    default_grid: torch.Tensor
    solver: str
    options: dict[str, Any]
    nfe: int
    method: str
    n: int
    reference_nfe: int
    reference_error: float
    fit_nfe: int
    evaluations: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ coordinates
class _Coord:
    r"""A monotone map between u in [0, 1] and times in [t_end, T]: :math:`u = (1 - m)\,u_\lambda + m\,u_t`, the
    blend (weight m = ``mix``) of the position linear in log-SNR and the one linear in t (a log-SNR-uniform set
    alone wastes candidates at high noise on schedules whose log-SNR plunges near T, e.g. the cosine one; a
    t-uniform one starves the low-noise end). Without a finite log-SNR range (t_end = 0) it is linear in t."""

    def __init__(self, sde: Any, T: float, t_end: float, mix: float = 0.5) -> None:
        self.sde, self.T, self.t_end = sde, T, t_end
        lam0 = float(sde.log_snr(torch.tensor(T, dtype=F64)))
        lam1 = float(sde.log_snr(torch.tensor(t_end, dtype=F64)))
        self.log_snr = math.isfinite(lam0) and math.isfinite(lam1) and lam1 > lam0
        self.lam0, self.lam1 = lam0, lam1
        self.mix = float(mix) if self.log_snr else 1.0

    def _u(self, t: torch.Tensor) -> torch.Tensor:
        ut = (t - self.T) / (self.t_end - self.T)
        if self.mix >= 1.0:
            return ut
        ul = (self.sde.log_snr(t).to(F64) - self.lam0) / (self.lam1 - self.lam0)
        return (1.0 - self.mix) * ul + self.mix * ut

    def times(self, u: torch.Tensor) -> torch.Tensor:
        u = u.to(F64)
        if self.mix >= 1.0:
            t = self.T + u * (self.t_end - self.T)
        elif self.mix <= 0.0:
            t = self.sde.t_from_log_snr(self.lam0 + u * (self.lam1 - self.lam0)).to(F64)
        else:  # bisection: u(t) decreases in t
            lo = torch.full_like(u, self.t_end)
            hi = torch.full_like(u, self.T)
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                above = self._u(mid) > u  # mid is too early (too small a t)
                lo = torch.where(above, mid, lo)
                hi = torch.where(above, hi, mid)
            t = 0.5 * (lo + hi)
        t = t.clone()
        t[0], t[-1] = self.T, self.t_end
        return t

    def u_of(self, grid: torch.Tensor) -> torch.Tensor:
        u = self._u(grid.to(F64)).clone()
        u[0], u[-1] = 0.0, 1.0
        return u


# ------------------------------------------------------------------------------------------------ the objective
class _Objective:
    """End-to-end RMS error of the solver on a grid against the reference end states; counts and tracks the best."""

    def __init__(
        self, stepper: Stepper, x_T: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, budget: int, coord: _Coord
    ) -> None:
        self.stepper, self.x_T, self.ref, self.w, self.budget, self.coord = stepper, x_T, ref, w, budget, coord
        self.evaluations = 0
        self.best_err = math.inf
        self.best_grid: torch.Tensor | None = None
        self.history: list[tuple[int, float]] = []
        self.snapshots: list[torch.Tensor] = []  # every grid that improved the best, in order

    def grid_error(self, grid: torch.Tensor) -> float:
        self.evaluations += 1
        err = _solve_error(self.stepper, self.budget, self.x_T, grid, self.ref, self.w)
        if err < self.best_err:
            self.best_err, self.best_grid = err, grid.clone()
            self.history.append((self.evaluations, err))
            self.snapshots.append(self.best_grid)
        return err

    def u_error(self, u: torch.Tensor) -> float:
        if not bool((u[1:] > u[:-1]).all()):
            return math.inf
        grid = self.coord.times(u)
        if not bool((grid[1:] < grid[:-1]).all()):
            return math.inf
        return self.grid_error(grid)


def _solve_error(
    stepper: Stepper, budget: int, x_T: torch.Tensor, grid: torch.Tensor, ref: torch.Tensor, w: torch.Tensor
) -> float:
    r"""Weighted RMS :math:`\sqrt{\sum_i w_i e_i^2 / \sum_i w_i}` of the per-sample RMS errors e_i."""
    try:
        stepper.num_steps(budget)  # singlestep solvers remember their NFE split for init()
        x = solve(stepper, x_T, grid).x
    except SolverError:
        return math.inf
    mse = (x.to(F64) - ref.to(F64)).pow(2).reshape(x.shape[0], -1).mean(1)
    err = float(((w * mse).sum() / w.sum()).sqrt())
    return err if math.isfinite(err) else math.inf


def _rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((x.to(F64) - ref.to(F64)).pow(2).mean().sqrt())
    return err if math.isfinite(err) else math.inf


def _golden(f: Callable[[float], float], a: float, b: float, x0: float, f0: float, iters: int) -> tuple[float, float]:
    """Golden-section search of f on [a, b] (Kiefer 1953), ``iters`` evaluations; returns the best of it and (x0, f0)."""
    best = (f0, x0)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    best = min(best, (fc, c), (fd, d))
    for _ in range(max(0, iters - 2)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
            best = min(best, (fc, c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
            best = min(best, (fd, d))
    return best[1], best[0]


def _coordinate_descent(obj: _Objective, u: torch.Tensor, sweeps: int, iters: int, tol: float) -> torch.Tensor:
    """Each interior knot in turn (golden section between its neighbours) on the true end error, ``sweeps`` times;
    stops early when a sweep improves by less than the relative ``tol``."""
    u = u.clone()
    err = obj.u_error(u)
    for _ in range(sweeps):
        start = err
        for k in range(1, u.numel() - 1):
            lo, hi = float(u[k - 1]), float(u[k + 1])
            gap = 1e-4 * (hi - lo)

            def f(v: float, k: int = k) -> float:
                w = u.clone()
                w[k] = v
                return obj.u_error(w)

            v, e = _golden(f, lo + gap, hi - gap, float(u[k]), err, iters)
            if e < err:
                u[k], err = v, e
        if not start < math.inf or start - err <= tol * start:
            break
    return u


# ------------------------------------------------------------------------------------------------ the family
def _family_u(coord: _Coord, steps: int, q: float, p: float) -> torch.Tensor:
    r"""u of the grid uniform in :math:`\phi_q(\sigma)` (:math:`\sigma = e^{-\lambda}`) at index fractions
    :math:`(i/S)^p`; without a finite log-SNR range, the power ramp :math:`u = (i/S)^{p e^q}` in t."""
    w = torch.linspace(0.0, 1.0, steps + 1, dtype=F64) ** p
    if not coord.log_snr:  # no finite log-SNR range: a power ramp in t, u = w^(exp q)
        return w ** math.exp(q)
    ls0, ls1 = -coord.lam0, -coord.lam1  # log sigma at the two ends (decreasing)

    def bc(ls: float | torch.Tensor) -> Any:
        return ls if abs(q) < 1e-12 else (torch.expm1(torch.as_tensor(q * ls, dtype=F64)) / q)

    phi0, phi1 = bc(ls0), bc(ls1)
    phi = phi0 + w * (phi1 - phi0)
    ls = phi if abs(q) < 1e-12 else torch.log1p(q * torch.as_tensor(phi)) / q
    return coord.u_of(coord.sde.t_from_log_snr(-ls).to(F64))


def _fit_family(obj: _Objective, steps: int, iters: int, sweeps: int = 2) -> tuple[float, float]:
    """Coordinate golden-section search of (q, p) in [-1, 1] x [1/3, 3] (p through log p)."""
    q, lp = 0.0, 0.0

    def err(q: float, lp: float) -> float:
        u = _family_u(obj.coord, steps, q, math.exp(lp))
        return obj.u_error(u) if bool(torch.isfinite(u).all()) else math.inf

    e = err(q, lp)
    for _ in range(sweeps):
        q, e = _golden(lambda v, lp=lp: err(v, lp), -1.0, 1.0, q, e, iters)  # type: ignore[misc]  # default-arg binding
        lp, e = _golden(lambda v, q=q: err(q, v), -math.log(3.0), math.log(3.0), lp, e, iters)  # type: ignore[misc]  # idem
    return q, math.exp(lp)


# ------------------------------------------------------------------------------------------------ DP
def _dp_path(cost: torch.Tensor, steps: int) -> list[int]:
    """Least summed cost path 0 -> M of exactly ``steps`` edges i -> j (i < j); cost (M+1, M+1), inf = forbidden."""
    M = cost.shape[0] - 1
    inf = math.inf
    D = torch.full((steps + 1, M + 1), inf, dtype=F64)
    arg = torch.full((steps + 1, M + 1), -1, dtype=torch.long)
    D[0, 0] = 0.0
    for m in range(1, steps + 1):
        # D[m, j] = min_i D[m-1, i] + cost[i, j]
        tot = D[m - 1][:, None] + cost
        best, idx = tot.min(0)
        D[m], arg[m] = best, idx
    if not math.isfinite(float(D[steps, M])):
        raise RuntimeError("no finite DP path: every candidate step failed")
    path = [M]
    for m in range(steps, 0, -1):
        path.append(int(arg[m, path[-1]]))
    return path[::-1]


def _dp_costs(
    stepper: Stepper, coord: _Coord, u_cand: torch.Tensor, states: torch.Tensor, dtype: torch.dtype, max_span: int
) -> torch.Tensor:
    """cost[i, j]: RMS error of one solver step from the reference state at candidate i to candidate j."""
    times = coord.times(u_cand)
    M = times.numel() - 1
    cost = torch.full((M + 1, M + 1), math.inf, dtype=F64)
    for i in range(M):
        x = states[i].to(dtype)
        for j in range(i + 1, min(M, i + max_span) + 1):
            try:
                y = solve(stepper, x, times[[i, j]]).x
            except SolverError:
                continue
            cost[i, j] = _rms(y, states[j])
    return cost


# ------------------------------------------------------------------------------------------------ the fit
@dataclass
class Reference:
    """A high-accuracy solve from fitting noises (see :func:`reference_solve`); pass it to :func:`fit_grid` to share
    one reference between the fits of a sweep (every solver, option set and budget of one model and t_end).

    Attributes:
        x_T: the starting noises; trajectory: the states at ``times`` (steps + 1, *x_T.shape), float64 by default.
        times: the reference grid (uniform in the fit's coordinate); t_end: its last time.
        error: estimated RMS error of the end states (Richardson: half-resolution difference / 7), NaN if unchecked.
        nfe: net calls spent.
        weights: per-noise weights of the error estimate (from :func:`stratified_noises`), None for equal ones.
    """

    x_T: torch.Tensor
    trajectory: torch.Tensor
    times: torch.Tensor
    t_end: float
    error: float
    nfe: int
    weights: torch.Tensor | None = None


def reference_solve(
    den: Denoiser,
    x_T: torch.Tensor,
    t_end: float | None = None,
    steps: int = 240,
    dtype: torch.dtype = torch.float64,
    check: bool = True,
    mix: float = 0.5,
    weights: torch.Tensor | None = None,
) -> Reference:
    r"""Fine DPM-Solver++(3M) solve (Lu et al. 2022b; no lower-order final steps) of the probability-flow ODE from
    ``x_T`` at ``sde.T`` to ``t_end`` on ``steps`` steps uniform in the blend ``mix`` of log-SNR and t (the fit's
    candidate coordinate, see ``fit_grid``), in ``dtype``, keeping every state; with
    ``check``, a half-resolution solve estimates its error (third order: :math:`e_h \approx (x_{2h} - x_h)/7`)."""
    sde = den.sde
    t_end = float(sde.eps if t_end is None else t_end)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2 or steps % 2:
        raise ValueError(f"steps must be an even integer >= 2, got {steps!r}")
    coord = _Coord(sde, float(sde.T), t_end, mix)
    nfe0 = den.nfe
    ref_stepper = _fixed_grid_stepper(den, "dpm_solver++", order=3, lower_order_final=False)
    x = x_T.to(dtype)
    times = coord.times(torch.linspace(0.0, 1.0, steps + 1, dtype=F64))
    traj = solve(ref_stepper, x, times, return_trajectory=True).trajectory
    assert traj is not None
    est = math.nan
    if check:
        half = solve(ref_stepper, x, times[::2]).x
        est = _rms(half, traj[-1]) / 7.0
    if weights is not None and (weights.shape != (x_T.shape[0],) or not bool((weights > 0).all())):
        raise ValueError(f"weights must be positive with shape ({x_T.shape[0]},), got {tuple(weights.shape)}")
    return Reference(x_T, traj, times, t_end, est, den.nfe - nfe0, weights)


def stratified_noises(
    den: Denoiser,
    shape: Sequence[int],
    n: int = 256,
    pool: int = 4096,
    hard: float = 0.25,
    generator: torch.Generator | None = None,
    t_end: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""n fitting noises and weights that estimate the RMS error over a ``pool`` of prior noises with low variance.

    At a few NFE the RMS end error over many noises is dominated by a few per cent of them (trajectories that pass
    near the boundary between modes are the most sensitive), so a few hundred plain draws hold too few of them and a
    fitted grid over-fits the rest. Stratified sampling (Cochran 1977, ch. 5) fixes the estimate: rank the pool by
    a cheap proxy of each noise's error (the gap between DPM-Solver++(2M) on the log-SNR grid at 8 and at 16 NFE,
    24 net calls on the pool in ``dtype``), keep the ``hard * n`` hardest with weight 1 and draw the rest uniformly
    from the others with weight :math:`(N - h)/m`; :math:`\sum_i w_i e_i^2 / \sum_i w_i` is then an unbiased
    estimate of the pool's mean squared error for every grid. Returns (x_T (n, *shape) float64 in random order,
    weights (n,) float64)."""
    sde = den.sde
    for name, v in (("n", n), ("pool", pool)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if pool < n:
        raise ValueError(f"pool={pool} must be >= n={n}")
    if not (isinstance(hard, (int, float)) and 0.0 <= hard < 1.0):
        raise ValueError(f"hard must be a fraction in [0, 1), got {hard!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x_pool = sde.prior_std() * torch.randn((pool, *tuple(shape)), generator=gen, dtype=F64)
    h = int(round(hard * n)) if pool > n else 0
    if h:
        proxy = _fixed_grid_stepper(den, "dpm_solver++", order=2)
        te = float(sde.eps if t_end is None else t_end)
        a = solve(proxy, x_pool.to(dtype), time_grid(sde, 8, "logsnr", t_end=te)).x
        b = solve(proxy, x_pool.to(dtype), time_grid(sde, 16, "logsnr", t_end=te)).x
        gap = (a.to(F64) - b.to(F64)).pow(2).reshape(pool, -1).mean(1)
        order = torch.argsort(gap, descending=True, stable=True)
        hard_idx, rest = order[:h], order[h:]
    else:
        hard_idx, rest = torch.zeros(0, dtype=torch.long), torch.arange(pool)
    m = n - h
    pick = rest[torch.randperm(rest.numel(), generator=gen)[:m]]
    idx = torch.cat([hard_idx, pick])
    w = torch.cat([torch.ones(h, dtype=F64), torch.full((m,), (pool - h) / m, dtype=F64)])
    perm = torch.randperm(n, generator=gen)
    return x_pool[idx[perm]], w[perm]


def _fixed_grid_stepper(den: Denoiser, solver: str | Stepper, **options: Any) -> Stepper:
    """The configured solver, refused unless a driver walks it along a fixed grid."""
    stepper = make_stepper(den, solver, **options)
    if not isinstance(stepper, Stepper) or stepper.integrator() is not None or stepper.tolerances is not None:
        raise ValueError(
            f"solver {stepper.name!r} is not a fixed-grid solver (it is adaptive or integrates whole spans): "
            "optimize_grid fits the grid of a fixed-grid deterministic solver (e.g. 'dpm_solver++', 'unipc', "
            "'dpm_solver', 'heun', 'euler', 'ddim')"
        )
    return stepper


def _check_solver(stepper: Stepper, nfe: int, t_end: float | None = None) -> int:
    """Refuse what a fitted fixed grid cannot serve; return the number of grid steps for the budget (on a grid ending
    at ``t_end``)."""
    if stepper.stochastic or stepper.noise_draws:
        raise ValueError(
            f"solver {stepper.name!r} with options {stepper.opts} is stochastic: a fitted grid needs a deterministic "
            "solver (its end error against the probability-flow reference must be a function of the grid)"
        )
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    return stepper.num_steps(nfe, t_end)


def fit_grid(
    den: Denoiser,
    solver: str | Stepper = "dpm_solver++",
    nfe: int = 10,
    x_T: torch.Tensor | None = None,
    shape: Sequence[int] | None = None,
    n: int = 256,
    method: str = "dp",
    generator: torch.Generator | None = None,
    t_end: float | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    reference: Reference | None = None,
    reference_steps: int = 240,
    reference_dtype: torch.dtype | None = None,
    check_reference: bool = True,
    candidates: int = 48,
    dp_samples: int = 64,
    refine: bool = True,
    validation: float = 0.0,
    mix: float = 0.5,
    pool: int | None = None,
    hard: float = 0.25,
    sweeps: int = 3,
    golden_iters: int = 8,
    tol: float = 1e-3,
    **solver_options: Any,
) -> GridFit:
    """Fit the time grid of ``solver`` at budget ``nfe`` to the model ``den`` (module docstring).

    Args:
        den: the model.
        solver: a fixed-grid deterministic solver: a name in ``sdeflow.solvers.SOLVERS`` or a Stepper instance.
        nfe: the budget of net calls the grid is fitted for; the solver must spend exactly this many.
        x_T: the fitting noises (batch, *data_shape), weighted equally; when None (and no ``reference``), ``n``
            are drawn by :func:`stratified_noises` from a pool of ``pool`` (default 16 n) prior noises with
            ``generator``, the ``hard`` fraction of them the pool's hardest.
        shape: the data shape of ONE sample (without the batch axis), needed when ``x_T`` is None.
        n: number of fitting noises drawn when ``x_T`` is None (a few hundred generalise; see the tests).
        method: ``"dp"`` (global: dynamic programming on the reference trajectories, then coordinate descent on
            the true end error) or ``"local"`` (cheap: golden-section search of a two-parameter grid family).
        generator: draws the fitting noises (default: a generator seeded with 0, so fits are reproducible).
        t_end: the final time (default ``sde.eps``).
        dtype: the dtype the solver runs in while fitting (the dtype you will sample in).
        reference: a :func:`reference_solve` of this model to reuse (its noises are the fitting noises; its step
            count must be a multiple of ``candidates``); when None, one is made with ``reference_steps`` (rounded
            up to an even multiple of ``candidates``), ``reference_dtype`` (default float64, or the dtype of the
            net's parameters when they are another floating type: an nn.Module in float32 takes float32 inputs) and
            ``check_reference`` (also solve at half resolution and report the reference's error).
        candidates: number of candidate intervals of the DP (``"dp"``).
        dp_samples: noises used for the DP's one-step costs (the refinement uses all of them).
        refine: run the coordinate descent on the true end error after the DP.
        mix: the search coordinate u = (1 - mix) u_log-SNR + mix u_t in which candidates and the reference grid are
            uniform (0: log-SNR, 1: t).
        validation: the fraction of the noises kept out of the search: of the grids that improved the fitting
            error, the one best on these is returned (early stopping against over-fitting a small noise set). Off
            by default: with a tail-dominated error a held-out quarter is too noisy a judge (d = 64 mixture, NFE 5,
            UniPC(bh1, 3): 0.25 picked an early grid, held-out error 0.111 against 0.086 without).
        sweeps, golden_iters, tol: coordinate-descent sweeps, golden-section evaluations per knot, and the
            relative improvement per sweep below which it stops.
        **solver_options: the solver's options (e.g. ``order=3``).

    Returns:
        a :class:`GridFit`; ``.grid`` is the float64 grid to pass as ``sf.sample(..., grid=fit.grid)``.

    Raises:
        ValueError: a stochastic or non-fixed-grid solver, a budget the solver cannot spend exactly, bad arguments.
    """
    t_start = time.perf_counter()
    nfe0 = den.nfe
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed values: {', '.join(map(repr, METHODS))}")
    stepper = _fixed_grid_stepper(den, solver, **solver_options)
    sde = den.sde
    T = float(sde.T)
    t_end = float(sde.eps if t_end is None else t_end)
    if not 0.0 <= t_end < T:
        raise ValueError(f"t_end must lie in [0, T) = [0, {T}), got t_end={t_end}")
    steps = _check_solver(stepper, nfe, t_end)
    for name, v in (("n", n), ("reference_steps", reference_steps), ("candidates", candidates)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(validation, (int, float)) and 0.0 <= validation <= 0.5):
        raise ValueError(f"validation must be a fraction in [0, 0.5], got {validation!r}")
    if not (isinstance(mix, (int, float)) and 0.0 <= mix <= 1.0):
        raise ValueError(f"mix must lie in [0, 1], got {mix!r}")
    if candidates < steps:
        raise ValueError(f"candidates={candidates} must be >= the number of steps {steps}")
    weights: torch.Tensor | None = None
    if reference is not None:
        if x_T is not None and x_T is not reference.x_T:
            raise ValueError("pass the fitting noises either as x_T or through reference, not both")
        if abs(reference.t_end - t_end) > 1e-12:
            raise ValueError(f"the reference ends at t_end={reference.t_end}, but t_end={t_end} was asked")
        if (reference.times.numel() - 1) % candidates:
            raise ValueError(
                f"the reference's {reference.times.numel() - 1} steps are not a multiple of candidates={candidates}"
            )
        x_T = reference.x_T
        weights = reference.weights
    if x_T is None:
        if shape is None:
            raise ValueError("pass either x_T or shape (the data shape of one sample)")
        x_T, weights = stratified_noises(den, shape, n, 16 * n if pool is None else pool, hard, generator, t_end, dtype)
    else:
        if x_T.ndim < 2:
            raise ValueError(f"x_T must have shape (batch, *data_shape), got {tuple(x_T.shape)}")
        if shape is not None and tuple(shape) != tuple(x_T.shape[1:]):
            raise ValueError(f"x_T has data shape {tuple(x_T.shape[1:])}, but shape={tuple(shape)} was given")
        if not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T must be finite")
    coord = _Coord(sde, T, t_end, mix)

    # the default grid, and the budget check: the solver must spend exactly nfe on it
    default = time_grid(sde, steps, stepper.default_grid, t_end=t_end)
    probe = x_T[:1].to(dtype)
    before = den.nfe
    stepper.num_steps(nfe, t_end)
    solve(stepper, probe, default)
    spent = den.nfe - before
    if spent != nfe:
        raise ValueError(
            f"nfe={nfe} cannot be split by solver {stepper.name!r} ({stepper.nfe_per_step} NFE per step): a grid of "
            f"{steps} steps spends {spent}; pick a budget it spends exactly (a multiple of {stepper.nfe_per_step})"
        )

    # the reference: a fine solve whose grid holds the DP candidates
    if reference_dtype is not None and not (
        isinstance(reference_dtype, torch.dtype) and reference_dtype.is_floating_point
    ):
        raise ValueError(
            f"reference_dtype must be None or a floating torch.dtype (e.g. torch.float64), got {reference_dtype!r}"
        )
    if reference is None:
        if reference_dtype is None:
            net = den.net
            param = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
            reference_dtype = param.dtype if param is not None and param.is_floating_point() else torch.float64
        sub = -(-reference_steps // (2 * candidates)) * 2
        reference = reference_solve(den, x_T, t_end, sub * candidates, reference_dtype, check_reference, mix)
    sub = (reference.times.numel() - 1) // candidates
    traj, ref = reference.trajectory, reference.trajectory[-1]
    u_fine = coord.u_of(reference.times)
    x_all = x_T.to(dtype)
    w_all = weights if weights is not None else torch.ones(x_all.shape[0], dtype=F64)
    n_val = int(round(validation * x_all.shape[0])) if x_all.shape[0] >= 8 else 0
    n_fit = x_all.shape[0] - n_val
    obj = _Objective(stepper, x_all[:n_fit], ref[:n_fit], w_all[:n_fit], nfe, coord)

    builtin = {stepper.default_grid: (obj.grid_error(default), default)}
    for kind in GRIDS:  # every built-in grid is a starting candidate
        if kind == stepper.default_grid:
            continue
        try:
            g = time_grid(sde, steps, kind, t_end=t_end)
        except ValueError:
            continue
        builtin[kind] = (obj.grid_error(g), g)
    best_builtin = min(builtin.values(), key=lambda v: v[0])[1]

    if steps >= 2:
        if method == "local":
            q, p = _fit_family(obj, steps, golden_iters)
        else:
            u_cand = u_fine[::sub]
            states = traj[::sub][:, :dp_samples]
            cost = _dp_costs(stepper, coord, u_cand, states, dtype, max_span=candidates)
            path = _dp_path(cost, steps)
            obj.u_error(u_cand[path])
            if refine:  # two starts: the DP path and the best built-in grid (the search has local minima)
                for start in (coord.u_of(coord.times(u_cand[path])), coord.u_of(best_builtin)):
                    _coordinate_descent(obj, start, sweeps, golden_iters, tol)

    # early stopping against over-fitting: of the grids that improved the fitting error, the one with the least
    # error on the validation noises; then the contract on all fitting noises: never worse than the default grid
    best = obj.snapshots[-1]
    if n_val:
        x_val, ref_val = x_all[n_fit:], ref[n_fit:]
        val = [_solve_error(stepper, nfe, x_val, g, ref_val, w_all[n_fit:]) for g in obj.snapshots]
        best = obj.snapshots[min(range(len(val)), key=lambda i: (val[i], -i))]
    err = _solve_error(stepper, nfe, x_all, best, ref, w_all)
    default_error = _solve_error(stepper, nfe, x_all, default, ref, w_all)
    if not err <= default_error:
        best, err = default, default_error
    opts = {k: v for k, v in stepper.opts.items()}
    return GridFit(
        grid=best,
        error=err,
        default_error=default_error,
        default_grid=default,
        solver=stepper.name,
        options=opts,
        nfe=nfe,
        method=method,
        n=int(x_T.shape[0]),
        reference_nfe=reference.nfe,
        reference_error=reference.error,
        fit_nfe=den.nfe - nfe0,
        evaluations=obj.evaluations,
        seconds=time.perf_counter() - t_start,
        history=obj.history,
    )


def optimize_grid(
    den: Denoiser,
    solver: str | Stepper = "dpm_solver++",
    nfe: int = 10,
    x_T: torch.Tensor | None = None,
    shape: Sequence[int] | None = None,
    n: int = 256,
    method: str = "dp",
    generator: torch.Generator | None = None,
    t_end: float | None = None,
    **options: Any,
) -> torch.Tensor:
    """The fitted float64 grid of :func:`fit_grid` (same arguments; fit settings and solver options as keywords):
    ``sf.sample(den, solver, nfe=nfe, grid=optimize_grid(den, solver, nfe, shape=(d,)), ...)``."""
    return fit_grid(den, solver, nfe, x_T, shape, n, method, generator, t_end, **options).grid


# ------------------------------------------------------------------------------------------------ cache and JSON
def model_fingerprint(den: Denoiser, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> str:
    """A hash of what the solver sees of the model: the SDE's description and log-SNR at 17 times, the prediction
    type, and the model's outputs on a fixed probe batch (4 samples of data ``shape``) at 3 times (3 net calls)."""
    sde = den.sde
    h = hashlib.sha256()
    h.update(repr(sde).encode())
    h.update(den.prediction.encode())
    ts = sde.eps + (sde.T - sde.eps) * torch.linspace(0.0, 1.0, 17, dtype=F64)
    h.update(sde.log_snr(ts).to(F64).numpy().tobytes())
    probe = torch.randn((4, *tuple(shape)), generator=torch.Generator().manual_seed(1234), dtype=F64).to(dtype)
    with torch.no_grad():
        for t in (0.9, 0.5, 0.1):
            tt = torch.tensor(sde.eps + t * (sde.T - sde.eps), dtype=F64)
            out = den.raw(probe, tt).detach().to("cpu", torch.float32)
            h.update(out.numpy().round(5).tobytes())
    return h.hexdigest()[:24]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


class GridCache:
    """Fitted grids memoised per (model fingerprint, solver, options, NFE, fit settings), so a sweep fits once.

    Args:
        directory: when given, fits are also stored there as JSON (one file per key) and read back across runs.

    ``cache.get(den, solver, nfe, shape=..., **fit_kwargs)`` returns the grid, fitting it on a miss; ``cache.fits``
    holds the :class:`GridFit` of the fits made in this process.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.grids: dict[str, torch.Tensor] = {}
        self.fits: dict[str, GridFit] = {}
        self.hits = 0
        self.misses = 0

    def key(
        self,
        den: Denoiser,
        solver: str | Stepper,
        nfe: int,
        data_shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        **fit_kwargs: Any,
    ) -> str:
        """The cache key: a hash of the model fingerprint, the solver and its options, the budget and the fit's
        settings (method, n, t_end, generator seed state excluded: pass x_T for custom noises)."""
        name = solver if isinstance(solver, str) else solver.name
        opts = dict(solver.opts) if isinstance(solver, Stepper) else {}
        payload = {
            "model": model_fingerprint(den, data_shape, dtype),
            "solver": name,
            "options": _jsonable(opts),
            "nfe": nfe,
            "dtype": str(dtype),
            "fit": _jsonable({k: v for k, v in sorted(fit_kwargs.items()) if k not in ("x_T", "reference")}),
        }
        x_T = fit_kwargs.get("x_T")
        if fit_kwargs.get("reference") is not None:
            x_T = fit_kwargs["reference"].x_T
            payload["reference_steps"] = fit_kwargs["reference"].times.numel() - 1
        if x_T is not None:
            payload["x_T"] = hashlib.sha256(x_T.detach().cpu().to(F64).numpy().tobytes()).hexdigest()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def get(
        self,
        den: Denoiser,
        solver: str | Stepper,
        nfe: int,
        shape: Sequence[int] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        **fit_kwargs: Any,
    ) -> torch.Tensor:
        """The fitted grid for this model, solver (with options in ``fit_kwargs``) and budget; fits on a miss."""
        x_T = fit_kwargs.get("x_T")
        if fit_kwargs.get("reference") is not None:
            x_T = fit_kwargs["reference"].x_T
        if shape is None:
            if x_T is None:
                raise ValueError("pass shape (the data shape of one sample) or x_T")
            shape = tuple(x_T.shape[1:])
        key = self.key(den, solver, nfe, shape, dtype, **fit_kwargs)
        if key in self.grids:
            self.hits += 1
            return self.grids[key]
        path = self.directory / f"{key}.json" if self.directory is not None else None
        if path is not None and path.exists():
            self.hits += 1
            grid = load_grid(path, den.sde)
            self.grids[key] = grid
            return grid
        self.misses += 1
        fit = fit_grid(den, solver, nfe, shape=None if x_T is not None else shape, dtype=dtype, **fit_kwargs)
        self.grids[key], self.fits[key] = fit.grid, fit
        if path is not None:
            save_grid(path, fit.grid, den.sde, fit)
        return fit.grid


def save_grid(path: str | Path, grid: torch.Tensor, sde: Any, fit: GridFit | None = None) -> None:
    """Write ``grid`` as JSON with the SDE's description (``repr(sde)``) and, when given, the fit's summary. Times are
    written as shortest round-trip decimal floats, so :func:`load_grid` returns the same float64 values."""
    check_grid(grid.to(F64), sde)
    doc: dict[str, Any] = {
        "format": _FORMAT,
        "sde": repr(sde),
        "times": [float(t) for t in grid.detach().cpu().to(F64).tolist()],
    }
    if fit is not None:
        doc["fit"] = {
            "solver": fit.solver,
            "options": _jsonable(fit.options),
            "nfe": fit.nfe,
            "method": fit.method,
            "n": fit.n,
            "error": fit.error,
            "default_error": fit.default_error,
            "reference_nfe": fit.reference_nfe,
            "reference_error": fit.reference_error,
            "fit_nfe": fit.fit_nfe,
            "seconds": fit.seconds,
        }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1))


def load_grid(path: str | Path, sde: Any | None = None) -> torch.Tensor:
    """Read a grid written by :func:`save_grid`; with ``sde``, refuse a grid saved for another SDE description."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or "times" not in doc:
        raise ValueError(f"{path} is not a sdeflow grid file (format {_FORMAT!r})")
    grid = torch.tensor(doc["times"], dtype=F64)
    if sde is not None:
        if doc.get("sde") != repr(sde):
            raise ValueError(f"{path} holds a grid for sde {doc.get('sde')!r}, not for {sde!r}")
        check_grid(grid, sde)
    return grid
