"""Variational bounds (sdeflow.vlb) against closed forms on Gaussian data.

Data N(mu, s^2 I) with the exact denoiser ``GaussianMixture(...).denoiser(sde)``: given x0, the denoiser is linear,
x0_hat = mu + c (x_t - a mu) with c = a s^2 / v, v = a^2 s^2 + sigma^2, so

* E ||x0 - x0_hat||^2 = ||x0 - mu||^2 sigma^4 / v^2 + d a^2 s^4 sigma^2 / v^2 (every DDPM KL term in closed form);
* the VDM diffusion term, with rho = SNR and w = 1 + rho s^2, is
  1/2 [ ||x0 - mu||^2 / s^2 (1/w_T - 1/w_eps) + d (log w_eps + 1/w_eps - log w_T - 1/w_T) ];
* the DDPM decoder term L_0 is a one-dimensional Gaussian integral per coordinate (Gauss-Hermite, 80 nodes).

Monte-Carlo estimates must sit within 4 standard errors of these; reported standard errors must match the empirical
spread; the expected bound must sit above the entropy of the data (Gibbs).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf
from sdeflow.vlb import (
    continuous_vlb,
    ddpm_coefficients,
    ddpm_vlb,
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    interpolate_log_variance,
    learned_log_variance,
)

F64 = torch.float64
MU = torch.tensor([0.1, -0.2], dtype=F64)
S = 0.3


def gaussian_data() -> sf.GaussianMixture:
    return sf.GaussianMixture(MU[None], torch.tensor([S], dtype=F64))


def repeated_points(R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three fixed points in [-1, 1]^2, each repeated R times: (3R, 2), and the point index of every row."""
    pts = torch.tensor([[0.0, 0.0], [0.5, -0.7], [-0.9, 0.3]], dtype=F64)
    idx = torch.arange(3).repeat_interleave(R)
    return pts[idx], idx


def small_sde() -> sf.DiscreteVPSDE:
    return sf.DiscreteVPSDE(torch.linspace(0.01, 0.3, 10, dtype=F64))


# ------------------------------------------------------------------------------------------------ closed forms
def ddpm_closed_form(x0: torch.Tensor, sde: sf.DiscreteVPSDE, variance: str) -> torch.Tensor:
    """E over the noise of every step term L_0..L_{N-1} for the exact Gaussian denoiser, shape (B, N)."""
    c = ddpm_coefficients(sde)
    d = x0.shape[1]
    lv_true = c["posterior_log_variance_clipped"]
    lv_model = lv_true if variance == "fixed_small" else c["fixed_large_log_variance"]
    abar = c["alphas_cumprod"]
    out = torch.empty(x0.shape[0], sde.N, dtype=F64)
    q = ((x0 - MU) ** 2).sum(1)
    for n in range(sde.N):
        a, sig2 = math.sqrt(float(abar[n])), 1 - float(abar[n])
        v = a * a * S * S + sig2
        if n == 0:
            cc = a * S * S / v
            log_scale = 0.5 * float(lv_model[0])
            y, w = np.polynomial.hermite.hermgauss(80)
            eps = torch.tensor(math.sqrt(2) * y, dtype=F64)
            wts = torch.tensor(w / math.sqrt(math.pi), dtype=F64)
            total = torch.zeros(x0.shape[0], dtype=F64)
            for j in range(d):
                xj = x0[:, j : j + 1]
                mean = MU[j] + cc * (a * (xj - MU[j]) + math.sqrt(sig2) * eps[None])
                ll = discretized_gaussian_log_likelihood(xj.expand_as(mean), mean, torch.full_like(mean, log_scale))
                total = total - (ll * wts[None]).sum(1)
            out[:, 0] = total
            continue
        err2 = q * sig2**2 / v**2 + d * a * a * S**4 * sig2 / v**2
        lm, lt = float(lv_model[n]), float(lv_true[n])
        c1 = float(c["posterior_mean_coef1"][n])
        out[:, n] = 0.5 * d * (lm - lt + math.exp(lt - lm) - 1) + c1 * c1 * err2 / (2 * math.exp(lm))
    return out


def ddpm_prior(x0: torch.Tensor, sde: sf.DiscreteVPSDE) -> torch.Tensor:
    ab = float(ddpm_coefficients(sde)["alphas_cumprod"][-1])
    m, v = math.sqrt(ab) * x0, 1 - ab
    return gaussian_kl(m, torch.full_like(m, math.log(v)), torch.zeros_like(m), torch.zeros_like(m)).sum(1)


def vdm_diffusion_closed_form(x0: torch.Tensor, sde: sf.GaussianSDE, t_eps: float) -> torch.Tensor:
    d = x0.shape[1]
    w_e = 1 + math.exp(2 * float(sde.log_snr(t_eps))) * S * S
    w_T = 1 + math.exp(2 * float(sde.log_snr(sde.T))) * S * S
    q = ((x0 - MU) ** 2).sum(1) / S**2
    return 0.5 * (q * (1 / w_T - 1 / w_e) + d * (math.log(w_e) + 1 / w_e - math.log(w_T) - 1 / w_T))


def within(est: torch.Tensor, ref: torch.Tensor, idx: torch.Tensor, k: float = 4.0) -> None:
    """Per point: the mean of est over its copies within k standard errors of ref."""
    for p in idx.unique():
        m = idx == p
        diff = est[m] - ref[m]
        se = float(diff.std()) / math.sqrt(int(m.sum()))
        assert abs(float(diff.mean())) < k * se + 1e-12, (int(p), float(diff.mean()), se)


# ------------------------------------------------------------------------------------------------ building blocks
@given(st.floats(-1.5, 1.5), st.floats(-6.0, 1.0))
def test_discretized_gaussian_is_a_distribution_over_levels(mean: float, log_scale: float) -> None:
    levels = 256
    x = torch.linspace(-1, 1, levels, dtype=F64)
    ll = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale), levels)
    assert bool(torch.isfinite(ll).all())
    assert abs(float(torch.logsumexp(ll, 0))) < 1e-9
    # interior bins against the plain CDF difference where it does not cancel
    half = 1 / 255
    sd = math.exp(log_scale)
    nd = torch.special.ndtr
    ref = torch.log(nd((x - mean + half) / sd) - nd((x - mean - half) / sd))
    ok = (ref > -20) & (x > -1 + half) & (x < 1 - half)
    torch.testing.assert_close(ll[ok], ref[ok], rtol=1e-7, atol=1e-9)


def test_gaussian_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2, l1, l2 = (torch.randn(50, generator=g, dtype=F64) for _ in range(4))
    N = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(N(m1, (0.5 * l1).exp()), N(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(gaussian_kl(m1, l1, m2, l2), ref)


def test_ddpm_posterior_is_consistent_with_the_marginals() -> None:
    """Composing q(x_{t-1}|x_t, x0) with q(x_t|x0) must give q(x_{t-1}|x0) = N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1})."""
    c = ddpm_coefficients(sf.DiscreteVPSDE.linear(1000))
    ab, abp = c["alphas_cumprod"], c["alphas_cumprod_prev"]
    c1, c2 = c["posterior_mean_coef1"], c["posterior_mean_coef2"]
    torch.testing.assert_close(c1 + c2 * ab.sqrt(), abp.sqrt())
    torch.testing.assert_close(c2**2 * (1 - ab) + c["posterior_variance"], 1 - abp)
    assert float(c["posterior_variance"][0]) == 0.0
    torch.testing.assert_close(c["posterior_log_variance_clipped"][0], c["posterior_variance"][1].log())


def test_learned_log_variance_on_consecutive_steps_matches_the_path() -> None:
    """For n >= 1 the tables equal the path's own step quantities between t_{n-1} = n/N and t_n = (n+1)/N: the
    forward transition variance s_0^2 - (a_0 s_1/a_1)^2 (beta_t) and the posterior variance (beta-tilde_t)."""
    sde = small_sde()
    c = ddpm_coefficients(sde)
    n = torch.arange(1, sde.N)
    t0, t1 = (n + 1).to(F64) / sde.N, n.to(F64) / sde.N
    a0, s0, a1, s1 = sde.alpha(t0), sde.sigma(t0), sde.alpha(t1), sde.sigma(t1)
    beta = s0**2 - (a0 * s1 / a1) ** 2
    beta_tilde = beta * s1**2 / s0**2
    v = torch.linspace(-1, 1, sde.N - 1, dtype=F64)
    torch.testing.assert_close(
        learned_log_variance(v, sde, n), interpolate_log_variance(v, beta.log(), beta_tilde.log())
    )
    torch.testing.assert_close(c["log_betas"][1:], beta.log())


def test_learned_log_variance_interpolates() -> None:
    sde = small_sde()
    c = ddpm_coefficients(sde)
    n = torch.tensor([0, 3, 9])
    v = torch.tensor([-1.0, 0.0, 1.0], dtype=F64)[:, None, None].expand(3, 2, 2)
    lv = learned_log_variance(v, sde, n)
    lo, hi = c["posterior_log_variance_clipped"][n], c["log_betas"][n]
    torch.testing.assert_close(lv[:, 0, 0], torch.stack([lo[0], 0.5 * (lo[1] + hi[1]), hi[2]]))


# ------------------------------------------------------------------------------------------------ DDPM bound
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_exact_sum_matches_closed_form(variance: str) -> None:
    sde = small_sde()
    den = gaussian_data().denoiser(sde)
    x0, idx = repeated_points(1500)
    res = ddpm_vlb(den, x0, variance=variance, generator=torch.Generator().manual_seed(0))
    ref = ddpm_closed_form(x0, sde, variance)
    assert res.terms["steps"].shape == (x0.shape[0], sde.N) and res.nfe == sde.N and res.std_error is None
    for n in range(sde.N):
        within(res.terms["steps"][:, n], ref[:, n], idx)
    torch.testing.assert_close(res.terms["prior"], ddpm_prior(x0, sde))
    within(res.nats, ref.sum(1) + ddpm_prior(x0, sde), idx)
    torch.testing.assert_close(res.bits_per_dim, res.nats / (2 * math.log(2)))


@pytest.mark.parametrize("t_sampling", ["importance", "uniform"])
def test_ddpm_monte_carlo_unbiased_with_honest_standard_error(t_sampling: str) -> None:
    sde = small_sde()
    den = gaussian_data().denoiser(sde)
    x0, idx = repeated_points(2000)
    res = ddpm_vlb(den, x0, n_t=3, t_sampling=t_sampling, generator=torch.Generator().manual_seed(1))
    ref = ddpm_closed_form(x0, sde, "fixed_small").sum(1) + ddpm_prior(x0, sde)
    within(res.nats, ref, idx)
    assert res.nfe == 3
    for p in range(3):  # reported per-sample SE (bits/dim) against the spread over the copies of one point
        m = idx == p
        ratio = float(res.std_error[m].pow(2).mean().sqrt()) / float(res.bits_per_dim[m].std())
        assert 0.85 < ratio < 1.15


def test_ddpm_learned_variance_reduces_to_the_fixed_choices() -> None:
    """A 2C-channel net whose variance channels are -1 is fixed_small exactly; +1 is fixed_large for t >= 2."""
    sde = small_sde()
    gmm = gaussian_data()
    x0, _ = repeated_points(20)
    x0 = x0.reshape(-1, 2, 1)  # (B, C, L): channels on dim 1

    def net_with(v_value: float):
        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.cat([gmm.eps(x, t, sde), torch.full_like(x, v_value)], dim=1)

        return sf.Denoiser(net, sde, "eps")

    exact = gmm.denoiser(sde)
    small = ddpm_vlb(exact, x0, variance="fixed_small", generator=torch.Generator().manual_seed(3))
    large = ddpm_vlb(exact, x0, variance="fixed_large", generator=torch.Generator().manual_seed(3))
    lo = ddpm_vlb(net_with(-1.0), x0, variance="learned", generator=torch.Generator().manual_seed(3))
    hi = ddpm_vlb(net_with(1.0), x0, variance="learned", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(lo.terms["steps"], small.terms["steps"])
    torch.testing.assert_close(hi.terms["steps"][:, 1:], large.terms["steps"][:, 1:])
    assert lo.nfe == sde.N
    with pytest.raises(ValueError, match="2C channels"):
        ddpm_vlb(exact, x0, variance="learned")


# ------------------------------------------------------------------------------------------------ continuous bound
SDES = {"vp": lambda: sf.VPSDE(), "ve": lambda: sf.VESDE(0.01, 50.0), "subvp": lambda: sf.SubVPSDE()}


@pytest.mark.parametrize("kind", list(SDES))
def test_continuous_bound_matches_closed_form(kind: str) -> None:
    sde = SDES[kind]()
    den = gaussian_data().denoiser(sde)
    x0, idx = repeated_points(1000)
    res = continuous_vlb(den, x0, n_t=2, generator=torch.Generator().manual_seed(0))
    within(res.terms["diffusion"], vdm_diffusion_closed_form(x0, sde, sde.eps), idx)
    d = 2
    recon = 0.5 * d * (math.log(2 * math.pi) + 1) - d * float(sde.log_snr(sde.eps))
    torch.testing.assert_close(res.terms["reconstruction"], torch.full_like(res.nats, recon))
    for p in range(3):
        m = idx == p
        ratio = float(res.std_error[m].pow(2).mean().sqrt()) / float(res.bits_per_dim[m].std())
        assert 0.85 < ratio < 1.15


def test_continuous_bound_uniform_t_is_unbiased_too() -> None:
    sde = sf.VPSDE()
    den = gaussian_data().denoiser(sde)
    x0, idx = repeated_points(1000)
    res = continuous_vlb(den, x0, n_t=2, t_sampling="t", generator=torch.Generator().manual_seed(4))
    within(res.terms["diffusion"], vdm_diffusion_closed_form(x0, sde, sde.eps), idx)


@pytest.mark.parametrize("kind", list(SDES))
def test_continuous_bound_sits_above_the_data_entropy(kind: str) -> None:
    """E_data[bound] >= h(N(mu, s^2 I)) for the exact model; in closed form the gap is
    E[prior] + d/2 log(1 + 1/(rho_eps s^2)) - d/2 log(1 + rho_T s^2) >= 0."""
    sde = SDES[kind]()
    gmm = gaussian_data()
    den = gmm.denoiser(sde)
    x0 = gmm.sample(4000, generator=torch.Generator().manual_seed(7))
    res = continuous_vlb(den, x0, n_t=1, generator=torch.Generator().manual_seed(8))
    d = 2
    H = 0.5 * d * math.log(2 * math.pi * math.e * S * S)
    rho_e, rho_T = math.exp(2 * float(sde.log_snr(sde.eps))), math.exp(2 * float(sde.log_snr(sde.T)))
    closed = res.terms["prior"] + res.terms["reconstruction"] + vdm_diffusion_closed_form(x0, sde, sde.eps)
    gap = float(res.terms["prior"].mean()) + 0.5 * d * (math.log1p(1 / (rho_e * S * S)) - math.log1p(rho_T * S * S))
    assert gap > 0
    # the closed-form expectation over data: E[q] = d replaces the sample mean of q
    se = float(closed.std()) / math.sqrt(len(closed))
    assert abs(float(closed.mean()) - (H + gap)) < 4 * se
    assert float(res.nats.mean()) > H


def test_continuous_discretized_decoder_bounds_discrete_entropy() -> None:
    """8-bit data (the Gaussian quantized to the 256 levels of [-1, 1]): the bound in bits/dim sits above the
    entropy of the quantized distribution, computed exactly per coordinate."""
    sde = sf.VPSDE()
    gmm = gaussian_data()
    den = gmm.denoiser(sde)
    xc = gmm.sample(3000, generator=torch.Generator().manual_seed(9)).clamp(-1, 1)
    x0 = torch.round((xc + 1) * 127.5) / 127.5 - 1
    res = continuous_vlb(den, x0, n_t=2, decoder="discretized", generator=torch.Generator().manual_seed(10))
    nll_data = -sum(
        discretized_gaussian_log_likelihood(
            x0[:, j], torch.full_like(x0[:, j], float(MU[j])), torch.full_like(x0[:, j], math.log(S))
        )
        for j in range(2)
    )
    # the diffusion term in closed form (the noisy part of the estimate), the decoder term as estimated; paired with
    # -log P_data(x) per sample, whose mean is the entropy: E[bound + log P_data] = KL-type gap >= 0
    closed = res.terms["prior"] + res.terms["reconstruction"] + vdm_diffusion_closed_form(x0, sde, sde.eps)
    gap = closed - nll_data
    se = float(gap.std()) / math.sqrt(len(gap))
    assert float(gap.mean()) > -4 * se
    assert float(gap.mean()) < 0.1 * 2  # and tight for the exact model: within 0.1 nat/dim
    within(res.nats, closed, torch.zeros(len(closed), dtype=torch.long))


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs() -> None:
    gmm = gaussian_data()
    den_c = gmm.denoiser(sf.VPSDE())
    den_d = gmm.denoiser(small_sde())
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="DiscreteVPSDE"):
        ddpm_vlb(den_c, x)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ddpm_vlb(den_d, x + 2)
    with pytest.raises(ValueError, match="variance"):
        ddpm_vlb(den_d, x, variance="wide")
    with pytest.raises(ValueError, match="n_t"):
        ddpm_vlb(den_d, x, n_t=0)
    with pytest.raises(ValueError, match="t_sampling"):
        ddpm_vlb(den_d, x, n_t=2, t_sampling="logsnr")
    with pytest.raises(ValueError, match="n_t"):
        continuous_vlb(den_c, x, n_t=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decoder"):
        continuous_vlb(den_c, x, decoder="laplace")
    with pytest.raises(ValueError, match="t_eps"):
        continuous_vlb(den_c, x, t_eps=0.0)
    with pytest.raises(ValueError, match="shape"):
        continuous_vlb(den_c, torch.zeros(3))
    with pytest.raises(ValueError, match="finite log-SNR"):
        continuous_vlb(gmm.denoiser(sf.DiscreteVPSDE([0.1, 0.2, 1.0])), x)
    with pytest.raises(ValueError, match="N >= 2"):
        ddpm_vlb(gmm.denoiser(sf.DiscreteVPSDE([0.1])), x)
