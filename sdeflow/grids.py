r"""Time grids for samplers, in float64, from ``T`` down to ``t_end`` (both exact end points).

* ``"uniform"``: uniform in t (Song et al. 2021; DDIM's "linear" spacing).
* ``"logsnr"``: uniform in :math:`\lambda = \log(a/s)` (DPM-Solver's ``logSNR``, Lu et al. 2022), mapped back with
  ``sde.t_from_log_snr``.
* ``"quadratic"``: :math:`t_i = (\sqrt{T} + \tfrac iN(\sqrt{t_\text{end}} - \sqrt T))^2` (DDIM / DPM-Solver
  ``time_quadratic``).
* ``"karras"``: :math:`\sigma_i = (\sigma_\max^{1/\rho} + \tfrac iN(\sigma_\min^{1/\rho} - \sigma_\max^{1/\rho}))^\rho`,
  :math:`\rho = 7`, in the EDM noise level :math:`\sigma = s/a` (Karras et al. 2022, eq. 5), mapped back to t.
* ``"leading" | "trailing" | "linspace"``: diffusers' timestep spacings for a discrete model of N training steps
  (a :class:`~sdeflow.sdes.DiscreteVPSDE`; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", Table 2), as diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` compute them for
  ``steps`` inference steps: integer timesteps n (``trailing``: ``round(N - k N/steps) - 1``; ``leading``:
  ``k (N // (steps + 1)) + steps_offset``; ``linspace``: ``round(linspace(0, N - 1, steps + 1))`` without the 0),
  each mapped to sdeflow's time t = (n + 1)/N, then the final time ``t_end``. diffusers' ``final_sigmas_type`` is
  ``t_end``: ``"sigma_min"`` is the default ``t_end = sde.eps = 1/N`` (timestep 0), ``"zero"`` is ``t_end = 0``.
* a user tensor: strictly decreasing times in [t_end, T].

The log-SNR based grids (``"logsnr"``, ``"karras"``) need a finite log-SNR at both ends: on paths that reach pure
noise (:class:`~sdeflow.sdes.FlowMatchingPath`, zero-terminal-SNR schedules) they raise; use ``"uniform"``,
``"trailing"`` or a tensor there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import numpy as np

from .sdes import GaussianSDE

__all__ = ["GRIDS", "SPACINGS", "time_grid", "check_grid", "diffusers_timesteps"]

#: grids defined on every path
GRIDS = ("uniform", "logsnr", "quadratic", "karras")
#: diffusers' timestep spacings (discrete models only)
SPACINGS = ("leading", "trailing", "linspace")


def diffusers_timesteps(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    import numpy as np  # diffusers' own arithmetic (float64 numpy), imported only for these spacings

    """diffusers' integer timesteps (decreasing, int64) of ``DPMSolverMultistepScheduler.set_timesteps(steps)`` /
    ``UniPCMultistepScheduler`` for a ``timestep_spacing`` (diffusers 0.2x-0.4x, ``lambda_min_clipped = -inf``)."""
    N = int(num_train_timesteps)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > N:
        raise ValueError(f"steps={steps} exceeds the {N} training timesteps of the model")
    if spacing == "linspace":
        ts = np.linspace(0, N - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = N // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        ts = np.arange(N, 0, -N / steps).round().astype(np.int64) - 1
    else:
        raise ValueError(f"spacing={spacing!r} is not supported; allowed values: {', '.join(map(repr, SPACINGS))}")
    return ts.copy()


def time_grid(
    sde: GaussianSDE,
    steps: int,
    kind: str | torch.Tensor = "uniform",
    t_end: float | None = None,
    t_start: float | None = None,
    rho: float = 7.0,
    device: torch.device | str | None = None,
    *,
    steps_offset: int = 0,
) -> torch.Tensor:
    """A float64 grid of ``steps + 1`` decreasing times from ``t_start`` (default ``sde.T``) to ``t_end``
    (default ``sde.eps``).

    Args:
        sde: the SDE (its log-SNR defines the "logsnr" and "karras" grids).
        steps: number of intervals, >= 1.
        kind: ``"uniform" | "logsnr" | "quadratic" | "karras"``, diffusers' spacings ``"leading" | "trailing" |
            "linspace"`` (discrete models; module docstring) or a tensor of times (validated, returned as float64).
        rho: the Karras exponent.
        steps_offset: diffusers' ``steps_offset`` of the ``"leading"`` spacing (Stable Diffusion's configs use 1).
    """
    for name, v in (("t_start", t_start), ("t_end", t_end), ("rho", rho)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (the Karras exponent; 7 in EDM), got {rho!r}")
    if not isinstance(kind, (str, torch.Tensor)):
        raise ValueError(f"kind (the grid) must be a grid name or a tensor of times, got {type(kind).__name__}")
    T = float(sde.T if t_start is None else t_start)
    t_end = float(sde.eps if t_end is None else t_end)
    if isinstance(kind, torch.Tensor):
        grid = kind.detach().to(device=device, dtype=torch.float64).flatten()
        check_grid(grid, sde)
        return grid
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(kind, str) and kind in SPACINGS:
        return _spacing_grid(sde, steps, kind, t_end, t_start, steps_offset, device)
    if not 0.0 <= t_end < T:
        raise ValueError(f"t_end must lie in [0, T) = [0, {T}), got t_end={t_end}")
    if T > sde.T + 1e-12:
        raise ValueError(f"t_start must be <= sde.T = {sde.T}, got {T}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if kind == "uniform":
        grid = T + u * (t_end - T)
    elif kind == "quadratic":
        grid = (T**0.5 + u * (t_end**0.5 - T**0.5)) ** 2
    elif kind == "logsnr":
        lam0, lam1 = sde.log_snr(T), sde.log_snr(t_end)
        _check_finite_log_snr(kind, float(lam0), float(lam1), T, t_end)
        grid = sde.t_from_log_snr(lam0 + u * (lam1 - lam0))
    elif kind == "karras":
        if t_end <= 0:
            raise ValueError('the "karras" grid needs t_end > 0 (sigma(0) = 0 has no rho-th root ramp)')
        _check_finite_log_snr(kind, float(sde.log_snr(T)), float(sde.log_snr(t_end)), T, t_end)
        smax = float(sde.edm_sigma(T)) ** (1.0 / rho)
        smin = float(sde.edm_sigma(t_end)) ** (1.0 / rho)
        grid = sde.t_from_edm_sigma((smax + u * (smin - smax)) ** rho)
    else:
        raise ValueError(
            f"grid={kind!r} is not supported; allowed values: {', '.join(map(repr, GRIDS + SPACINGS))} or a tensor"
        )
    grid = grid.clone()
    grid[0], grid[-1] = T, t_end
    return grid.to(device) if device is not None else grid


def _check_finite_log_snr(kind: str, lam0: float, lam1: float, T: float, t_end: float) -> None:
    if not (math.isfinite(lam0) and math.isfinite(lam1)):
        raise ValueError(
            f"the {kind!r} grid needs a finite log-SNR at both ends, got lambda({T}) = {lam0}, lambda({t_end}) = {lam1} "
            "(a path that reaches pure noise or clean data there); use grid='uniform', 'trailing' or a tensor of times, "
            "or a t_start / t_end inside the path"
        )


def _spacing_grid(
    sde: GaussianSDE,
    steps: int,
    kind: str,
    t_end: float,
    t_start: float | None,
    steps_offset: int,
    device: torch.device | str | None,
) -> torch.Tensor:
    N = getattr(sde, "N", None)
    if not isinstance(N, int):
        raise ValueError(
            f"grid={kind!r} is diffusers' timestep spacing for discrete models (an SDE with N training steps, e.g. "
            f"DiscreteVPSDE); {type(sde).__name__} has none: use 'uniform', 'logsnr', 'quadratic' or 'karras'"
        )
    if t_start is not None:
        raise ValueError(f"grid={kind!r} starts where diffusers' spacing does; t_start is not supported with it")
    if not 0.0 <= t_end <= 1.0 / N + 1e-12:
        raise ValueError(
            f"grid={kind!r} needs t_end in [0, 1/N] = [0, {1.0 / N}] (diffusers' final_sigmas_type 'zero' is 0, "
            f"'sigma_min' is 1/N), got t_end={t_end}"
        )
    ts = diffusers_timesteps(N, steps, kind, steps_offset)
    if ts.max() > N - 1 or ts.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} moves the {kind!r} timesteps outside [0, N - 1] = [0, {N - 1}]")
    times = (torch.from_numpy(ts).to(torch.float64) + 1.0) / N
    grid = torch.cat([times, torch.tensor([t_end], dtype=torch.float64)])
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(
            f"grid={kind!r} with steps={steps} reaches timestep 0 (t = 1/N) before the final time t_end={t_end}; "
            "use fewer steps or t_end=0"
        )
    return grid.to(device) if device is not None else grid


def check_grid(grid: torch.Tensor, sde: GaussianSDE) -> None:
    """Raise a ValueError unless ``grid`` is a 1-D float tensor of >= 2 strictly decreasing times in [0, T]."""
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be a 1-D tensor of at least 2 times, got shape {tuple(grid.shape)}")
    g = grid.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("grid must be finite")
    if not bool((g[1:] < g[:-1]).all()):
        raise ValueError("grid must be strictly decreasing (from T towards 0)")
    if float(g[0]) > sde.T + 1e-12 or float(g[-1]) < 0:
        raise ValueError(f"grid must lie in [0, T] = [0, {sde.T}], got [{float(g[-1])}, {float(g[0])}]")
