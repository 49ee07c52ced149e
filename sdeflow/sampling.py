r"""The sampling layer: solver names -> configured solvers, and :func:`sample`.

:func:`sample` picks the driver by the configured solver's type (:mod:`sdeflow.solvers.base`): an
:class:`~sdeflow.solvers.base.Integrator` (or a configuration that hands one out, e.g. ``rk45`` with the torchdiffeq
backend) integrates the whole span itself; a solver with ``tolerances`` runs the per-sample adaptive driver
(:func:`sdeflow.integrate.solve_adaptive`); any other :class:`~sdeflow.solvers.base.Stepper` walks a grid sized by the
NFE budget (:func:`sdeflow.integrate.solve`). It draws x_T from the prior when not given, and returns a
:class:`~sdeflow.solvers.record.SampleResult` whose ``nfe`` is what the Denoiser counted, never the solver's
arithmetic. Sampling records no autograd graph unless ``enable_grad=True``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .denoiser import Denoiser
from .grids import time_grid
from .integrate import solve, solve_adaptive
from .noise import IIDNoise, NoiseSource, PerSampleGenerator, randn
from .solvers import SOLVERS, available
from .solvers.base import Solver, SolverError, Stepper
from .solvers.record import Callback, SampleResult
from .solvers.state import memo_per_grid

_EMPTY = torch.empty(0, dtype=torch.float64)

__all__ = ["DEFAULT_SOLVER", "available", "make_solver", "make_stepper", "sample"]


def make_solver(den: Denoiser, solver: str | Solver, **solver_options: Any) -> Solver:
    """A configured solver from its name in ``SOLVERS`` (or pass an instance through)."""
    if isinstance(solver, Solver):
        if solver_options:
            raise ValueError("pass solver options to the stepper's constructor, not with a solver instance")
        if solver.den is not den:
            raise ValueError("the solver instance wraps another denoiser than the one given to sample()")
        return solver
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; available solvers: {', '.join(available())}")
    return SOLVERS[solver](den, **solver_options)


#: the solver ``sample()`` uses when none is named: UniPC (bh2, p = 2, with its corrector) on the path's default grid,
#: ahead of or level with DPM-Solver++(2M) in 30 of 36 cells of benchmarks/default_grids.py (docs/solvers.md)
DEFAULT_SOLVER = "unipc"

#: the historical name (a solver is not always a stepper: bridges and the Picard driver are integrators)
make_stepper = make_solver


def sample(
    den: Denoiser,
    solver: str | Solver = DEFAULT_SOLVER,
    nfe: int | None = None,
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
    max_steps: int = 20_000,
    enable_grad: bool = False,
    t_start: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **solver_options: Any,
) -> SampleResult:
    """Sample from ``den`` by integrating its reverse dynamics from ``sde.T`` to ``t_end`` (default ``sde.eps``).

    Args:
        den: the :class:`~sdeflow.Denoiser`.
        solver: a name in ``sdeflow.solvers.SOLVERS`` (see ``sdeflow.solvers.available()``) or a solver instance
            (default :data:`DEFAULT_SOLVER`, ``"unipc"``).
        nfe: budget of net calls (default 10), never exceeded: fixed-step solvers take the most steps it pays for,
            ``solver.num_steps(nfe, t_end)`` (``nfe // nfe_per_step``; heun: ``nfe // 2`` full Heun steps, or
            ``(nfe + 1) // 2`` on a grid ending at sigma = s/a = 0, where its last step is an Euler step), on one
            fewer NFE when ``denoise_final``. What a solver cannot split is left unspent (heun's odd budget at
            sigma > 0): ``res.nfe`` is what was spent. With a grid tensor the grid sets the steps: leave nfe None, or
            give a budget that makes exactly that many steps (anything else raises). Ignored by adaptive solvers.
        x_T: the state at ``t_start``: drawn from the prior (with ``generator``) when None, then ``shape`` is
            required (only at t_start = T: below T pass the state, e.g. ``sde.marginal(x0, t_start, noise)``).
        generator: a torch.Generator or a :class:`~sdeflow.noise.PerSampleGenerator` for x_T and the solver's noise.
        t_end: the final time, in [0, T) (default ``sde.eps``; a grid tensor's last time, which must then agree).
        grid: ``"uniform" | "logsnr" | "quadratic" | "karras"``, diffusers' spacings for discrete models, or a
            decreasing tensor of times from ``t_start`` to ``t_end`` (default: the solver's grid kind).
        t_start: the start time (default ``sde.T``); below T the sampler starts from the given x_T at t_start
            (SDEdit-style partial sampling; Meng et al. 2022).
        model_kwargs: keyword inputs passed to the net on every call (conditioning tensors: ``class_labels``,
            diffusers' ``encoder_hidden_states``, ...). Tensors with one row per sample are sliced to the samples a
            solver steps (:class:`~sdeflow.denoiser.BoundDenoiser`); NFE is counted on ``den``.
        denoise_final: finish with the Tweedie denoising step x0_hat(x, t_end) (one more net call).
        noise: a noise source for stochastic solvers (default IID from ``generator``).
        rtol, atol: tolerances of adaptive solvers.
        max_steps: cap on the adaptive driver's rounds and on rk45's bridge steps (a SolverError past it).
        enable_grad: record the autograd graph (to differentiate through the sampler); off by default, so sampling
            a net whose parameters require grad costs no graph memory.
        **solver_options: options of the solver (e.g. ``eta`` for DDIM, ``order`` for DPM-Solver).

    Returns:
        :class:`~sdeflow.solvers.record.SampleResult` with x, nfe (counted by the Denoiser), times, trajectory, stats.
    """
    if not isinstance(den, Denoiser):
        raise TypeError(f"den must be a sdeflow.Denoiser, got {type(den).__name__}")
    if not isinstance(enable_grad, bool):
        raise ValueError(f"enable_grad must be True or False, got {enable_grad!r}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise ValueError(
            f"model_kwargs must be a dict of keyword inputs for the net, got {type(model_kwargs).__name__}"
        )
    if model_kwargs:
        if isinstance(solver, Solver):
            raise ValueError(
                "model_kwargs with a solver instance: build the solver on den.bind(**model_kwargs) instead"
            )
        den = den.bind(**model_kwargs)
    with torch.set_grad_enabled(bool(enable_grad)):
        return _sample(
            den, solver, nfe, x_T, shape, generator, t_end, grid, return_trajectory, progress, denoise_final, noise,
            callback, dtype, device, rtol, atol, max_steps, t_start, solver_options,
        )  # fmt: skip


#: the default grid when the path starts at a(T) = 0, where "logsnr" and "karras" do not exist. Measured on exact
#: 3-component flow-matching mixtures (shift 1 and 3, RMS error against DOP853 at 1e-11, docs/solvers.md): dpm_solver++
#: and unipc on "quadratic" have 0.2-0.4x the error of diffusers' FlowMatchEuler (Euler, uniform) at 10 and 20 NFE,
#: and 1.5-10x less than on "uniform" (whose long last log-SNR step destabilizes 2nd-order multistep); heun keeps the
#: uniform grid of diffusers' FlowMatchHeun.
ZERO_SNR_GRIDS = {"logsnr": "quadratic", "karras": "uniform"}


def _finite_log_snr(sde: Any, t: float) -> bool:
    return math.isfinite(float(sde.log_snr(torch.tensor(t, dtype=torch.float64))))


def _check_net_dtype(den: Denoiser, x: torch.Tensor) -> None:
    """A torch module whose floating parameters have another dtype than the samples fails inside its first layer with
    a raw error: say it here, with what to change."""
    net = getattr(den, "net", None)
    if isinstance(net, torch.nn.Module):
        dtypes = {p.dtype for p in net.parameters() if p.is_floating_point()}
        if dtypes and x.dtype not in dtypes:
            have = ", ".join(sorted(str(d) for d in dtypes))
            raise ValueError(
                f"the samples are {x.dtype} but the net's parameters are {have}: pass dtype={have} to sample() "
                f"(or x_T of that dtype), or convert the net (net.to({x.dtype}))"
            )


def _check_nfe(nfe: Any) -> None:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")


def _span(sde: Any, grid: str | torch.Tensor | None, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    """(t_start, t_end), checked against each other and against a grid tensor's ends (a conflict raises)."""
    T = float(sde.T)
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if isinstance(grid, torch.Tensor):
        if grid.ndim != 1 or grid.numel() < 2:
            raise ValueError(f"grid must be a 1-D tensor of at least 2 times, got shape {tuple(grid.shape)}")
        g0, g1 = float(grid[0]), float(grid[-1])
        if not bool((grid[1:] < grid[:-1]).all()):
            raise ValueError("grid must be strictly decreasing (sampling runs from noise to data)")
        tol = 1e-9 * max(1.0, T)
        if t_start is None and abs(g0 - T) > tol:
            raise ValueError(
                f"the grid starts at t={g0:.6g}, not at T={T}, where x_T is drawn from the prior: pass t_start={g0:.6g} "
                "and x_T = the state at that time (SDEdit-style), or a grid from T"
            )
        if t_start is not None and abs(g0 - t_start) > tol:
            raise ValueError(f"the grid starts at t={g0:.6g} but t_start={t_start}: they must agree")
        if t_end is not None and abs(g1 - t_end) > tol:
            raise ValueError(f"the grid ends at t={g1:.6g} but t_end={t_end}: they must agree (or leave t_end None)")
        t_start, t_end = g0, g1
    t_start = T if t_start is None else float(t_start)
    t_end = float(sde.eps if t_end is None else t_end)
    if not 0.0 <= t_end < sde.T:
        raise ValueError(f"t_end must lie in [0, T) = [0, {sde.T}), got t_end={t_end}")
    if not t_end < t_start <= T + 1e-9 * max(1.0, T):
        raise ValueError(f"t_start must satisfy t_end < t_start <= T = {T}, got t_start={t_start}, t_end={t_end}")
    return t_start, t_end


def _sample(
    den: Denoiser,
    solver: str | Solver,
    nfe: int | None,
    x_T: torch.Tensor | None,
    shape: tuple[int, ...] | None,
    generator: torch.Generator | PerSampleGenerator | None,
    t_end: float | None,
    grid: str | torch.Tensor | None,
    return_trajectory: bool,
    progress: bool,
    denoise_final: bool,
    noise: NoiseSource | None,
    callback: Callback | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
    rtol: float | None,
    atol: float | None,
    max_steps: int,
    t_start: float | None,
    solver_options: dict[str, Any],
) -> SampleResult:
    sde = den.sde
    if rtol is not None:
        solver_options["rtol"] = rtol
    if atol is not None:
        solver_options["atol"] = atol
    if isinstance(solver, str) and "max_steps" in getattr(SOLVERS.get(solver), "options", {}):
        solver_options.setdefault("max_steps", max_steps)  # whole-span bridges cap their own steps (rk45)
    s = make_solver(den, solver, **solver_options)
    t_start, t_end = _span(sde, grid, t_start, t_end)
    if x_T is None:
        if shape is None:
            raise ValueError("pass either x_T or shape (batch, *data_shape)")
        if t_start < sde.T:
            raise ValueError(
                f"t_start={t_start} < T={sde.T}: pass x_T, the state at t_start (e.g. sde.marginal(x0, t_start, "
                "noise)); only at T is it drawn from the prior"
            )
        x_T = sde.prior_std() * randn(tuple(shape), generator, dtype=dtype, device=device)
    else:
        if shape is not None and tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, but shape={tuple(shape)} was given")
        if x_T.ndim < 2:
            raise ValueError(f"x_T must have shape (batch, *data_shape), got {tuple(x_T.shape)}")
        if not x_T.is_floating_point():
            raise ValueError(f"x_T must be a floating-point tensor, got dtype {x_T.dtype}")
        if not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T must be finite")
    _check_net_dtype(den, x_T)
    batch = getattr(den, "batch", None)
    if batch not in (None, 1, x_T.shape[0]):
        raise ValueError(
            f"model_kwargs tensors have {batch} rows but x_T has {x_T.shape[0]} samples: one row per sample"
        )
    if noise is None and s.noise_draws:
        noise = IIDNoise(generator)
    zero_signal = (
        den.prediction in ("eps", "score") and float(sde.alpha(torch.tensor(t_start, dtype=torch.float64))) == 0
    )
    try:
        return _drive(
            s,
            den,
            x_T,
            nfe,
            grid,
            t_start,
            t_end,
            return_trajectory,
            progress,
            denoise_final,
            noise,
            callback,
            max_steps,
        )
    except SolverError as err:
        if zero_signal:  # the NaN comes from x0 = (x - s eps) / a at a = 0: say so
            raise ValueError(
                f"the path has a(t_start) = 0 at t_start={t_start} (pure noise), where a {den.prediction}-prediction "
                "model carries no information about x0: start below it (t_start < T) or use an x0 / v / flow model"
            ) from err
        raise


def _drive(
    s: Solver,
    den: Denoiser,
    x_T: torch.Tensor,
    nfe: int | None,
    grid: str | torch.Tensor | None,
    t_start: float,
    t_end: float,
    return_trajectory: bool,
    progress: bool,
    denoise_final: bool,
    noise: NoiseSource | None,
    callback: Callback | None,
    max_steps: int,
) -> SampleResult:
    """Run the driver the configured solver's type asks for (module doc) and finish the result."""
    sde = den.sde
    nfe0 = den.nfe
    whole = s.integrator()
    tol = s.tolerances
    if whole is None and tol is not None:
        if return_trajectory:
            raise ValueError("return_trajectory is not available for adaptive solvers (per-sample times differ)")
        res = solve_adaptive(
            s,  # type: ignore[arg-type]  # solve_adaptive checks the capability and raises a clear error
            x_T,
            t_start,
            t_end,
            rtol=tol.rtol,
            atol=tol.atol,
            h0=tol.h0,
            noise=noise,
            callback=callback,
            progress=progress,
            max_steps=max_steps,
        )
    else:
        if isinstance(grid, torch.Tensor):
            steps = grid.numel() - 1
            if nfe is not None and tol is None:  # adaptive configurations take the grid as output times
                _check_nfe(nfe)
                budget = nfe - (1 if denoise_final else 0)
                if budget < 1 or s.num_steps(budget, t_end) != steps:
                    raise ValueError(
                        f"nfe={nfe} does not fit the grid tensor of {steps} steps (solver {s.name!r} takes "
                        f"{s.num_steps(budget, t_end) if budget >= 1 else 0} steps for it): pass nfe=None to let the grid set "
                        "the steps, or a grid of that many steps"
                    )
        else:
            nfe = 10 if nfe is None else nfe
            _check_nfe(nfe)
            budget = nfe - (1 if denoise_final else 0)
            if budget < 1:
                raise ValueError(f"nfe={nfe} leaves no net call for the solver after the final denoising step")
            steps = s.num_steps(budget, t_end)
        kind = grid if grid is not None else s.default_grid
        if isinstance(kind, str) and grid is None and kind in ZERO_SNR_GRIDS and not _finite_log_snr(sde, t_start):
            kind = ZERO_SNR_GRIDS[kind]  # a(T) = 0 (flow path, zero terminal SNR): no log-SNR / sigma grid exists
        if isinstance(kind, str):  # a named grid is a function of (sde, steps, kind, t_start, t_end): built once
            key = ("time_grid", steps, kind, t_start, t_end)
            start = None if t_start == float(sde.T) else t_start  # diffusers' spacings fix their own start
            build = lambda: time_grid(sde, steps, kind, t_end=t_end, t_start=start)
            g = memo_per_grid(sde, key, _EMPTY, build).clone()
        else:
            g = time_grid(sde, steps, kind, t_end=t_end, t_start=None if t_start == float(sde.T) else t_start)
        if whole is not None:
            res = whole.integrate(
                x_T, g, noise=noise, callback=callback, return_trajectory=return_trajectory, progress=progress
            )
        elif isinstance(s, Stepper):
            res = solve(s, x_T, g, noise, callback, return_trajectory, progress)
        else:
            raise TypeError(f"solver {s.name!r} ({type(s).__name__}) is neither a Stepper nor an Integrator")
    if denoise_final:
        x0 = den.x0(res.x, torch.tensor(t_end, dtype=torch.float64))
        if not bool(torch.isfinite(x0).all()):
            raise SolverError(f"non-finite values in the final denoising step at t = {t_end:.6g}")
        res.x = x0
    res.nfe = den.nfe - nfe0
    res.stats["nfe"] = res.nfe
    return res
