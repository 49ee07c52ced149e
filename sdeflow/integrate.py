r"""The ONE time loop of sdeflow: fixed grids and per-sample adaptive stepping, callbacks, statistics; ``sample()``.

Steppers (:mod:`sdeflow.solvers`) only know how to make one step; everything about time lives here:

* :func:`solve` walks a float64 grid. No host sync inside the loop: non-finite states are recorded in a device flag and
  reported once at the end, naming the first bad step and its times.
* :func:`solve_adaptive` runs a PI step-size controller (Hairer, Norsett & Wanner II, IV.2; Söderlind 2002) with a
  step size *per sample*, on the stepper's embedded error estimate or, failing one, on step doubling (Richardson:
  :math:`\mathrm{err} = (x_{h/2,h/2} - x_h)/(2^p - 1)`), which makes any deterministic stepper adaptive.
* :func:`sample` picks the grid and the step count from an NFE budget, draws x_T from the prior when not given, and
  returns a :class:`SampleResult` whose ``nfe`` is what the Denoiser counted, never the solver's arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .denoiser import Denoiser
from .grids import time_grid
from .noise import IIDNoise, NoiseSource, PerSampleGenerator
from .solvers import SOLVERS, available
from .solvers.base import SolverError, Stepper

__all__ = ["SampleResult", "PIController", "solve", "solve_adaptive", "sample", "make_stepper"]

Callback = Callable[[dict[str, Any]], None]

#: solve_adaptive raises once a sample has had this many non-finite step proposals (each is rejected)
MAX_NONFINITE = 10


@dataclass
class SampleResult:
    """Result of a solve.

    Attributes:
        x: the final state (batch, *data_shape).
        nfe: net calls counted by the Denoiser during the solve.
        times: the float64 times visited (the grid; for adaptive solves the per-sample final times).
        trajectory: states at ``times`` stacked on a leading axis when asked for, else None.
        stats: dict with nfe, steps, accepted, rejected, rounds (and solver-specific entries).
    """

    x: torch.Tensor
    nfe: int
    times: torch.Tensor
    trajectory: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def _progress(total: int | None, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def solve(
    stepper: Stepper,
    x: torch.Tensor,
    grid: torch.Tensor,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SampleResult:
    """Integrate with ``stepper`` along the float64 ``grid`` starting from ``x`` at ``grid[0]``.

    Args:
        stepper: a fixed-grid :class:`~sdeflow.solvers.base.Stepper`.
        x: the state at grid[0], shape (batch, *data_shape).
        grid: float64 times, strictly decreasing (sampling); an increasing grid integrates forward in time
            (probability-flow ODE inversion, :func:`sdeflow.guidance.encode`).
        noise: the noise source for stochastic steppers (default: IID from the global RNG).
        callback: called after every step with ``{"i", "t", "x", "x0"}``.
        return_trajectory: stack the states at every grid time.
    """
    den = stepper.den
    nfe0 = den.nfe
    if stepper.noise_draws and noise is None:
        noise = IIDNoise(None)
    state = stepper.init(x, grid)
    traj = [x] if return_trajectory else None
    bad_step = torch.full((), -1, dtype=torch.long, device=x.device)
    n = grid.numel() - 1
    bar = _progress(n, progress, stepper.name)
    for i in range(n):
        t0, t1 = grid[i], grid[i + 1]
        z = noise(i, t0, t1, x, stepper.noise_draws) if stepper.noise_draws else None
        res = stepper.step(t0, t1, x, state, z)
        x, state = res.x, res.state
        # one reduction instead of isfinite(x).all() (5 passes over x): NaN/inf anywhere makes the sum non-finite
        nonfinite = ~torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))
        bad_step = torch.where((bad_step < 0) & nonfinite, torch.full_like(bad_step, i), bad_step)
        if traj is not None:
            traj.append(x)
        if callback is not None:
            callback({"i": i, "t": t1, "x": x, "x0": res.x0})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _raise_if_bad(bad_step, grid)
    steps = n
    stats = {"nfe": den.nfe - nfe0, "steps": steps, "accepted": steps, "rejected": 0, "rounds": den.nfe - nfe0}
    trajectory = torch.stack(traj) if traj is not None else None
    return SampleResult(x, den.nfe - nfe0, grid, trajectory, stats)


def _raise_if_bad(bad_step: torch.Tensor, grid: torch.Tensor) -> None:
    i = int(bad_step)  # the one host sync of a fixed-grid solve
    if i >= 0:
        raise SolverError(
            f"non-finite values (NaN/inf) at step {i}, t = {float(grid[i]):.6g} -> {float(grid[i + 1]):.6g}: the model "
            "output or the state diverged; check the model, the dtype and the grid's end time"
        )


@dataclass
class PIController:
    r"""PI step-size controller: :math:`h \leftarrow h\,\min(f_{max}, \max(f_{min}, \kappa\,e_n^{-\beta_1/k}
    e_{n-1}^{\beta_2/k}))`, k = order + 1 (Gustafsson 1991; Hairer & Wanner II, IV.2). Rejected steps never grow."""

    safety: float = 0.9
    beta1: float = 0.7
    beta2: float = 0.4
    factor_min: float = 0.2
    factor_max: float = 5.0

    def factor(self, err: torch.Tensor, err_prev: torch.Tensor, order: float) -> torch.Tensor:
        k = order + 1.0
        e = err.clamp(min=1e-10)
        f = self.safety * e.pow(-self.beta1 / k) * err_prev.clamp(min=1e-10).pow(self.beta2 / k)
        f = torch.where(torch.isfinite(f), f, torch.full_like(f, self.factor_min))
        f = f.clamp(self.factor_min, self.factor_max)
        return torch.where(err <= 1.0, f, f.clamp(max=1.0))


def error_norm(err: torch.Tensor, x_old: torch.Tensor, x_new: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per-sample RMS of err / (atol + rtol max(|x_old|, |x_new|)) (Hairer's norm); non-finite -> inf. Shape (B,)."""
    scale = atol + rtol * torch.maximum(x_old.abs(), x_new.abs())
    r = (err / scale).reshape(err.shape[0], -1).pow(2).mean(1).sqrt()
    return torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf"))).to(torch.float64)


def solve_adaptive(
    stepper: Stepper,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    h0: float | None = None,
    noise: NoiseSource | None = None,
    controller: PIController | None = None,
    max_steps: int = 100_000,
    callback: Callback | None = None,
    progress: bool = False,
) -> SampleResult:
    """Adaptive integration from ``t_start`` down to ``t_end`` with one step size per sample.

    ``t_end > t_start`` integrates forward in time (probability-flow ODE inversion, :func:`sdeflow.guidance.encode`);
    steppers' formulas from t0 to t1 hold in either direction.

    The stepper's ``step`` is called on the active samples with per-sample times (B_active,). If it returns no
    ``error``, step doubling estimates it (deterministic steppers only).
    """
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if t_end == t_start:
        raise ValueError(f"t_end must differ from t_start, got t_end={t_end}, t_start={t_start}")
    direction = -1.0 if t_end < t_start else 1.0
    # a stepper may bring its paper's controller and error norm (e.g. adaptive_sde, Jolicoeur-Martineau et al. 2021)
    controller = controller or getattr(stepper, "controller", None) or PIController()
    norm = getattr(stepper, "error_norm", None) or error_norm
    den = stepper.den
    nfe0 = den.nfe
    if stepper.noise_draws and noise is None:
        noise = IIDNoise(None)
    B, dev = x.shape[0], x.device
    f64 = dict(dtype=torch.float64, device=dev)
    span = abs(t_start - t_end)
    t = torch.full((B,), float(t_start), **f64)
    h = torch.full((B,), float(h0 if h0 is not None else 0.05 * span), **f64)
    h_min = 1e-12 * max(1.0, span)
    err_prev = torch.ones(B, **f64)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    n_rej = torch.zeros(B, dtype=torch.long, device=dev)
    n_bad = torch.zeros(B, dtype=torch.long, device=dev)  # non-finite proposals per sample
    rounds = 0
    bar = _progress(None, progress, stepper.name)
    done_tol = 1e-12 * max(1.0, abs(t_end))
    while True:
        active = direction * (t_end - t) > done_tol
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        rounds += 1
        if rounds > max_steps:
            raise SolverError(f"adaptive solve did not reach t_end={t_end} in max_steps={max_steps} rounds")
        t0 = t[idx]
        t1 = t0 + direction * h[idx]
        t1 = (
            torch.maximum(t1, torch.full_like(t0, t_end))
            if direction < 0
            else torch.minimum(t1, torch.full_like(t0, t_end))
        )
        xs = x[idx]
        z = noise(rounds - 1, t0, t1, xs, stepper.noise_draws) if stepper.noise_draws else None
        res = stepper.step(t0, t1, xs, None, z)
        x_new, err = res.x, res.error
        if err is None:
            if stepper.stochastic:
                raise ValueError(
                    f"solver {stepper.name!r} is stochastic and has no error estimate: it cannot be adaptive"
                )
            mid = 0.5 * (t0 + t1)
            half = stepper.step(mid, t1, stepper.step(t0, mid, xs, None, None).x, None, None)
            err = (half.x - x_new) / (2.0**stepper.order - 1.0)
            x_new = half.x
        en = norm(err, xs, x_new, rtol, atol)
        accept = en <= 1.0
        hs = direction * (t1 - t0)
        k_order = stepper.order if (res.error is None or stepper.error_order is None) else stepper.error_order
        fac = controller.factor(en, err_prev[idx], k_order)
        acc_idx = idx[accept]
        x = x.index_copy(0, acc_idx, x_new[accept]) if acc_idx.numel() else x
        t = t.index_copy(0, acc_idx, t1[accept])
        err_prev = err_prev.index_copy(0, acc_idx, en[accept].clamp(min=1e-4))
        n_acc = n_acc.index_add(0, idx, accept.long())
        n_rej = n_rej.index_add(0, idx, (~accept).long())
        h = h.index_copy(0, idx, hs * fac)
        nonfinite = ~torch.isfinite(en) | ~torch.isfinite(x_new.reshape(x_new.shape[0], -1)).all(1)
        n_bad = n_bad.index_add(0, idx, nonfinite.long())
        if bool((n_bad[idx] >= MAX_NONFINITE).any()):
            b = idx[n_bad[idx] >= MAX_NONFINITE][0]
            raise SolverError(
                f"non-finite values (NaN/inf) at t = {float(t[b]):.6g} for sample {int(b)}: {MAX_NONFINITE} step "
                "proposals were not finite (each one shrank the step): the model output or the state diverged"
            )
        if bool((h[idx][~accept] < h_min).any()):
            bad = idx[~accept][h[idx][~accept] < h_min][0]
            raise SolverError(
                f"step size underflow at t = {float(t[bad]):.6g} for sample {int(bad)}: the error estimate is not "
                "finite or the tolerances are too tight"
            )
        if callback is not None:
            callback({"i": rounds - 1, "t": t, "x": x, "x0": res.x0})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    nfe = den.nfe - nfe0
    stats = {
        "nfe": nfe,
        "steps": int(n_acc.max()) if B else 0,
        "accepted": int(n_acc.sum()),
        "rejected": int(n_rej.sum()),
        "rounds": rounds,
        "accepted_per_sample": n_acc,
        "rejected_per_sample": n_rej,
    }
    return SampleResult(x, nfe, t, None, stats)


def make_stepper(den: Denoiser, solver: str | Stepper, **solver_options: Any) -> Stepper:
    """A stepper from its name in ``SOLVERS`` (or pass an instance through)."""
    if isinstance(solver, Stepper):
        if solver_options:
            raise ValueError("pass solver options to the stepper's constructor, not with a stepper instance")
        return solver
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; available solvers: {', '.join(available())}")
    return SOLVERS[solver](den, **solver_options)


def sample(
    den: Denoiser,
    solver: str | Stepper = "dpm_solver++",
    nfe: int | None = 10,
    x_T: torch.Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    generator: torch.Generator | PerSampleGenerator | None = None,
    t_end: float | None = None,
    grid: str | torch.Tensor | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    *,
    denoise_final: bool = False,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    **solver_options: Any,
) -> SampleResult:
    """Sample from ``den`` by integrating its reverse dynamics from ``sde.T`` to ``t_end`` (default ``sde.eps``).

    Args:
        den: the :class:`~sdeflow.Denoiser`.
        solver: a name in ``sdeflow.solvers.SOLVERS`` (see ``sdeflow.solvers.available()``) or a Stepper instance.
        nfe: budget of net calls; fixed-step solvers take ``nfe // nfe_per_step`` steps (one fewer NFE when
            ``denoise_final``). Ignored by adaptive solvers (they take rtol/atol).
        x_T: the starting noise; drawn from the prior (with ``generator``) when None, then ``shape`` is required.
        generator: a torch.Generator or a :class:`~sdeflow.noise.PerSampleGenerator` for x_T and the solver's noise.
        t_end: the final time, in [0, T).
        grid: ``"uniform" | "logsnr" | "quadratic" | "karras"`` or a tensor of times (default: the solver's).
        denoise_final: finish with the Tweedie denoising step x0_hat(x, t_end) (one more net call).
        noise: a noise source for stochastic solvers (default IID from ``generator``).
        rtol, atol: tolerances of adaptive solvers.
        **solver_options: options of the solver (e.g. ``eta`` for DDIM, ``order`` for DPM-Solver).

    Returns:
        :class:`SampleResult` with x, nfe (counted by the Denoiser), times, trajectory, stats.
    """
    sde = den.sde
    if rtol is not None:
        solver_options["rtol"] = rtol
    if atol is not None:
        solver_options["atol"] = atol
    stepper = make_stepper(den, solver, **solver_options)
    t_end = float(sde.eps if t_end is None else t_end)
    if not 0.0 <= t_end < sde.T:
        raise ValueError(f"t_end must lie in [0, T) = [0, {sde.T}), got t_end={t_end}")
    if x_T is None:
        if shape is None:
            raise ValueError("pass either x_T or shape (batch, *data_shape)")
        from .noise import randn

        x_T = sde.prior_std() * randn(tuple(shape), generator, dtype=dtype, device=device)
    else:
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, but shape={tuple(shape)} was given")
        if x_T.ndim < 2:
            raise ValueError(f"x_T must have shape (batch, *data_shape), got {tuple(x_T.shape)}")
        if not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T must be finite")
    if noise is None and stepper.noise_draws:
        noise = IIDNoise(generator)
    nfe0 = den.nfe
    if stepper.mode == "adaptive":
        res = solve_adaptive(
            stepper,
            x_T,
            sde.T,
            t_end,
            rtol=stepper.opts.get("rtol", 1e-3),
            atol=stepper.opts.get("atol", 1e-3),
            h0=stepper.opts.get("h0"),
            noise=noise,
            callback=callback,
            progress=progress,
        )
        if return_trajectory:
            raise ValueError("return_trajectory is not available for adaptive solvers (per-sample times differ)")
    else:
        if nfe is None or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
        budget = nfe - (1 if denoise_final else 0)
        if budget < 1:
            raise ValueError(f"nfe={nfe} leaves no net call for the solver after the final denoising step")
        steps = stepper.num_steps(budget)
        kind = grid if grid is not None else stepper.default_grid
        g = time_grid(sde, steps, kind, t_end=t_end)
        if isinstance(kind, torch.Tensor):
            t_end = float(g[-1])
        if stepper.mode == "external":
            res = stepper.integrate(
                x_T, g, noise=noise, callback=callback, return_trajectory=return_trajectory, progress=progress
            )
        else:
            res = solve(stepper, x_T, g, noise, callback, return_trajectory, progress)
    if denoise_final:
        x0 = den.x0(res.x, torch.tensor(t_end, dtype=torch.float64))
        if not bool(torch.isfinite(x0).all()):
            raise SolverError(f"non-finite values in the final denoising step at t = {t_end:.6g}")
        res.x = x0
    res.nfe = den.nfe - nfe0
    res.stats["nfe"] = res.nfe
    return res
