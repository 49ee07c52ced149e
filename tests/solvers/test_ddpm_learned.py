"""DDPM with improved DDPM's learned variance (Nichol & Dhariwal 2021, eq. 15): the net's extra channels v in
[-1, 1] interpolate log beta-tilde (v = -1) and log beta (v = 1), ADM's convention (sdeflow.vlb)."""

from __future__ import annotations

import pytest
import torch

import sdeflow as sf
from sdeflow.grids import time_grid
from sdeflow.integrate import solve
from sdeflow.noise import TensorNoise
from sdeflow.sampling import make_stepper

F64 = torch.float64


def _nets(sde, v_value):
    gmm = sf.GaussianMixture([[1.0, -0.5], [-1.0, 0.5]], [0.3, 0.4])

    def learned(x, t):
        eps = gmm.eps(x, (t + 1) / sde.N, sde)
        return torch.cat([eps, torch.full_like(eps, v_value)], dim=1)

    def plain(x, t):
        return gmm.eps(x, (t + 1) / sde.N, sde)

    return (
        sf.Denoiser(learned, sde, time_input="index", learned_variance=True),
        sf.Denoiser(plain, sde, time_input="index"),
    )


@pytest.mark.parametrize("v,fixed", [(-1.0, "beta_tilde"), (1.0, "beta")])
def test_learned_variance_endpoints_are_the_fixed_variances(v, fixed):
    """v = -1 gives the posterior variance beta-tilde, v = +1 the forward variance beta (ADM's convention), on a
    respaced 12-step grid of a 1000-step DDPM schedule, with the same noise."""
    sde = sf.DiscreteVPSDE.linear(1000)
    den_l, den_f = _nets(sde, v)
    grid = time_grid(sde, 12, "uniform")
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    z = torch.randn(12, 1, 5, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    a = solve(make_stepper(den_l, "ddpm", variance="learned"), x_T, grid, TensorNoise(z)).x
    b = solve(make_stepper(den_f, "ddpm", variance=fixed), x_T, grid, TensorNoise(z)).x
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_learned_variance_needs_a_learned_variance_denoiser():
    sde = sf.DiscreteVPSDE.linear(1000)
    _, den_f = _nets(sde, 0.0)
    with pytest.raises(ValueError, match="learned_variance=True"):
        make_stepper(den_f, "ddpm", variance="learned")
