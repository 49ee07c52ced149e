r"""Bridges to other integrators: torchdiffeq and scipy for the probability-flow ODE, torchsde for the reverse SDE.

Each bridge runs the whole solve in one call (Stepper ``mode = "external"``; :func:`sdeflow.sample` calls
``stepper.integrate``) and returns a :class:`sdeflow.integrate.SampleResult` whose ``nfe`` is what the Denoiser counted.
A non-finite model output raises :class:`~sdeflow.solvers.base.SolverError` naming the time, as the native loop does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._utils import check_choice
from ..noise import BrownianNoise, IIDNoise, NoiseSource, PerSampleGenerator
from .base import SolverError, Stepper, StepResult

__all__ = ["integrate_torchdiffeq", "integrate_scipy", "TorchSDE"]


def _check_finite(v: torch.Tensor, t: float, what: str) -> None:
    if not bool(torch.isfinite(v).all()):
        raise SolverError(
            f"non-finite values (NaN/inf) in the {what} at t = {t:.6g}: the model output or the state diverged; check "
            "the model, the dtype and the end time"
        )


def _result(x, nfe, times, traj, accepted, rejected, **extra):
    from ..integrate import SampleResult  # lazy: integrate imports the solver table

    stats = {"nfe": nfe, "steps": accepted, "accepted": accepted, "rejected": rejected, "rounds": nfe, **extra}
    return SampleResult(x, nfe, times, traj, stats)


def _bar(progress: bool, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, leave=False)


class _PFODE:
    """torchdiffeq's ``func(t, y)``: the probability-flow velocity, and step callbacks counting accepted/rejected."""

    def __init__(self, stepper: Stepper, callback: Callable | None, bar) -> None:
        self.stepper, self.callback, self.bar = stepper, callback, bar
        self.accepted = self.rejected = 0

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t64 = t.detach().to(torch.float64)
        v, _ = self.stepper.ode_velocity(y, t64)
        _check_finite(v, float(t64), "probability-flow velocity")
        return v

    def callback_accept_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        # the state at the start of accepted step k is the result of step k - 1
        if self.callback is not None and self.accepted > 0:
            self.callback({"i": self.accepted - 1, "t": t0.detach().to(torch.float64), "x": y0, "x0": None})
        self.accepted += 1
        if self.bar is not None:
            self.bar.update(1)

    def callback_reject_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.rejected += 1


def integrate_torchdiffeq(
    stepper: Stepper,
    x: torch.Tensor,
    grid: torch.Tensor,
    rtol: float,
    atol: float,
    method: str = "dopri5",
    h0: float | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
):
    """The probability-flow ODE through ``torchdiffeq.odeint`` (adaptive, one step size for the batch) with outputs at
    the float64 times ``grid`` (decreasing). Returns a SampleResult with nfe, accepted and rejected steps.

    The grid times are passed as ``step_t`` so that no step overshoots them (torchdiffeq otherwise steps past the end
    time and interpolates, which would evaluate the model outside [t_end, T]); the first step is ``h0`` (default
    5% of the span) instead of torchdiffeq's probe, which may also leave the interval.
    """
    import torchdiffeq

    den = stepper.den
    nfe0 = den.nfe
    bar = _bar(progress, stepper.name)
    func = _PFODE(stepper, callback, bar)
    span = abs(float(grid[-1]) - float(grid[0]))
    g = grid.to(device=x.device, dtype=torch.float64)
    options = {"step_t": g[1:], "first_step": float(h0) if h0 is not None else 0.05 * span}
    try:
        ys = torchdiffeq.odeint(func, x, g, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as e:  # torchdiffeq asserts on step-size underflow
        raise SolverError(f"torchdiffeq {method} failed: {e}") from e
    finally:
        if bar is not None:
            bar.close()
    xT = ys[-1]
    _check_finite(xT, float(grid[-1]), "final state")
    if callback is not None:
        callback({"i": func.accepted - 1, "t": grid[-1], "x": xT, "x0": None})
    return _result(xT, den.nfe - nfe0, grid, ys if return_trajectory else None, func.accepted, func.rejected)


def integrate_scipy(
    stepper: Stepper,
    x: torch.Tensor,
    grid: torch.Tensor,
    rtol: float,
    atol: float,
    method: str = "DOP853",
    h0: float | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
):
    """The probability-flow ODE through scipy's ``DOP853`` (or ``RK45``) in float64 on the flattened batch; the model
    runs in x's dtype and device. Outputs at ``grid`` (interior times from the dense output). Accepted steps are
    scipy's steps; rejected = attempts - accepted, an attempt costing ``n_stages`` evaluations."""
    import numpy as np
    from scipy import integrate as si

    check_choice("method", method, ["DOP853", "RK45"])
    den = stepper.den
    nfe0 = den.nfe
    shape, dtype, device = x.shape, x.dtype, x.device
    evals = [0]

    def fun(t: float, y: np.ndarray) -> np.ndarray:
        evals[0] += 1
        xt = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
        v, _ = stepper.ode_velocity(xt, torch.tensor(t, dtype=torch.float64))
        _check_finite(v, t, "probability-flow velocity")
        return v.detach().to(torch.float64).cpu().numpy().ravel()

    times = grid.detach().cpu().to(torch.float64).tolist()
    y0 = x.detach().to(torch.float64).cpu().numpy().ravel()
    first = {"first_step": float(h0)} if h0 is not None else {}
    solver = getattr(si, method)(fun, times[0], y0, t_bound=times[-1], rtol=rtol, atol=atol, **first)
    outs = [y0]
    k, accepted, rejected = 1, 0, 0
    bar = _bar(progress, stepper.name)
    while solver.status == "running":
        e0 = evals[0]
        msg = solver.step()
        if solver.status == "failed":
            raise SolverError(f"scipy {method} failed at t = {solver.t:.6g}: {msg}")
        accepted += 1
        rejected += (evals[0] - e0) // solver.n_stages - 1
        dense = None
        while k < len(times) - 1 and times[k] >= solver.t:
            dense = dense or solver.dense_output()
            outs.append(dense(times[k]))
            k += 1
        if callback is not None:
            xs = torch.from_numpy(solver.y.copy()).reshape(shape).to(device=device, dtype=dtype)
            callback({"i": accepted - 1, "t": torch.tensor(solver.t, dtype=torch.float64), "x": xs, "x0": None})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    outs.append(solver.y)
    to_x = lambda y: torch.from_numpy(np.ascontiguousarray(y)).reshape(shape).to(device=device, dtype=dtype)
    xT = to_x(outs[-1])
    traj = torch.stack([to_x(y) for y in outs]) if return_trajectory else None
    return _result(xT, den.nfe - nfe0, grid, traj, accepted, rejected)


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

    def __init__(self, stepper: Stepper, shape: torch.Size, sde_type: str, noise_type: str) -> None:
        super().__init__()
        self.stepper, self.shape = stepper, shape
        self.sde_type, self.noise_type = sde_type, noise_type
        self._memo: tuple | None = None

    def f(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (float(tau), id(y), y._version)
        if self._memo is not None and self._memo[0] == key and self._memo[1] is y:
            return self._memo[2]
        t = -torch.as_tensor(tau, dtype=torch.float64)
        x = y.reshape(self.shape)
        drift, _ = self.stepper.reverse_sde_drift(x, t)
        _check_finite(drift, float(t), "reverse-SDE drift")
        out = -drift.reshape(y.shape)
        self._memo = (key, y, out)
        return out

    def _g(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = -torch.as_tensor(tau, dtype=torch.float64)
        return torch.sqrt(self.stepper.sde.g2(t)).to(dtype=y.dtype, device=y.device)

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


class TorchSDE(Stepper):
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
    mode = "external"
    options = {"method": "euler", "adaptive": False, "rtol": 1e-3, "atol": 1e-3, "dt_min": 1e-5}

    def validate(self) -> None:
        check_choice("method", self.opts["method"], list(TORCHSDE_METHODS))
        if not isinstance(self.opts["adaptive"], bool):
            raise ValueError(f"adaptive must be True or False, got {self.opts['adaptive']!r}")

    @property
    def _spec(self) -> tuple:
        return TORCHSDE_METHODS[self.opts["method"]]

    @property
    def order(self) -> float:  # type: ignore[override]
        return self._spec[3]

    @property
    def strong_order(self) -> float:  # type: ignore[override]
        return self._spec[4]

    @property
    def nfe_per_step(self) -> int:  # type: ignore[override]
        return self._spec[2]

    def num_steps(self, nfe: int) -> int:
        if self.opts["adaptive"]:
            return 1
        return super().num_steps(nfe)

    def step(self, t0, t1, x, state, noise) -> StepResult:
        raise NotImplementedError("the torchsde bridge integrates whole spans: use sample() or integrate()")

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

    def integrate(self, x, grid, noise=None, callback=None, return_trajectory=False, progress=False):
        """Integrate the reverse SDE over the decreasing float64 ``grid`` (see the class docstring)."""
        import torchsde
        from torchsde._core.base_sde import ForwardSDE
        from torchsde._core.methods import select

        den = self.den
        nfe0 = den.nfe
        sde_type, noise_type = self._spec[:2]
        B, D = x.shape[0], x[0].numel()
        sde = _ReverseSDE(self, x.shape, sde_type, noise_type)
        bm = self._brownian(noise, B, D, grid, x)
        taus = -grid.to(torch.float64)
        y = x.reshape(B, D)
        method = self.opts["method"]
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
            _check_finite(xs[-1], float(grid[-1]), "final state")
            if callback is not None:
                callback({"i": 0, "t": grid[-1], "x": xs[-1], "x0": None})
            return _result(xs[-1], den.nfe - nfe0, grid, xs if return_trajectory else None, None, None)
        solver = select(method=method, sde_type=sde_type)(
            sde=ForwardSDE(sde), bm=bm, dt=1.0, adaptive=False, rtol=0.0, atol=0.0, dt_min=0.0, options={}
        )
        extra = solver.init_extra_solver_state(taus[0], y)
        traj = [x] if return_trajectory else None
        bar = _bar(progress, self.name)
        for i in range(len(taus) - 1):
            y, extra = solver.step(taus[i], taus[i + 1], y, extra)
            xi = y.reshape(x.shape)
            if traj is not None:
                traj.append(xi)
            if callback is not None:
                callback({"i": i, "t": grid[i + 1], "x": xi, "x0": None})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        xT = y.reshape(x.shape)
        _check_finite(xT, float(grid[-1]), "final state")
        steps = len(taus) - 1
        return _result(xT, den.nfe - nfe0, grid, torch.stack(traj) if traj is not None else None, steps, 0)
