"""Time grids: exact end points, float64, strict monotonicity, and each kind's defining uniformity, on every SDE."""

from __future__ import annotations

import pytest
import torch

import sdeflow as sf
from sdeflow.grids import GRIDS, check_grid, time_grid


@pytest.mark.parametrize("kind", GRIDS)
def test_grid_endpoints_and_monotone(sde_kind, make_sde, kind):
    sde = make_sde(sde_kind)
    for steps in (1, 7, 50):
        g = time_grid(sde, steps, kind)
        assert g.dtype == torch.float64 and g.shape == (steps + 1,)
        assert float(g[0]) == sde.T and float(g[-1]) == sde.eps
        assert bool((g[1:] < g[:-1]).all())


def _assert_uniform(v: torch.Tensor, tol: float) -> None:
    d = v[1:] - v[:-1]
    assert float((d - d.mean()).abs().max()) <= tol * float(d.abs().mean()), d


def test_each_grid_is_uniform_in_its_variable(sde_kind, make_sde):
    """uniform in t; quadratic: uniform in sqrt(t); logsnr: uniform in lambda; karras: uniform in sigma^(1/rho)."""
    sde = make_sde(sde_kind)
    n, rho = 12, 7.0
    _assert_uniform(time_grid(sde, n, "uniform"), 1e-12)
    _assert_uniform(time_grid(sde, n, "quadratic").sqrt(), 1e-12)
    _assert_uniform(sde.log_snr(time_grid(sde, n, "logsnr")), 1e-6)
    _assert_uniform(sde.edm_sigma(time_grid(sde, n, "karras")) ** (1 / rho), 1e-6)


def test_karras_rho_and_t_end():
    sde = sf.VESDE(0.01, 50.0)
    g = time_grid(sde, 4, "karras", t_end=0.2, rho=3.0)
    s = sde.edm_sigma(g)
    torch.testing.assert_close(
        s ** (1 / 3), torch.linspace(50.0 ** (1 / 3), float(sde.sigma(0.2)) ** (1 / 3), 5, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="t_end > 0"):
        time_grid(sde, 4, "karras", t_end=0.0)


def test_tensor_grid_validated():
    sde = sf.VPSDE()
    g = time_grid(sde, 3, torch.tensor([1.0, 0.5, 0.1], dtype=torch.float32))
    assert g.dtype == torch.float64 and torch.equal(g, torch.tensor([1.0, 0.5, 0.1], dtype=torch.float32).double())
    for bad, match in [
        (torch.tensor([0.5, 1.0]), "strictly decreasing"),
        (torch.tensor([1.0, 1.0, 0.5]), "strictly decreasing"),
        (torch.tensor([1.0]), "at least 2"),
        (torch.tensor([1.5, 0.5]), r"lie in \[0, T\]"),
        (torch.tensor([1.0, -0.1]), r"lie in \[0, T\]"),
        (torch.tensor([1.0, float("nan")]), "finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            time_grid(sde, 3, bad)
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_grid(torch.tensor([0.1, 0.2], dtype=torch.float64), sde)
    with pytest.raises(ValueError, match="1-D"):
        check_grid(torch.tensor([[1.0, 0.5]], dtype=torch.float64), sde)


def test_bad_grid_arguments():
    sde = sf.VPSDE()
    with pytest.raises(ValueError, match="grid='cosine' is not supported; allowed values: 'uniform', 'logsnr'"):
        time_grid(sde, 4, "cosine")
    for steps in (0, -1, 2.0):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            time_grid(sde, steps)
    for t_end in (1.0, 2.0, -1e-3):
        with pytest.raises(ValueError, match="t_end"):
            time_grid(sde, 4, t_end=t_end)
    with pytest.raises(ValueError, match="t_start"):
        time_grid(sde, 4, t_start=1.5)


def test_partial_span_and_device():
    sde = sf.VPSDE()
    g = time_grid(sde, 5, "logsnr", t_end=0.1, t_start=0.6, device="cpu")
    assert float(g[0]) == 0.6 and float(g[-1]) == 0.1 and g.device.type == "cpu"
