"""Fitted sampling grids (sdeflow.grid_opt): generalisation, determinism, the reference, JSON, the cache, refusals.

The oracle is independent of the solvers: exact Gaussian-mixture scores and a float64 DOP853 solve of the
probability-flow ODE in log-SNR (scipy). Grids are fitted on a few dozen noises and judged on many others.
"""

from __future__ import annotations

import json
import math

import pytest
import scipy.integrate
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf
from sdeflow.grid_opt import (
    GridCache,
    fit_grid,
    load_grid,
    optimize_grid,
    reference_solve,
    save_grid,
    stratified_noises,
)
from sdeflow.grids import time_grid

F64 = torch.float64
# small, cheap fits: the tests check properties, the benchmark measures
FAST = dict(n=128, candidates=16, reference_steps=96, dp_samples=32, sweeps=2, golden_iters=6)
TINY = dict(n=32, candidates=8, reference_steps=32, dp_samples=16, sweeps=1, golden_iters=4)


def _mixture() -> sf.GaussianMixture:
    g = torch.Generator().manual_seed(0)
    means = torch.rand(5, 2, generator=g, dtype=F64) * 1.6 - 0.8
    return sf.GaussianMixture(means, 0.05 + 0.1 * torch.rand(5, generator=g, dtype=F64))


GMM = _mixture()
SDE = sf.VPSDE()
DEN = GMM.denoiser(SDE)


def dop853(x_T: torch.Tensor, t_end: float) -> torch.Tensor:
    r""":math:`d(x/s)/d\lambda = e^\lambda \hat x_0(x)` by DOP853 (rtol = atol = 1e-10) in float64."""
    lam0, lam1 = float(SDE.log_snr(SDE.T)), float(SDE.log_snr(t_end))
    shape = x_T.shape

    def rhs(lam, u):
        t = SDE.t_from_log_snr(torch.tensor(lam, dtype=F64))
        x = torch.from_numpy(u).reshape(shape) * SDE.sigma(t)
        return (math.exp(lam) * GMM.x0(x, t, SDE)).reshape(-1).numpy()

    u0 = (x_T.to(F64) / SDE.sigma(SDE.T)).reshape(-1).numpy()
    sol = scipy.integrate.solve_ivp(rhs, (lam0, lam1), u0, method="DOP853", rtol=1e-10, atol=1e-10)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).reshape(shape) * SDE.sigma(t_end)


_HELD: dict = {}


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """1000 noises never used for fitting and their DOP853 end states."""
    if not _HELD:
        x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(99), dtype=F64)
        _HELD["x"], _HELD["ref"] = x, dop853(x, SDE.eps)
    return _HELD["x"], _HELD["ref"]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b).pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------------ generalisation
@pytest.mark.parametrize(
    "solver,nfe,opts,method",
    [
        ("dpm_solver++", 5, {}, "dp"),
        ("unipc", 6, {"order": 3}, "dp"),
        ("dpm_solver++", 6, {"order": 3}, "local"),
        ("dpm_solver", 6, {"order": 2}, "dp"),  # singlestep: 3 steps of 2 NFE
    ],
)
def test_fitted_grid_beats_the_default_on_held_out_noise(solver, nfe, opts, method):
    fit = fit_grid(DEN, solver, nfe, shape=(2,), method=method, dtype=F64, **FAST, **opts)
    assert fit.error <= fit.default_error
    x, ref = held_out()
    default = sf.sample(DEN, solver, nfe=nfe, x_T=x, **opts)
    fitted = sf.sample(DEN, solver, nfe=nfe, x_T=x, grid=fit.grid, **opts)
    assert fitted.nfe == default.nfe == nfe
    assert rms(fitted.x, ref) <= rms(default.x, ref)
    if method == "dp":  # the global method is well ahead, not just level
        assert rms(fitted.x, ref) < 0.8 * rms(default.x, ref)


def test_validation_split_keeps_the_contract():
    fit = fit_grid(DEN, "unipc", 5, shape=(2,), dtype=F64, validation=0.25, **FAST)
    assert fit.error <= fit.default_error
    x, ref = held_out()
    assert rms(sf.sample(DEN, "unipc", nfe=5, x_T=x, grid=fit.grid).x, ref) < rms(
        sf.sample(DEN, "unipc", nfe=5, x_T=x).x, ref
    )
    with pytest.raises(ValueError, match="validation"):
        fit_grid(DEN, "unipc", 5, shape=(2,), validation=0.9)


def test_grid_shape_and_cost_report():
    fit = fit_grid(DEN, "dpm_solver++", 4, shape=(2,), dtype=F64, **FAST)
    g = fit.grid
    assert g.dtype == F64 and g.numel() == 5
    assert float(g[0]) == SDE.T and float(g[-1]) == SDE.eps
    assert bool((g[1:] < g[:-1]).all())
    torch.testing.assert_close(fit.default_grid, time_grid(SDE, 4, SDE.default_grid), rtol=0, atol=0)
    assert fit.reference_nfe == 96 + 48  # the reference and its half-resolution check
    assert fit.fit_nfe > fit.reference_nfe and fit.evaluations > 10 and fit.seconds > 0
    assert fit.reference_error < 1e-2 * fit.error  # the reference is far more accurate than what is fitted
    assert fit.error <= fit.default_error and fit.history[0][0] == 1  # the default grid is evaluated first
    assert fit.options["order"] == 2 and fit.solver == "dpm_solver++" and fit.n == 128


def test_reference_solve_matches_dop853():
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref = reference_solve(DEN, x, steps=240)
    err = rms(ref.trajectory[-1], dop853(x, SDE.eps))
    assert err < 1e-5
    assert err / 3 < ref.error < 3 * err  # the Richardson estimate has the right size
    assert ref.nfe == 360 and ref.trajectory.shape == (241, 16, 2)


def test_shared_reference_gives_the_same_fit():
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    opts = {k: v for k, v in TINY.items() if k not in ("n", "reference_steps")}
    ref = reference_solve(DEN, x, steps=32)
    a = fit_grid(DEN, "unipc", 5, reference=ref, dtype=F64, **opts)
    b = fit_grid(DEN, "unipc", 5, x_T=x, reference_steps=32, dtype=F64, **opts)
    torch.testing.assert_close(a.grid, b.grid, rtol=0, atol=0)
    assert a.fit_nfe == b.fit_nfe - b.reference_nfe


def test_stratified_noises_estimate_the_pool_error_without_bias():
    """For every pool, the weighted squared errors of the stratified draw estimate the pool's mean squared error
    (unbiased: the ratio averages to 1 over pools); the draw holds the proxy's hardest noises and is deterministic."""
    pool, n, ratios = 256, 32, []
    for seed in range(12):
        x_pool = SDE.prior_std() * torch.randn(pool, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
        ref = reference_solve(DEN, x_pool, steps=120, check=False).trajectory[-1]  # tested against DOP853 above
        mse = (sf.sample(DEN, "dpm_solver++", nfe=5, x_T=x_pool).x - ref).pow(2).mean(1)
        xs, w = stratified_noises(DEN, (2,), n, pool, 0.25, torch.Generator().manual_seed(seed), dtype=F64)
        xs2, w2 = stratified_noises(DEN, (2,), n, pool, 0.25, torch.Generator().manual_seed(seed), dtype=F64)
        torch.testing.assert_close((xs, w), (xs2, w2), rtol=0, atol=0)
        assert xs.shape == (n, 2) and float(w.sum()) == pytest.approx(pool) and int((w == 1).sum()) == 8
        idx = torch.cdist(xs, x_pool).argmin(1)  # the rows of the pool that were drawn
        torch.testing.assert_close(xs, x_pool[idx], rtol=0, atol=0)
        ratios.append(float((w * mse[idx]).sum() / w.sum() / mse.mean()))
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.1)


# ------------------------------------------------------------------------------------------------ determinism
def test_deterministic_given_the_generator():
    a = optimize_grid(DEN, "dpm_solver++", 5, shape=(2,), generator=torch.Generator().manual_seed(7), **TINY)
    b = optimize_grid(DEN, "dpm_solver++", 5, shape=(2,), generator=torch.Generator().manual_seed(7), **TINY)
    c = optimize_grid(DEN, "dpm_solver++", 5, shape=(2,), **TINY)  # no generator: a fixed seed
    d = optimize_grid(DEN, "dpm_solver++", 5, shape=(2,), **TINY)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ JSON and cache
def test_json_round_trip_is_exact(tmp_path):
    fit = fit_grid(DEN, "dpm_solver++", 4, shape=(2,), **TINY)
    path = tmp_path / "g.json"
    save_grid(path, fit.grid, SDE, fit)
    back = load_grid(path, SDE)
    assert back.dtype == F64
    torch.testing.assert_close(back, fit.grid, rtol=0, atol=0)
    doc = json.loads(path.read_text())
    assert doc["sde"] == repr(SDE) and doc["fit"]["nfe"] == 4 and doc["fit"]["solver"] == "dpm_solver++"
    with pytest.raises(ValueError, match="not for"):
        load_grid(path, sf.VESDE())
    path.write_text(json.dumps({"times": [1.0, 0.5]}))
    with pytest.raises(ValueError, match="not a sdeflow grid file"):
        load_grid(path)


@given(st.lists(st.floats(1e-3, 1.0, allow_nan=False), min_size=2, max_size=12, unique=True))
def test_json_round_trip_any_grid(tmp_path_factory, times):
    grid = torch.tensor(sorted(times, reverse=True), dtype=F64)
    path = tmp_path_factory.mktemp("grids") / "g.json"
    save_grid(path, grid, SDE)
    torch.testing.assert_close(load_grid(path, SDE), grid, rtol=0, atol=0)


def test_save_refuses_a_bad_grid(tmp_path):
    with pytest.raises(ValueError, match="strictly decreasing"):
        save_grid(tmp_path / "g.json", torch.tensor([0.5, 0.9], dtype=F64), SDE)


def test_cache_fits_once_and_persists(tmp_path):
    cache = GridCache(tmp_path)
    kw = dict(TINY, order=2)
    g1 = cache.get(DEN, "dpm_solver++", 4, shape=(2,), **kw)
    g2 = cache.get(DEN, "dpm_solver++", 4, shape=(2,), **kw)
    assert cache.misses == 1 and cache.hits == 1 and g1 is g2
    g3 = cache.get(DEN, "dpm_solver++", 5, shape=(2,), **kw)  # another budget: another fit
    assert cache.misses == 2 and g3.numel() == 6
    other = GridCache(tmp_path)  # a new process: read back from JSON, no fit
    nfe0 = DEN.nfe
    g4 = other.get(DEN, "dpm_solver++", 4, shape=(2,), **kw)
    assert other.misses == 0 and other.hits == 1
    assert DEN.nfe - nfe0 == 3  # only the fingerprint's probe calls
    torch.testing.assert_close(g4, g1, rtol=0, atol=0)
    # another model: another key
    den2 = sf.GaussianMixture(GMM.means + 0.1, GMM.stds).denoiser(SDE)
    assert cache.key(den2, "dpm_solver++", 4, (2,), **kw) != cache.key(DEN, "dpm_solver++", 4, (2,), **kw)
    assert cache.key(DEN, "dpm_solver++", 4, (2,), order=3) != cache.key(DEN, "dpm_solver++", 4, (2,), order=2)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "solver,opts,match",
    [
        ("euler_maruyama", {}, "stochastic"),
        ("ddpm", {}, "stochastic"),
        ("dpm_solver++", {"sde": True}, "stochastic"),
        ("rk45", {}, "fixed-grid"),
    ],
)
def test_refuses_stochastic_and_adaptive_solvers(solver, opts, match):
    with pytest.raises(ValueError, match=match):
        fit_grid(DEN, solver, 6, shape=(2,), **FAST, **opts)


def test_refuses_budgets_the_solver_cannot_split():
    with pytest.raises(ValueError, match="cannot be split"):
        fit_grid(DEN, "heun", 5, shape=(2,), **FAST)  # N full Heun steps spend 2N NFE (the grid ends at sigma > 0)
    assert fit_grid(DEN, "heun", 6, shape=(2,), **TINY).grid.numel() == 4  # 3 steps spend 6


@given(st.one_of(st.integers(-5, 0), st.just(2.5), st.just("4"), st.just(True)))
def test_refuses_bad_nfe(nfe):
    with pytest.raises(ValueError, match="nfe"):
        fit_grid(DEN, "dpm_solver++", nfe, shape=(2,), **FAST)


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        fit_grid(DEN, "dpm_solver++", 5, shape=(2,), method="adam")
    with pytest.raises(ValueError, match="x_T or shape"):
        fit_grid(DEN, "dpm_solver++", 5)
    with pytest.raises(ValueError, match="data shape"):
        fit_grid(DEN, "dpm_solver++", 5, x_T=torch.zeros(4, 2), shape=(3,))
    with pytest.raises(ValueError, match="t_end"):
        fit_grid(DEN, "dpm_solver++", 5, shape=(2,), t_end=1.0)
    with pytest.raises(ValueError, match="candidates"):
        fit_grid(DEN, "dpm_solver++", 10, shape=(2,), candidates=4)
    with pytest.raises(ValueError, match="unknown solver"):
        fit_grid(DEN, "nope", 5, shape=(2,))


class _Net32(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1).to(x)], 1))


def test_float32_module_gets_a_float32_reference():
    """An nn.Module in float32 takes float32 inputs: fit_grid's reference follows its parameters' dtype by default
    (a float64 reference crashed inside the net); an explicit float64 reference still reaches the net."""
    torch.manual_seed(0)
    den = sf.Denoiser(_Net32(), SDE, "eps")
    fit = fit_grid(den, "unipc", 4, shape=(2,), **FAST)
    assert fit.error <= fit.default_error and fit.grid.dtype == F64 and fit.grid.numel() == 5
    with pytest.raises(RuntimeError):
        fit_grid(den, "unipc", 4, shape=(2,), reference_dtype=F64, **FAST)
    for bad in ("float64", torch.int64, 64):
        with pytest.raises(ValueError, match="reference_dtype"):
            fit_grid(den, "unipc", 4, shape=(2,), reference_dtype=bad, **FAST)
