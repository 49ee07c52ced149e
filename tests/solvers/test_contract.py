"""The solver contract (sdeflow.solvers.base): a call that cannot be honoured raises instead of quietly running
another method; declared orders belong to the configured instance."""

from __future__ import annotations

import pytest
import torch

import sdeflow as sf
from sdeflow.grids import time_grid
from sdeflow.integrate import solve, solve_adaptive
from sdeflow.sampling import make_stepper
from sdeflow.solvers import EmbeddedStepper, Integrator, MultistepStepper, SingleStepper, Stepper


@pytest.fixture(scope="module")
def den():
    sde = sf.VPSDE()
    return sf.GaussianMixture([[1.0, 0.5], [-1.0, -0.5]], [0.5, 0.6]).denoiser(sde)


def _x(den, n=4):
    return den.sde.prior_sample((n, 2), torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("name,opts", [("dpm_solver++", {"order": 2}), ("dpm_solver++", {"order": 3}), ("unipc", {})])
def test_multistep_without_state_raises(den, name, opts):
    st = make_stepper(den, name, **opts)
    assert isinstance(st, MultistepStepper)
    t0, t1 = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    with pytest.raises(ValueError, match="multistep method: step\\(\\) needs the state"):
        st.step(t0, t1, _x(den), None, None)
    # with its state it steps (the first step of a grid)
    grid = time_grid(den.sde, 4, "logsnr")
    st.step(grid[0], grid[1], _x(den), st.init(_x(den), grid), None)


@pytest.mark.parametrize("name", ["dpm_solver++", "unipc"])
def test_adaptive_driver_refuses_multistep(den, name):
    """The round-1 bug: adaptive dpm_solver++ silently became DDIM while declaring order 2 (753 NFE at rtol 1e-5)."""
    with pytest.raises(ValueError, match="multistep method"):
        solve_adaptive(make_stepper(den, name), _x(den), 1.0, 1e-3, rtol=1e-5, atol=1e-5)


def test_adaptive_step_doubling_integrates_at_the_declared_order(den):
    """Step doubling of a single stepper: halving the tolerance cuts the error as tol, and the NFE grows as
    tol^(-1/(p+1)) for the declared order p (here heun, p = 2: about 2^(1/3) = 1.26 per halving of tol)."""
    st = make_stepper(den, "heun")
    ref = (
        make_stepper(den, "rk45", backend="scipy", rtol=1e-12, atol=1e-12)
        .integrate(_x(den), torch.tensor([1.0, 1e-3], dtype=torch.float64))
        .x
    )
    nfes, errs = [], []
    for tol in (1e-3, 1e-4, 1e-5):
        res = solve_adaptive(st, _x(den), 1.0, 1e-3, rtol=tol, atol=tol)
        nfes.append(res.nfe)
        errs.append(float((res.x - ref).abs().max()))
    assert errs[2] < errs[1] < errs[0] and errs[2] < 2e-3
    growth = (nfes[2] / nfes[0]) ** 0.5  # per factor 10 of tol
    assert 10 ** (1 / 3.0) * 0.7 < growth < 10 ** (1 / 2.0), (nfes, errs)  # order 2, not 1 (10^(1/2) = 3.2)


def test_stochastic_steppers_need_noise(den):
    st = make_stepper(den, "euler_maruyama")
    t0, t1 = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    with pytest.raises(ValueError, match="stochastic: the driver must pass noise"):
        st.step(t0, t1, _x(den), None, None)


def test_orders_belong_to_the_configured_instance(den):
    assert make_stepper(den, "dpm_solver", order=2).order == 2.0
    assert make_stepper(den, "dpm_solver", order=3).order == 3.0
    assert make_stepper(den, "unipc", order=2, corrector=False).order == 2.0
    assert make_stepper(den, "unipc", order=2).order == 3.0
    assert make_stepper(den, "ddim", eta=0.5).stochastic and not make_stepper(den, "ddim").stochastic


def test_capability_types_of_the_table(den):
    types = {
        "euler": SingleStepper,
        "ddim": SingleStepper,
        "heun": SingleStepper,
        "dpm_solver": EmbeddedStepper,
        "rk45": EmbeddedStepper,
        "adaptive_sde": EmbeddedStepper,
        "dpm_solver++": MultistepStepper,
        "unipc": MultistepStepper,
        "torchsde": Integrator,
        "parallel": Integrator,
    }
    for name, kind in types.items():
        assert isinstance(make_stepper(den, name), kind), name


def test_integrators_are_not_stepped(den):
    with pytest.raises(TypeError, match="fixed-grid Stepper"):
        solve(make_stepper(den, "torchsde"), _x(den), time_grid(den.sde, 4, "uniform"))
    assert isinstance(make_stepper(den, "rk45"), Stepper)  # the DOPRI5 stepper also walks a grid
    assert make_stepper(den, "rk45").integrator() is not None  # ... and hands out its torchdiffeq bridge
    assert make_stepper(den, "rk45", backend="sdeflow").integrator() is None


def test_adaptive_sde_with_per_sample_generators_is_batch_size_independent(den):
    """Issue 16: the adaptive driver steps a subset of the batch; its noise comes from the subset's own streams."""
    from sdeflow.noise import PerSampleGenerator

    seeds = list(range(12))
    big = sf.sample(den, "adaptive_sde", shape=(12, 2), generator=PerSampleGenerator(seeds), dtype=torch.float64)
    small = sf.sample(den, "adaptive_sde", shape=(3, 2), generator=PerSampleGenerator(seeds[5:8]), dtype=torch.float64)
    torch.testing.assert_close(big.x[5:8], small.x, rtol=0, atol=0)


class _LabelNet:
    """eps-net of a two-class mixture conditioned on a label tensor passed as a keyword (class_labels)."""

    def __init__(self, sde):
        self.sde = sde
        self.gmms = [sf.GaussianMixture([[1.5, 0.0]], [0.4]), sf.GaussianMixture([[-1.5, 0.0]], [0.4])]
        self.rows: list[int] = []

    def __call__(self, x, t, class_labels):
        assert class_labels.shape[0] == x.shape[0]
        self.rows.append(x.shape[0])
        out = torch.empty_like(x)
        for c, gmm in enumerate(self.gmms):
            m = class_labels == c
            if m.any():
                out[m] = gmm.eps(x[m], t[m], self.sde)
        return out


@pytest.mark.parametrize(
    "solver,opts",
    [("dpm_solver++", {}), ("dpm_solver", {"order": 2, "adaptive": True}), ("parallel", {"base": "ddim", "window": 4})],
)
def test_model_kwargs_follow_the_samples(solver, opts):
    """Issue 14: conditioning tensors reach the net on every call, sliced to the samples an adaptive solver steps and
    repeated for Picard windows; each sample lands in its own class."""
    sde = sf.VPSDE()
    net = _LabelNet(sde)
    den = sf.Denoiser(net, sde)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    x_T = sde.prior_sample((6, 2), torch.Generator().manual_seed(1), dtype=torch.float64)
    res = sf.sample(den, solver, nfe=20, x_T=x_T, model_kwargs={"class_labels": labels}, **opts)
    assert torch.equal(res.x[:, 0] > 0, labels == 0)
    assert res.nfe == den.nfe and res.nfe > 0
    if solver == "dpm_solver":
        assert min(net.rows) < 6  # the adaptive driver stepped subsets
    with pytest.raises(ValueError, match="one row per sample"):
        sf.sample(den, "ddim", nfe=5, x_T=x_T, model_kwargs={"class_labels": labels[:4]})


def test_sampling_records_no_graph():
    """Issue 14: a net whose parameters require grad samples without an autograd graph unless enable_grad=True."""
    sde = sf.VPSDE()
    net = sf.MLPScoreNet(2, hidden=32, depth=2)
    den = sf.Denoiser(net, sde)
    x_T = torch.randn(8, 2)
    res = sf.sample(den, "dpm_solver++", nfe=5, x_T=x_T)
    assert not res.x.requires_grad and res.x.grad_fn is None
    res = sf.sample(den, "dpm_solver++", nfe=5, x_T=x_T, enable_grad=True)
    assert res.x.requires_grad
    res.x.sum().backward()
    assert any(p.grad is not None for p in net.parameters())


def test_bad_sampling_inputs_are_named():
    """Issue 16 item 4: integer x_T and a net of another precision are named up front, not raw errors inside torch."""
    sde = sf.VPSDE()
    den = sf.Denoiser(sf.MLPScoreNet(2, hidden=16, depth=1), sde)
    with pytest.raises(ValueError, match="x_T must be a floating-point tensor"):
        sf.sample(den, "ddim", x_T=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="the samples are torch.float64 but the net's parameters are torch.float32"):
        sf.sample(den, "ddim", shape=(2, 2), dtype=torch.float64)


def test_output_dtype_follows_the_samples():
    """Issue 16 item 8: a net returning another dtype gives samples in x_T's dtype, whatever the solver."""
    sde = sf.VPSDE()
    gmm = sf.GaussianMixture([[1.0, 0.5]], [0.5])
    den = sf.Denoiser(lambda x, t: gmm.eps(x.double(), t.double(), sde).float(), sde)
    x_T = torch.randn(3, 2, dtype=torch.float64)
    for solver in ("ddim", "euler", "dpm_solver++", "heun", "unipc"):
        assert sf.sample(den, solver, nfe=6, x_T=x_T).x.dtype == torch.float64, solver


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"model_kwargs": [1]}, "model_kwargs must be a dict"),
        ({"enable_grad": "yes"}, "enable_grad must be True or False"),
        ({"t_start": float("nan")}, "t_start must be a finite number"),
        ({"t_start": 2.0}, "t_start must satisfy"),
        ({"max_steps": 0, "solver": "rk45"}, "max_steps must be an integer >= 1"),
        ({"grid": torch.tensor([1e-3, 1.0], dtype=torch.float64)}, "grid must be strictly decreasing"),
    ],
)
def test_new_sample_options_refuse_wrong_values(den, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sf.sample(den, x_T=_x(den), **kwargs)


def test_eps_model_cannot_start_where_a_is_zero():
    den = sf.GaussianMixture([[1.0, 0.5]], [0.4]).denoiser(sf.FlowMatchingPath())
    with pytest.raises(ValueError, match="a\\(t_start\\) = 0"):
        sf.sample(den, "dpm_solver++", x_T=torch.randn(2, 2))
    assert torch.isfinite(sf.sample(den, "dpm_solver++", x_T=torch.randn(2, 2), t_start=0.99, nfe=8).x).all()
