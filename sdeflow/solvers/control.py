r"""Step-size control beside the steppers: the PI controller, the error norm and an adaptive configuration's
tolerances (used by :func:`sdeflow.integrate.solve_adaptive`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PIController", "Tolerances", "error_norm", "check_tolerances"]


@dataclass(frozen=True)
class Tolerances:
    """rtol / atol of an adaptive solve and its first step size h0 (None: 5% of the span)."""

    rtol: float
    atol: float
    h0: float | None = None


def check_tolerances(rtol: object, atol: object, dtype: torch.dtype | None = None) -> None:
    """rtol and atol must be positive finite numbers; with ``dtype``, rtol must be resolvable in it (at least 10x
    its machine epsilon: a tighter one makes the controller shrink the step until it underflows)."""
    for k, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
            raise ValueError(f"{k} must be > 0 and finite (rtol and atol must be positive), got {k}={v!r}")
    if dtype is not None and dtype.is_floating_point:
        floor = 10 * torch.finfo(dtype).eps
        if float(rtol) < floor:  # type: ignore[arg-type]  # checked to be a number above
            raise ValueError(
                f"rtol={rtol} is below what {dtype} can resolve (10 x eps = {floor:.1e}): use rtol >= {floor:.1e} or "
                "sample in float64 (dtype=torch.float64)"
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
