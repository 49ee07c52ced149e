"""Property tests of the SDE layer against independent oracles (closed forms in numpy, autograd, scipy, bisection)."""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf

F64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64)


def np_(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


# ---------------------------------------------------------------------------------------------------- closed forms
# times in [0, 1]: 0 exactly or >= 1e-12 (deep-subnormal times lose relative precision in any implementation)
unit_times = st.one_of(st.just(0.0), st.floats(1e-12, 1.0))
# Each oracle below is written from the papers' formulas in numpy, independently of sdeflow's log-space code.


def vp_linear_log_alpha(t, b0, b1):
    return -(t**2) * (b1 - b0) / 4 - t * b0 / 2


def vp_linear_alpha(t, b0, b1):
    return np.exp(vp_linear_log_alpha(t, b0, b1))


def one_minus_a2(log_a):
    """1 - a^2 without cancellation near t = 0 (the oracle must be at least as accurate as the code)."""
    return -np.expm1(2 * log_a)


@given(b0=st.floats(0.01, 2.0), db=st.floats(0.5, 40.0), t=unit_times)
def test_vp_linear_closed_form(b0, db, t):
    sde = sf.VPSDE(b0, b0 + db, "linear")
    a = vp_linear_alpha(t, b0, b0 + db)
    np.testing.assert_allclose(float(sde.alpha(t)), a, rtol=1e-13)
    s2 = one_minus_a2(vp_linear_log_alpha(t, b0, b0 + db))
    np.testing.assert_allclose(float(sde.sigma(t)), math.sqrt(s2), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(float(sde.beta(t)), b0 + t * db, rtol=1e-13)


@given(b0=st.floats(0.01, 2.0), db=st.floats(0.5, 40.0), t=unit_times)
def test_subvp_closed_form(b0, db, t):
    sde = sf.SubVPSDE(b0, b0 + db)
    a = vp_linear_alpha(t, b0, b0 + db)
    np.testing.assert_allclose(float(sde.alpha(t)), a, rtol=1e-13)
    np.testing.assert_allclose(
        float(sde.sigma(t)), one_minus_a2(vp_linear_log_alpha(t, b0, b0 + db)), rtol=1e-12, atol=1e-300
    )
    # Song et al. 2021, eq. 29: g^2 = beta(t) (1 - exp(-2 int_0^t beta)) = beta (1 - a^4)
    np.testing.assert_allclose(
        float(sde.g2(t)), (b0 + t * db) * -np.expm1(4 * vp_linear_log_alpha(t, b0, b0 + db)), rtol=1e-12, atol=1e-300
    )


@given(smin=st.floats(1e-3, 1.0), r=st.floats(1.0, 5.0), t=unit_times)
def test_ve_closed_form(smin, r, t):
    smax = smin * 10**r
    sde = sf.VESDE(smin, smax)
    np.testing.assert_allclose(float(sde.sigma(t)), smin * (smax / smin) ** t, rtol=1e-13)
    assert float(sde.alpha(t)) == 1.0
    assert float(sde.f(t)) == 0.0
    assert sde.eps == 1e-5 and sde.prior_std() == pytest.approx(smax, rel=1e-13)


@given(s=st.floats(1e-3, 0.05), t=st.one_of(st.just(0.0), st.floats(1e-12, 0.9946)))
def test_vp_cosine_closed_form(s, t):
    sde = sf.VPSDE(schedule="cosine", cosine_s=s)
    a = math.cos(math.pi / 2 * (t + s) / (1 + s)) / math.cos(math.pi / 2 * s / (1 + s))
    np.testing.assert_allclose(float(sde.alpha(t)), a, rtol=1e-12)
    # sqrt(1 - a^2) cancels near t = 0 in the oracle, so: s(t) to sqrt(ulp) absolutely, and a^2 + s^2 = 1 exactly
    sig = float(sde.sigma(t))
    np.testing.assert_allclose(sig, math.sqrt(max(1 - a * a, 0.0)), rtol=1e-11, atol=3e-8)
    assert float(sde.alpha(t)) ** 2 + sig**2 == pytest.approx(1.0, abs=2e-15)
    assert sig == 0.0 if t == 0.0 else sig > 0


def test_vp_cosine_default_end_time():
    sde = sf.VPSDE(schedule="cosine")
    assert sde.T == 0.9946  # DPM-Solver's NoiseScheduleVP('cosine') stopping time
    assert 0.008 < float(sde.alpha(sde.T)) < 0.009 and float(sde.beta(sde.T)) < 400


@given(
    start=st.floats(-6.0, -0.5),
    end=st.floats(0.5, 6.0),
    tau=st.floats(0.5, 2.0),
    delta=st.floats(1e-6, 1e-2),
    t=unit_times,
)
def test_vp_sigmoid_closed_form(start, end, tau, delta, t):
    sde = sf.VPSDE(schedule="sigmoid", sigmoid_start=start, sigmoid_end=end, sigmoid_tau=tau, alpha_bar_min=delta)
    sig = lambda z: 1 / (1 + math.exp(-z))
    vs, ve = sig(start / tau), sig(end / tau)
    gamma = (ve - sig((start + t * (end - start)) / tau)) / (ve - vs)
    abar = delta + (1 - delta) * gamma
    # u = start + t (end - start) rounds: abar is known to ~1e-16 absolutely, a relative 1e-10 when abar = delta ~ 1e-6
    np.testing.assert_allclose(float(sde.alpha(t)) ** 2, abar, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(float(sde.sigma(t)) ** 2, 1 - abar, rtol=1e-9, atol=1e-15)
    assert float(sde.alpha(0.0)) == pytest.approx(1.0, abs=1e-15)
    assert float(sde.alpha(1.0)) ** 2 == pytest.approx(delta, rel=1e-9)


betas_st = st.lists(st.floats(1e-5, 0.3), min_size=1, max_size=200)


def _check_discrete(sde: sf.DiscreteVPSDE, betas: np.ndarray, w: float) -> None:
    N = len(betas)
    abar = np.cumprod(1 - betas)  # independent: no logs, no torch
    tn = (np.arange(N) + 1) / N
    np.testing.assert_allclose(np_(sde.alpha(t64(tn))) ** 2, abar, rtol=1e-12)
    np.testing.assert_allclose(np_(sde.alphas_cumprod), abar, rtol=1e-12)
    # log-linear in between: t = (j + w)/N between the grid values L_j = log a(j/N), L_0 = 0 (clean data at t = 0)
    L = np.concatenate([[0.0], 0.5 * np.log(abar)])
    t = (np.arange(N) + w) / N
    np.testing.assert_allclose(np_(sde.log_alpha(t64(t))), (1 - w) * L[:-1] + w * L[1:], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np_(sde.sigma(t64(tn))) ** 2, 1 - abar, rtol=1e-10)
    assert sde.N == N and sde.eps == 1 / N and sde.T == 1.0


@given(betas=betas_st, w=st.floats(0.0, 1.0))
def test_discrete_grid_is_cumprod_and_log_linear(betas, w):
    betas = np.asarray(betas)
    _check_discrete(sf.DiscreteVPSDE(torch.as_tensor(betas)), betas, w)


@given(n=st.integers(1, 1000), b0=st.floats(1e-5, 1e-3), b1=st.floats(5e-3, 5e-2), w=st.floats(0.0, 1.0))
def test_discrete_linear_constructor(n, b0, b1, w):
    sde = sf.DiscreteVPSDE.linear(n, b0, b1)
    betas = np.linspace(b0, b1, n)  # DDPM, Ho et al. 2020
    np.testing.assert_allclose(np_(sde.betas), betas, rtol=1e-14)
    _check_discrete(sde, betas, w)


@given(n=st.integers(1, 1000), w=st.floats(0.0, 1.0))
def test_discrete_cosine_constructor(n, w):
    sde = sf.DiscreteVPSDE.cosine(n)
    s = 0.008  # Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999
    fbar = np.cos((np.arange(n + 1) / n + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1 - fbar[1:] / fbar[:-1], 0.999)
    np.testing.assert_allclose(np_(sde.betas), betas, rtol=1e-10)  # 1 - ratio cancels: ulps of cos differ
    _check_discrete(sde, betas, w)


# ---------------------------------------------------------------------------------------------------- moment equations


def _autograd_moments(sde: sf.GaussianSDE, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """a, a', s^2, (s^2)' by reverse-mode autograd of the marginal scales alone (never sde.f / sde.g2)."""
    t = t.clone().requires_grad_(True)
    a, s2 = sde.alpha(t), sde.sigma(t) ** 2

    def d(y: torch.Tensor) -> torch.Tensor:  # a constant scale (VE: a = 1) carries no graph
        return torch.autograd.grad(y.sum(), t)[0] if y.requires_grad else torch.zeros_like(t)

    return a.detach(), d(a), s2.detach(), d(s2)


@pytest.mark.parametrize("v0", [0.0, 0.3, 4.0])
@given(data=st.data())
def test_moment_equations(sde_kind, sde_strategy, v0, data):
    """m(t) = a m0 and v(t) = a^2 v0 + s^2 obey m' = f m and v' = 2 f v + g^2 (Sarkka & Solin 2019, eq. 5.51)."""
    sde = data.draw(sde_strategy(sde_kind))
    ts = data.draw(st.lists(st.floats(sde.eps, sde.T), min_size=1, max_size=16))
    t = t64(ts)
    a, da, s2, ds2 = _autograd_moments(sde, t)
    f, g2 = sde.f(t), sde.g2(t)
    m0 = 1.7
    np.testing.assert_allclose(np_(da * m0), np_(f * a * m0), rtol=1e-9, atol=1e-300)
    v = a**2 * v0 + s2
    dv = 2 * a * da * v0 + ds2
    scale = (2 * f * v).abs() + g2.abs()
    assert bool(((dv - (2 * f * v + g2)).abs() <= 1e-9 * scale).all()), (dv, 2 * f * v + g2)
    assert bool((g2 >= 0).all())
    np.testing.assert_allclose(np_(sde.diffusion(t)) ** 2, np_(g2), rtol=1e-12)


@given(betas=betas_st, w=st.floats(0.05, 0.95), v0=st.floats(0.0, 5.0))
def test_discrete_moments_by_finite_differences(betas, w, v0):
    """Inside a segment log a is linear, so a central difference of log a / log v is exact up to rounding."""
    sde = sf.DiscreteVPSDE(torch.as_tensor(betas))
    N = sde.N
    t = t64((np.arange(N) + w) / N)
    h = 1e-4 / N
    la = lambda u: sde.log_alpha(u)
    dla = (la(t + h) - la(t - h)) / (2 * h)
    np.testing.assert_allclose(np_(sde.f(t)), np_(dla), rtol=1e-6)
    v = lambda u: sde.alpha(u) ** 2 * v0 + sde.sigma(u) ** 2
    dv = (v(t + h) - v(t - h)) / (2 * h)
    rhs = 2 * sde.f(t) * v(t) + sde.g2(t)
    # v is affine in exp(2 log a): FD error ~ h^2 |2f|^2 |v'| / 6 < 1e-8 |v'|, rounding ~ 1e-16 / h
    np.testing.assert_allclose(np_(dv), np_(rhs), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------- log-SNR


def test_log_snr_strictly_decreasing_dense(sde_kind, make_sde):
    sde = make_sde(sde_kind)
    lam = sde.log_snr(torch.linspace(sde.eps, sde.T, 20001, dtype=F64))
    assert bool(torch.isfinite(lam).all())
    assert bool((lam[1:] < lam[:-1]).all())


@given(data=st.data())
def test_log_snr_strictly_decreasing_random(sde_kind, sde_strategy, data):
    sde = data.draw(sde_strategy(sde_kind))
    ts = np.sort(np.unique(data.draw(st.lists(st.floats(sde.eps, sde.T), min_size=2, max_size=50))))
    ts = ts[np.concatenate([[True], np.diff(ts) > 1e-9])]  # closer times may round to the same float64 lambda
    lam = np_(sde.log_snr(t64(ts)))
    assert np.all(np.diff(lam) < 0)


@given(data=st.data())
def test_log_snr_inverse_round_trip(sde_kind, sde_strategy, data):
    sde = data.draw(sde_strategy(sde_kind))
    extra = data.draw(st.lists(st.floats(sde.eps, sde.T), max_size=20))
    t = torch.cat([torch.linspace(sde.eps, sde.T, 2001, dtype=F64), t64(extra)])
    back = sde.t_from_log_snr(sde.log_snr(t))
    err = float((back - t).abs().max())
    assert err < 1e-10, err
    # the EDM parametrization sigma = s/a goes through the same inverse
    assert float((sde.t_from_edm_sigma(sde.edm_sigma(t)) - t).abs().max()) < 1e-10


@given(data=st.data())
def test_closed_form_inverse_matches_bisection(sde_kind, sde_strategy, data):
    sde = data.draw(sde_strategy(sde_kind))
    lo, hi = float(sde.log_snr(sde.T)), float(sde.log_snr(sde.eps))
    lam = t64(data.draw(st.lists(st.floats(lo, hi), min_size=1, max_size=30)))
    closed, bisect = sde.t_from_log_snr(lam), sde._bisect_log_snr(lam)
    assert float((closed - bisect).abs().max()) < 1e-10


def test_log_snr_inverse_clamps_outside_range(sde_kind, make_sde):
    sde = make_sde(sde_kind)
    lam = t64([float(sde.log_snr(sde.T)) - 5.0, float(sde.log_snr(sde.eps)) + 50.0])
    t = sde.t_from_log_snr(lam)
    assert bool(((t >= 0) & (t <= sde.T)).all())
    assert float(t[0]) == pytest.approx(sde.T, abs=1e-12)


def test_log_snr_float32(sde_kind, make_sde):
    sde = make_sde(sde_kind)
    t = torch.linspace(sde.eps, sde.T, 101, dtype=torch.float32)
    lam = sde.log_snr(t)
    assert lam.dtype == torch.float32 and bool(torch.isfinite(lam).all())
    np.testing.assert_allclose(np_(lam), np_(sde.log_snr(t.double().clamp(max=sde.T))), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- drift, marginal


def test_drift_diffusion_marginal_shapes(sde_kind, make_sde):
    sde = make_sde(sde_kind)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 2, generator=g, dtype=F64)
    noise = torch.randn(x.shape, generator=g, dtype=F64)
    t = torch.linspace(sde.eps, sde.T, 5, dtype=F64)
    col = lambda c: c.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(np_(sde.drift(x, t)), np_(col(sde.f(t)) * x), rtol=1e-14)
    xt = sde.marginal(x, t, noise)
    np.testing.assert_allclose(np_(xt), np_(col(sde.alpha(t)) * x + col(sde.sigma(t)) * noise), rtol=1e-14)
    score = torch.randn(x.shape, generator=g, dtype=F64)
    f, g2 = col(sde.f(t)), col(sde.g2(t))
    np.testing.assert_allclose(np_(sde.reverse_drift(x, t, score)), np_(f * x - g2 * score), rtol=1e-13)
    np.testing.assert_allclose(np_(sde.probability_flow_drift(x, t, score)), np_(f * x - 0.5 * g2 * score), rtol=1e-13)
    # scalar t, float32 state: coefficients follow the state's dtype
    x32 = x.float()
    assert sde.drift(x32, 0.5 * sde.T).dtype == torch.float32
    assert sde.marginal(x32, 0.5 * sde.T, noise.float()).shape == x.shape


# ---------------------------------------------------------------------------------------------------- prior


@pytest.mark.parametrize("shape", [(7, 3), (4, 2, 3, 2)])
def test_prior_log_prob_matches_scipy(sde_kind, make_sde, shape):
    sde = make_sde(sde_kind)
    sT = float(sde.sigma(sde.T))
    x = sT * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    d = int(np.prod(shape[1:]))
    ref = scipy.stats.multivariate_normal(np.zeros(d), sT**2 * np.eye(d)).logpdf(np_(x.reshape(shape[0], d)))
    np.testing.assert_allclose(np_(sde.prior_log_prob(x)), ref, rtol=1e-12)
    ref1 = scipy.stats.norm(0, sT).logpdf(np_(x)).reshape(shape[0], -1).sum(1)
    np.testing.assert_allclose(np_(sde.prior_log_prob(x)), ref1, rtol=1e-12)


def test_prior_sample_statistics_and_determinism(sde_kind, make_sde):
    sde = make_sde(sde_kind)
    sT = float(sde.sigma(sde.T))
    n, d = 20000, 4
    x = sde.prior_sample((n, d), generator=torch.Generator().manual_seed(3), dtype=F64)
    assert x.shape == (n, d) and x.dtype == F64
    # 5-sigma Monte-Carlo bands: mean ~ N(0, s^2/n), sample variance ~ N(s^2, 2 s^4/n)
    assert float(x.mean(0).abs().max()) < 5 * sT / math.sqrt(n)
    assert float((x.var(0) / sT**2 - 1).abs().max()) < 5 * math.sqrt(2 / n)
    y = sde.prior_sample((n, d), generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(x, y)
    z = sde.prior_sample((n, d), generator=torch.Generator().manual_seed(4), dtype=F64)
    assert not torch.equal(x, z)
    assert sde.prior_sample((2, 3, 4)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: sf.VPSDE(20.0, 0.1), "beta_min"),
        (lambda: sf.VPSDE(1.0, 1.0), "beta_min"),
        (lambda: sf.VPSDE(-0.1, 20.0), "beta_min"),
        (lambda: sf.SubVPSDE(20.0, 0.1), "beta_min"),
        (lambda: sf.VPSDE(schedule="quadratic"), "schedule"),
        (lambda: sf.VPSDE(schedule="cosine", T=1.0), "T"),
        (lambda: sf.VPSDE(schedule="cosine", cosine_s=0.0), "cosine_s"),
        (lambda: sf.VPSDE(schedule="sigmoid", sigmoid_start=2.0, sigmoid_end=1.0), "sigmoid_start"),
        (lambda: sf.VPSDE(schedule="sigmoid", sigmoid_tau=0.0), "sigmoid_tau"),
        (lambda: sf.VPSDE(schedule="sigmoid", alpha_bar_min=1.5), "alpha_bar_min"),
        (lambda: sf.VPSDE(eps=0.0), "eps"),
        (lambda: sf.VPSDE(eps=2.0), "eps"),
        (lambda: sf.VESDE(0.0, 50.0), "sigma_min"),
        (lambda: sf.VESDE(-1.0, 50.0), "sigma_min"),
        (lambda: sf.VESDE(0.01, 0.0), "sigma_max"),
        (lambda: sf.VESDE(0.01, -5.0), "sigma_max"),
        (lambda: sf.VESDE(50.0, 0.01), "sigma_min"),
        (lambda: sf.VESDE(0.01, float("nan")), "sigma_max"),
        (lambda: sf.DiscreteVPSDE([0.1, 1.5]), "betas"),
        (lambda: sf.DiscreteVPSDE([0.1, 0.0]), "betas"),
        (lambda: sf.DiscreteVPSDE([]), "betas"),
        (lambda: sf.DiscreteVPSDE.linear(0), "n"),
        (lambda: sf.DiscreteVPSDE.cosine(0), "n"),
        (lambda: sf.GaussianPath(torch.log1p, torch.log, T=0.0), "T"),
    ],
)
def test_bad_construction_raises(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@pytest.mark.parametrize("bad", [-0.1, 1.0 + 1e-6, float("nan"), [0.5, 1.2]])
def test_time_outside_range_raises(sde_kind, make_sde, bad):
    sde = make_sde(sde_kind)
    tb = t64(bad) * sde.T  # relative to T (the cosine VP ends at 0.9946)
    for method in (sde.alpha, sde.sigma, sde.log_snr, sde.f, sde.g2, sde.diffusion):
        with pytest.raises(ValueError, match="t must"):
            method(tb)
    with pytest.raises(ValueError, match="t must"):
        sde.drift(torch.zeros(2, 3), tb)


def test_marginal_noise_shape_mismatch_raises(make_sde):
    sde = make_sde("vp_linear")
    with pytest.raises(ValueError, match="noise"):
        sde.marginal(torch.zeros(2, 3), 0.5, torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------- docs


def test_docs_example_runs():
    """The runnable example of docs/sdes.md runs and its own assertions hold."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "sdes.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/sdes.md lost its example"
    exec(compile(blocks[-1], "docs/sdes.md", "exec"), {"__name__": "__docs__", "print": lambda *a, **k: None})
