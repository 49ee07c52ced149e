r"""The bookkeeping every driver shares: the result type, the progress bar, non-finite detection, statistics and
callbacks (the fixed-grid loop, the adaptive loop, the Picard driver and the bridges all use :class:`Recorder`).

Statistics (``SampleResult.stats``), one meaning per key:

========== ========================================================================================================
key        meaning
========== ========================================================================================================
nfe        network evaluations counted by the Denoiser during the solve (per sample batch, not per sample)
steps      time steps taken to reach the end: the grid's steps, or for per-sample adaptive solves the most accepted
           steps any sample took
accepted   accepted steps (adaptive: summed over samples; fixed grids: = steps)
rejected   rejected step proposals (summed over samples; 0 on fixed grids)
rounds     iterations of the driver's loop, i.e. its sequential depth: fixed grids one per step, adaptive solves one
           per controller round (all active samples at once), Picard one per window sweep, bridges one per attempted
           step of the external solver
========== ========================================================================================================

Drivers may add their own keys (``accepted_per_sample``, ``converged``, ...); None means "not reported by the
external solver". The callback payload is one dict per step: ``{"i": step index, "t": float64 time(s) reached,
"x": state, "x0": the data prediction of that step or None}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import SolverError

__all__ = ["Callback", "Recorder", "SampleResult", "check_finite"]

Callback = Callable[[dict[str, Any]], None]


@dataclass
class SampleResult:
    """Result of a solve.

    Attributes:
        x: the final state (batch, *data_shape).
        nfe: net calls counted by the Denoiser during the solve.
        times: the float64 times visited (the grid; for adaptive solves the per-sample final times).
        trajectory: states at ``times`` stacked on a leading axis when asked for, else None.
        stats: see the module table (nfe, steps, accepted, rejected, rounds, and driver-specific entries).
    """

    x: torch.Tensor
    nfe: int
    times: torch.Tensor
    trajectory: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def check_finite(v: torch.Tensor, t: float, what: str) -> None:
    """Raise a SolverError naming ``what`` and the time when v holds NaN/inf (one host sync: for bridges that
    already synchronize per evaluation, and for final states)."""
    if not bool(torch.isfinite(v).all()):
        raise SolverError(
            f"non-finite values (NaN/inf) in the {what} at t = {t:.6g}: the model output or the state diverged; check "
            "the model, the dtype and the end time"
        )


class Recorder:
    """One solve's bookkeeping: NFE baseline, progress bar, callbacks, trajectory, the device-side non-finite flag.

    Args:
        den: the denoiser whose NFE counter is read.
        name: the progress bar's label.
        total: the progress bar's length (None: unknown).
        callback: called with the step payload (module doc).
        trajectory: keep the states (``record`` appends them).
        progress: show a tqdm bar.
    """

    def __init__(
        self,
        den: Any,
        name: str,
        total: int | None = None,
        callback: Callback | None = None,
        trajectory: bool = False,
        progress: bool = False,
    ) -> None:
        self.den, self.callback = den, callback
        self.nfe0 = den.nfe
        self.states: list[torch.Tensor] | None = [] if trajectory else None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=name, leave=False)
        self._sums: torch.Tensor | None = None
        self.total = total

    @property
    def nfe(self) -> int:
        return self.den.nfe - self.nfe0

    def start(self, x: torch.Tensor) -> None:
        """The initial state (first row of the trajectory)."""
        if self.states is not None:
            self.states.append(x)

    def record(
        self,
        i: int,
        t: torch.Tensor,
        x: torch.Tensor,
        x0: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        keep: bool = True,
    ) -> None:
        """Step ``i`` reached time(s) ``t`` with state x: callback, trajectory (when ``keep``), progress. ``x0`` may be
        deferred (a function), evaluated only for a callback."""
        if self.states is not None and keep:
            self.states.append(x)
        if self.callback is not None:
            self.callback({"i": i, "t": t, "x": x, "x0": x0() if callable(x0) else x0})
        if self.bar is not None:
            self.bar.update(1)

    def watch(self, i: int, x: torch.Tensor) -> None:
        """Keep the sum of x at step i in a device buffer (no host sync; :meth:`raise_if_bad` reads it): NaN/inf
        anywhere in x makes the sum non-finite, one reduction instead of isfinite(x).all()'s passes."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self._sums is None:
            self._sums = torch.zeros(self.total or 1, dtype=dtype, device=x.device)
        if i >= self._sums.numel():
            self._sums = torch.cat([self._sums, torch.zeros_like(self._sums)])
        torch.sum(x.detach().reshape(-1), 0, dtype=dtype, out=self._sums[i])

    def raise_if_bad(self, grid: torch.Tensor, what: str = "") -> None:
        """The one host sync of a fixed-grid solve: raise naming the first non-finite step and its times."""
        if self._sums is None:
            return
        bad = (~torch.isfinite(self._sums)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise SolverError(
                f"non-finite values (NaN/inf) at step {i}, t = {float(grid[i]):.6g} -> {float(grid[i + 1]):.6g}{what}: "
                "the model output or the state diverged; check the model, the dtype and the grid's end time"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def trajectory(self) -> torch.Tensor | None:
        return torch.stack(self.states) if self.states is not None else None

    def result(
        self,
        x: torch.Tensor,
        times: torch.Tensor,
        steps: int | None,
        accepted: int | None,
        rejected: int | None,
        rounds: int | None,
        trajectory: torch.Tensor | None = None,
        **extra: Any,
    ) -> SampleResult:
        """Close the bar and build the result with the module's statistics."""
        self.close()
        nfe = self.nfe
        stats = {"nfe": nfe, "steps": steps, "accepted": accepted, "rejected": rejected, "rounds": rounds, **extra}
        traj = trajectory if trajectory is not None else self.trajectory()
        return SampleResult(x, nfe, times, traj, stats)
