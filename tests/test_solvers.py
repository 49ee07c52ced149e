"""Solver behaviour against exact oracles: worked examples, NFE accounting, reproducibility, shapes and dtypes, bad
input, and per-solver identities (Heun's SDE invariance, DDIM = Euler in sigma, torchsde euler = Euler-Maruyama,
Langevin's stationary variance, the ODE backends against a float64 reference)."""

from __future__ import annotations

import math

import pytest
import torch

import sdeflow as sf
from sdeflow.grids import time_grid
from sdeflow.integrate import solve
from sdeflow.noise import BrownianNoise, IIDNoise, PerSampleGenerator, TensorNoise
from sdeflow.sampling import make_stepper
from sdeflow.solvers import SOLVERS, SolverError, Stepper, available

MIX = dict(means=[[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], stds=[0.5, 0.6, 0.45], weights=[0.3, 0.4, 0.3])


class CountingNet:
    """The exact mixture eps as a plain function that counts its own calls (independent of Denoiser.nfe)."""

    def __init__(self, gmm: sf.GaussianMixture, sde: sf.GaussianSDE, nan_below: float | None = None) -> None:
        self.gmm, self.sde, self.calls, self.nan_below = gmm, sde, 0, nan_below

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.gmm.eps(x, t, self.sde)
        if self.nan_below is not None:  # NaN for the samples whose time is below nan_below
            bad = (t.expand(x.shape[0]) < self.nan_below).reshape(-1, *([1] * (x.ndim - 1)))
            out = torch.where(bad, torch.full_like(out, float("nan")), out)
        return out


def _setup(d: int = 2, sde=None, nan_below=None):
    sde = sde or sf.VPSDE()
    gmm = sf.GaussianMixture(**MIX) if d == 2 else sf.GaussianMixture(torch.linspace(-1, 1, d)[None], [0.5])
    net = CountingNet(gmm, sde, nan_below)
    return sde, gmm, net, sf.Denoiser(net, sde)


def _adaptive(name: str, opts: dict | None = None) -> bool:
    """Solvers whose cost is set by tolerances, not by nfe."""
    st = SOLVERS[name](_setup()[3], **(opts or {}))
    return st.tolerances is not None


ALL = available()


def _stochastic_fixed(name: str) -> bool:
    st = SOLVERS[name](_setup()[3])
    return st.stochastic and isinstance(st, Stepper) and st.tolerances is None


STOCHASTIC_FIXED = [n for n in ALL if _stochastic_fixed(n)]
STOCHASTIC_FIXED += ["heun_churn"]


def _named(name: str) -> tuple[str, dict]:
    return ("heun", {"S_churn": 10.0}) if name == "heun_churn" else (name, {})


# ---------------------------------------------------------------------------------------------- worked example
def test_ddim_worked_example():
    """abar_100 = 0.8, abar_50 = 0.9, x_100 = (0.3, -0.4), eps = (0.2, -0.5)  ->  x_50 = (0.2865, -0.3451)."""
    path = sf.GaussianPath(lambda t: 0.5 * torch.log1p(-0.2 * t), lambda t: 0.5 * torch.log(0.2 * t), T=1.0, eps=1e-3)
    eps = torch.tensor([[0.2, -0.5]], dtype=torch.float64)
    den = sf.Denoiser(lambda x, t: eps.expand_as(x), path)
    x_T = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    res = sf.sample(den, "ddim", nfe=1, x_T=x_T, grid=torch.tensor([1.0, 0.5], dtype=torch.float64))
    # DDIM eq. 12 by hand: x0 = (x - sqrt(1 - 0.8) eps) / sqrt(0.8), x_50 = sqrt(0.9) x0 + sqrt(0.1) eps
    x0 = (x_T - math.sqrt(0.2) * eps) / math.sqrt(0.8)
    torch.testing.assert_close(res.x, math.sqrt(0.9) * x0 + math.sqrt(0.1) * eps, rtol=0, atol=1e-12)
    # the seed quotes the digits truncated to 4 decimals: (0.28657, -0.34521)
    seed = torch.tensor([[0.2865, -0.3451]], dtype=torch.float64)
    assert bool(((res.x - seed) * seed.sign() >= 0).all()) and bool(((res.x - seed).abs() < 1.1e-4).all())
    assert res.nfe == 1


# ---------------------------------------------------------------------------------------------- NFE accounting
@pytest.mark.parametrize("name", ALL)
def test_reported_nfe_is_counted_calls(name):
    sde, gmm, net, den = _setup()
    res = sf.sample(den, name, nfe=12, shape=(4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert res.nfe == net.calls == res.stats["nfe"] > 0
    if not _adaptive(name):
        assert res.nfe <= 12


@pytest.mark.parametrize(
    "name,opts,nfe,expected",
    [
        ("heun", {}, 10, 10),  # 5 full Heun steps: the grid ends at sigma(eps) > 0
        ("heun", {}, 9, 8),  # an odd budget leaves one call unused there
        ("heun", {}, 2, 2),
        ("heun", {"t_end": 0.0, "grid": "uniform"}, 9, 9),  # ends at sigma = 0 (s(0) = 0): 4 Heun + 1 Euler
        ("heun", {"t_end": 0.0, "grid": "uniform"}, 10, 9),  # an even budget leaves one call unused there
        ("heun", {"t_end": 0.0, "grid": "uniform"}, 1, 1),
        ("pc", {"n_corrector": 2}, 10, 9),  # 3 steps x (1 + 2)
        ("pc", {"predictor": "none", "n_corrector": 3}, 10, 9),
        ("euler_maruyama", {}, 7, 7),
        ("torchsde", {"method": "srk"}, 9, 8),  # 2 per step (torchsde's repeated stage is memoized)
        ("torchsde", {"method": "milstein"}, 7, 7),
    ],
)
def test_nfe_budget_exact(name, opts, nfe, expected):
    sde, gmm, net, den = _setup()
    res = sf.sample(den, name, nfe=nfe, shape=(3, 2), generator=torch.Generator().manual_seed(0), **opts)
    assert res.nfe == net.calls == expected


def test_denoise_final_counts_and_equals_tweedie():
    sde, gmm, net, den = _setup()
    x_T = sde.prior_sample((5, 2), torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = sf.sample(den, "heun", nfe=8, x_T=x_T)
    fin = sf.sample(den, "heun", nfe=9, x_T=x_T, denoise_final=True)
    assert plain.nfe == 8 and fin.nfe == 9
    torch.testing.assert_close(fin.x, gmm.x0(plain.x, sde.eps, sde))


# ---------------------------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("name", ALL)
def test_same_generator_same_samples(name):
    sde, gmm, net, den = _setup()
    a = sf.sample(den, name, nfe=8, shape=(3, 2), generator=torch.Generator().manual_seed(4)).x
    b = sf.sample(den, name, nfe=8, shape=(3, 2), generator=torch.Generator().manual_seed(4)).x
    assert torch.equal(a, b)
    if SOLVERS[name](den).stochastic:
        c = sf.sample(den, name, nfe=8, shape=(3, 2), generator=torch.Generator().manual_seed(5)).x
        assert not torch.equal(a, c)


@pytest.mark.parametrize("name", STOCHASTIC_FIXED)
def test_per_sample_generator_independent_of_batch(name):
    name, opts = _named(name)
    sde, gmm, net, den = _setup()
    big = sf.sample(
        den, name, nfe=8, shape=(4, 2), generator=PerSampleGenerator([3, 7, 11, 13]), dtype=torch.float64, **opts
    ).x
    one = sf.sample(den, name, nfe=8, shape=(1, 2), generator=PerSampleGenerator([11]), dtype=torch.float64, **opts).x
    torch.testing.assert_close(big[2:3], one, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(3, 8), (3, 2, 2, 2)], ids=["Bd", "BCHW"])
@pytest.mark.parametrize("name", ALL)
def test_shapes_and_dtypes(name, shape, dtype):
    sde, gmm, net, den = _setup(d=8)
    res = sf.sample(den, name, nfe=6, shape=shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert res.x.shape == shape and res.x.dtype == dtype
    assert bool(torch.isfinite(res.x).all())


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_solver_lists_available():
    den = _setup()[3]
    with pytest.raises(ValueError, match="available solvers: .*euler_maruyama.*heun.*pc.*rk45.*torchsde"):
        sf.sample(den, "rk4", shape=(2, 2))


@pytest.mark.parametrize("nfe", [0, -3, 2.5, True, "10"])
def test_bad_nfe(nfe):
    with pytest.raises(ValueError, match="nfe"):
        sf.sample(_setup()[3], "euler", nfe=nfe, shape=(2, 2))


def test_nfe_none_is_the_default_budget_or_the_grid_s():
    """nfe=None: 10 on a named grid; a grid tensor sets the steps itself (issue 16: nothing silently overridden)."""
    den = _setup()[3]
    assert sf.sample(den, "euler", nfe=None, shape=(2, 2)).nfe == 10
    grid = time_grid(den.sde, 7, "uniform")
    assert sf.sample(den, "euler", x_T=torch.zeros(2, 2), grid=grid).nfe == 7


def test_grid_tensor_conflicts_raise():
    den = _setup()[3]
    sde = den.sde
    grid = time_grid(sde, 7, "uniform")
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="nfe=10 does not fit the grid tensor of 7 steps"):
        sf.sample(den, "euler", nfe=10, x_T=x, grid=grid)
    assert sf.sample(den, "euler", nfe=7, x_T=x, grid=grid).nfe == 7  # a budget that fits is fine
    with pytest.raises(ValueError, match="the grid ends at .* but t_end=0.1"):
        sf.sample(den, "euler", x_T=x, grid=grid, t_end=0.1)
    late = time_grid(sde, 7, "uniform", t_start=0.5)
    with pytest.raises(ValueError, match="the grid starts at t=0.5, not at T"):
        sf.sample(den, "euler", x_T=x, grid=late)
    with pytest.raises(ValueError, match="pass x_T, the state at t_start"):
        sf.sample(den, "euler", shape=(2, 2), t_start=0.5)


def test_t_start_samples_from_an_intermediate_time():
    """SDEdit-style: from x at t_start the sampler integrates [t_start, t_end] only, and equals the tail of a full
    solve on the same grid."""
    den = _setup()[3]
    sde = den.sde
    grid = time_grid(sde, 10, "uniform")
    x_T = sde.prior_sample((3, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    full = sf.sample(den, "ddim", x_T=x_T, grid=grid, return_trajectory=True)
    tail = sf.sample(den, "ddim", x_T=full.trajectory[4], grid=grid[4:], t_start=float(grid[4]))
    torch.testing.assert_close(tail.x, full.x, rtol=0, atol=1e-12)
    assert tail.nfe == 6


def test_nfe_too_small_for_solver():
    den = _setup()[3]
    with pytest.raises(ValueError, match="too small for solver 'pc'"):
        sf.sample(den, "pc", nfe=2, shape=(2, 2), n_corrector=2)
    with pytest.raises(ValueError, match="too small for solver 'torchsde'"):
        sf.sample(den, "torchsde", nfe=1, shape=(2, 2), method="srk")
    with pytest.raises(ValueError, match="no net call"):
        sf.sample(den, "euler", nfe=1, shape=(2, 2), denoise_final=True)


@pytest.mark.parametrize("t_end", [1.0, 1.5, -0.1])
def test_bad_t_end(t_end):
    with pytest.raises(ValueError, match="t_end"):
        sf.sample(_setup()[3], "euler", nfe=4, shape=(2, 2), t_end=t_end)


def test_bad_x_T():
    den = _setup()[3]
    with pytest.raises(ValueError, match="shape"):
        sf.sample(den, "euler", nfe=4, x_T=torch.zeros(2, 2), shape=(3, 2))
    with pytest.raises(ValueError, match="batch"):
        sf.sample(den, "euler", nfe=4, x_T=torch.zeros(2))
    with pytest.raises(ValueError, match="values per sample"):
        sf.sample(den, "euler", nfe=4, x_T=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="finite"):
        sf.sample(den, "euler", nfe=4, x_T=torch.full((2, 2), float("nan")))


@pytest.mark.parametrize(
    "name,opts,match",
    [
        ("pc", {"predictor": "leapfrog"}, "predictor='leapfrog' is not supported; allowed values: 'euler_maruyama'"),
        ("pc", {"corrector": "ald"}, "corrector='ald' is not supported; allowed values: 'langevin', 'none'"),
        ("pc", {"snr": 0.0}, "snr must be > 0"),
        ("pc", {"n_corrector": 0}, "n_corrector must be an integer >= 1"),
        ("pc", {"predictor": "none", "corrector": "none"}, "nothing to do"),
        ("heun", {"S_churn": -1.0}, "S_churn must be >= 0"),
        ("heun", {"S_tmin": 2.0, "S_tmax": 1.0}, "S_tmin must be <= S_tmax"),
        ("rk45", {"backend": "jax"}, "backend='jax' is not supported; allowed values: 'torchdiffeq', 'scipy'"),
        ("rk45", {"rtol": 0.0}, "rtol must be > 0"),
        ("torchsde", {"method": "reversible_heun"}, "method='reversible_heun' is not supported; allowed values"),
        ("euler_maruyama", {"eta": 1.0}, r"unknown option\(s\) \['eta'\] for solver 'euler_maruyama'; allowed: none"),
    ],
)
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        make_stepper(_setup()[3], name, **opts)


@pytest.mark.parametrize("name", ALL)
def test_nan_from_model_raises(name):
    sde, gmm, net, den = _setup(nan_below=0.5)
    with pytest.raises(SolverError, match=r"t = |step"):
        sf.sample(den, name, nfe=10, shape=(2, 2), generator=torch.Generator().manual_seed(0))


def test_nan_names_the_step():
    sde, gmm, net, den = _setup(nan_below=0.5)
    # uniform grid 1 -> 1e-3 in 10 steps: the first model call below t = 0.5 is step 6's, at t0 = 0.4006
    with pytest.raises(SolverError, match=r"at step 6, t = 0.4006 -> 0.3007"):
        sf.sample(den, "euler_maruyama", nfe=10, shape=(2, 2), grid="uniform")


def test_torchsde_noise_restrictions():
    den = _setup()[3]
    with pytest.raises(ValueError, match="PerSampleGenerator is not supported"):
        sf.sample(den, "torchsde", nfe=4, shape=(2, 2), generator=PerSampleGenerator([1, 2]))
    with pytest.raises(ValueError, match="IIDNoise or a BrownianNoise"):
        sf.sample(den, "torchsde", nfe=4, shape=(2, 2), noise=TensorNoise(torch.zeros(4, 1, 2, 2)))


# ---------------------------------------------------------------------------------------------- callbacks, trajectory
@pytest.mark.parametrize("name", ["euler", "euler_maruyama", "pc", "heun", "torchsde"])
def test_callback_and_trajectory(name):
    sde, gmm, net, den = _setup()
    seen = []
    res = sf.sample(
        den,
        name,
        nfe=8,
        shape=(3, 2),
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
        callback=seen.append,
    )
    n = res.times.numel() - 1
    assert res.trajectory.shape == (n + 1, 3, 2)
    assert torch.equal(res.trajectory[-1], res.x)
    assert [p["i"] for p in seen] == list(range(n))
    assert all(set(p) == {"i", "t", "x", "x0"} for p in seen)
    assert torch.equal(seen[-1]["x"], res.x) and float(seen[-1]["t"]) == pytest.approx(sde.eps)


# ---------------------------------------------------------------------------------------------- Heun (EDM)
def _sigma_grid(sde, sigmas):
    return sde.t_from_edm_sigma(sigmas).to(torch.float64)


@pytest.mark.parametrize("churn", [0.0, 8.0])
def test_heun_same_scaled_trajectory_for_every_sde(churn):
    """EDM's ODE in (x / a, sigma = s / a) is the same for every Gaussian path: VP, sub-VP and VE runs on the same
    sigma grid (and the same churn noise) give the same x / a."""
    gmm = sf.GaussianMixture(**MIX)
    sigmas = torch.tensor([40.0, 12.0, 3.0, 1.0, 0.3, 0.08], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    xs = sigmas[0] * torch.randn(4, 2, generator=g, dtype=torch.float64)
    z = torch.randn(len(sigmas) - 1, 1, 4, 2, generator=g, dtype=torch.float64)
    outs = []
    for sde in (sf.VPSDE(), sf.SubVPSDE(), sf.VESDE(0.01, 50.0)):
        grid = _sigma_grid(sde, sigmas)
        a = sde.alpha(grid)
        st = make_stepper(gmm.denoiser(sde), "heun", S_churn=churn, S_tmax=20.0)  # sigma_hat stays below VE's 50
        outs.append(solve(st, a[0] * xs, grid, TensorNoise(z)).x / a[-1])
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[1], outs[2], rtol=1e-9, atol=1e-9)


def test_heun_last_step_is_euler_only_at_sigma_zero():
    """EDM Algorithm 1, line 6: the step to sigma = 0 is an Euler step, which in sigma is DDIM (x1 = a1 x0_hat +
    s1 eps_hat); every other step, the last one of a grid ending at sigma > 0 included, is a full Heun step
    (single_step). Counted calls: 2N - 1 on the first grid, 2N on the second."""
    sde, gmm, net, den = _setup()
    x_T = sde.prior_sample((5, 2), torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = time_grid(sde, 6, "karras")  # ends at sde.eps, sigma = s/a > 0
    to_zero = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])  # EDM's sigmas: a final 0 (s(0) = 0 on VP)
    ddim, heun = make_stepper(den, "ddim"), make_stepper(den, "heun")
    one = torch.tensor([sde.T, 0.0], dtype=torch.float64)
    torch.testing.assert_close(solve(heun, x_T, one).x, solve(ddim, x_T, one).x, rtol=1e-12, atol=1e-12)
    state = x_T
    for i in range(6):  # six full Heun steps
        state = heun.single_step(grid[i], grid[i + 1], state, None).x
    net.calls = 0
    res = solve(heun, x_T, grid)
    assert net.calls == res.nfe == 12
    torch.testing.assert_close(res.x, state, rtol=1e-12, atol=1e-12)
    last = ddim.single_step(to_zero[6], to_zero[7], state, None).x
    net.calls = 0
    res = solve(heun, x_T, to_zero)
    assert net.calls == res.nfe == 13
    torch.testing.assert_close(res.x, last, rtol=1e-12, atol=1e-12)
    one_step_heun = heun.single_step(grid[0], grid[1], x_T, None).x  # a one-step grid to sigma > 0: full Heun too
    torch.testing.assert_close(solve(heun, x_T, grid[:2]).x, one_step_heun, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(one_step_heun, solve(ddim, x_T, grid[:2]).x, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- predictor-corrector
@pytest.mark.parametrize(
    "sde_name,predictor",
    [
        ("vp", "reverse_diffusion"),
        ("subvp", "reverse_diffusion"),
        ("ve", "reverse_diffusion"),
        ("vp", "euler_maruyama"),
        ("ve", "none"),
    ],
)
def test_pc_langevin_equilibrium(sde_name, predictor):
    """Langevin with the snr rule on Gaussian data N(mu, S^2 I), exact score: u = x - a mu obeys
    u' = (1 - eps/v) u + sqrt(2 eps) z with eps = 2 alpha_c r^2 |z|^2 v^2/|u|^2. With |z|^2 ~ chi2_d and
    |u|^2 ~ V chi2_d, E|u'|^2 = E|u|^2 gives the stationary variance V = v (1 + alpha_c r^2)(d + 2)/(d - 2), and the
    mean is exact. Enough corrector steps per level (contraction 1 - 2 alpha_c r^2/(1 + alpha_c r^2) per step)
    equilibrate the chain at t_end whatever the predictor, on every SDE (alpha_c = (a0/a1)^2 < 1 on VP paths).
    Predictor "none" (annealed Langevin) runs one level from the marginal at t = 0.2: far from equilibrium the snr rule
    takes small steps (eps ~ 1/|u|^2), so it needs the predictor to bring it close first."""
    sde = {"vp": sf.VPSDE(), "subvp": sf.SubVPSDE(), "ve": sf.VESDE(0.01, 50.0)}[sde_name]
    d, B, r, M, mu, S = 64, 1000, 0.3, 20, 0.4, 0.6
    gmm = sf.GaussianMixture(torch.full((1, d), mu), [S])
    g = torch.Generator().manual_seed(0)
    grid = time_grid(sde, 10, "uniform")
    if predictor == "none":
        grid, M = torch.tensor([0.2, 0.1], dtype=torch.float64), 120
    aT, sT = float(sde.alpha(grid[0])), float(sde.sigma(grid[0]))
    x_T = aT * mu + math.sqrt(aT**2 * S**2 + sT**2) * torch.randn(B, d, generator=g, dtype=torch.float64)
    st = make_stepper(gmm.denoiser(sde), "pc", predictor=predictor, snr=r, n_corrector=M)
    x = solve(st, x_T, grid, IIDNoise(g)).x
    a, s = float(sde.alpha(grid[-1])), float(sde.sigma(grid[-1]))
    v = a * a * S * S + s * s
    alpha_c = float(sde.alpha(grid[-2]) / sde.alpha(grid[-1])) ** 2
    predicted = (1 + alpha_c * r * r) * (d + 2) / (d - 2)
    n = B * d
    ratio = float(x.var()) / v
    assert abs(float(x.mean()) - a * mu) < 5 * math.sqrt(ratio * v / n)
    assert abs(ratio - predicted) < 0.01 + 5 * math.sqrt(2 / n), (ratio, predicted)
    assert abs(ratio - 1) > 0.1  # the corrector's bias is visible: the oracle discriminates


# ---------------------------------------------------------------------------------------------- rk45 backends
@pytest.fixture(scope="module")
def ode_problem():
    """Mixture, VP, 4 starting points, and the exact end points from a tight scipy solve on Heun's fine grid."""
    sde = sf.VPSDE()
    gmm = sf.GaussianMixture(**MIX)
    x_T = sde.prior_sample((4, 2), torch.Generator().manual_seed(9), dtype=torch.float64)
    den = gmm.denoiser(sde)
    ref = make_stepper(den, "rk45", backend="scipy", rtol=1e-12, atol=1e-12)
    exact = ref.integrate(x_T, time_grid(sde, 1, "uniform")).x
    # independent check of the reference: 512 Heun steps agree to Heun's accuracy
    heun = solve(make_stepper(den, "heun"), x_T, time_grid(sde, 512, "karras")).x
    torch.testing.assert_close(heun, exact, rtol=0, atol=2e-4)
    return sde, gmm, x_T, exact


@pytest.mark.parametrize("backend", ["torchdiffeq", "scipy", "sdeflow"])
def test_rk45_backends_reach_tolerance(backend, ode_problem):
    sde, gmm, x_T, exact = ode_problem
    errs = []
    for tol in (1e-4, 1e-7):
        _, _, net, den = _setup()
        res = sf.sample(den, "rk45", x_T=x_T, backend=backend, rtol=tol, atol=tol)
        errs.append(float((res.x - exact).abs().max()))
        assert errs[-1] < 200 * tol
        st = res.stats
        assert res.nfe == net.calls and st["accepted"] > 0 and st["rejected"] >= 0
        if backend == "torchdiffeq":  # f(x_T) once, then 6 new stages per attempt (FSAL)
            assert res.nfe == 1 + 6 * (st["accepted"] + st["rejected"])
        elif backend == "scipy":  # f(x_T) and the initial-step probe, then 12 evaluations per DOP853 attempt
            assert res.nfe == 2 + 12 * (st["accepted"] + st["rejected"])
        else:  # 7 stages per round, the batch in one call
            assert res.nfe == 7 * st["rounds"]
    assert errs[1] < errs[0] / 50


def test_rk45_trajectory_at_grid_times(ode_problem):
    sde, gmm, x_T, exact = ode_problem
    den = gmm.denoiser(sde)
    grid = time_grid(sde, 5, "uniform")
    for backend in ("torchdiffeq", "scipy"):
        res = sf.sample(den, "rk45", x_T=x_T, grid=grid, return_trajectory=True, backend=backend, rtol=1e-8, atol=1e-8)
        assert res.trajectory.shape == (6, 4, 2)
        mid = make_stepper(den, "rk45", backend="scipy", rtol=1e-12, atol=1e-12).integrate(x_T, grid[:3]).x
        torch.testing.assert_close(res.trajectory[2], mid, rtol=0, atol=1e-6)
        torch.testing.assert_close(res.x, exact, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- torchsde bridge
def test_torchsde_euler_is_euler_maruyama_on_the_same_path():
    """The bridge's time reversal and flattening are exact: torchsde's Euler on a BrownianNoise path reproduces the
    native Euler-Maruyama on the same path."""
    sde, gmm, net, den = _setup()
    x_T = sde.prior_sample((3, 2, 1), torch.Generator().manual_seed(0), dtype=torch.float64).reshape(3, 2, 1)
    gmm3 = sf.GaussianMixture(**MIX)
    den = sf.Denoiser(lambda x, t: gmm3.eps(x, t, sde), sde)
    bn = BrownianNoise((3, 2, 1), seed=3, t_min=sde.eps, t_max=1.0)
    a = sf.sample(den, "torchsde", nfe=20, x_T=x_T, noise=bn).x
    b = sf.sample(den, "euler_maruyama", nfe=20, x_T=x_T, noise=bn).x
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_torchsde_srk_strong_order():
    """SRA1 on additive noise: pathwise error against a fine SRK solve falls at least like h^1.5."""
    sde = sf.VPSDE()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    t_end, B = 0.05, 16
    x_T = sde.prior_sample((B, 2), torch.Generator().manual_seed(1), dtype=torch.float64)
    bn = BrownianNoise((B, 2), seed=2, t_min=t_end, t_max=1.0, levy_area_approximation="space-time")
    st = make_stepper(den, "torchsde", method="srk")
    ref = st.integrate(x_T, time_grid(sde, 256, "uniform", t_end=t_end), noise=bn).x
    errs = [
        float((st.integrate(x_T, time_grid(sde, n, "uniform", t_end=t_end), noise=bn).x - ref).norm(dim=1).mean())
        for n in (8, 16, 32)
    ]
    slope = math.log(errs[0] / errs[2]) / math.log(4)
    assert slope >= st.strong_order - 0.3, errs


def test_torchsde_adaptive():
    sde, gmm, net, den = _setup()
    res = sf.sample(
        den,
        "torchsde",
        shape=(8, 2),
        generator=torch.Generator().manual_seed(0),
        adaptive=True,
        rtol=0.05,
        atol=0.05,
        dtype=torch.float64,
    )
    assert res.nfe == net.calls > 0 and bool(torch.isfinite(res.x).all())


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_solvers_on_cuda_match_cpu(name):
    """Device agnostic: the same solve on CUDA stays there and matches the CPU result (same x_T, same noise)."""
    sde, gmm, net, den = _setup()
    x_T = sde.prior_sample((8, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = (
        {
            "noise": TensorNoise(
                torch.randn(64, 2, 8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            )
        }
        if name in STOCHASTIC_FIXED
        else {}
    )
    cpu = sf.sample(den, name, nfe=10, x_T=x_T, **opts).x
    if "noise" in opts:
        opts["noise"] = TensorNoise(opts["noise"].noise.cuda())
    gpu = sf.sample(den, name, nfe=10, x_T=x_T.cuda(), **opts).x
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
