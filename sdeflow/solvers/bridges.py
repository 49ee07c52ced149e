r"""Bridges to other integrators: torchdiffeq and scipy for the probability-flow ODE, torchsde for the reverse SDE.

Each bridge runs a whole span in one call (an :class:`~sdeflow.solvers.base.Integrator`) and returns a
:class:`~sdeflow.solvers.record.SampleResult` whose ``nfe`` is what the Denoiser counted, with the shared bookkeeping
(:class:`~sdeflow.solvers.record.Recorder`). A non-finite model output raises
:class:`~sdeflow.solvers.base.SolverError` naming the time, as the native loop does. :func:`odeint` is the one
torchdiffeq entry point of the package: sampling (:func:`integrate_torchdiffeq`) and likelihood
(:func:`sdeflow.log_likelihood`) both go through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .._utils import check_choice
from ..denoiser import Denoiser
from ..noise import BrownianNoise, IIDNoise, NoiseSource, PerSampleGenerator
from .base import Integrator, SolverError, probability_flow_velocity, reverse_sde_drift
from .record import Callback, Recorder, SampleResult, check_finite

__all__ = ["ODE_BACKENDS", "TORCHSDE_METHODS", "TorchSDE", "integrate_scipy", "integrate_torchdiffeq", "odeint"]

#: the whole-span ODE backends: torchdiffeq's dopri5 (batched, on the device) and scipy's DOP853 (float64, host)
ODE_BACKENDS = ("torchdiffeq", "scipy")


class _StepCounter:
    """torchdiffeq's step callbacks: count accepted / rejected steps, report accepted ones to a Recorder."""

    def __init__(self, func: Callable, rec: Recorder | None) -> None:
        self.func, self.rec = func, rec
        self.accepted = self.rejected = 0

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.func(t, y)

    def callback_accept_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        # the state at the start of accepted step k is the result of step k - 1
        if self.rec is not None and self.accepted > 0:
            self.rec.record(self.accepted - 1, t0.detach().to(torch.float64), y0, None, keep=False)
        self.accepted += 1

    def callback_reject_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.rejected += 1


def odeint(
    func: Callable[[torch.Tensor, Any], Any],
    y0: Any,
    times: torch.Tensor,
    rtol: float,
    atol: float,
    method: str = "dopri5",
    h0: float | None = None,
    adjoint: bool = False,
    adjoint_params: tuple[torch.Tensor, ...] | None = None,
    rec: Recorder | None = None,
    options: dict[str, Any] | None = None,
    adjoint_kwargs: dict[str, Any] | None = None,
    max_steps: int | None = None,
) -> tuple[Any, int, int]:
    """``torchdiffeq.odeint`` (or ``odeint_adjoint``) of ``dy/dt = func(t, y)`` with outputs at the float64 ``times``.

    The times are also passed as ``step_t`` so that no step overshoots them (torchdiffeq otherwise steps past the end
    time and interpolates, which would evaluate the model outside [t_end, T]); the first step is ``h0`` (default 5% of
    the span) instead of torchdiffeq's probe, which may also leave the interval. ``y0`` may be a tensor or a tuple of
    tensors (an augmented state). ``options`` replaces those defaults (torchdiffeq's method options);
    ``adjoint_kwargs`` go to ``odeint_adjoint`` (adjoint_rtol, adjoint_atol, adjoint_options). Returns (states at
    ``times``, accepted steps, rejected steps); torchdiffeq's step-size underflow becomes a SolverError.
    """
    import torchdiffeq

    counter = _StepCounter(func, rec)
    if options is None:
        span = abs(float(times[-1]) - float(times[0]))
        options = {"step_t": times[1:], "first_step": float(h0) if h0 is not None else 0.05 * span}
    if max_steps is not None:  # torchdiffeq's cap on attempted steps (it asserts past it: a SolverError below)
        options = {**options, "max_num_steps": int(max_steps)}
    kw: dict[str, Any] = {"rtol": rtol, "atol": atol, "method": method, "options": options}
    try:
        if adjoint:
            akw = {"adjoint_options": dict(options), **(adjoint_kwargs or {})}
            ys = torchdiffeq.odeint_adjoint(counter, y0, times, adjoint_params=adjoint_params, **akw, **kw)
        else:
            ys = torchdiffeq.odeint(counter, y0, times, **kw)
    except AssertionError as e:  # torchdiffeq asserts on step-size underflow
        raise SolverError(f"torchdiffeq {method} failed: {e}") from e
    return ys, counter.accepted, counter.rejected


def integrate_torchdiffeq(
    den: Denoiser,
    x: torch.Tensor,
    grid: torch.Tensor,
    rtol: float,
    atol: float,
    method: str = "dopri5",
    h0: float | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    name: str = "rk45",
    max_steps: int | None = None,
) -> SampleResult:
    """The probability-flow ODE of ``den`` through :func:`odeint` (adaptive, one step size for the batch) with
    outputs at the float64 times ``grid`` (decreasing). Returns a SampleResult with nfe, accepted and rejected steps.
    ``max_steps`` caps the attempted steps (a SolverError past it instead of a run without end)."""
    rec = Recorder(den, name, None, callback, False, progress)

    def velocity(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t64 = t.detach().to(torch.float64)
        v, _ = probability_flow_velocity(den, y, t64)
        check_finite(v, float(t64), "probability-flow velocity")
        return v

    g = grid.to(device=x.device, dtype=torch.float64)
    try:
        ys, accepted, rejected = odeint(velocity, x, g, rtol, atol, method, h0, rec=rec, max_steps=max_steps)
    finally:
        rec.close()
    xT = ys[-1]
    check_finite(xT, float(grid[-1]), "final state")
    rec.record(accepted - 1, grid[-1], xT, None, keep=False)
    traj = ys if return_trajectory else None
    return rec.result(xT, grid, accepted, accepted, rejected, accepted + rejected, trajectory=traj)


def integrate_scipy(
    den: Denoiser,
    x: torch.Tensor,
    grid: torch.Tensor,
    rtol: float,
    atol: float,
    method: str = "DOP853",
    h0: float | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    name: str = "rk45",
    max_steps: int | None = None,
) -> SampleResult:
    """The probability-flow ODE of ``den`` through scipy's ``DOP853`` (or ``RK45``) in float64 on the flattened batch;
    the model runs in x's dtype and device. Outputs at ``grid`` (interior times from the dense output). Accepted steps
    are scipy's steps; rejected = attempts - accepted, an attempt costing ``n_stages`` evaluations."""
    import numpy as np
    from scipy import integrate as si

    check_choice("method", method, ["DOP853", "RK45"])
    shape, dtype, device = x.shape, x.dtype, x.device
    evals = [0]

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        evals[0] += 1
        xt = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
        v, _ = probability_flow_velocity(den, xt, torch.tensor(t, dtype=torch.float64))
        check_finite(v, t, "probability-flow velocity")
        return v.detach().to(torch.float64).cpu().numpy().ravel()

    rec = Recorder(den, name, None, callback, False, progress)
    times = grid.detach().cpu().to(torch.float64).tolist()
    y0 = x.detach().to(torch.float64).cpu().numpy().ravel()
    first = {"first_step": float(h0)} if h0 is not None else {}
    solver = getattr(si, method)(fun, times[0], y0, t_bound=times[-1], rtol=rtol, atol=atol, **first)
    outs = [y0]
    k, accepted, rejected = 1, 0, 0

    def to_x(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y)).reshape(shape).to(device=device, dtype=dtype)

    try:
        while solver.status == "running":
            e0 = evals[0]
            msg = solver.step()
            if solver.status == "failed":
                raise SolverError(f"scipy {method} failed at t = {solver.t:.6g}: {msg}")
            accepted += 1
            rejected += (evals[0] - e0) // solver.n_stages - 1
            if max_steps is not None and accepted + rejected > max_steps:
                raise SolverError(
                    f"scipy {method} did not reach t = {times[-1]:.6g} in max_steps={max_steps} steps (at t = "
                    f"{solver.t:.6g}): loosen rtol/atol or raise max_steps"
                )
            dense = None
            while k < len(times) - 1 and times[k] >= solver.t:
                dense = dense or solver.dense_output()
                outs.append(dense(times[k]))
                k += 1
            rec.record(accepted - 1, torch.tensor(solver.t, dtype=torch.float64), to_x(solver.y.copy()), keep=False)
    finally:
        rec.close()
    outs.append(solver.y)
    xT = to_x(outs[-1])
    traj = torch.stack([to_x(y) for y in outs]) if return_trajectory else None
    return rec.result(xT, grid, accepted, accepted, rejected, accepted + rejected, trajectory=traj)


# ----------------------------------------------------------------------------------------------------- torchsde
TORCHSDE_METHODS = {
    # method: (torchsde SDE type, noise type, drift evaluations per step, weak order, strong order). The reverse SDE
    # has additive noise g(t), so Ito and Stratonovich forms coincide and every method below applies.
    "euler": ("ito", "additive", 1, 1.0, 1.0),
    "milstein": ("ito", "additive", 1, 1.0, 1.0),
    "srk": ("ito", "additive", 2, 1.5, 1.5),  # Roessler's SRA1 for additive noise
}
# Not offered: torchsde's reversible Heun (Kidger et al. 2021). On y' = lam y its two-step recursion has the roots
# r = mu +- sqrt(mu^2 + 1), mu = lam h: for the dissipative reverse SDE (lam < 0) the parasitic root -(1 + |mu|)
# amplifies by exp(int |lam| dt) whatever the step count (measured strong error 0.9 at 128 steps on a 2-D mixture,
# where Euler-Maruyama reaches 0.02).


class _ReverseSDE(torch.nn.Module):
    r"""The reverse SDE in torchsde's terms: time :math:`\tau = -t` increases, the state is flattened to (B, D).

    :math:`dx = -[f(t)x - g(t)^2\nabla\log p_t(x)]\,d\tau + g(t)\,d\bar W_\tau`. The drift memoizes its last call, so
    torchsde's repeated evaluation at the same (tau, y) (SRA1's stage reuse) costs no extra NFE.
    """

    def __init__(self, den: Denoiser, shape: torch.Size, sde_type: str, noise_type: str) -> None:
        super().__init__()
        self.den, self.shape = den, shape
        self.sde_type, self.noise_type = sde_type, noise_type
        self._memo: tuple | None = None

    def f(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (float(tau), id(y), y._version)
        if self._memo is not None and self._memo[0] == key and self._memo[1] is y:
            return self._memo[2]
        t = -torch.as_tensor(tau, dtype=torch.float64)
        x = y.reshape(self.shape)
        drift, _ = reverse_sde_drift(self.den, x, t)
        check_finite(drift, float(t), "reverse-SDE drift")
        out = -drift.reshape(y.shape)
        self._memo = (key, y, out)
        return out

    def _g(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = -torch.as_tensor(tau, dtype=torch.float64)
        return torch.sqrt(self.den.sde.g2(t)).to(dtype=y.dtype, device=y.device)

    def g_prod(self, tau: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._g(tau, y) * v


class _ReversedBrownian:
    r"""A :class:`~sdeflow.noise.BrownianNoise` path seen in torchsde's time :math:`\tau = -t` on flattened states.

    The increment over :math:`[\tau_a, \tau_b]` is :math:`W(-\tau_a) - W(-\tau_b)`, the same increment the native
    steppers draw for the step from t0 = -tau_a to t1 = -tau_b; the space-time Levy area becomes
    :math:`U = h\,\Delta W - U_W` under the reversal.
    """

    def __init__(self, noise: BrownianNoise, B: int) -> None:
        self.noise, self.B = noise, B
        self.shape = (B, math.prod(noise.shape[1:]))
        self.dtype, self.device = noise.bm.dtype, noise.bm.device
        self.levy_area_approximation = noise.bm.levy_area_approximation

    def size(self):
        return self.shape

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        lo, hi = -float(tb), -float(ta)
        if return_U:
            dW, U = self.noise.bm(lo, hi, return_U=True)
            h = hi - lo
            return dW.reshape(self.shape), (h * dW - U).reshape(self.shape)
        return self.noise.bm(lo, hi).reshape(self.shape)

    def __repr__(self) -> str:
        return f"_ReversedBrownian({self.noise!r})"


class TorchSDE(Integrator):
    r"""The reverse SDE through torchsde (Li et al. 2020): Euler-Maruyama, Milstein, SRK (Roessler 2010's SRA1).

    torchsde integrates forward in time on 2-D states, so the bridge integrates in :math:`\tau = -t` on (B, D)
    states (see :class:`_ReverseSDE`). Fixed steps land exactly on the grid (the method's step is called per grid
    interval, carrying the method's state); ``adaptive=True`` runs ``torchsde.sdeint`` with step
    doubling on rtol/atol (outputs at grid times are linear interpolations, as torchsde makes them; torchsde does not
    expose its step counts, so ``stats`` reports steps, accepted and rejected as None there).

    Noise: a :class:`~sdeflow.noise.BrownianNoise` passed to ``sample(noise=...)`` is used as the path (time-reversed,
    so a solve sees the same Brownian motion as ``euler_maruyama``; ``srk`` needs it built with
    ``levy_area_approximation="space-time"``); otherwise a torchsde ``BrownianInterval`` is seeded from the generator.
    A :class:`~sdeflow.noise.PerSampleGenerator` is not supported (torchsde draws one path for the batch).

    Options: ``method`` in {"euler", "milstein", "srk"}; ``adaptive``; ``rtol``, ``atol``, ``dt_min`` (adaptive).
    Weak/strong orders and NFE per step per method: euler 1/1/1, milstein 1/1/1 (additive noise: = Euler-Maruyama),
    srk 1.5/1.5/2. Reversible Heun is not offered (unstable on the dissipative reverse SDE, see TORCHSDE_METHODS).
    """

    name = "torchsde"
    stochastic = True
    options = {"method": "euler", "adaptive": False, "rtol": 1e-3, "atol": 1e-3, "dt_min": 1e-5}

    def validate(self) -> None:
        check_choice("method", self.opts["method"], list(TORCHSDE_METHODS))
        if not isinstance(self.opts["adaptive"], bool):
            raise ValueError(f"adaptive must be True or False, got {self.opts['adaptive']!r}")

    @property
    def _spec(self) -> tuple:
        return TORCHSDE_METHODS[self.opts["method"]]

    def configure(self) -> None:
        self.nfe_per_step, self.order, self.strong_order = self._spec[2:5]

    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        if self.opts["adaptive"]:
            return 1
        return super().num_steps(nfe, t_end)

    def _brownian(self, noise: NoiseSource | None, B: int, D: int, grid: torch.Tensor, x: torch.Tensor):
        import torchsde

        if isinstance(noise, BrownianNoise):
            if noise.shape[0] != B or math.prod(noise.shape[1:]) != D:
                raise ValueError(f"the Brownian path has shape {noise.shape}, the state {tuple(x.shape)}")
            lo, hi = float(grid.min()), float(grid.max())
            if lo < noise.t_min - 1e-12 or hi > noise.t_max + 1e-12:
                raise ValueError(f"the Brownian path covers [{noise.t_min}, {noise.t_max}], the solve [{lo}, {hi}]")
            return _ReversedBrownian(noise, B)
        gen = noise.generator if isinstance(noise, IIDNoise) else None
        if noise is not None and not isinstance(noise, IIDNoise):
            raise ValueError(
                f"noise must be an IIDNoise or a BrownianNoise for solver 'torchsde', got {type(noise).__name__}"
            )
        if isinstance(gen, PerSampleGenerator):
            raise ValueError(
                "solver 'torchsde' draws one Brownian path for the batch: PerSampleGenerator is not supported"
            )
        gdev = gen.device if gen is not None else "cpu"
        entropy = int(torch.randint(0, 2**62, (1,), generator=gen, device=gdev))
        levy = "space-time" if self.opts["method"] == "srk" else "none"
        return torchsde.BrownianInterval(
            t0=-float(grid[0]),
            t1=-float(grid[-1]),
            size=(B, D),
            dtype=x.dtype,
            device=x.device,
            entropy=entropy,
            levy_area_approximation=levy,
        )

    def integrate(
        self,
        x: torch.Tensor,
        grid: torch.Tensor,
        noise: NoiseSource | None = None,
        callback: Callback | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> SampleResult:
        """Integrate the reverse SDE over the decreasing float64 ``grid`` (see the class docstring)."""
        import torchsde
        from torchsde._core.base_sde import ForwardSDE
        from torchsde._core.methods import select

        den = self.den
        sde_type, noise_type = self._spec[:2]
        B, D = x.shape[0], x[0].numel()
        sde = _ReverseSDE(den, x.shape, sde_type, noise_type)
        bm = self._brownian(noise, B, D, grid, x)
        taus = -grid.to(torch.float64)
        y = x.reshape(B, D)
        method = self.opts["method"]
        rec = Recorder(den, self.name, len(taus) - 1, callback, return_trajectory, progress)
        rec.start(x)
        if self.opts["adaptive"]:
            span = float(taus[-1] - taus[0])
            ys = torchsde.sdeint(
                sde,
                y,
                taus,
                bm=bm,
                method=method,
                dt=0.05 * span,
                adaptive=True,
                rtol=float(self.opts["rtol"]),
                atol=float(self.opts["atol"]),
                dt_min=float(self.opts["dt_min"]),
            )
            xs = ys.reshape(len(taus), *x.shape)
            rec.close()
            check_finite(xs[-1], float(grid[-1]), "final state")
            rec.record(0, grid[-1], xs[-1], keep=False)
            # torchsde does not expose its step counts: None = not reported
            return rec.result(xs[-1], grid, None, None, None, None, trajectory=xs if return_trajectory else None)
        solver = select(method=method, sde_type=sde_type)(
            sde=ForwardSDE(sde), bm=bm, dt=1.0, adaptive=False, rtol=0.0, atol=0.0, dt_min=0.0, options={}
        )
        extra = solver.init_extra_solver_state(taus[0], y)
        for i in range(len(taus) - 1):
            y, extra = solver.step(taus[i], taus[i + 1], y, extra)
            rec.record(i, grid[i + 1], y.reshape(x.shape))
        rec.close()
        xT = y.reshape(x.shape)
        check_finite(xT, float(grid[-1]), "final state")
        steps = len(taus) - 1
        return rec.result(xT, grid, steps, steps, 0, steps)
