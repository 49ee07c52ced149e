"""Declared orders are tested contracts: empirical convergence orders of every solver in SOLVERS.

* Deterministic solvers (ONE parametrized test, every name in ``SOLVERS`` plus the option variants in
  ``DETERMINISTIC_VARIANTS``): the log-log slope of the final error against the step size, on a Gaussian mixture with
  exact score against a float64 scipy DOP853 reference of the probability-flow ODE, and on Gaussian data against the
  closed-form flow ((x_t - a_t mu) / sqrt(a_t^2 S^2 + s_t^2) is constant along probability-flow trajectories).
* Stochastic solvers: the *exact* weak error on Gaussian data. With exact (affine) scores every sampler here is an
  affine map of (x_T, z_0, z_1, ...), so one solve on a probe batch (x_T = 0 / 1 and one unit noise draw per sample)
  gives the output law N(alpha m_T + gamma, alpha^2 v_T + sum_i beta_i^2) exactly: no Monte-Carlo error, so the weak
  order is fitted like an ODE order. A Monte-Carlo run of sample() checks the probe against real sampling.
* Strong order of Euler-Maruyama (and the PC predictor) on one Brownian path: coarse increments are sums of the fine
  ones (BrownianNoise), against a fine torchsde SRK reference.

A new solver joins by being in SOLVERS; add option variants to the dicts below.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import sdeflow as sf
from sdeflow.grids import time_grid
from sdeflow.integrate import solve
from sdeflow.noise import BrownianNoise, TensorNoise
from sdeflow.sampling import make_stepper
from sdeflow.solvers import SOLVERS, Integrator, available

#: option variants of deterministic solvers (default options when a solver is absent); stochastic ones are skipped.
DETERMINISTIC_VARIANTS: dict[str, list[dict]] = {
    "ddim": [{"eta": 0.0}],
    "heun": [{}],
    "rk45": [{}],
    "dpm_solver": [
        {"order": 1},
        {"order": 2},
        {"order": 3},
        {"order": 2, "solver_type": "taylor"},
        {"order": 3, "solver_type": "taylor"},
        {"order": 3, "predict_x0": True},
    ],
    # DPM-Solver++(3M) and UniPC-3 are fitted in test_fast_solvers.py on mixtures: on Gaussian data 3M converges with
    # order 4 (the Adams error telescopes to end-point derivatives that vanish there) and UniPC-3 reaches its order 4
    # only beyond 128 steps
    "dpm_solver++": [{"order": 1}, {"order": 2}, {"order": 2, "solver_type": "taylor"}],
    "unipc": [
        {"order": 1},
        {"order": 2},
        {"order": 2, "variant": "bh1"},
        {"order": 2, "corrector": False},
        {"order": 2, "predict_x0": False},
    ],
    # DEIS-3 "logrho" (exact in log-SNR, like 3M) and LMS-4 are fitted on mixtures with more steps in
    # tests/solvers/test_new_solvers.py (3M's telescoping on Gaussian data; LMS-4 is pre-asymptotic below 128 steps)
    "deis": [{"order": 1}, {"order": 2}, {"order": 2, "solver_type": "tab"}, {"order": 3, "solver_type": "tab"}],
    "lms": [{"order": 2}, {"order": 3}],
    "ipndm": [{"max_order": 1}, {"max_order": 2}, {"max_order": 4}],
    "dpmpp_2s_ancestral": [{"eta": 0.0}],
    "dpmpp_sde": [{"eta": 0.0}, {"eta": 0.0, "r": 0.3}],
    "er_sde": [{"noise_scaler": "ode", "max_stage": 2}, {"noise_scaler": "ode", "max_stage": 3}],
    "sa_solver": [{"tau": 0.0}, {"tau": 0.0, "predictor_order": 1}, {"tau": 0.0, "corrector_order": 3}],
}
#: option variants of stochastic solvers for the exact weak-order test (samplers affine in x for Gaussian data).
STOCHASTIC_VARIANTS: dict[str, list[dict]] = {
    "euler_maruyama": [{}],
    "ddpm": [{"variance": "beta_tilde"}, {"variance": "beta"}],
    "ddim": [{"eta": 1.0}],
    "pc": [
        {"predictor": "reverse_diffusion", "corrector": "none"},
        {"predictor": "euler_maruyama", "corrector": "none"},
    ],
    "heun": [{"S_churn": 20.0}, {"S_churn": 5.0, "S_tmin": 0.05, "S_tmax": 1.0}],
    "dpm_solver++": [{"sde": True, "order": 1}, {"sde": True, "order": 2}, {"sde": True, "order": 3}],
    "dpmpp_2s_ancestral": [{}, {"eta": 0.5}],
    "dpmpp_sde": [{}],
    "er_sde": [{}, {"max_stage": 1}],
    "sa_solver": [{}, {"tau": 0.5, "tau_window": (0.0, 1.0), "predictor_order": 1, "corrector_order": 1}],
}
#: solvers the weak-order probe cannot drive (they draw their own noise); they are checked in test_solvers.py.
EXTERNAL_NOISE = {"torchsde"}

STEP_COUNTS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
FIT_POINTS = 4  # fit on the finest FIT_POINTS step counts whose error is above the floor
TOL = 0.3

MIX = dict(means=[[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], stds=[0.5, 0.6, 0.45], weights=[0.3, 0.4, 0.3])
MU, S = 0.5, 0.5  # Gaussian data N(MU, S^2 I)


def _dummy_den() -> sf.Denoiser:
    return sf.GaussianMixture([[0.0]], [1.0]).denoiser(sf.VPSDE())


def _cases(variants: dict[str, list[dict]], stochastic: bool) -> list:
    """(name, options) for every solver in SOLVERS: its listed variants, else its defaults (stochastic solvers with
    defaults only when they step on a fixed grid), keeping those whose stepper is (not) stochastic."""
    den, out = _dummy_den(), []
    for name in available():
        for opts in variants.get(name, [{}]):
            st = SOLVERS[name](den, **opts)
            if bool(st.stochastic) != stochastic or (stochastic and name in EXTERNAL_NOISE):
                continue
            if stochastic and name not in variants and (st.integrator() is not None or st.tolerances is not None):
                continue
            tag = ",".join(f"{k}={v}" for k, v in opts.items())
            out.append(pytest.param(name, opts, id=f"{name}[{tag}]" if tag else name))
    return out


SDES = {"vp": lambda: sf.VPSDE(0.1, 20.0), "ve": lambda: sf.VESDE(0.01, 50.0)}


def _fit_slope(ns, errs, floor):
    """-d log err / d log N over the finest FIT_POINTS points above ``floor``."""
    pts = [(n, e) for n, e in zip(ns, errs) if e > floor][-FIT_POINTS:]
    assert len(pts) >= 3, f"too few step counts above the error floor {floor:g}: {list(zip(ns, errs))}"
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    return -np.polyfit(x, y, 1)[0], pts


def _pf_reference(sde, gmm, x_T: torch.Tensor, T: float, t_end: float) -> torch.Tensor:
    """float64 scipy DOP853 solution of dx/dt = f x - g^2/2 score (exact mixture score), rtol 1e-13, atol 1e-14
    (about 1e-14 accurate: tightening further changes it by < 1e-14)."""
    shape = x_T.shape

    def rhs(t, y):
        xt = torch.from_numpy(y).reshape(shape)
        tt = torch.tensor(t, dtype=torch.float64)
        return (sde.f(tt) * xt - 0.5 * sde.g2(tt) * gmm.score(xt, tt, sde)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (T, t_end), x_T.reshape(-1).numpy(), method="DOP853", rtol=1e-13, atol=1e-14)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def _gaussian_flow(sde, x_T: torch.Tensor, T: float, t_end: float) -> torch.Tensor:
    """Closed-form probability-flow map for data N(MU, S^2 I)."""

    def a_v(t):
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        return a, math.sqrt(a * a * S * S + s * s)

    aT, vT = a_v(T)
    ae, ve = a_v(t_end)
    return ae * MU + ve / vT * (x_T - aT * MU)


_REF_CACHE: dict = {}


def _problem(kind: str, sde_name: str):
    """(sde, denoiser, x_T, exact x at t_end, floor) for 'mixture' or 'gaussian' data, cached per module run."""
    key = (kind, sde_name)
    if key not in _REF_CACHE:
        sde = SDES[sde_name]()
        t_end = 1e-3
        g = torch.Generator().manual_seed(3)
        x_T = sde.prior_std() * torch.randn(6, 2, generator=g, dtype=torch.float64)
        if kind == "mixture":
            gmm = sf.GaussianMixture(**MIX)
            exact, floor = _pf_reference(sde, gmm, x_T, sde.T, t_end), 1e-12
        else:
            gmm = sf.GaussianMixture([[MU, MU]], [S])
            exact, floor = _gaussian_flow(sde, x_T, sde.T, t_end), 1e-12
        _REF_CACHE[key] = (sde, gmm.denoiser(sde), x_T, t_end, exact, floor)
    return _REF_CACHE[key]


@pytest.mark.parametrize("sde_name,data", [("vp", "mixture"), ("vp", "gaussian"), ("ve", "mixture")])
@pytest.mark.parametrize("name,opts", _cases(DETERMINISTIC_VARIANTS, stochastic=False))
def test_deterministic_order(name, opts, sde_name, data):
    sde, den, x_T, t_end, exact, floor = _problem(data, sde_name)
    st = make_stepper(den, name, **opts)
    errs = []
    # the formula's order is measured on log-SNR steps for the exponential integrators: on their default quadratic
    # grid (VP) the last steps near t_end shrink in lambda only once n >> 30, so singlestep DPM-Solver-3 fits 2.2-2.6
    # at 48-128 steps there (pre-asymptotic, not a lower order)
    kind = "logsnr" if getattr(st, "grid_from_path", False) else st.default_grid
    for n in STEP_COUNTS:
        grid = time_grid(sde, n, kind, t_end=t_end)
        x = st.integrate(x_T, grid).x if isinstance(st, Integrator) else solve(st, x_T, grid).x
        errs.append(float((x - exact).pow(2).mean().sqrt()))
        if errs[-1] < floor:
            break
    ns = STEP_COUNTS[: len(errs)]
    slope, pts = _fit_slope(ns, errs, floor)
    assert abs(slope - st.order) <= TOL, f"{name}{opts}: slope {slope:.3f} vs declared order {st.order}; {pts}"


def test_reference_oracle_matches_closed_form():
    """The DOP853 reference reproduces the closed-form Gaussian flow (the two oracles agree)."""
    sde = SDES["vp"]()
    x_T = torch.tensor([[0.3, -1.2], [2.0, 0.1]], dtype=torch.float64)
    ref = _pf_reference(sde, sf.GaussianMixture([[MU, MU]], [S]), x_T, 1.0, 1e-3)
    torch.testing.assert_close(ref, _gaussian_flow(sde, x_T, 1.0, 1e-3), rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ weak order, exact
def exact_output_law(stepper, sde, grid: torch.Tensor) -> tuple[float, float]:
    """Mean and variance (per coordinate) of the solve's output for x_T ~ p_T, data N(MU, S^2) in d = 1.

    Probe batch: sample 0 has x_T = 0 and no noise (gamma), sample 1 x_T = 1 (alpha + gamma), sample 2 + k the unit
    k-th noise draw (beta_k + gamma), and a last sample x_T = 2 checks that the solve is affine.
    """
    n, draws = grid.numel() - 1, stepper.noise_draws
    P = n * draws
    x = torch.zeros(P + 3, 1, dtype=torch.float64)
    x[1], x[-1] = 1.0, 2.0
    z = torch.zeros(n, draws, P + 3, 1, dtype=torch.float64)
    for i in range(n):
        for j in range(draws):
            z[i, j, 2 + i * draws + j] = 1.0
    out = solve(stepper, x, grid, TensorNoise(z)).x[:, 0]
    gamma, alpha, beta = out[0], out[1] - out[0], out[2:-1] - out[0]
    torch.testing.assert_close(out[-1], 2 * alpha + gamma, rtol=1e-9, atol=1e-9, msg="the solve is not affine")
    T = grid[0]
    aT, sT = float(sde.alpha(T)), float(sde.sigma(T))
    m = float(alpha) * aT * MU + float(gamma)
    v = float(alpha) ** 2 * (aT**2 * S**2 + sT**2) + float((beta**2).sum())
    return m, v


def _exact_end_law(sde, t_end):
    a, s = float(sde.alpha(t_end)), float(sde.sigma(t_end))
    return a * MU, a * a * S * S + s * s


@pytest.mark.parametrize("name,opts", _cases(STOCHASTIC_VARIANTS, stochastic=True))
def test_weak_order_exact(name, opts):
    sde = SDES["vp"]()
    den = sf.GaussianMixture([[MU]], [S]).denoiser(sde)
    st = make_stepper(den, name, **opts)
    m_ex, v_ex = _exact_end_law(sde, sde.eps)
    ns, errs = (64, 128, 256), []
    for n in ns:
        m, v = exact_output_law(st, sde, time_grid(sde, n, st.default_grid))
        errs.append(abs(m - m_ex) + abs(v / v_ex - 1))
    slope, pts = _fit_slope(ns, errs, 1e-9)
    assert abs(slope - st.order) <= TOL, f"{name}{opts}: weak slope {slope:.3f} vs declared order {st.order}; {pts}"


@pytest.mark.parametrize("name,opts", [("euler_maruyama", {}), ("ddpm", {}), ("heun", {"S_churn": 20.0})])
def test_exact_law_matches_sampling(name, opts):
    """Monte-Carlo sample() on Gaussian data reproduces the probed output law (5 standard errors)."""
    sde = SDES["vp"]()
    den = sf.GaussianMixture([[MU]], [S]).denoiser(sde)
    st = make_stepper(den, name, **opts)
    n, B = 16, 40_000
    m, v = exact_output_law(st, sde, time_grid(sde, n, st.default_grid))
    g = torch.Generator().manual_seed(11)
    aT, sT = float(sde.alpha(sde.T)), float(sde.sigma(sde.T))
    x_T = aT * MU + math.sqrt(aT**2 * S**2 + sT**2) * torch.randn(B, 1, generator=g, dtype=torch.float64)
    x = sf.sample(den, name, nfe=st.nfe_per_step * n, x_T=x_T, generator=g, **opts).x
    se_m, se_v = math.sqrt(v / B), v * math.sqrt(2 / (B - 1))
    assert abs(float(x.mean()) - m) < 5 * se_m
    assert abs(float(x.var()) - v) < 5 * se_v


# ------------------------------------------------------------------------------------------ strong order
@pytest.fixture(scope="module")
def brownian_problem():
    """A mixture, 32 starting points, one Brownian path on [0.05, 1] and the SRK solve on it with 512 steps."""
    sde = SDES["vp"]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    t_end, B = 0.05, 32
    g = torch.Generator().manual_seed(5)
    x_T = sde.prior_std() * torch.randn(B, 2, generator=g, dtype=torch.float64)
    bn = BrownianNoise((B, 2), seed=7, t_min=t_end, t_max=1.0, levy_area_approximation="space-time")
    grid = time_grid(sde, 512, "uniform", t_end=t_end)
    ref = make_stepper(den, "torchsde", method="srk").integrate(x_T, grid, noise=bn).x
    return sde, den, t_end, x_T, bn, ref


@pytest.mark.parametrize("name,opts", [("euler_maruyama", {}), ("pc", {"corrector": "none"})])
def test_strong_order_on_brownian_path(name, opts, brownian_problem):
    """Pathwise error against a fine torchsde SRK solve on the same Brownian path: slope = strong order (1: additive
    noise)."""
    sde, den, t_end, x_T, bn, ref = brownian_problem
    st = make_stepper(den, name, **opts)
    ns, errs = (8, 16, 32, 64), []
    for n in ns:
        x = solve(st, x_T, time_grid(sde, n, "uniform", t_end=t_end), bn).x
        errs.append(float((x - ref).norm(dim=1).mean()))
    slope, pts = _fit_slope(ns, errs, 1e-6)
    assert abs(slope - st.strong_order) <= TOL, f"{name}: strong slope {slope:.3f}; {pts}"
