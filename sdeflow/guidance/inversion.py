r"""Probability-flow ODE inversion (encode / decode) and spherical interpolation between latents.

* :func:`encode` / :func:`decode`: integrate the probability-flow ODE from data to noise and back with any
  deterministic stepper (DDIM inversion, Song, Meng & Ermon 2021 Sec. 4.3 / Dhariwal & Nichol 2021 App. F, is the
  ``"ddim"`` case);
* :func:`slerp` (Shoemake 1985) and :func:`interpolate` between latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._utils import append_dims
from ..denoiser import Denoiser
from ..grids import time_grid

__all__ = ["encode", "decode", "slerp", "interpolate"]


def _deterministic_stepper(den: Denoiser, solver: Any, solver_options: dict[str, Any]):
    from ..sampling import make_stepper

    stepper = make_stepper(den, solver, **solver_options)
    if stepper.stochastic or stepper.noise_draws:
        raise ValueError(
            f"solver {stepper.name!r} is stochastic: inversion needs a deterministic probability-flow ODE solver "
            "(e.g. 'ddim' with eta=0, 'euler', 'heun', 'rk45', 'dpm_solver++')"
        )
    return stepper


def _inversion_grid(
    den: Denoiser,
    stepper,
    nfe: int | None,
    grid: str | torch.Tensor | None,
    t_data: float,
    t_noise: float,
    forward: bool = False,
) -> torch.Tensor:
    """The decreasing float64 grid from t_noise to t_data (as sample() builds it); its step count is the one that fits
    the budget when walked towards t_noise (``forward``) or t_data."""
    if nfe is None or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    kind = grid if grid is not None else stepper.default_grid
    steps = stepper.num_steps(nfe, t_noise if forward else t_data)
    return time_grid(den.sde, steps, kind, t_end=t_data, t_start=t_noise)


def _span(den: Denoiser, t_data: float | None, t_noise: float | None) -> tuple[float, float]:
    sde = den.sde
    t_data = float(sde.eps if t_data is None else t_data)
    t_noise = float(sde.T if t_noise is None else t_noise)
    if not 0.0 <= t_data < t_noise <= sde.T:
        raise ValueError(f"t_data and t_noise must satisfy 0 <= t_data < t_noise <= T={sde.T}, got {t_data}, {t_noise}")
    return t_data, t_noise


def _run(
    den: Denoiser,
    x: torch.Tensor,
    solver: Any,
    nfe: int | None,
    grid: str | torch.Tensor | None,
    t_data: float | None,
    t_noise: float | None,
    forward: bool,
    solver_options: dict[str, Any],
):
    """Integrate the probability-flow ODE between t_data and t_noise, forward (encode) or backward (decode)."""
    from ..integrate import solve, solve_adaptive

    _check_data(x, "x0" if forward else "x_T")
    t_data, t_noise = _span(den, t_data, t_noise)
    stepper = _deterministic_stepper(den, solver, solver_options)
    nfe0 = den.nfe
    whole, tol = stepper.integrator(), stepper.tolerances
    if whole is None and tol is not None:  # sdeflow's per-sample adaptive driver
        t0, t1 = (t_data, t_noise) if forward else (t_noise, t_data)
        res = solve_adaptive(stepper, x, t0, t1, rtol=tol.rtol, atol=tol.atol, h0=tol.h0)
    else:
        g = _inversion_grid(den, stepper, nfe, grid, t_data, t_noise, forward)
        g = g.flip(0) if forward else g
        res = whole.integrate(x, g) if whole is not None else solve(stepper, x, g)
    res.nfe = den.nfe - nfe0
    res.stats["nfe"] = res.nfe
    return res


def encode(
    den: Denoiser,
    x0: torch.Tensor,
    solver: Any = "ddim",
    nfe: int | None = 50,
    grid: str | torch.Tensor | None = None,
    t_data: float | None = None,
    t_noise: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    **solver_options: Any,
):
    r"""ODE inversion: integrate the probability-flow ODE :math:`dx/dt = f x - \tfrac12 g^2\nabla\log p_t` *forward*
    from data at ``t_data`` to a latent at ``t_noise`` (DDIM inversion, Song, Meng & Ermon 2021, is ``"ddim"``).

    The steppers' updates are formulas from t0 to t1 that hold in either direction (Euler; DDIM's exponential
    integrator :math:`x_1 = a_1\hat x_0 + s_1\hat\varepsilon`; Heun; Runge-Kutta), so the one solve loop walks the
    sampling grid reversed; adaptive solvers run their controller from t_data up to t_noise (``rk45`` with its
    torchdiffeq / scipy backends integrates the increasing span directly). :func:`decode` with the same solver, nfe
    and grid walks the same times back: the round-trip error is twice the solver's global error, of its order.

    Args:
        den: any Denoiser (a guided or conditional wrapper too).
        x0: data (batch, *data_shape).
        solver: a deterministic solver name or Stepper instance; stochastic ones raise ValueError.
        nfe: net-call budget of fixed-step solvers (the step count is the solver's ``num_steps(nfe)``).
        grid: ``"uniform" | "logsnr" | "quadratic" | "karras"`` or a decreasing tensor of times (the sampling grid;
            walked in reverse). Default: the solver's.
        t_data, t_noise: the span, default ``sde.eps`` and ``sde.T``; t_noise < T encodes to an intermediate time.
        rtol, atol: tolerances of adaptive solvers.
        **solver_options: the solver's options.

    Returns:
        :class:`~sdeflow.integrate.SampleResult` whose ``x`` is the latent at t_noise and ``nfe`` the net calls.
    """
    if rtol is not None:
        solver_options["rtol"] = rtol
    if atol is not None:
        solver_options["atol"] = atol
    return _run(den, x0, solver, nfe, grid, t_data, t_noise, True, solver_options)


def decode(
    den: Denoiser,
    x_T: torch.Tensor,
    solver: Any = "ddim",
    nfe: int | None = 50,
    grid: str | torch.Tensor | None = None,
    t_data: float | None = None,
    t_noise: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    **solver_options: Any,
):
    """Decode a latent: the probability-flow ODE from ``t_noise`` back to ``t_data`` (the inverse of :func:`encode`).

    Same arguments as :func:`encode`; with t_noise = T it is ``sample(den, solver, nfe, x_T=x_T, t_end=t_data, ...)``
    restricted to deterministic solvers. Returns a :class:`~sdeflow.integrate.SampleResult`.
    """
    if rtol is not None:
        solver_options["rtol"] = rtol
    if atol is not None:
        solver_options["atol"] = atol
    return _run(den, x_T, solver, nfe, grid, t_data, t_noise, False, solver_options)


def _check_data(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"{name} must be a tensor of shape (batch, *data_shape)")


def slerp(
    z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor, dot_threshold: float = 0.9995
) -> torch.Tensor:
    r"""Spherical linear interpolation (Shoemake 1985), per sample over the flattened data dims.

    .. math:: \mathrm{slerp}(z_0, z_1; \alpha) = \frac{\sin((1-\alpha)\theta)}{\sin\theta} z_0
              + \frac{\sin(\alpha\theta)}{\sin\theta} z_1,\qquad \cos\theta = \frac{\langle z_0, z_1\rangle}{|z_0||z_1|}

    the interpolation of DDIM latents (Song, Meng & Ermon 2021, Sec. 5.3): Gaussian latents concentrate on a sphere,
    where a straight line would pass through low-density, low-norm points. Where :math:`|\cos\theta| >` ``dot_threshold``
    (nearly parallel, sin(theta) -> 0) it falls back to the linear interpolation, its limit.

    Args:
        z0, z1: (B, *data_shape), same shape.
        alpha: a float or a (B,) tensor; alpha = 0 gives z0, alpha = 1 gives z1.
    Returns:
        (B, *data_shape).
    """
    if z0.shape != z1.shape or z0.ndim < 2:
        raise ValueError(
            f"z0 and z1 must have the same shape (batch, *data_shape), got {tuple(z0.shape)}, {tuple(z1.shape)}"
        )
    if not 0.0 < dot_threshold < 1.0:
        raise ValueError(f"dot_threshold must lie in (0, 1), got {dot_threshold}")
    B = z0.shape[0]
    a = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device)
    if a.ndim and a.shape != (B,):
        raise ValueError(f"alpha must be a float or have shape (batch,) = ({B},), got {tuple(a.shape)}")
    for name, value in (("z0", z0), ("z1", z1), ("alpha", a)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite: it holds NaN or inf")
    f0, f1 = z0.reshape(B, -1), z1.reshape(B, -1)
    cos = (f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1)).clamp_min(torch.finfo(z0.dtype).tiny)
    cos = cos.clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    parallel = cos.abs() > dot_threshold
    sin = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(parallel, 1 - a, torch.sin((1 - a) * theta) / sin)
    c1 = torch.where(parallel, a * torch.ones_like(theta), torch.sin(a * theta) / sin)
    return append_dims(c0, z0.ndim) * z0 + append_dims(c1, z0.ndim) * z1


def interpolate(
    den: Denoiser,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    alphas: Sequence[float] | torch.Tensor,
    solver: Any = "ddim",
    nfe: int = 50,
    **options: Any,
) -> torch.Tensor:
    """Interpolate data through the latent space: encode x_a and x_b, slerp the latents at each alpha, decode.

    Args:
        x_a, x_b: (B, *data_shape) data.
        alphas: N interpolation weights.
        solver, nfe, **options: as for :func:`encode` / :func:`decode` (a deterministic solver).
    Returns:
        (N, B, *data_shape): decoded interpolants, row i at ``alphas[i]``.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    z = encode(den, torch.cat([x_a, x_b]), solver, nfe, **options).x
    za, zb = z.chunk(2)
    B, N = x_a.shape[0], alphas.numel()
    zs = torch.cat([slerp(za, zb, float(a)) for a in alphas])
    out = decode(den, zs, solver, nfe, **options).x
    return out.reshape(N, B, *x_a.shape[1:])
