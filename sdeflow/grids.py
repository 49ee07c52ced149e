r"""Time grids for samplers, in float64, from ``T`` down to ``t_end`` (both exact end points).

* ``"uniform"``: uniform in t (Song et al. 2021; DDIM's "linear" spacing).
* ``"logsnr"``: uniform in :math:`\lambda = \log(a/s)` (DPM-Solver's ``logSNR``, Lu et al. 2022), mapped back with
  ``sde.t_from_log_snr``.
* ``"quadratic"``: :math:`t_i = (\sqrt{T} + \tfrac iN(\sqrt{t_\text{end}} - \sqrt T))^2` (DDIM / DPM-Solver
  ``time_quadratic``).
* ``"karras"``: :math:`\sigma_i = (\sigma_\max^{1/\rho} + \tfrac iN(\sigma_\min^{1/\rho} - \sigma_\max^{1/\rho}))^\rho`,
  :math:`\rho = 7`, in the EDM noise level :math:`\sigma = s/a` (Karras et al. 2022, eq. 5), mapped back to t.
* a user tensor: strictly decreasing times in [t_end, T].
"""

from __future__ import annotations

import torch

from .sdes import GaussianSDE

__all__ = ["GRIDS", "time_grid", "check_grid"]

GRIDS = ("uniform", "logsnr", "quadratic", "karras")


def time_grid(
    sde: GaussianSDE,
    steps: int,
    kind: str | torch.Tensor = "uniform",
    t_end: float | None = None,
    t_start: float | None = None,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A float64 grid of ``steps + 1`` decreasing times from ``t_start`` (default ``sde.T``) to ``t_end``
    (default ``sde.eps``).

    Args:
        sde: the SDE (its log-SNR defines the "logsnr" and "karras" grids).
        steps: number of intervals, >= 1.
        kind: ``"uniform" | "logsnr" | "quadratic" | "karras"`` or a tensor of times (validated, returned as float64).
        rho: the Karras exponent.
    """
    T = float(sde.T if t_start is None else t_start)
    t_end = float(sde.eps if t_end is None else t_end)
    if isinstance(kind, torch.Tensor):
        grid = kind.detach().to(device=device, dtype=torch.float64).flatten()
        check_grid(grid, sde)
        return grid
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
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
        grid = sde.t_from_log_snr(lam0 + u * (lam1 - lam0))
    elif kind == "karras":
        if t_end <= 0:
            raise ValueError('the "karras" grid needs t_end > 0 (sigma(0) = 0 has no rho-th root ramp)')
        smax = float(sde.edm_sigma(T)) ** (1.0 / rho)
        smin = float(sde.edm_sigma(t_end)) ** (1.0 / rho)
        grid = sde.t_from_edm_sigma((smax + u * (smin - smax)) ** rho)
    else:
        raise ValueError(f"grid={kind!r} is not supported; allowed values: {', '.join(map(repr, GRIDS))} or a tensor")
    grid = grid.clone()
    grid[0], grid[-1] = T, t_end
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
