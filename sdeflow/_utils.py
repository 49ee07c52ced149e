"""Small shared helpers: broadcasting time over data, float64 time tensors, argument checks."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

Number = float | int
TimeLike = torch.Tensor | float | int


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a scalar or a (B,) tensor so that it broadcasts against a (B, *data_shape) tensor of ``ndim`` dims."""
    if v.ndim == 0:
        return v
    extra = ndim - v.ndim
    if extra < 0:
        raise ValueError(f"cannot broadcast a tensor of shape {tuple(v.shape)} over {ndim} dims")
    return v.reshape(*v.shape, *([1] * extra))


def as_time(t: TimeLike, like: torch.Tensor | None = None) -> torch.Tensor:
    """A time as a tensor. Python numbers become float64 tensors (on ``like``'s device when given)."""
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            t = t.to(torch.float64)
        return t
    device = like.device if like is not None else None
    return torch.tensor(float(t), dtype=torch.float64, device=device)


def check_time(t: torch.Tensor, T: float, name: str = "t", low: float = 0.0) -> None:
    """Raise a ValueError when a time lies outside [low, T].

    The check runs on CPU tensors only: on an accelerator it would force a host sync inside sampling loops, so there
    the public entry points (``sample``, ``log_likelihood``) check their float64 grids instead.
    """
    if t.device.type != "cpu":
        return
    n = t.numel()
    if n == 0:
        return
    # a float32 time cannot represent T = 0.999 or 0.9946 exactly: allow a few ulps of the time's own dtype
    tol = max(1e-12, 4 * torch.finfo(t.dtype).eps) * max(1.0, T)
    if n == 1:  # the common case inside solvers: one float read, no reductions
        lo = hi = float(t.detach().reshape(()))
    else:
        td = t.detach()
        lo, hi = float(td.min()), float(td.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {t}")
    if lo < low - tol or hi > T + tol:
        raise ValueError(f"{name} must lie in [{low}, {T}], got values in [{lo}, {hi}]")


def check_positive(name: str, value: float) -> None:
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def batch_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) time to shape (B,) in x's dtype and device (what nets receive)."""
    t = t.to(device=x.device, dtype=x.dtype)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape (batch,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@functools.cache
def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [-1, 1] (float64 tensors), computed once per n (numpy, imported here only)."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights)
