"""Likelihood through the probability-flow ODE, checked against the exact GaussianMixture oracle.

The prior N(0, s(T)^2 I) is not exactly p_T, so the ODE part is tested on its own: log_prob - prior_log_prob(x_T) +
log p_T(x_T) (exact) must equal log p_{t_eps}(x) (exact). Gradients are checked against the exact score at t_eps and
adjoint against direct backpropagation; bits/dim of dequantized data against a discretized Gaussian in closed form.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import sdeflow as sf
from sdeflow.likelihood import (
    VARIABLES,
    UniformDequantization,
    drift_and_divergence,
    log_snr_from_vp_time,
    prior_gap_bound,
    vp_time_from_log_snr,
)

F64 = torch.float64
SDES = {"vp": lambda: sf.VPSDE(0.1, 20.0), "subvp": lambda: sf.SubVPSDE(0.1, 20.0), "ve": lambda: sf.VESDE(0.01, 50.0)}


def make_gmm(d: int, seed: int = 0, K: int = 3) -> sf.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(K, d, generator=g, dtype=F64)
    stds = 0.3 + 0.5 * torch.rand(K, d, generator=g, dtype=F64)
    weights = torch.softmax(torch.randn(K, generator=g, dtype=F64), 0)
    return sf.GaussianMixture(means, stds, weights)


def ode_part(res: sf.LikelihoodResult, gmm: sf.GaussianMixture, sde: sf.GaussianSDE) -> torch.Tensor:
    """log p_eps(x) with the exact log p_T(x_T) in place of the prior."""
    return res.log_prob - res.prior_log_prob + gmm.marginal_log_prob(res.x_T, sde.T, sde)


class MLP(torch.nn.Module):
    """A small smooth eps-net (B, *shape) x (B,) -> (B, *shape) for gradient tests."""

    def __init__(self, d: int, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(d + 1, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, d),
        ).to(F64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        return self.body(torch.cat([flat, t.reshape(-1, 1).expand(x.shape[0], 1)], 1)).reshape(x.shape)


# ------------------------------------------------------------------------------------------------ exact ODE part
@pytest.mark.parametrize("d", [2, 8])
@pytest.mark.parametrize("kind", list(SDES))
def test_ode_part_matches_closed_form(kind: str, d: int) -> None:
    sde = SDES[kind]()
    gmm = make_gmm(d, seed=d)
    x = gmm.sample(8, generator=torch.Generator().manual_seed(1))
    res = sf.log_likelihood(gmm.denoiser(sde), x, rtol=1e-8, atol=1e-8)
    ref = gmm.marginal_log_prob(x, sde.eps, sde)
    assert (ode_part(res, gmm, sde) - ref).abs().max() / d < 1e-5
    # bookkeeping of the result
    torch.testing.assert_close(res.log_prob, res.prior_log_prob + res.delta_log_prob)
    torch.testing.assert_close(res.prior_log_prob, sde.prior_log_prob(res.x_T.to(F64)))
    torch.testing.assert_close(res.bits_per_dim, -res.log_prob / (d * math.log(2)))
    assert res.t_eps == sde.eps and res.dequantization_offset == 0.0
    assert res.nfe == res.stats["evaluations"] > 0  # one net call per ODE evaluation
    # looser tolerance: cheaper, still accurate to the tolerance's order
    loose = sf.log_likelihood(gmm.denoiser(sde), x, rtol=1e-5, atol=1e-5)
    assert loose.nfe < res.nfe
    assert (ode_part(loose, gmm, sde) - ref).abs().max() / d < 1e-2


@pytest.mark.parametrize("kind", list(SDES))
def test_flow_end_point_of_gaussian_data(kind: str) -> None:
    """Gaussian data N(mu, S^2 I): (x_t - a_t mu) / sqrt(a_t^2 S^2 + s_t^2) is constant along the flow."""
    sde = SDES[kind]()
    mu, S = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64), 0.7
    gmm = sf.GaussianMixture(mu, S)
    x = gmm.sample(5, generator=torch.Generator().manual_seed(0))
    t_eps = 0.05
    res = sf.log_likelihood(gmm.denoiser(sde), x, rtol=1e-9, atol=1e-9, t_eps=t_eps)

    def scale(t: float) -> tuple[float, float]:
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        return a, math.sqrt(a * a * S * S + s * s)

    (a0, r0), (a1, r1) = scale(t_eps), scale(sde.T)
    x_T = a1 * mu + r1 / r0 * (x - a0 * mu)
    torch.testing.assert_close(res.x_T, x_T, rtol=1e-6, atol=1e-6)
    # the flow is linear here: the divergence integral is d log(r1 / r0)
    torch.testing.assert_close(
        res.delta_log_prob, torch.full((5,), 3 * math.log(r1 / r0), dtype=F64), rtol=0, atol=1e-6
    )


def test_prior_gap_bound() -> None:
    """E_x[KL(N(a_T x, s_T^2) || prior)] bounds KL(p_T || prior) >= 0; checked by Monte Carlo with a small sigma_max."""
    sde = sf.VESDE(0.01, 3.0)
    gmm = make_gmm(2, seed=3)
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(20000, generator=g)
    x_T = sde.marginal(x0, sde.T, torch.randn(x0.shape, generator=g, dtype=F64))
    ratio = gmm.marginal_log_prob(x_T, sde.T, sde) - sde.prior_log_prob(x_T)
    kl, se = float(ratio.mean()), float(ratio.std()) / math.sqrt(ratio.numel())
    bound = prior_gap_bound(sde, x0)
    assert kl - 3 * se > 0 and kl + 3 * se < float(bound.mean())
    # the result carries it per sample; a custom prior switches it off
    den = gmm.denoiser(sde)
    res = sf.log_likelihood(den, x0[:4])
    torch.testing.assert_close(res.prior_gap_bound, bound[:4])
    exact_prior = sf.log_likelihood(den, x0[:4], prior=lambda z: gmm.marginal_log_prob(z, sde.T, sde))
    assert exact_prior.prior_gap_bound is None
    torch.testing.assert_close(exact_prior.log_prob, ode_part(res, gmm, sde))


# ------------------------------------------------------------------------------------------------ divergence
def test_divergence_against_jacobian_trace() -> None:
    net = MLP(6)
    t = torch.tensor(0.3, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))

    def fn(z: torch.Tensor) -> torch.Tensor:
        return net(z, t.expand(z.shape[0]))

    jac = torch.func.vmap(torch.func.jacrev(lambda z: fn(z[None])[0]))(x).reshape(5, 6, 6)
    trace = jac.diagonal(dim1=1, dim2=2).sum(-1)
    for chunk in (1, 4, 6, None):
        v, div = drift_and_divergence(fn, x, "exact", chunk_size=chunk)
        torch.testing.assert_close(div, trace)
        torch.testing.assert_close(v, fn(x))
    probes = torch.randn(3, 5, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    e = probes.reshape(3, 5, 6)
    expected = torch.einsum("nbi,bij,nbj->nb", e, jac, e).mean(0)
    _, est = drift_and_divergence(fn, x, "hutchinson", probes=probes)
    torch.testing.assert_close(est, expected)


def test_hutchinson_is_unbiased() -> None:
    """Per point: the mean over 150 single-probe solves lies within 3 standard errors of the exact value."""
    sde = sf.VPSDE()
    gmm = make_gmm(2, seed=5)
    den = gmm.denoiser(sde)
    x = gmm.sample(4, generator=torch.Generator().manual_seed(2))
    exact = sf.log_likelihood(den, x, rtol=1e-7, atol=1e-7).log_prob
    M = 150
    variances = {}
    for probe in ("rademacher", "gaussian"):
        g = torch.Generator().manual_seed(7)
        res = sf.log_likelihood(den, x.repeat(M, 1), "hutchinson", 1e-7, 1e-7, generator=g, probe=probe)
        lp = res.log_prob.reshape(M, 4)
        mean, se = lp.mean(0), lp.std(0) / math.sqrt(M)
        assert bool(((mean - exact).abs() <= 3 * se + 1e-5).all()), (probe, mean - exact, se)
        assert bool((se > 0).all())
        variances[probe] = lp.var(0)
    # Rademacher: Var = 2 sum_{i != j} A_ij^2 < Gaussian: 2 ||A||_F^2 (A the symmetrized integrated Jacobian)
    assert bool((variances["rademacher"] < variances["gaussian"]).all())


def test_hutchinson_reproducible_and_more_probes_less_variance() -> None:
    sde = sf.VESDE()
    gmm = make_gmm(3, seed=6)
    den = gmm.denoiser(sde)
    x = gmm.sample(2, generator=torch.Generator().manual_seed(0)).repeat(60, 1)
    kw = dict(divergence="hutchinson", probe="gaussian", rtol=1e-6, atol=1e-6)
    a = sf.log_likelihood(den, x, generator=torch.Generator().manual_seed(3), **kw).log_prob
    b = sf.log_likelihood(den, x, generator=torch.Generator().manual_seed(3), **kw).log_prob
    c = sf.log_likelihood(den, x, generator=torch.Generator().manual_seed(4), **kw).log_prob
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    many = sf.log_likelihood(den, x, generator=torch.Generator().manual_seed(3), n_probes=8, **kw).log_prob
    var1, var8 = a.reshape(60, 2).var(0), many.reshape(60, 2).var(0)
    assert bool((var8 < var1 / 3).all())  # expected ratio 8


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("adjoint", [False, True])
def test_gradient_wrt_x_is_the_score(adjoint: bool) -> None:
    """d/dx log p_eps(x) = score(x, t_eps): the exact oracle for gradients through the solve."""
    sde = sf.VPSDE()
    gmm = make_gmm(2, seed=8)
    x = gmm.sample(3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    res = sf.log_likelihood(
        gmm.denoiser(sde),
        x,
        rtol=1e-8,
        atol=1e-8,
        adjoint=adjoint,
        prior=lambda z: gmm.marginal_log_prob(z, sde.T, sde),
    )
    (grad,) = torch.autograd.grad(res.log_prob.sum(), x)
    torch.testing.assert_close(grad, gmm.score(x.detach(), sde.eps, sde), rtol=1e-5, atol=1e-5)


def test_adjoint_gradient_matches_direct_backprop() -> None:
    sde = sf.VPSDE()
    net = MLP(2)
    den = sf.Denoiser(net, sde, prediction="eps")
    x0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for adjoint in (False, True):
        x = x0.clone().requires_grad_(True)
        res = sf.log_likelihood(den, x, rtol=1e-8, atol=1e-8, adjoint=adjoint)
        grads[adjoint] = torch.autograd.grad(res.log_prob.sum(), [x, *net.parameters()])
    for direct, adj in zip(grads[False], grads[True]):
        assert float((direct - adj).norm() / direct.norm()) < 1e-4
    # and the direct gradient is a real one: a central difference along one coordinate of x
    h = 1e-4
    with torch.no_grad():
        bump = torch.zeros_like(x0)
        bump[1, 0] = h
        lp = [sf.log_likelihood(den, x0 + s * bump, rtol=1e-10, atol=1e-10).log_prob[1] for s in (1, -1)]
    assert abs(float((lp[0] - lp[1]) / (2 * h)) - float(grads[False][0][1, 0])) < 1e-5


def test_no_graph_under_no_grad() -> None:
    net = MLP(2)
    den = sf.Denoiser(net, sf.VPSDE(), prediction="eps")
    with torch.no_grad():
        res = sf.log_likelihood(den, torch.zeros(3, 2, dtype=F64), rtol=1e-4, atol=1e-4)
    assert not res.log_prob.requires_grad and not res.x_T.requires_grad


# ------------------------------------------------------------------------------------------------ bits/dim
def _discretized_gaussian(m: float, v: float, deq: UniformDequantization, k: torch.Tensor):
    """For p = N(m, v I): exact -log2 P(k)/d, and the exact dequantized bound E_u[-log2 p(x)]/d - log2(Delta)."""
    lo = deq.low + deq.width * k
    sd = math.sqrt(v)
    cdf = lambda z: 0.5 * torch.erfc(-(z - m) / (sd * math.sqrt(2)))
    log_P = torch.log(cdf(lo + deq.width) - cdf(lo)).sum(-1)
    centre = lo + deq.width / 2
    e_log_p = (-0.5 * math.log(2 * math.pi * v) - ((centre - m) ** 2 + deq.width**2 / 12) / (2 * v)).sum(-1)
    d = k.shape[-1]
    return -log_P / (d * math.log(2)), -e_log_p / (d * math.log(2)) + deq.offset_bits


@pytest.mark.parametrize("deq", [UniformDequantization(), UniformDequantization(256, 0.0, 1.0)])
def test_bits_per_dim_of_dequantized_data(deq: UniformDequantization) -> None:
    """Discretized Gaussian: the mean of the pipeline's bits/dim over dequantization draws equals the closed-form
    E_u bound, which lies above the exact discrete -log2 P(k)/d (the entropy bound for this k)."""
    assert deq.offset_bits == pytest.approx(7.0 if deq.low == -1.0 else 8.0)
    sde = sf.VPSDE()
    mu, S = deq.low + 0.52 * (deq.high - deq.low), 0.006 * (deq.high - deq.low)
    gmm = sf.GaussianMixture(torch.full((1, 2), mu, dtype=F64), S)
    a, s = float(sde.alpha(sde.eps)), float(sde.sigma(sde.eps))
    m, v = a * mu, a * a * S * S + s * s  # p_eps = N(m, v I)
    k = torch.tensor([[131, 135]], dtype=torch.int64)
    k = k + (0 if deq.low == -1.0 else 1)
    M = 64
    res = sf.log_likelihood(
        gmm.denoiser(sde),
        k.repeat(M, 1),
        rtol=1e-7,
        atol=1e-7,
        dequantize=deq,
        generator=torch.Generator().manual_seed(0),
        prior=lambda z: gmm.marginal_log_prob(z, sde.T, sde),
    )
    assert res.x.dtype == torch.get_default_dtype() or res.x.dtype == F64
    cells = ((res.x - deq.low) / deq.width).floor()
    torch.testing.assert_close(cells, k.repeat(M, 1).to(cells.dtype), rtol=0, atol=0)
    discrete, bound = _discretized_gaussian(m, v, deq, k[0].to(F64))
    assert float(bound) > float(discrete)  # Jensen
    mean, se = float(res.bits_per_dim.mean()), float(res.bits_per_dim.std()) / math.sqrt(M)
    assert abs(mean - float(bound)) < 3 * se + 1e-4
    assert mean > float(discrete) - 3 * se
    # per draw: the density of the dequantized point itself, plus the offset
    expected = -gmm.marginal_log_prob(res.x.to(F64), sde.eps, sde) / (2 * math.log(2)) + deq.offset_bits
    torch.testing.assert_close(res.bits_per_dim, expected, rtol=0, atol=1e-5)


def test_bits_per_dim_not_below_entropy() -> None:
    """Data k ~ P (a discretized Gaussian, exact model): bits/dim >= -log2 P(k)/d per sample up to the u noise, so the
    mean is not below the entropy H(P)/d; paired differences make the check sharp."""
    deq = UniformDequantization()
    sde = sf.VESDE(sigma_min=0.002, sigma_max=50.0)  # little noise at t_eps: a model sharp against the cells
    S, d, n = 0.004, 3, 200
    gmm = sf.GaussianMixture(torch.zeros(1, d, dtype=F64), S)
    a, s = float(sde.alpha(sde.eps)), float(sde.sigma(sde.eps))
    v = a * a * S * S + s * s
    levels = torch.arange(256, dtype=F64)[:, None]
    P = torch.exp(-_discretized_gaussian(0.0, v, deq, levels)[0] * math.log(2))  # per-dimension cell masses
    assert abs(float(P.sum()) - 1) < 1e-9
    entropy_bits = float(-(P * torch.log2(P.clamp_min(1e-300))).sum())  # per dimension
    g = torch.Generator().manual_seed(0)
    k = torch.multinomial(P, n * d, replacement=True, generator=g).reshape(n, d)
    res = sf.log_likelihood(
        gmm.denoiser(sde), k, dequantize=deq, generator=g, prior=lambda z: gmm.marginal_log_prob(z, sde.T, sde)
    )
    discrete, bound = _discretized_gaussian(0.0, v, deq, k.to(F64))
    excess = res.bits_per_dim - discrete  # >= 0 in expectation over u, for every k
    assert float(excess.mean()) > 3 * float(excess.std()) / math.sqrt(n) > 0, (excess.mean(), excess.std())
    diff = res.bits_per_dim - bound  # zero-mean u noise
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(n)
    # the sample's own entropy estimate matches H(P), and the mean bits/dim sits above it by the small Jensen gap
    assert abs(float(discrete.mean()) - entropy_bits) < 3 * float(discrete.std()) / math.sqrt(n)
    assert float(excess.mean()) < 0.5


def test_bits_below_zero_warns() -> None:
    """A model far too sharp for the quantization (wrong scaling) gives bits/dim < 0: a warning, not a result."""
    sde = sf.VPSDE()
    deq = UniformDequantization(levels=4)  # cells of width 0.5, far wider than the model's std 0.03 at t_eps
    gmm = sf.GaussianMixture(torch.full((1, 1), 0.25, dtype=F64), 1e-3)  # centred in cell k = 2
    with pytest.warns(UserWarning, match="entropy bound"):
        res = sf.log_likelihood(
            gmm.denoiser(sde),
            torch.full((32, 1), 2),
            dequantize=deq,
            rtol=1e-4,
            atol=1e-4,
            generator=torch.Generator().manual_seed(0),
        )
    assert float(res.bits_per_dim.min()) < 0 < float(res.bits_per_dim.max())


# ------------------------------------------------------------------------------------------------ options
def test_shapes_batches_dtypes_and_methods() -> None:
    sde = sf.VPSDE()
    gmm = make_gmm(4, seed=9)
    den = gmm.denoiser(sde)
    x = gmm.sample(7, generator=torch.Generator().manual_seed(0))
    ref = gmm.marginal_log_prob(x, sde.eps, sde)
    flat = sf.log_likelihood(den, x, rtol=1e-8, atol=1e-8)
    image = sf.log_likelihood(den, x.reshape(7, 1, 2, 2), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(image.log_prob, flat.log_prob)
    assert image.x_T.shape == (7, 1, 2, 2)
    split = sf.log_likelihood(den, x, rtol=1e-8, atol=1e-8, batch_size=3, progress=False)
    assert split.stats["batches"] == 3
    torch.testing.assert_close(split.log_prob, flat.log_prob, rtol=0, atol=1e-6)
    rk4 = sf.log_likelihood(den, x, method="rk4", options={"step_size": 0.01})
    assert rk4.stats["evaluations"] == 4 * 100
    assert (ode_part(rk4, gmm, sde) - ref).abs().max() / 4 < 1e-5
    # float32 model: float64 state and accumulator, x_T back in float32
    lo = sf.log_likelihood(den, x.float(), rtol=1e-6, atol=1e-6)
    assert lo.x_T.dtype == torch.float32 and lo.log_prob.dtype == F64
    assert (ode_part(lo, gmm, sde) - ref).abs().max() / 4 < 1e-4


def test_bad_input_raises() -> None:
    sde = sf.VPSDE()
    gmm = make_gmm(2)
    den = gmm.denoiser(sde)
    x = gmm.sample(3, generator=torch.Generator().manual_seed(0))
    bad_x = {
        "shape": torch.zeros(2, dtype=F64),
        "batch": torch.zeros(0, 2, dtype=F64),
        "finite": x.clone().index_fill_(0, torch.tensor([1]), float("nan")),
        "dequantize": torch.ones(3, 2, dtype=torch.int64),
    }
    for match, bad in bad_x.items():
        with pytest.raises(ValueError, match=match):
            sf.log_likelihood(den, bad)
    with pytest.raises(ValueError, match="finite"):
        sf.log_likelihood(den, x.clone().index_fill_(1, torch.tensor([0]), float("inf")))
    with pytest.raises(ValueError, match="2 values per sample"):  # the model's data shape
        sf.log_likelihood(den, torch.zeros(3, 5, dtype=F64))
    bad_kwargs = {
        "divergence": dict(divergence="trace"),
        "probe": dict(probe="sphere"),
        "method": dict(method="rk45"),
        "rtol": dict(rtol=0.0),
        "n_probes": dict(n_probes=0),
        "t_eps": dict(t_eps=1.0),
        "step_size": dict(method="rk4"),
        "batch_size": dict(batch_size=0),
    }
    for match, kw in bad_kwargs.items():
        with pytest.raises(ValueError, match=match):
            sf.log_likelihood(den, x, **kw)
    with pytest.raises(ValueError, match="t_eps"):
        sf.log_likelihood(den, x, t_eps=-0.1)
    deq = UniformDequantization()
    for k in (torch.tensor([[0, 256]]), torch.tensor([[-1, 3]]), torch.tensor([[1.5, 2.0]])):
        with pytest.raises(ValueError, match="integers in"):
            sf.log_likelihood(den, k, dequantize=deq)
    with pytest.raises(ValueError, match="levels"):
        UniformDequantization(levels=1)
    with pytest.raises(ValueError, match="low"):
        UniformDequantization(low=1.0, high=-1.0)
    with pytest.raises(ValueError, match="s\\(t_eps\\) = 0"):  # the score at t = 0 is singular for VP
        sf.log_likelihood(den, x, t_eps=0.0)
    # VE has s(0) = sigma_min > 0: t_eps = 0 is allowed
    ve = sf.VESDE()
    res = sf.log_likelihood(gmm.denoiser(ve), x, t_eps=0.0, rtol=1e-8, atol=1e-8)
    assert (ode_part(res, gmm, ve) - gmm.marginal_log_prob(x, 0.0, ve)).abs().max() < 2e-5


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_on_a_checkpoint(tmp_path, capsys) -> None:
    from tiny_checkpoint import write_mlp_checkpoint

    from sdeflow.cli import main
    from sdeflow.training import load_denoiser

    write_mlp_checkpoint(tmp_path / "ckpt.pt", dim=4)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 1, 2, 2)).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "ll.json"
    args = [
        "likelihood",
        "--ckpt",
        str(tmp_path / "ckpt.pt"),
        "--data",
        str(tmp_path / "images.npy"),
        "--rtol",
        "1e-4",
        "--atol",
        "1e-4",
        "--device",
        "cpu",
        "--dtype",
        "float64",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "bits/dim" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n"] == 5 and report["dequantization_offset_bits"] == pytest.approx(7.0)
    den = load_denoiser(tmp_path / "ckpt.pt", device="cpu", dtype=F64)
    with torch.no_grad():
        res = sf.log_likelihood(
            den,
            torch.from_numpy(images).long(),
            rtol=1e-4,
            atol=1e-4,
            dequantize=UniformDequantization(),
            generator=torch.Generator().manual_seed(0),
        )
    np.testing.assert_allclose(report["per_sample"]["bits_per_dim"], res.bits_per_dim.numpy(), rtol=1e-9)
    np.testing.assert_allclose(report["per_sample"]["log_prob"], res.log_prob.numpy(), rtol=1e-9)
    np.save(tmp_path / "floats.npy", images.astype(np.float32))
    rc = main(args[:4] + [str(tmp_path / "floats.npy"), "--levels", "17", "--device", "cpu", "--no-progress"])
    assert rc != 0 and "integer data only" in capsys.readouterr().err  # the CLI reports errors with a status


# ------------------------------------------------------------------------------------------------ issue 19
def test_stochastic_divergences_report_a_calibrated_standard_error() -> None:
    """Hutchinson with several probes and Hutch++: unbiased (mean over independent solves within 3 SE of the exact
    value) and their per-sample std_error matches the spread of log p over independent probe draws."""
    sde = sf.VPSDE()
    gmm = make_gmm(6, seed=11)
    den = gmm.denoiser(sde)
    x = gmm.sample(2, generator=torch.Generator().manual_seed(0))
    exact = sf.log_likelihood(den, x, rtol=1e-7, atol=1e-7)
    assert exact.std_error is None and exact.probe_variance is None
    M = 32
    for method, n, m in (("hutchinson", 4, 4), ("hutch++", 6, 2)):  # m: residual probes (Hutch++: 6 - 2 * 2)
        res = sf.log_likelihood(
            den,
            x.repeat(M, 1),
            method,
            1e-5,
            1e-5,
            generator=torch.Generator().manual_seed(5),
            n_probes=n,
            probe="gaussian",
        )
        lp = res.log_prob.reshape(M, 2)
        se = res.std_error.reshape(M, 2)
        assert res.std_error.shape == (2 * M,) and bool((res.std_error >= 0).all()) and float(se.mean()) > 0
        spread = lp.std(0) / math.sqrt(M)
        assert bool(((lp.mean(0) - exact.log_prob).abs() <= 3 * spread + 1e-4).all()), (method, lp.mean(0))
        # E[std_error^2] = Var(log p): the ratio of the two variance estimates is near 1 (chi-square noise)
        ratio = se.pow(2).mean(0) / lp.var(0)
        assert bool(((ratio > 0.4) & (ratio < 2.5)).all()), (method, ratio)
        torch.testing.assert_close(res.probe_variance, m * res.std_error.pow(2))
    one = sf.log_likelihood(den, x, "hutchinson", generator=torch.Generator().manual_seed(0))
    assert one.std_error is None  # one probe: no spread to measure


def test_log_snr_variable_and_fixed_grid_solvers() -> None:
    """variable='logsnr' (change of variables dt = du / -lambda'(t)) gives the same density; fixed-grid solvers take
    exactly nfe evaluations and converge at their order against the closed form."""
    d = 3
    for kind in ("vp", "ve"):
        sde = SDES[kind]()
        gmm = make_gmm(d, seed=12)
        den = gmm.denoiser(sde)
        x = gmm.sample(6, generator=torch.Generator().manual_seed(0))
        ref = gmm.marginal_log_prob(x, sde.eps, sde)
        lam = sf.log_likelihood(den, x, rtol=1e-8, atol=1e-8, variable="logsnr")
        assert lam.stats["variable"] == "logsnr"
        assert (ode_part(lam, gmm, sde) - ref).abs().max() / d < 1e-5
        errs = []
        for nfe in (80, 160):
            fixed = sf.log_likelihood(den, x, solver="rk4", nfe=nfe, variable="logsnr")
            assert fixed.nfe == fixed.stats["evaluations"] == nfe
            errs.append(float((ode_part(fixed, gmm, sde) - ref).abs().mean()))
        assert errs[1] < errs[0] / 8  # order 4: 16x expected
    heun = [sf.log_likelihood(den, x, solver="heun", nfe=n).nfe for n in (9, 10)]
    assert heun == [8, 10]  # whole steps of 2 evaluations


def _flow_denoiser(gmm: sf.GaussianMixture, sde) -> sf.Denoiser:
    """A velocity-predicting Denoiser with the exact u = a'(t) x0 + s'(t) eps of the mixture on ``sde``."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        da = sde.d_alpha(t).reshape(-1, 1).to(x.dtype)
        ds = sde.d_sigma(t).reshape(-1, 1).to(x.dtype)
        return da * gmm.x0(x, t, sde) + ds * gmm.eps(x, t, sde)

    return sf.Denoiser(net, sde, prediction="flow")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_likelihood_is_exact(shift: float) -> None:
    """Gaussian data on the flow path x_t = a x0 + s eps: p_t = N(a mu, (a^2 S^2 + s^2) I) and at t = 1 the prior
    N(0, I) is exactly p_1, so log_prob itself (no prior swap) equals the closed form."""
    from sdeflow.sdes import FlowMatchingPath

    sde = FlowMatchingPath(shift=shift)
    mu, S = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64), 0.7
    gmm = sf.GaussianMixture(mu, S)
    x = gmm.sample(5, generator=torch.Generator().manual_seed(0))
    den = _flow_denoiser(gmm, sde)
    res = sf.log_likelihood(den, x, rtol=1e-9, atol=1e-9)
    a, s = float(sde.alpha(sde.eps)), float(sde.sigma(sde.eps))
    v = a * a * S * S + s * s
    exact = (-0.5 * (x - a * mu).pow(2).sum(1) / v - 1.5 * math.log(2 * math.pi * v)).to(F64)
    torch.testing.assert_close(res.log_prob, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.prior_gap_bound, torch.zeros(5, dtype=F64))
    # the end point is the noise: x_1 = (x_eps - a mu) / sqrt(v)
    torch.testing.assert_close(res.x_T, (x - a * mu) / math.sqrt(v), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="variable='logsnr' needs a finite log-SNR"):
        sf.log_likelihood(den, x, variable="logsnr")
    # the same model through diffusers' flow convention (velocity eps - x0 in sigma, timestep sigma * N)
    from sdeflow.integrations import from_diffusers

    plain = FlowMatchingPath()

    def model(xx: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sig = (timestep / 1000).to(F64)
        return gmm.eps(xx, sig, plain) - gmm.x0(xx, sig, plain)

    dden = from_diffusers(model, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift})
    assert isinstance(dden.sde, FlowMatchingPath) and dden.sde.shift == shift
    dres = sf.log_likelihood(dden, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dres.log_prob, exact, rtol=0, atol=1e-6)


def test_diffusers_ddpm_and_edm_likelihoods() -> None:
    """Models adapted from diffusers (DDPM timesteps n = tN - 1 on the DiscreteVPSDE) and EDM (D(x; sigma) on
    EDMPath, t = sigma) against the closed form of Gaussian data, with the exact log p_T in place of the prior."""
    from sdeflow.integrations import from_diffusers, from_edm

    mu, S = torch.tensor([[0.3, -0.4]], dtype=F64), 0.5
    gmm = sf.GaussianMixture(mu, S)
    x = gmm.sample(4, generator=torch.Generator().manual_seed(0))
    config = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    dsde = sf.DiscreteVPSDE.linear(1000)

    def unet(xx: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return gmm.eps(xx, ((timestep.to(F64) + 1) / 1000).clamp(max=1.0), dsde)

    den = from_diffusers(unet, config)
    assert isinstance(den.sde, sf.DiscreteVPSDE) and den.sde.eps == 1e-3
    exact_prior = lambda z: gmm.marginal_log_prob(z, 1.0, dsde)
    res = sf.log_likelihood(den, x, rtol=1e-6, atol=1e-6, prior=exact_prior)
    assert res.stats["variable"] == "vp_time"  # "auto" on a DiscreteVPSDE
    ref = gmm.marginal_log_prob(x, den.sde.eps, dsde)  # diffusers' timestep 0: noise std sqrt(beta_1) = 0.01
    assert float((res.log_prob - ref).abs().max()) < 1e-5
    # in t, f(t) jumps at each of the 1000 knots: the adaptive solver spends more and misses the error
    in_t = sf.log_likelihood(den, x, rtol=1e-6, atol=1e-6, variable="t", prior=exact_prior)
    assert in_t.nfe > 4 * res.nfe and float((in_t.log_prob - ref).abs().max()) > 1e-4
    from sdeflow.sdes import EDMPath

    path = EDMPath(0.002, 80.0)
    eden = from_edm(lambda xx, sigma: gmm.x0(xx, sigma.to(F64), path))
    for variable in VARIABLES:
        eres = sf.log_likelihood(
            eden, x, rtol=1e-8, atol=1e-8, variable=variable, prior=lambda z: gmm.marginal_log_prob(z, 80.0, path)
        )
        eref = gmm.marginal_log_prob(x, 0.002, path)  # x0 + sigma_min * eps
        assert float((eres.log_prob - eref).abs().max()) < 1e-5, variable


def test_issue19_bad_input() -> None:
    sde = sf.VPSDE()
    gmm = make_gmm(2)
    den = gmm.denoiser(sde)
    x = gmm.sample(3, generator=torch.Generator().manual_seed(0))
    cases = {
        "variable": dict(variable="lambda"),
        "solver": dict(solver="dopri5", nfe=10),
        "pass solver=": dict(nfe=10),
        "nfe must be an integer >= 4": dict(solver="rk4", nfe=3),
        "n_probes >= 3": dict(divergence="hutch++", n_probes=2),
        "exact_mode": dict(exact_mode="jvp"),
    }
    for match, kw in cases.items():
        with pytest.raises(ValueError, match=match):
            sf.log_likelihood(den, x, **kw)


def test_vp_time_is_the_linear_vp_time_of_the_log_snr() -> None:
    """vp_time_from_log_snr inverts the linear VP SDE's log-SNR (beyond its T too), log_snr_from_vp_time inverts it
    back, and its derivative is the autograd derivative."""
    vp = sf.VPSDE(0.1, 20.0)
    t = torch.tensor([1e-4, 1e-3, 0.1, 0.5, 0.9, 1.0], dtype=F64)
    torch.testing.assert_close(vp_time_from_log_snr(vp.log_snr(t)), t, rtol=1e-12, atol=0)
    tau = torch.tensor([1e-3, 0.3, 1.0, 1.2], dtype=F64, requires_grad=True)  # 1.2: beyond the SDE's T = 1
    lam, dlam = log_snr_from_vp_time(tau)
    torch.testing.assert_close(vp_time_from_log_snr(lam), tau.detach(), rtol=1e-12, atol=0)
    (auto,) = torch.autograd.grad(lam.sum(), tau)
    torch.testing.assert_close(dlam, auto, rtol=1e-10, atol=0)


def test_vp_time_variable_and_adams() -> None:
    """variable='vp_time' and method='adams' (sdeflow.adams' PEC pair) give the closed-form density; the fixed-grid
    Adams pairs take exactly nfe evaluations and converge at their order (k + 1)."""
    d = 3
    gmm = make_gmm(d, seed=13)
    x = gmm.sample(6, generator=torch.Generator().manual_seed(0))
    # VE at a tighter tolerance: the Adams error estimate is optimistic there (docs/likelihood.md)
    for kind, tol, kws in (
        ("vp", 1e-6, [dict(variable="vp_time"), dict(method="adams")]),
        ("ve", 1e-7, [dict(method="adams", variable="vp_time")]),
    ):
        sde = SDES[kind]()
        den = gmm.denoiser(sde)
        ref = gmm.marginal_log_prob(x, sde.eps, sde)
        for kw in kws:
            res = sf.log_likelihood(den, x, rtol=tol, atol=tol, **kw)
            assert res.stats["variable"] == kw.get("variable", "t")
            assert (ode_part(res, gmm, sde) - ref).abs().max() / d < 2e-5, (kind, kw)
    sde = SDES["vp"]()
    den = gmm.denoiser(sde)
    ref = gmm.marginal_log_prob(x, sde.eps, sde)
    for solver, order in (("abm3", 4), ("abm4", 5)):
        errs = []
        for nfe in (33, 65):
            res = sf.log_likelihood(den, x, solver=solver, nfe=nfe)
            assert res.nfe == res.stats["evaluations"] == nfe
            errs.append(float((ode_part(res, gmm, sde) - ref).abs().mean()))
        assert errs[1] < errs[0] / 2 ** (order - 1), (solver, errs)  # 2^order expected


def test_adams_carries_probes_and_gradients() -> None:
    """method='adams' integrates one Delta per Hutchinson probe (std_error) and backpropagates to the exact score;
    adjoint=True and foreign options are refused by name."""
    sde = sf.VPSDE()
    gmm = make_gmm(2, seed=8)
    den = gmm.denoiser(sde)
    x = gmm.sample(3, generator=torch.Generator().manual_seed(0))
    res = sf.log_likelihood(
        den, x, "hutchinson", n_probes=4, method="adams", generator=torch.Generator().manual_seed(1)
    )
    assert res.std_error is not None and res.std_error.shape == (3,) and bool((res.std_error > 0).all())
    xg = x.clone().requires_grad_(True)
    res = sf.log_likelihood(
        den, xg, rtol=1e-8, atol=1e-8, method="adams", prior=lambda z: gmm.marginal_log_prob(z, sde.T, sde)
    )
    (grad,) = torch.autograd.grad(res.log_prob.sum(), xg)
    torch.testing.assert_close(grad, gmm.score(x, sde.eps, sde), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="adjoint=True needs a torchdiffeq integrator; method='adams'"):
        sf.log_likelihood(den, x, method="adams", adjoint=True)
    with pytest.raises(ValueError, match="adjoint=True needs a torchdiffeq integrator; solver='abm4'"):
        sf.log_likelihood(den, x, solver="abm4", nfe=10, adjoint=True)
    with pytest.raises(ValueError, match="options for method='adams' must be among"):
        sf.log_likelihood(den, x, method="adams", options={"step_size": 0.1})
    with pytest.raises(ValueError, match="nfe must be an integer >= 2"):
        sf.log_likelihood(den, x, solver="abm3", nfe=1)
    with pytest.raises(ValueError, match="variable='vp_time' needs a finite log-SNR"):
        from sdeflow.sdes import FlowMatchingPath

        sf.log_likelihood(_flow_denoiser(gmm, FlowMatchingPath()), x, variable="vp_time")


def test_net_only_divergence_equals_the_velocity_divergence() -> None:
    """The likelihood differentiates the net's raw output and adds the affine part exactly (div(c_x x + c_o out) =
    c_x d + c_o div out): the same log p and gradient as differentiating the whole velocity, which a Denoiser subclass
    overriding predict gets; eps, x0, v and flow predictions."""

    class Wrapped(sf.Denoiser):
        def predict(self, x, t, **kwargs):  # an override: prediction_affine declines, the velocity path runs
            return super().predict(x, t, **kwargs)

    sde = sf.VPSDE()
    gmm = make_gmm(3, seed=21)
    x = gmm.sample(4, generator=torch.Generator().manual_seed(0))
    for prediction, kw in (("eps", dict(n_probes=3, divergence="hutchinson")), ("x0", {}), ("v", {})):
        plain = gmm.denoiser(sde, prediction)
        wrapped = Wrapped(plain.net, sde, prediction=prediction)
        a = sf.log_likelihood(plain, x, rtol=1e-4, atol=1e-4, generator=torch.Generator().manual_seed(1), **kw)
        b = sf.log_likelihood(wrapped, x, rtol=1e-4, atol=1e-4, generator=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=1e-9)
        assert a.nfe == b.nfe
    from sdeflow.sdes import FlowMatchingPath

    path = FlowMatchingPath()
    flow = _flow_denoiser(gmm, path)
    wrapped = Wrapped(flow.net, path, prediction="flow")
    xg = x.clone().requires_grad_(True)
    a = sf.log_likelihood(flow, xg, rtol=1e-4, atol=1e-4)
    (ga,) = torch.autograd.grad(a.log_prob.sum(), xg)
    b = sf.log_likelihood(wrapped, xg, rtol=1e-4, atol=1e-4)
    (gb,) = torch.autograd.grad(b.log_prob.sum(), xg)
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=1e-9)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-8)
