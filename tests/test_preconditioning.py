"""EDM preconditioning (Karras et al. 2022, Table 1 / eq. 7): the coefficients against the paper's formulas, the
wrapper against the exact Gaussian-mixture denoiser on every path, solvers through ``Denoiser(..., "x0")``, and the
config wiring."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf
from sdeflow.nets import MLPScoreNet, UNet
from sdeflow.preconditioning import EDMPreconditioning, edm_coefficients, edm_denoiser
from sdeflow.training import build_loss, build_net, load_denoiser
from sdeflow.training.config import edm_options
from sdeflow.training.losses import EDMLoss


@given(st.floats(1e-4, 1e3), st.floats(0.05, 5.0))
def test_coefficients_are_table_1(sigma, sd):
    """Each coefficient against its formula written out in Python floats, plus the two identities behind them:
    Var(c_in x_hat) = 1 for x_hat = x0 + sigma n with Var(x0) = sd^2, and c_skip^2 sd^2 ... the target variance
    (x0 - c_skip x_hat)/c_out has unit variance (Karras et al. 2022, eq. 8 and App. B.6)."""
    c = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), sd)
    tot = sigma**2 + sd**2
    assert math.isclose(float(c.c_skip), sd**2 / tot, rel_tol=1e-12)
    assert math.isclose(float(c.c_out), sigma * sd / math.sqrt(tot), rel_tol=1e-12)
    assert math.isclose(float(c.c_in), 1 / math.sqrt(tot), rel_tol=1e-12)
    assert math.isclose(float(c.c_noise), math.log(sigma) / 4, rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(float(c.c_in) ** 2 * tot, 1.0, rel_tol=1e-12)
    # Var((x0 - c_skip (x0 + sigma n)) / c_out) = ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1
    target_var = ((1 - float(c.c_skip)) ** 2 * sd**2 + float(c.c_skip) ** 2 * sigma**2) / float(c.c_out) ** 2
    assert math.isclose(target_var, 1.0, rel_tol=1e-9)


def test_sigma_zero_is_identity_and_finite():
    c = edm_coefficients(torch.tensor([0.0]), 0.5)
    assert float(c.c_skip) == 1.0 and float(c.c_out) == 0.0 and math.isfinite(float(c.c_noise))


def oracle_F(gmm: sf.GaussianMixture, sigma_data: float):
    """The raw net F* whose EDM-preconditioned denoiser is the exact E[x0 | x0 + sigma n = x_hat] of the mixture.

    F receives (c_in x_hat, c_noise); sigma = exp(4 c_noise) and x_hat = input / c_in invert the preconditioning, and
    F* = (E[x0 | x_hat] - c_skip x_hat) / c_out, with the posterior mean of the VE path a = 1, s = sigma (computed by
    the oracle on a VE SDE whose s(t) we map from sigma)."""
    ve = sf.VESDE(1e-4, 1e4)

    def F(inp: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = torch.exp(4 * c_noise.to(torch.float64))
        c = edm_coefficients(sigma, sigma_data)
        x_hat = inp / c.c_in[:, None]
        t = ve.t_from_edm_sigma(sigma)
        x0 = gmm.x0(x_hat, t, ve)
        return (x0 - c.c_skip[:, None] * x_hat) / c.c_out[:, None]

    return F


@pytest.mark.parametrize("kind", ["vp_linear", "vp_cosine", "subvp", "ve", "discrete_linear", "gaussian_path"])
def test_wrapper_reproduces_the_exact_denoiser_on_every_path(kind, make_sde):
    """EDMPreconditioning(F*) on a path x_t = a x0 + s eps gives the exact E[x0 | x_t] of the analytic oracle (which
    works on the path itself, not through sigma), so the x / a, sigma = s / a mapping is right on every path."""
    sde = make_sde(kind)
    gmm = sf.training.default_gmm()
    den = edm_denoiser(oracle_F(gmm, 0.7), sde, sigma_data=0.7)
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(sde.eps, sde.T, 16, dtype=torch.float64) * 0.999
    x0 = gmm.sample(16, generator=g)
    x = sde.marginal(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    got = den.x0(x, t)
    want = gmm.x0(x, t, sde)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    # the eps / score views come out of the Denoiser's table unchanged
    torch.testing.assert_close(den.eps(x, t), gmm.eps(x, t, sde), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["vp_linear", "ve"])
def test_zero_net_is_the_optimal_denoiser_of_gaussian_data(kind, make_sde):
    """For data N(0, sd^2 I) the optimal denoiser is c_skip x_hat exactly (Karras et al. 2022, App. B.6): the
    preconditioned zero net must equal the one-component mixture's exact posterior mean."""
    sde = make_sde(kind)
    sd = 0.5
    gmm = sf.GaussianMixture(torch.zeros(1, 3, dtype=torch.float64), sd)
    den = edm_denoiser(lambda x, c: torch.zeros_like(x), sde, sigma_data=sd)
    g = torch.Generator().manual_seed(1)
    t = torch.rand(32, generator=g, dtype=torch.float64) * (sde.T - sde.eps) + sde.eps
    x = torch.randn(32, 3, generator=g, dtype=torch.float64) * 2
    torch.testing.assert_close(den.x0(x, t), gmm.x0(x, t, sde), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["dpm_solver++", "heun", "euler_maruyama"])
def test_every_solver_samples_the_preconditioned_model(solver):
    """Same prior noise and generator: sampling the preconditioned oracle matches sampling the oracle itself."""
    sde = sf.VPSDE()
    gmm = sf.training.default_gmm()
    pre = edm_denoiser(oracle_F(gmm, 0.5), sde, sigma_data=0.5)
    ref = gmm.denoiser(sde, "eps")
    out = []
    for den in (pre, ref):
        g = torch.Generator().manual_seed(3)
        out.append(sf.sample(den, solver=solver, nfe=20, shape=(64, 2), generator=g, dtype=torch.float64).x)
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-6)


def test_net_time_argument_and_labels_pass_through():
    seen = {}

    def F(x, c, y=None):
        seen["c"], seen["y"] = c, y
        return torch.zeros_like(x)

    sde = sf.VPSDE()
    t = torch.tensor([0.1, 0.5])
    x = torch.randn(2, 4)
    EDMPreconditioning(F, sde)(x, t, y=torch.tensor([1, 2]))
    torch.testing.assert_close(seen["c"], 0.25 * torch.log(sde.edm_sigma(t)).float())
    assert seen["y"].tolist() == [1, 2]
    EDMPreconditioning(F, sde, noise_input="t")(x, t)
    torch.testing.assert_close(seen["c"], t)


def test_bad_arguments_name_the_argument():
    sde = sf.VPSDE()
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPreconditioning(torch.nn.Identity(), sde, sigma_data=0.0)
    with pytest.raises(ValueError, match="noise_input"):
        EDMPreconditioning(torch.nn.Identity(), sde, noise_input="sigma")
    with pytest.raises(TypeError, match="sde"):
        EDMPreconditioning(torch.nn.Identity(), "vp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        EDMPreconditioning(lambda x, c: x[:, :1], sde)(torch.randn(2, 3), torch.tensor([0.3, 0.4]))


def test_config_builds_edm_net_and_loss_and_load_denoiser_round_trips(tmp_path):
    base = {
        "sde": {"name": "vp"},
        "net": {"name": "unet", "in_channels": 1, "channels": 8, "channel_mult": [1], "attention_levels": []},
        "loss": {"prediction": "eps", "weighting": "simple", "p_uncond": 0.0},
        "data": {"spec": "digits"},
    }
    cfg = edm_options(base)
    assert base["loss"]["prediction"] == "eps" and "preconditioning" not in base["net"]  # a copy
    net = build_net(cfg)
    assert isinstance(net, EDMPreconditioning) and isinstance(net.net, UNet) and net.sigma_data == 0.5
    loss = build_loss(cfg)
    assert (
        isinstance(loss, EDMLoss)
        and loss.prediction == "x0"
        and loss.config()
        == cfg["loss"]
        | {
            "stratified": False,
            "t_min": loss.t_min,
            "t_max": loss.t_max,
        }
    )
    assert build_loss({**cfg, "loss": loss.config()}).config() == loss.config()
    from sdeflow.training import save_checkpoint

    save_checkpoint(
        {"config": cfg, "step": 0, "model": net.state_dict(), "ema": net.state_dict()}, tmp_path / "ckpt.pt"
    )
    den = load_denoiser(tmp_path / "ckpt.pt")
    assert den.prediction == "x0" and isinstance(den.net, EDMPreconditioning)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(
        den.x0(x, 0.5),
        x
        / den.sde.alpha(0.5).float()
        * loss.sigma_data**2
        / (loss.sigma_data**2 + den.sde.edm_sigma(0.5).float() ** 2),
    )  # zero-initialised output conv: D = c_skip x_hat
    with pytest.raises(ValueError, match="input_scaling"):
        build_net({**cfg, "net": {**cfg["net"], "input_scaling": True}})
    with pytest.raises(ValueError, match="preconditioning"):
        build_net({**cfg, "net": {**cfg["net"], "preconditioning": "karras"}})
    with pytest.raises(ValueError, match="objective"):
        build_loss({**cfg, "loss": {**cfg["loss"], "objective": "ddpm"}})


def test_mlp_edm_net_trains_one_step():
    """The wrapper is an nn.Module whose parameters are the inner net's: a Trainer-style step moves them."""
    sde = sf.VESDE(0.01, 10.0)
    net = EDMPreconditioning(MLPScoreNet(2, hidden=16, depth=1), sde, sigma_data=1.0)
    assert {n for n, _ in net.named_parameters()} == {"net." + n for n, _ in net.net.named_parameters()}
    loss = EDMLoss(sde, sigma_data=1.0)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    value = loss(net, x0, torch.Generator().manual_seed(1))
    value.backward()
    assert math.isfinite(float(value.detach())) and any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()
    )
