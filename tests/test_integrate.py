"""The one time loop: fixed grids (trajectory, callbacks, statistics), per-sample adaptive stepping (step doubling,
embedded errors, PI controller), and sample()'s argument handling."""

from __future__ import annotations

import pytest
import torch
from scipy.integrate import solve_ivp

import sdeflow as sf
from sdeflow.grids import time_grid
from sdeflow.integrate import PIController, error_norm, solve, solve_adaptive
from sdeflow.noise import IIDNoise
from sdeflow.sampling import make_stepper
from sdeflow.solvers import EmbeddedStepper, SolverError

MIX = dict(means=[[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], stds=[0.5, 0.6, 0.45], weights=[0.3, 0.4, 0.3])


@pytest.fixture(scope="module")
def problem():
    """VP, exact mixture denoiser, 6 starting points and their exact probability-flow end points (float64 DOP853)."""
    sde = sf.VPSDE()
    gmm = sf.GaussianMixture(**MIX)
    x_T = sde.prior_sample((6, 2), torch.Generator().manual_seed(3), dtype=torch.float64)

    def rhs(t, y):
        xt, tt = torch.from_numpy(y).reshape(6, 2), torch.tensor(t, dtype=torch.float64)
        return (sde.f(tt) * xt - 0.5 * sde.g2(tt) * gmm.score(xt, tt, sde)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (1.0, 1e-3), x_T.reshape(-1).numpy(), method="DOP853", rtol=1e-13, atol=1e-14)
    return sde, gmm.denoiser(sde), x_T, torch.from_numpy(sol.y[:, -1]).reshape(6, 2)


# ---------------------------------------------------------------------------------------------- fixed grids
def test_solve_trajectory_callback_and_stats(problem):
    sde, den, x_T, _ = problem
    grid = time_grid(sde, 7, "logsnr")
    seen = []
    den.reset_nfe()
    res = solve(make_stepper(den, "heun"), x_T, grid, callback=seen.append, return_trajectory=True, progress=True)
    assert res.trajectory.shape == (8, 6, 2) and torch.equal(res.trajectory[0], x_T)
    assert torch.equal(res.trajectory[-1], res.x) and torch.equal(res.times, grid)
    assert [p["i"] for p in seen] == list(range(7)) and all(torch.equal(p["t"], grid[p["i"] + 1]) for p in seen)
    assert all(torch.equal(p["x"], res.trajectory[p["i"] + 1]) for p in seen)
    # rounds = iterations of the driver loop (one meaning for every driver, sdeflow.solvers.record); the grid ends at
    # sigma(1e-3) > 0, so all 7 Heun steps are full ones (2 NFE each)
    assert res.stats == {"nfe": 14, "steps": 7, "accepted": 7, "rejected": 0, "rounds": 7} and den.nfe == 14


def test_solve_flags_the_first_nonfinite_step(problem):
    sde, _, x_T, _ = problem

    def net(x, t):  # NaN for t in (0.3, 0.5): steps 5 and 6 of a uniform 10-step grid evaluate there
        out = torch.zeros_like(x)
        return out * float("nan") if 0.3 < float(t.max()) < 0.5 else out

    den = sf.Denoiser(net, sde)
    with pytest.raises(SolverError, match=r"step 6, t = 0.4006 -> 0.3007"):
        solve(make_stepper(den, "euler"), x_T, time_grid(sde, 10, "uniform"))


# ---------------------------------------------------------------------------------------------- adaptive
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_step_doubling_reaches_tolerance(name, problem):
    """Step doubling makes fixed steppers adaptive: the error falls with the tolerance (error-per-step control gives
    global error ~ tol^(p/(p+1)); here within 100 tol) and every sample reaches t_end."""
    sde, den, x_T, exact = problem
    st = make_stepper(den, name)
    errs, nfes = [], []
    for tol in (1e-3, 1e-5):
        res = solve_adaptive(st, x_T, sde.T, sde.eps, rtol=tol, atol=tol)
        errs.append(float((res.x - exact).abs().max()))
        nfes.append(res.nfe)
        assert errs[-1] < 100 * tol
        torch.testing.assert_close(res.times, torch.full((6,), sde.eps, dtype=torch.float64), rtol=0, atol=1e-12)
        # NFE accounting of step doubling: 3 steps of nfe_per_step calls per round on the active samples
        assert res.nfe == 3 * st.nfe_per_step * res.stats["rounds"]
    assert errs[1] < errs[0] / 10 and nfes[1] > nfes[0]


def test_per_sample_step_sizes(problem):
    """Each sample has its own step size: different samples take different step counts, and a sample's result does
    not depend on the other samples of the batch."""
    sde, den, x_T, exact = problem
    st = make_stepper(den, "heun")
    res = solve_adaptive(st, x_T, sde.T, sde.eps, rtol=1e-4, atol=1e-4)
    acc = res.stats["accepted_per_sample"]
    assert acc.shape == (6,) and len(set(acc.tolist())) > 1
    assert int(acc.sum()) == res.stats["accepted"] and res.stats["steps"] == int(acc.max())
    alone = solve_adaptive(st, x_T[2:3], sde.T, sde.eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone.x, res.x[2:3], rtol=0, atol=1e-13)
    assert int(alone.stats["accepted_per_sample"][0]) == int(acc[2])


def test_embedded_error_used_without_doubling(problem):
    """rk45 returns DOPRI5's embedded error: 7 NFE per round, no doubling; the controller uses error_order 4."""
    sde, den, x_T, exact = problem
    st = make_stepper(den, "rk45", backend="sdeflow")
    assert isinstance(st, EmbeddedStepper) and st.integrator() is None and st.error_order == 4
    res = solve_adaptive(st, x_T, sde.T, sde.eps, rtol=1e-8, atol=1e-8)
    assert res.nfe == 7 * res.stats["rounds"]
    assert float((res.x - exact).abs().max()) < 1e-6


def test_adaptive_refuses_stochastic_without_error(problem):
    sde, den, x_T, _ = problem
    with pytest.raises(ValueError, match="stochastic and has no error estimate"):
        solve_adaptive(make_stepper(den, "euler_maruyama"), x_T, 1.0, 0.01, noise=IIDNoise(torch.Generator()))


def test_adaptive_argument_checks_and_limits(problem):
    sde, den, x_T, _ = problem
    st = make_stepper(den, "euler")
    with pytest.raises(ValueError, match="rtol and atol must be positive"):
        solve_adaptive(st, x_T, 1.0, 0.01, rtol=0.0)
    with pytest.raises(ValueError, match="t_end must differ"):
        solve_adaptive(st, x_T, 0.5, 0.5)
    with pytest.raises(SolverError, match="max_steps=3"):
        solve_adaptive(st, x_T, 1.0, 0.001, rtol=1e-6, atol=1e-6, max_steps=3)


def test_adaptive_nonfinite_raises(problem):
    sde, _, x_T, _ = problem
    den = sf.Denoiser(lambda x, t: torch.where(t[:, None] < 0.5, float("nan"), 0.0) * x, sde)
    with pytest.raises(SolverError, match="non-finite values .* at t = 0.5"):
        solve_adaptive(make_stepper(den, "heun"), x_T, 1.0, 0.01)


def test_pi_controller_and_error_norm():
    c = PIController()
    err = torch.tensor([0.0, 0.5, 1.0, 2.0, float("inf")], dtype=torch.float64)
    f = c.factor(err, torch.ones(5, dtype=torch.float64), order=2.0)
    assert bool((f >= c.factor_min).all()) and bool((f <= c.factor_max).all())
    assert float(f[0]) == c.factor_max and float(f[4]) == c.factor_min
    assert bool((f[3:] <= 1).all())  # rejected steps never grow
    torch.testing.assert_close(f[2], torch.tensor(0.9, dtype=torch.float64))  # err = err_prev = 1: the safety factor
    # Hairer's norm: RMS of err / (atol + rtol max(|x0|, |x1|)) per sample
    x0 = torch.tensor([[1.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    e = error_norm(torch.tensor([[0.1, 0.3], [0.0, float("nan")]], dtype=torch.float64), x0, x0, rtol=0.1, atol=0.1)
    torch.testing.assert_close(e[0], torch.tensor(((0.5**2 + 1.0**2) / 2) ** 0.5, dtype=torch.float64))
    assert float(e[1]) == float("inf")


# ---------------------------------------------------------------------------------------------- sample()
def test_sample_draws_x_T_from_the_prior(problem):
    sde, den, _, _ = problem
    res = sf.sample(
        den,
        "euler",
        nfe=1,
        shape=(5, 2),
        generator=torch.Generator().manual_seed(7),
        dtype=torch.float64,
        grid=torch.tensor([1.0, 1.0 - 1e-9], dtype=torch.float64),
    )
    x_T = sde.prior_std() * torch.randn(5, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(res.x, x_T, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pass either x_T or shape"):
        sf.sample(den, "euler")


def test_sample_adaptive_paths(problem):
    sde, den, x_T, exact = problem
    res = sf.sample(den, "rk45", x_T=x_T, backend="sdeflow", rtol=1e-6, atol=1e-6)
    assert float((res.x - exact).abs().max()) < 1e-4 and res.stats["rounds"] > 0
    with pytest.raises(ValueError, match="return_trajectory is not available for adaptive solvers"):
        sf.sample(den, "rk45", x_T=x_T, backend="sdeflow", return_trajectory=True)


def test_make_stepper():
    den = sf.GaussianMixture([[0.0]], [1.0]).denoiser(sf.VPSDE())
    st = make_stepper(den, "heun")
    assert make_stepper(den, st) is st
    with pytest.raises(ValueError, match="stepper's constructor"):
        make_stepper(den, st, S_churn=1.0)
    with pytest.raises(TypeError, match="sdeflow.Denoiser"):
        sf.solvers.SOLVERS["euler"](lambda x, t: x)
