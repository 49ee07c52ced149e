r"""The drivers of sdeflow's own steps: a fixed grid (:func:`solve`) and per-sample adaptive stepping
(:func:`solve_adaptive`). Steppers (:mod:`sdeflow.solvers`) only know how to make one step; the time loops live here
and share their bookkeeping (:class:`~sdeflow.solvers.record.Recorder`) with the Picard driver and the bridges.

* :func:`solve` walks a float64 grid with any :class:`~sdeflow.solvers.base.Stepper`. No host sync inside the loop:
  non-finite states are recorded in a device flag and reported once at the end, naming the first bad step and its
  times.
* :func:`solve_adaptive` runs a PI step-size controller (Hairer, Norsett & Wanner II, IV.2; Söderlind 2002) with a
  step size *per sample*, on an :class:`~sdeflow.solvers.base.EmbeddedStepper`'s error estimate or, for a
  deterministic :class:`~sdeflow.solvers.base.SingleStepper`, on step doubling (Richardson:
  :math:`\mathrm{err} = (x_{h/2,h/2} - x_h)/(2^p - 1)` with p the stepper's declared order). Multistep steppers are
  refused: their history has no meaning across per-sample steps of changing size.

:func:`sdeflow.sample` (in :mod:`sdeflow.sampling`) picks the driver by the solver's type.
"""

from __future__ import annotations

from typing import Any

import torch

from .noise import IIDNoise, NoiseSource
from .solvers.base import EmbeddedStepper, MultistepStepper, SingleStepper, SolverError, Stepper, StepResult
from .solvers.control import PIController, check_tolerances, error_norm
from .solvers.record import Callback, Recorder, SampleResult

__all__ = ["MAX_NONFINITE", "PIController", "SampleResult", "error_norm", "solve", "solve_adaptive"]

#: solve_adaptive raises once a sample has had this many non-finite step proposals (each is rejected)
MAX_NONFINITE = 10


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
    if not isinstance(stepper, Stepper):
        raise TypeError(
            f"solve() steps a fixed-grid Stepper, got {type(stepper).__name__}: run an Integrator with its "
            "integrate(), or use sdeflow.sample()"
        )
    draws = stepper.noise_draws
    if draws and noise is None:
        noise = IIDNoise(None)
    n = grid.numel() - 1
    rec = Recorder(stepper.den, stepper.name, n, callback, return_trajectory, progress)
    rec.start(x)
    state = stepper.init(x, grid)
    try:
        for i in range(n):
            t0, t1 = grid[i], grid[i + 1]
            z = noise(i, t0, t1, x, draws) if noise is not None and draws else None
            res = stepper.step(t0, t1, x, state, z)
            x, state = res.x, res.state
            rec.watch(i, x)
            rec.record(i, t1, x, res.x0)
    finally:
        rec.close()
    rec.raise_if_bad(grid)
    return rec.result(x, grid, steps=n, accepted=n, rejected=0, rounds=n)


def _adaptive_step(
    stepper: SingleStepper, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None
) -> tuple[StepResult, float]:
    """A step with its error estimate and the order that sets the controller's exponent."""
    if isinstance(stepper, EmbeddedStepper):
        return stepper.step_with_error(t0, t1, x, z), stepper.error_order
    full = stepper.single_step(t0, t1, x, None)
    mid = 0.5 * (t0 + t1)
    half = stepper.single_step(mid, t1, stepper.single_step(t0, mid, x, None).x, None)
    half.error = (half.x - full.x) / (2.0**stepper.order - 1.0)
    return half, stepper.order


def check_adaptive(stepper: Any) -> SingleStepper:
    """The stepper if the adaptive driver can trust its error estimate, else a ValueError saying why."""
    if isinstance(stepper, MultistepStepper):
        raise ValueError(
            f"solver {stepper.name!r} is a multistep method: its history has no meaning across per-sample steps of "
            "changing size, so the adaptive driver cannot integrate it at its declared order; use it on a grid "
            "(sdeflow.integrate.solve) or choose an embedded pair (rk45, dpm_solver adaptive=True) or a single-step "
            "solver (step doubling)"
        )
    if not isinstance(stepper, SingleStepper):
        raise TypeError(f"solve_adaptive() steps a SingleStepper, got {type(stepper).__name__}")
    if not isinstance(stepper, EmbeddedStepper) and stepper.stochastic:
        raise ValueError(
            f"solver {stepper.name!r} is stochastic and has no error estimate (no embedded pair): it cannot be "
            "adaptive (step doubling would compare different noise)"
        )
    return stepper


def solve_adaptive(
    stepper: SingleStepper,
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

    The stepper's step is called on the active samples with per-sample times (B_active,): an
    :class:`~sdeflow.solvers.base.EmbeddedStepper`'s ``step_with_error``, or step doubling of a deterministic
    :class:`~sdeflow.solvers.base.SingleStepper`. ``max_steps`` caps the controller rounds (a SolverError past it).
    """
    stepper = check_adaptive(stepper)
    check_tolerances(rtol, atol, x.dtype)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if t_end == t_start:
        raise ValueError(f"t_end must differ from t_start, got t_end={t_end}, t_start={t_start}")
    direction = -1.0 if t_end < t_start else 1.0
    # an embedded stepper may bring its paper's controller and error norm (e.g. adaptive_sde)
    if isinstance(stepper, EmbeddedStepper):
        controller, norm = controller or stepper.controller, stepper.error_norm
    else:
        controller, norm = controller or PIController(), error_norm
    draws = stepper.noise_draws
    if draws and noise is None:
        noise = IIDNoise(None)
    B, dev = x.shape[0], x.device
    f64: dict[str, Any] = {"dtype": torch.float64, "device": dev}
    span = abs(t_start - t_end)
    t = torch.full((B,), float(t_start), **f64)
    h = torch.full((B,), float(h0 if h0 is not None else 0.05 * span), **f64)
    h_min = 1e-12 * max(1.0, span)
    err_prev = torch.ones(B, **f64)
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    n_rej = torch.zeros(B, dtype=torch.long, device=dev)
    n_bad = torch.zeros(B, dtype=torch.long, device=dev)  # non-finite proposals per sample
    rounds = 0
    rec = Recorder(stepper.den, stepper.name, None, callback, False, progress)
    done_tol = 1e-12 * max(1.0, abs(t_end))
    try:
        while True:
            active = direction * (t_end - t) > done_tol
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            rounds += 1
            if rounds > max_steps:
                raise SolverError(
                    f"adaptive solve did not reach t_end={t_end} in max_steps={max_steps} rounds (t reached "
                    f"{float(t[idx].min() if direction < 0 else t[idx].max()):.6g}): loosen rtol/atol or raise max_steps"
                )
            t0 = t[idx]
            t1 = t0 + direction * h[idx]
            end = torch.full_like(t0, t_end)
            t1 = torch.maximum(t1, end) if direction < 0 else torch.minimum(t1, end)
            xs = x[idx]
            z = noise(rounds - 1, t0, t1, xs, draws, index=idx) if noise is not None and draws else None
            with stepper.den.rows(idx):  # per-sample inputs bound to the denoiser follow the active samples
                res, k_order = _adaptive_step(stepper, t0, t1, xs, z)
            x_new, err = res.x, res.error
            if err is None:
                raise SolverError(f"solver {stepper.name!r} returned no error estimate from step_with_error")
            en = norm(err, xs, x_new, rtol, atol)
            accept = en <= 1.0
            hs = direction * (t1 - t0)
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
            rec.record(rounds - 1, t, x, res.x0, keep=False)
    finally:
        rec.close()
    return rec.result(
        x,
        t,
        steps=int(n_acc.max()) if B else 0,
        accepted=int(n_acc.sum()),
        rejected=int(n_rej.sum()),
        rounds=rounds,
        accepted_per_sample=n_acc,
        rejected_per_sample=n_rej,
    )
