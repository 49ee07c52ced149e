"""The EDM loss (Karras et al. 2022): its floor against closed forms (single Gaussian by quadrature, Gaussian mixture
by the exact posterior variance), the excess of a perturbed denoiser, the truncated log-normal sigma law, and the
Trainer running it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mixture_posterior import posterior_x0_var
from scipy import integrate, stats

import sdeflow as sf
from sdeflow.preconditioning import edm_coefficients
from sdeflow.training import default_gmm
from sdeflow.training.losses import EDMLoss

SDES = {"vp": lambda: sf.VPSDE(), "ve": lambda: sf.VESDE(0.002, 80.0)}


def lognormal_expectation(fn, loss: EDMLoss) -> float:
    """E[fn(sigma)] for ln sigma ~ N(p_mean, p_std^2) truncated to [sigma_min, sigma_max], by adaptive quadrature."""
    lo = (math.log(loss.sigma_min) - loss.p_mean) / loss.p_std
    hi = (math.log(loss.sigma_max) - loss.p_mean) / loss.p_std
    mass = stats.norm.cdf(hi) - stats.norm.cdf(lo)
    val, _ = integrate.quad(
        lambda z: fn(math.exp(loss.p_mean + loss.p_std * z)) * stats.norm.pdf(z), lo, hi, epsabs=1e-12, limit=200
    )
    return val / mass


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("data_std,sigma_data", [(0.5, 0.5), (1.0, 0.5), (0.3, 1.0)])
def test_single_gaussian_floor_equals_the_quadrature(sde_name, data_std, sigma_data):
    """Data N(0, v I): the optimal D = E[x0 | x_hat] has per-dimension loss lambda(sigma) sigma^2 v / (sigma^2 + v) at
    every sigma; its expectation under the log-normal is computed by quadrature and the Monte-Carlo loss of the exact
    oracle must agree within 4 standard errors. With v = sigma_data^2 the floor is exactly 1 at every sigma."""
    sde = SDES[sde_name]()
    v = data_std**2
    gmm = sf.GaussianMixture(torch.zeros(1, 4, dtype=torch.float64), data_std)
    loss = EDMLoss(sde, sigma_data=sigma_data, stratified=True)
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(8192, generator=g)
    per = loss.per_sample(gmm.denoiser(sde, "x0"), x0, g)
    sd2 = sigma_data**2
    expect = lognormal_expectation(lambda s: (s * s + sd2) / (s * s * sd2) * s * s * v / (s * s + v), loss)
    se = float(per.std()) / math.sqrt(per.numel())
    assert abs(float(per.mean()) - expect) < 4 * se, (float(per.mean()), expect, se)
    if data_std == sigma_data:
        assert expect == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_mixture_oracle_sits_at_the_floor_and_a_perturbed_denoiser_pays_exactly_its_error(sde_name):
    """E[loss | x_t] of the exact denoiser is lambda(sigma) Var(x0 | x_t) / d (closed form per draw); a denoiser
    perturbed by delta(x, t) pays lambda ||delta||^2 / d more in expectation (the cross term has mean zero)."""
    sde = SDES[sde_name]()
    gmm = default_gmm()
    loss = EDMLoss(sde, sigma_data=1.0, stratified=True)
    g = torch.Generator().manual_seed(1)
    x0 = gmm.sample(8192, generator=g)
    draw = loss.draw(x0, g)
    oracle = gmm.denoiser(sde, "x0")
    per = loss.per_sample(oracle, x0, draw=draw)
    a, s = sde.alpha(draw.t), sde.sigma(draw.t)
    sigma = s / a
    lam = (sigma**2 + 1.0) / sigma**2
    floor = lam * posterior_x0_var(gmm, draw.x_t, a, s).mean(1)
    gap = per - floor
    assert abs(float(gap.mean())) < 4 * float(gap.std()) / math.sqrt(len(gap))

    def delta(x, t):  # an error that is small where sigma is small, like a real net's
        sig = torch.exp(-sde.log_snr(t))[:, None]
        return 0.3 * sig / (1 + sig) * torch.tanh(x)

    perturbed = sf.Denoiser(lambda x, t: oracle.net(x, t) + delta(x, t), sde, "x0")
    worse = loss.per_sample(perturbed, x0, draw=draw)
    excess = worse - per
    expect = lam * delta(draw.x_t, draw.t).square().mean(1)
    diff = excess - expect
    assert float(excess.mean()) > 5 * float(excess.std()) / math.sqrt(len(excess))  # the oracle is strictly better
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff))


@pytest.mark.parametrize("prediction", ["eps", "v", "score"])
def test_loss_lives_in_x0_space_for_every_prediction(prediction):
    """The same exact model, as eps / v / score net, gives the x0-net's per-sample losses (one conversion table)."""
    sde = sf.VPSDE()
    gmm = default_gmm()
    g = torch.Generator().manual_seed(2)
    x0 = gmm.sample(256, generator=g)
    ref = EDMLoss(sde, prediction="x0", sigma_data=1.0)
    draw = ref.draw(x0, g)
    want = ref.per_sample(gmm.denoiser(sde, "x0"), x0, draw=draw)
    got = EDMLoss(sde, prediction=prediction, sigma_data=1.0).per_sample(gmm.denoiser(sde, prediction), x0, draw=draw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@given(st.floats(1e-3, 1e2), st.floats(0.1, 2.0))
def test_weight_is_one_over_c_out_squared(sigma, sd):
    """lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2 = 1/c_out^2 (Karras et al. 2022, eq. 8 / Table 1)."""
    loss = EDMLoss(sf.VESDE(1e-3, 1e3), sigma_data=sd)
    s = torch.tensor(sigma, dtype=torch.float64)
    assert math.isclose(float(loss.sigma_weight(s)), (sigma**2 + sd**2) / (sigma * sd) ** 2, rel_tol=1e-12)
    assert math.isclose(float(loss.sigma_weight(s)) * float(edm_coefficients(s, sd).c_out) ** 2, 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_sigma_follows_the_truncated_lognormal(sde_name):
    """ln sigma of the drawn times (mapped back through the path) against scipy's truncated normal: KS test, and the
    truncation removes exactly the mass outside [sigma(t_min), sigma(t_max)]."""
    sde = SDES[sde_name]()
    loss = EDMLoss(sde)
    t, ratio = loss.sample_time(20000, torch.Generator().manual_seed(4))
    assert bool((t >= loss.t_min).all() and (t <= loss.t_max).all()) and bool((ratio == 1).all())
    log_sigma = torch.log(sde.edm_sigma(t)).numpy()
    lo = (math.log(loss.sigma_min) - loss.p_mean) / loss.p_std
    hi = (math.log(loss.sigma_max) - loss.p_mean) / loss.p_std
    law = stats.truncnorm(lo, hi, loc=loss.p_mean, scale=loss.p_std)
    assert stats.kstest(log_sigma, law.cdf).pvalue > 1e-3
    assert loss.truncated_mass == pytest.approx(1 - (stats.norm.cdf(hi) - stats.norm.cdf(lo)), rel=1e-9)
    assert 0 < loss.truncated_mass < 0.01


def test_stratified_sigma_has_one_draw_per_stratum():
    loss = EDMLoss(sf.VESDE(0.002, 80.0), stratified=True)
    sigma = loss.sample_sigma(64, torch.Generator().manual_seed(5))
    cdf = stats.truncnorm(
        (math.log(loss.sigma_min) - loss.p_mean) / loss.p_std,
        (math.log(loss.sigma_max) - loss.p_mean) / loss.p_std,
    ).cdf(((torch.log(sigma) - loss.p_mean) / loss.p_std).numpy())
    assert sorted(int(c * 64) for c in cdf) == list(range(64))


def test_bad_arguments_name_the_argument():
    sde = sf.VPSDE()
    for kwargs, name in [
        ({"sigma_data": 0.0}, "sigma_data"),
        ({"p_std": -1.0}, "p_std"),
        ({"p_mean": float("nan")}, "p_mean"),
        ({"prediction": "noise"}, "prediction"),
        ({"p_mean": 40.0, "p_std": 0.1}, "no mass"),
        ({"t_min": 0.5, "t_max": 0.2}, "t_min"),
    ]:
        with pytest.raises(ValueError, match=name):
            EDMLoss(sde, **kwargs)


def test_config_round_trip_and_repr():
    loss = EDMLoss(sf.VPSDE(), sigma_data=0.7, p_mean=-1.0, p_std=1.1, p_uncond=0.1)
    cfg = loss.config()
    assert cfg["objective"] == "edm"
    rebuilt = EDMLoss(sf.VPSDE(), **{k: v for k, v in cfg.items() if k != "objective"})
    assert rebuilt.config() == cfg and repr(rebuilt).startswith("EDMLoss(")


def test_trainer_reduces_the_edm_loss_on_gmm():
    """A tiny EDM-preconditioned MLP trained with the Trainer (EDM config through build_trainer) ends below the
    zero net's loss (the zero net is EDM's c_skip x_hat, optimal only for Gaussian data of scale sigma_data)."""
    from sdeflow.training import build_trainer
    from sdeflow.training.config import edm_options

    cfg = {
        "sde": {"name": "vp"},
        "net": {"name": "mlp", "dim": 2, "hidden": 32, "depth": 1, "time_dim": 16},
        "loss": {"prediction": "eps"},
        "data": {"spec": "gmm"},
        "train": {"batch_size": 128, "lr": 3e-3, "warmup": 10, "seed": 0, "log_every": 1000},
    }
    cfg = edm_options(cfg, sigma_data=1.0)
    trainer = build_trainer(cfg, progress=False, device="cpu")
    g = torch.Generator().manual_seed(0)
    x0 = default_gmm().sample(4096, generator=g).float()
    draw = trainer.loss.draw(x0, g)
    with torch.no_grad():
        before = float(trainer.loss.per_sample(trainer.net, x0, draw=draw).mean())
    trainer.fit(200)
    with torch.no_grad():
        after = float(trainer.loss.per_sample(trainer.ema, x0, draw=draw).mean())
    assert after < 0.9 * before, (before, after)
