"""GaussianMixture, the exact oracle: against scipy, autograd, Tweedie, the continuity equation and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf
from sdeflow.denoiser import PREDICTIONS

F64 = torch.float64


@st.composite
def mixtures(draw, diagonal: bool | None = None, max_k: int = 4, max_d: int = 4) -> sf.GaussianMixture:
    """A random mixture: K components in d dims, means ~ N(0, 3^2), stds in [0.05, 2], Dirichlet-like weights."""
    K, d = draw(st.integers(1, max_k)), draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, d, generator=g, dtype=F64)
    diag = draw(st.booleans()) if diagonal is None else diagonal
    stds = 0.05 + 1.95 * torch.rand((K, d) if diag else (K,), generator=g, dtype=F64)
    w = -torch.log(torch.rand(K, generator=g, dtype=F64))  # Exp(1) draws, normalized: Dirichlet(1, ..., 1)
    return sf.GaussianMixture(means, stds, w / w.sum())


def np_mixture_logpdf(x: np.ndarray, means: np.ndarray, var: np.ndarray, w: np.ndarray) -> np.ndarray:
    """log sum_k w_k N(x; means_k, diag(var_k)) with scipy, x (B, d), var (K, d)."""
    comps = [scipy.stats.multivariate_normal(m, np.diag(v)).logpdf(x).reshape(-1) for m, v in zip(means, var)]
    return scipy.special.logsumexp(np.stack(comps, 1), b=w[None], axis=1)


def points(gmm: sf.GaussianMixture, sde: sf.GaussianSDE, t: float, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(near, far): samples of p_t, and points at distance 1e3 from the origin (far from every mean)."""
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, generator=g)
    near = sde.marginal(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    direction = torch.randn(n, gmm.d, generator=g, dtype=F64)
    far = 1e3 * direction / direction.norm(dim=1, keepdim=True)
    return near, far


def autograd_score(gmm: sf.GaussianMixture, x: torch.Tensor, t, sde: sf.GaussianSDE) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.marginal_log_prob(x, t, sde).sum(), x)
    return grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------- densities


@given(gmm=mixtures(), seed=st.integers(0, 1000))
def test_log_prob_matches_scipy(gmm, seed):
    x = gmm.sample(17, generator=torch.Generator().manual_seed(seed)) + 0.5
    ref = np_mixture_logpdf(x.numpy(), gmm.means.numpy(), gmm.stds.numpy() ** 2, gmm.weights.numpy())
    np.testing.assert_allclose(gmm.log_prob(x).numpy(), ref, rtol=1e-11, atol=1e-11)


@given(data=st.data(), gmm=mixtures())
def test_marginal_log_prob_matches_scipy(sde_kind, sde_strategy, data, gmm):
    sde = data.draw(sde_strategy(sde_kind))
    t = data.draw(st.floats(sde.eps, sde.T))
    near, _ = points(gmm, sde, t, 13, seed=data.draw(st.integers(0, 1000)))
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    var = a**2 * gmm.stds.numpy() ** 2 + s**2
    ref = np_mixture_logpdf(near.numpy(), a * gmm.means.numpy(), var, gmm.weights.numpy())
    np.testing.assert_allclose(gmm.marginal_log_prob(near, t, sde).numpy(), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True])
def test_marginal_log_prob_tends_to_log_prob(sde_kind, make_sde, diagonal):
    """s(t) -> 0 as t -> 0 (all but VE): log p_t -> log p_0 with an O(s^2) gap; VE at t = 0 is p_0 * N(0, s_min^2)."""
    sde = make_sde(sde_kind)
    g = torch.Generator().manual_seed(0)
    stds = 0.3 + torch.rand((3, 2) if diagonal else (3,), generator=g, dtype=F64)
    gmm = sf.GaussianMixture(torch.randn(3, 2, generator=g, dtype=F64), stds, torch.tensor([0.2, 0.3, 0.5], dtype=F64))
    x = gmm.sample(50, generator=g)
    exact = gmm.log_prob(x)
    if isinstance(sde, sf.VESDE):
        blurred = sf.GaussianMixture(gmm.means, torch.sqrt(gmm.stds**2 + sde.sigma_min**2), gmm.weights)
        np.testing.assert_allclose(gmm.marginal_log_prob(x, 0.0, sde).numpy(), blurred.log_prob(x).numpy(), rtol=1e-12)
        return
    gaps = []
    for t in (1e-2 * sde.T, 1e-4, 1e-6, 1e-8):
        gap = float((gmm.marginal_log_prob(x, t, sde) - exact).abs().max())
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        # first order in the perturbation of the path: the mean moves by (1 - a) mu, the variance by s^2
        assert gap < 1e3 * (abs(1 - a) + s**2) + 1e-12, (t, gap, a, s)
        gaps.append(gap)
    assert gaps[-1] < 1e-6 and all(b <= a for a, b in zip(gaps, gaps[1:]))
    if not isinstance(sde, sf.GaussianPath):  # log s(0) = log 0 is fine for the VP family
        np.testing.assert_allclose(gmm.marginal_log_prob(x, 0.0, sde).numpy(), exact.numpy(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------- exact score


@pytest.mark.parametrize("diagonal", [False, True])
@given(data=st.data())
def test_score_equals_autograd_of_marginal_log_prob(sde_kind, sde_strategy, diagonal, data):
    sde = data.draw(sde_strategy(sde_kind))
    gmm = data.draw(mixtures(diagonal=diagonal))
    t = data.draw(st.floats(sde.eps, sde.T))
    near, far = points(gmm, sde, t, 16, seed=data.draw(st.integers(0, 1000)))
    for x in (near, far):
        score = gmm.score(x, t, sde)
        assert bool(torch.isfinite(score).all())
        assert rel(score, autograd_score(gmm, x, t, sde)) < 1e-8
    # batched times: one t per sample
    tb = torch.tensor(data.draw(st.lists(st.floats(sde.eps, sde.T), min_size=16, max_size=16)), dtype=F64)
    assert rel(gmm.score(near, tb, sde), autograd_score(gmm, near, tb, sde)) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_score_stable_far_from_every_mean(sde_kind, make_sde, dtype):
    """At |x| = 1e3 every responsibility but one underflows: log-sum-exp keeps the score finite and exact."""
    sde = make_sde(sde_kind)
    means, stds = torch.tensor([[0.0, 1.0], [2.0, -1.0]]), torch.tensor([0.1, 0.2])
    gmm = sf.GaussianMixture(means, stds, torch.tensor([0.5, 0.5]))
    x = torch.tensor([[1e3, 0.0], [-1e3, 0.0], [0.0, 1e3], [7e2, -7e2]], dtype=dtype)
    for t in (sde.eps, 0.5 * sde.T, sde.T):
        score = gmm.score(x, t, sde)
        lp = gmm.marginal_log_prob(x, t, sde)
        assert score.dtype == dtype and bool(torch.isfinite(score).all()) and bool(torch.isfinite(lp).all())
        # the reference: float64 autograd of log p_t (itself checked against scipy above)
        ref = autograd_score(gmm, x.double(), t, sde)
        assert rel(score.double(), ref) < (1e-10 if dtype == F64 else 1e-6)


@given(data=st.data(), gmm=mixtures())
def test_x0_is_tweedie(sde_kind, sde_strategy, data, gmm):
    """E[x0 | x_t] = (x + s^2 grad log p_t)/a (Tweedie / Robbins), with the score from autograd."""
    sde = data.draw(sde_strategy(sde_kind))
    t = data.draw(st.floats(sde.eps, sde.T))
    near, _ = points(gmm, sde, t, 16, seed=data.draw(st.integers(0, 1000)))
    a, s = sde.alpha(t), sde.sigma(t)
    tweedie = (near + s**2 * autograd_score(gmm, near, t, sde)) / a
    assert rel(gmm.x0(near, t, sde), tweedie) < 1e-8
    assert rel(gmm.eps(near, t, sde), -s * autograd_score(gmm, near, t, sde)) < 1e-8


@given(data=st.data(), gmm=mixtures(max_d=3))
def test_probability_flow_solves_the_continuity_equation(sde_kind, sde_strategy, data, gmm):
    """d/dt log p_t(x) = -div v - v . grad log p_t for the PF velocity v = f x - g^2 score / 2 (Song et al. 2021).

    This ties f and g^2 (sdes.py) to the marginals a, s through the exact mixture density, for every SDE.
    """
    sde = data.draw(sde_strategy(sde_kind))
    t0 = data.draw(st.floats(sde.eps, sde.T))
    near, _ = points(gmm, sde, t0, 4, seed=data.draw(st.integers(0, 1000)))
    t = torch.full((len(near),), t0, dtype=F64, requires_grad=True)  # one t per sample: per-sample d/dt
    (dlogp_dt,) = torch.autograd.grad(gmm.marginal_log_prob(near, t, sde).sum(), t)
    x = near.clone().requires_grad_(True)
    score = gmm.score(x, t0, sde)
    v = sde.probability_flow_drift(x, t0, score)
    div = sum(torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(gmm.d))
    rhs = -div - (v * score).sum(1)
    scale = float(div.abs().max() + (v * score).sum(1).abs().max())
    assert float((rhs - dlogp_dt).abs().max()) <= 1e-8 * scale
    # the reverse SDE drift differs from the PF drift by the other half of the score term
    reverse, expected = sde.reverse_drift(x, t0, score), 2 * v - sde.drift(x, t0)
    np.testing.assert_allclose(reverse.detach().numpy(), expected.detach().numpy(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- denoiser


@given(data=st.data(), gmm=mixtures())
def test_denoiser_predictions_agree(sde_kind, sde_strategy, data, gmm):
    sde = data.draw(sde_strategy(sde_kind))
    t = torch.tensor(data.draw(st.lists(st.floats(sde.eps, sde.T), min_size=8, max_size=8)), dtype=F64)
    near, _ = points(gmm, sde, float(t[0]), 8, seed=data.draw(st.integers(0, 1000)))
    eps_ref, x0_ref, score_ref = gmm.eps(near, t, sde), gmm.x0(near, t, sde), gmm.score(near, t, sde)
    # x0 -> eps = (x - a x0)/s cancels where s is tiny (sub-VP: s ~ beta_min t): allow for that conditioning
    s = sde.sigma(t)[:, None]
    kappa = float((near.abs() / (s * eps_ref.norm(dim=1, keepdim=True) + 1e-300)).max())
    for p in PREDICTIONS:
        den = gmm.denoiser(sde, prediction=p)
        assert den.prediction == p
        tol = 1e-8 + (1e-14 * kappa if p in ("x0", "v") else 0.0)
        assert rel(den.eps(near, t), eps_ref) < tol
        assert rel(den.x0(near, t), x0_ref) < 1e-8
        assert rel(den.score(near, t), score_ref) < tol
        assert den.nfe == 3


def test_float32_matches_float64(sde_kind, make_sde):
    sde = make_sde(sde_kind)
    g = torch.Generator().manual_seed(2)
    gmm = sf.GaussianMixture(torch.randn(3, 4, generator=g), 0.2 + torch.rand(3, 4, generator=g), None)
    t = torch.linspace(sde.eps, sde.T, 32, dtype=F64)
    x = sde.marginal(gmm.sample(32, generator=g), t, torch.randn(32, 4, generator=g, dtype=F64))
    for name in ("eps", "x0", "score"):
        y32, y64 = getattr(gmm, name)(x.float(), t, sde), getattr(gmm, name)(x, t, sde)
        assert y32.dtype == torch.float32 and bool(torch.isfinite(y32).all())
        assert rel(y32.double(), y64) < 1e-3, name
    lp32 = gmm.marginal_log_prob(x.float(), t, sde)
    np.testing.assert_allclose(lp32.double().numpy(), gmm.marginal_log_prob(x, t, sde).numpy(), rtol=1e-4, atol=1e-4)
    assert gmm.sample(5, generator=g, dtype=torch.float32).dtype == torch.float32


def test_image_shaped_data(make_sde):
    """Data (B, C, H, W) with C H W = d behaves exactly like the flat (B, d) data."""
    sde = make_sde("vp_cosine")
    g = torch.Generator().manual_seed(3)
    gmm = sf.GaussianMixture(torch.randn(2, 12, generator=g, dtype=F64), torch.tensor([0.5, 1.0], dtype=F64))
    x = torch.randn(5, 3, 2, 2, generator=g, dtype=F64)
    flat = x.reshape(5, 12)
    t = torch.full((5,), 0.4, dtype=F64)
    np.testing.assert_array_equal(gmm.log_prob(x).numpy(), gmm.log_prob(flat).numpy())
    np.testing.assert_array_equal(gmm.marginal_log_prob(x, t, sde).numpy(), gmm.marginal_log_prob(flat, t, sde).numpy())
    for name in ("eps", "x0", "score"):
        y = getattr(gmm, name)(x, t, sde)
        assert y.shape == x.shape
        np.testing.assert_array_equal(y.reshape(5, 12).numpy(), getattr(gmm, name)(flat, t, sde).numpy())
    den = gmm.denoiser(sde, prediction="v")
    np.testing.assert_allclose(den.eps(x, t).reshape(5, 12).numpy(), gmm.eps(flat, t, sde).numpy(), rtol=1e-10)


# ---------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("diagonal", [False, True])
def test_sample_moments_within_monte_carlo_error(diagonal):
    g = torch.Generator().manual_seed(11)
    K, d, n = 3, 3, 40000
    means = 2 * torch.randn(K, d, generator=g, dtype=F64)
    stds = 0.2 + torch.rand((K, d) if diagonal else (K,), generator=g, dtype=F64)
    w = np.array([0.5, 0.3, 0.2])
    gmm = sf.GaussianMixture(means, stds, torch.tensor(w))
    # the oracle moments, from the definition in numpy
    mu, sd = means.numpy(), np.broadcast_to(stds.numpy().reshape(K, -1), (K, d))
    mean = (w[:, None] * mu).sum(0)
    cov = sum(wk * (np.diag(sk**2) + np.outer(mk, mk)) for wk, mk, sk in zip(w, mu, sd)) - np.outer(mean, mean)
    np.testing.assert_allclose(gmm.mean().numpy(), mean, rtol=1e-13)
    np.testing.assert_allclose(gmm.covariance().numpy(), cov, rtol=1e-12, atol=1e-14)
    x = gmm.sample(n, generator=torch.Generator().manual_seed(5)).numpy()
    assert x.shape == (n, d)
    # 5-sigma bands; standard errors of the covariance entries from the sample's own fourth moments
    assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
    c = x - x.mean(0)
    prods = c[:, :, None] * c[:, None, :]
    se = prods.std(0) / math.sqrt(n)
    assert np.all(np.abs(prods.mean(0) - cov) < 5 * se + 1e-12)
    # mixing weights: E[p(k | x)] = w_k under the mixture, and Var[p(k | x)] <= w_k (1 - w_k)
    lp = np.stack([scipy.stats.multivariate_normal(m, np.diag(s**2)).logpdf(x) for m, s in zip(mu, sd)], 1)
    resp = scipy.special.softmax(lp + np.log(w), axis=1).mean(0)
    assert np.all(np.abs(resp - w) < 5 * np.sqrt(w * (1 - w) / n))


def test_sample_determinism():
    gmm = sf.GaussianMixture(torch.tensor([[0.0], [5.0]]), torch.tensor([1.0, 0.5]), torch.tensor([0.3, 0.7]))
    a = gmm.sample(100, generator=torch.Generator().manual_seed(7))
    b = gmm.sample(100, generator=torch.Generator().manual_seed(7))
    c = gmm.sample(100, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert gmm.sample(0).shape == (0, 1)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "means, stds, weights, name",
    [
        ([[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0], [0.7, 0.7], "weights"),
        ([[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0], [1.5, -0.5], "weights"),
        ([[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0], [0.2, 0.3], "weights"),
        ([[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0], [1.0], "weights"),
        ([[0.0, 0.0], [1.0, 1.0]], [1.0, 0.0], None, "stds"),
        ([[0.0, 0.0], [1.0, 1.0]], [1.0, -1.0], None, "stds"),
        ([[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0, 1.0], None, "stds"),
        ([[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0, 1.0]] * 2, None, "stds"),
        ([0.0, 1.0], [1.0, 1.0], None, "means"),
        ([[0.0, float("nan")]], [1.0], None, "means"),
    ],
)
def test_bad_mixture_raises(means, stds, weights, name):
    w = None if weights is None else torch.tensor(weights)
    with pytest.raises(ValueError, match=name):
        sf.GaussianMixture(torch.tensor(means), torch.tensor(stds), w)


def test_bad_data_raises(make_sde):
    sde = make_sde("vp_linear")
    gmm = sf.GaussianMixture(torch.zeros(2, 3), torch.ones(2))
    for x in (torch.zeros(4, 2), torch.zeros(4, 2, 2), torch.zeros(3)):
        with pytest.raises(ValueError, match="x must"):
            gmm.log_prob(x)
        with pytest.raises(ValueError, match="x must"):
            gmm.score(x, 0.5, sde)
    with pytest.raises(ValueError, match="t must"):
        gmm.marginal_log_prob(torch.zeros(4, 3), 1.5, sde)
    with pytest.raises(ValueError, match="n must"):
        gmm.sample(-1)
    with pytest.raises(ValueError, match="prediction"):
        gmm.denoiser(sde, prediction="noise")


# ---------------------------------------------------------------------------------------------------- devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_agnostic(sde_kind, make_sde, device):
    """Everything stays on the data's device (generator included) and matches the CPU float64 result."""
    sde = make_sde(sde_kind)
    gmm = sf.GaussianMixture(
        torch.tensor([[0.0, 1.0], [2.0, -1.0]]), torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.6])
    )
    g = torch.Generator(device=device).manual_seed(0)
    x0 = gmm.sample(64, generator=g)
    xT = sde.prior_sample((64, 2), generator=g, dtype=F64)
    assert x0.device.type == device and xT.device.type == device
    t = torch.linspace(sde.eps, sde.T, 64, dtype=F64, device=device)
    xt = sde.marginal(x0, t, xT / sde.prior_std())
    den = gmm.denoiser(sde, prediction="v")
    for name in ("eps", "x0", "score"):
        y = getattr(den, name)(xt, t)
        assert y.device.type == device
        assert rel(y.cpu(), getattr(gmm, name)(xt.cpu(), t.cpu(), sde)) < 1e-8
    assert gmm.marginal_log_prob(xt, t, sde).device.type == device
    assert sde.prior_log_prob(xT).device.type == device
