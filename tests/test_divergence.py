"""Divergence estimators (sdeflow.divergence) against analytic Jacobian traces.

Oracles: linear maps x -> M_b x (trace of M_b), the exact GaussianMixture score field in float64 (its Jacobian built
column by column with torch.autograd.functional.jacobian on one sample at a time, a code path the estimators do not
use), and the closed-form variances of Hutchinson's estimator (Avron & Toledo 2011): Gaussian probes
2 ||J_s||_F^2, Rademacher probes 2 (||J_s||_F^2 - sum_i J_ii^2), J_s = (J + J^T)/2.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf
from sdeflow.divergence import DivergenceResult, divergence, exact_chunk, hutchinson_probes

F64 = torch.float64


def linear_field(B: int, d: int, seed: int = 0, shape: tuple[int, ...] | None = None):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, d, d, generator=g, dtype=F64)
    shape = shape or (d,)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bij,bj->bi", M, x.reshape(x.shape[0], d)).reshape(x.shape)

    return f, M


def gmm_field(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gmm = sf.GaussianMixture(
        1.5 * torch.randn(3, d, generator=g, dtype=F64),
        0.3 + 0.5 * torch.rand(3, d, generator=g, dtype=F64),
        torch.softmax(torch.randn(3, generator=g, dtype=F64), 0),
    )
    sde = sf.VPSDE()
    t = torch.tensor(0.3, dtype=F64)
    return gmm, (lambda x: sde.probability_flow_drift(x, t, gmm.score(x, t, sde)))


def per_sample_jacobians(f, x: torch.Tensor) -> torch.Tensor:
    rows = [torch.autograd.functional.jacobian(lambda z: f(z[None])[0], x[b]) for b in range(x.shape[0])]
    d = x[0].numel()
    return torch.stack([r.reshape(d, d) for r in rows])


# ------------------------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("mode", ["reverse", "forward", "vjp", "auto"])
@pytest.mark.parametrize("chunk", [None, 1, 3, 100])
def test_exact_linear_map(mode: str, chunk: int | None) -> None:
    f, M = linear_field(4, 7)
    x = torch.randn(4, 7, dtype=F64)
    res = divergence(f, x, "exact", mode=mode, chunk=chunk)
    assert isinstance(res, DivergenceResult)
    torch.testing.assert_close(res.value, M.diagonal(dim1=1, dim2=2).sum(1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(res.f_x, f(x))
    assert res.matvecs == 7 and torch.equal(res.std_error, torch.zeros(4, dtype=F64))
    assert res.mode in ("reverse", "forward", "vjp") and not res.value.requires_grad


@pytest.mark.parametrize("mode", ["reverse", "forward", "vjp"])
def test_exact_gmm_score_field_and_image_shape(mode: str) -> None:
    gmm, f = gmm_field(6)
    x = gmm.sample(5, generator=torch.Generator().manual_seed(3)).reshape(5, 2, 3)  # (B, *shape) with 2 data dims
    ref = per_sample_jacobians(f, x).diagonal(dim1=1, dim2=2).sum(1)
    res = divergence(f, x, mode=mode, chunk=4)
    torch.testing.assert_close(res.value, ref, rtol=1e-12, atol=1e-12)
    assert res.f_x.shape == x.shape


def test_exact_create_graph_gradient() -> None:
    """d/dx tr J for f(x) = x * sin(x) (J diagonal): tr J = sum(sin x + x cos x), gradient 2 cos x - x sin x."""
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    for mode in ("reverse", "forward", "vjp"):
        res = divergence(lambda z: z * torch.sin(z), x, mode=mode, create_graph=True)
        (g,) = torch.autograd.grad(res.value.sum(), x)
        torch.testing.assert_close(g, 2 * torch.cos(x) - x * torch.sin(x))


@given(
    st.integers(1, 4),
    st.sampled_from([(1,), (5,), (2, 3), (2, 2, 2)]),
    st.integers(1, 9),
    st.sampled_from(["reverse", "forward", "vjp"]),
    st.integers(0, 2**16),
)
def test_exact_equals_jacobian_trace_any_shape(B: int, shape: tuple, chunk: int, mode: str, seed: int) -> None:
    """A smooth nonlinear field tanh(M x) + x^2 per sample, any data shape and chunk: equals the trace of the
    per-sample Jacobian built column by column."""
    d = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=F64)
    f = lambda z: (torch.tanh(z.reshape(z.shape[0], d) @ M.T) + z.reshape(z.shape[0], d) ** 2).reshape(z.shape)
    x = torch.randn(B, *shape, generator=g, dtype=F64)
    ref = per_sample_jacobians(f, x).diagonal(dim1=1, dim2=2).sum(1)
    torch.testing.assert_close(divergence(f, x, mode=mode, chunk=chunk).value, ref, rtol=1e-12, atol=1e-12)


def test_exact_auto_times_once_per_shape_and_caches() -> None:
    """mode='auto' with the default chunk times every candidate once on the first call of a shape (counting the
    field's calls), caches the winner and then calls f once per evaluation for the reverse / vjp modes."""
    from sdeflow import divergence as dv

    dv.clear_autotune_cache()
    f0, M = linear_field(4, 7)
    calls = [0]

    def f(z: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return f0(z)

    x = torch.randn(4, 7, dtype=F64)
    exact = M.diagonal(dim1=1, dim2=2).sum(1)
    res = divergence(f, x, mode="auto")
    torch.testing.assert_close(res.value, exact, rtol=1e-13, atol=1e-13)
    key = ("cpu", F64, (4, 7))
    assert dv._AUTOTUNE[key] == (res.mode, res.chunk)
    # every reverse candidate ran (a fast f on CPU skips the torch.func modes, whose first use imports torch._dynamo)
    assert calls[0] >= sum(m == "reverse" for m, _ in dv._candidates(x)) >= 3
    assert res.mode == "reverse" or "torch._dynamo" in sys.modules
    calls[0] = 0
    again = divergence(f, x, mode="auto")
    assert (again.mode, again.chunk) == (res.mode, res.chunk)
    assert calls[0] == (1 if res.mode != "forward" else math.ceil(7 / res.chunk))
    torch.testing.assert_close(again.value, exact, rtol=1e-13, atol=1e-13)
    dv.clear_autotune_cache()
    assert key not in dv._AUTOTUNE


def test_exact_chunk_default_and_clip() -> None:
    x = torch.zeros(256, 64)
    assert exact_chunk(x) == 4 and exact_chunk(torch.zeros(256, 256)) == 1 and exact_chunk(x, 1000) == 64
    assert exact_chunk(torch.zeros(2, 8)) == 8


# ------------------------------------------------------------------------------------------------ stochastic
def _sym_frob(M: torch.Tensor) -> torch.Tensor:
    Js = 0.5 * (M + M.transpose(1, 2))
    return Js.pow(2).sum((1, 2))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_and_variance_matches_closed_form(probe: str) -> None:
    """One matrix repeated over a batch of 4000 independent draws: the mean sits within 4 SE of the trace and the
    reported per-probe variance averages to the closed form."""
    d, B, n = 6, 4000, 4
    _, M1 = linear_field(1, d, seed=1)
    M = M1.expand(B, d, d)
    f = lambda x: torch.einsum("bij,bj->bi", M, x)
    x = torch.randn(B, d, dtype=F64)
    res = divergence(f, x, "hutchinson", n_probes=n, probe=probe, generator=torch.Generator().manual_seed(0))
    tr = float(M1.diagonal(dim1=1, dim2=2).sum())
    var_closed = 2 * float(_sym_frob(M1)) - (
        2 * float(M1.diagonal(dim1=1, dim2=2).pow(2).sum()) if probe == "rademacher" else 0
    )
    se_of_mean = math.sqrt(var_closed / n / B)
    assert abs(float(res.value.mean()) - tr) < 4 * se_of_mean
    # reported per-probe variance: unbiased, so its batch mean matches the closed form within its own spread
    assert abs(float(res.probe_variance.mean()) - var_closed) < 4 * float(res.probe_variance.std()) / math.sqrt(B)
    # the reported standard error matches the empirical spread of the estimates over the batch
    emp_sd = float(res.value.std())
    assert abs(float(res.std_error.pow(2).mean().sqrt()) - emp_sd) / emp_sd < 0.1
    assert res.matvecs == n


def test_hutchinson_single_probe_reports_no_spread_and_fixed_probes() -> None:
    f, M = linear_field(3, 5)
    x = torch.randn(3, 5, dtype=F64)
    r1 = divergence(f, x, "hutchinson", n_probes=1, generator=torch.Generator().manual_seed(0))
    assert r1.std_error is None and r1.probe_variance is None
    z = hutchinson_probes("gaussian", 2, x, torch.Generator().manual_seed(1))
    r2 = divergence(f, x, "hutchinson", probes=z)
    per = torch.einsum("nbi,bij,nbj->nb", z, M, z)
    torch.testing.assert_close(r2.value, per.mean(0))
    torch.testing.assert_close(r2.per_probe, per)
    torch.testing.assert_close(r2.probe_variance, per.var(0))
    r3 = divergence(f, x, "hutchinson", probes=z, control=2.0)
    # the control variate: z^T (J - cI) z + c d = z^T J z - c (|z|^2 - d), same mean, other spread
    torch.testing.assert_close(r3.per_probe, per - 2.0 * (z.pow(2).sum(2) - 5))


def test_hutchpp_unbiased_and_beats_hutchinson_on_low_rank_dominated_matrix() -> None:
    """M = U diag(100, 50, 20) U^T + 0.1 noise (d = 30): Hutch++ with 9 products (3 sketch, 3 projection, 3 residual)
    is unbiased and its variance is far below Hutchinson's with 9 probes (Meyer et al. 2021)."""
    d, B, n = 30, 2000, 9
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=F64))
    M1 = U @ torch.diag(torch.tensor([100.0, 50.0, 20.0], dtype=F64)) @ U.T + 0.1 * torch.randn(
        d, d, generator=g, dtype=F64
    )
    f = lambda x: x @ M1.T
    x = torch.randn(B, d, dtype=F64)
    tr = float(M1.trace())
    hpp = divergence(f, x, "hutch++", n_probes=n, generator=torch.Generator().manual_seed(1))
    hut = divergence(f, x, "hutchinson", n_probes=n, generator=torch.Generator().manual_seed(2))
    assert hpp.matvecs == hut.matvecs == n
    var_hpp, var_hut = float(hpp.value.var()), float(hut.value.var())
    assert abs(float(hpp.value.mean()) - tr) < 4 * math.sqrt(var_hpp / B)
    assert abs(float(hut.value.mean()) - tr) < 4 * math.sqrt(var_hut / B)
    assert var_hpp < 0.05 * var_hut
    # its reported standard error (residual given Q) tracks its empirical spread within a factor 2
    ratio = float(hpp.std_error.pow(2).mean().sqrt()) / math.sqrt(var_hpp)
    assert 0.5 < ratio < 2.0


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_control_variate_removes_the_known_linear_part(method: str) -> None:
    """f(x) = c x + E x with c = -5 per sample: with control=c Gaussian probes and Hutch++ see only E (variance
    2 ||E_s||_F^2 for Gaussian Hutchinson), still unbiased."""
    d, B, n = 12, 3000, 6
    g = torch.Generator().manual_seed(2)
    E = 0.3 * torch.randn(d, d, generator=g, dtype=F64)
    c = torch.full((B,), -5.0, dtype=F64)
    f = lambda x: c[:, None] * x + x @ E.T
    x = torch.randn(B, d, dtype=F64)
    tr = -5.0 * d + float(E.trace())
    kw = dict(n_probes=n, probe="gaussian")
    plain = divergence(f, x, method, generator=torch.Generator().manual_seed(0), **kw)
    ctrl = divergence(f, x, method, generator=torch.Generator().manual_seed(0), control=c, **kw)
    for r in (plain, ctrl):
        assert abs(float(r.value.mean()) - tr) < 4 * float(r.value.std()) / math.sqrt(B)
    assert float(ctrl.value.var()) < 0.1 * float(plain.value.var())
    if method == "hutchinson":
        Es = 0.5 * (E + E.T)
        closed = 2 * float(Es.pow(2).sum()) / n
        assert abs(float(ctrl.value.var()) / closed - 1) < 0.1
    scalar = divergence(f, x, method, generator=torch.Generator().manual_seed(0), control=-5.0, **kw)
    torch.testing.assert_close(scalar.value, ctrl.value)
    with pytest.raises(ValueError, match="control"):
        divergence(f, x, method, control=torch.zeros(2, 2), **kw)


def test_hutchpp_exact_when_sketch_spans_space() -> None:
    f, M = linear_field(3, 4)
    x = torch.randn(3, 4, dtype=F64)
    res = divergence(f, x, "hutch++", n_probes=14, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.value, M.diagonal(dim1=1, dim2=2).sum(1))
    assert res.per_probe.shape == (14 - 2 * 4, 3)
    torch.testing.assert_close(res.per_probe.mean(0), res.value)


def test_stochastic_create_graph() -> None:
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    z = hutchinson_probes("rademacher", 3, x.detach(), torch.Generator().manual_seed(0))
    res = divergence(lambda v: v * torch.sin(v), x, "hutchinson", probes=z, create_graph=True)
    (g,) = torch.autograd.grad(res.value.sum(), x)
    # Rademacher z_i^2 = 1: z^T diag(sin x + x cos x) z is exactly the trace, its gradient 2 cos x - x sin x
    torch.testing.assert_close(g, 2 * torch.cos(x) - x * torch.sin(x))


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="trace"), "method"),
        (dict(mode="sideways"), "mode"),
        (dict(probe="uniform"), "probe"),
        (dict(chunk=0), "chunk"),
        (dict(method="hutch++", n_probes=2), "n_probes >= 3"),
        (dict(method="hutchinson", probes=torch.zeros(2, 3)), "probes must have shape"),
        (dict(method="hutchinson", n_probes=0), "n_probes"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        divergence(lambda z: z, torch.zeros(2, 3, dtype=F64), **kwargs)


@given(st.sampled_from(["x", "shape", "int"]))
def test_bad_x_and_f(case: str) -> None:
    with pytest.raises(ValueError):
        if case == "x":
            divergence(lambda z: z, torch.zeros(3))
        elif case == "shape":
            divergence(lambda z: z[:, :1], torch.zeros(2, 3))
        else:
            divergence(lambda z: z, torch.zeros(2, 3, dtype=torch.long))
