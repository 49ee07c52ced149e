"""The Denoiser and its one conversion table, tested against the defining relation x_t = a x0 + s eps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf
from sdeflow.denoiser import PREDICTIONS, convert

F64 = torch.float64
VP_KINDS = ("vp_linear", "vp_cosine", "vp_sigmoid", "discrete_linear", "discrete_cosine")


def col(c: torch.Tensor, ndim: int) -> torch.Tensor:
    return c.reshape(-1, *([1] * (ndim - 1)))


def truth(sde: sf.GaussianSDE, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every target at x_t = a x0 + s eps, written from the definitions (v: d/dphi of x_t / r, phi = atan2(s, a))."""
    a, s = col(sde.alpha(t), x0.ndim), col(sde.sigma(t), x0.ndim)
    phi = torch.atan2(s, a)
    v = -torch.sin(phi) * x0 + torch.cos(phi) * eps  # d/dphi (cos phi x0 + sin phi eps), checked by a difference below
    return {"x": a * x0 + s * eps, "eps": eps, "x0": x0, "score": -eps / s, "v": v, "a": a, "s": s}


def _draw(sde: sf.GaussianSDE, data: st.DataObject, shape=(6, 3)):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x0 = 3 * torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = torch.tensor(data.draw(st.lists(st.floats(sde.eps, sde.T), min_size=shape[0], max_size=shape[0])), dtype=F64)
    return x0, eps, t


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = float(expected.abs().max()) + 1e-300
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=rtol, atol=rtol * scale)


def test_velocity_is_derivative_of_rescaled_path():
    """The helper's v is d/dphi (cos phi x0 + sin phi eps): check it by a central difference in phi."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    phi, h = torch.tensor(0.7, dtype=F64), 1e-6
    path = lambda p: torch.cos(p) * x0 + torch.sin(p) * eps
    fd = (path(phi + h) - path(phi - h)) / (2 * h)
    np.testing.assert_allclose((-torch.sin(phi) * x0 + torch.cos(phi) * eps).numpy(), fd.numpy(), atol=1e-9)


@given(data=st.data())
def test_convert_matches_definitions(sde_kind, sde_strategy, data):
    """From the exact value of any target, convert() gives the exact value of every other target."""
    sde = data.draw(sde_strategy(sde_kind))
    x0, eps, t = _draw(sde, data)
    tr = truth(sde, x0, eps, t)
    for src, dst in itertools.product(PREDICTIONS, PREDICTIONS):
        out = convert(tr[src], tr["x"], tr["a"], tr["s"], src, dst)
        _close(out, tr[dst], rtol=1e-8)


@given(data=st.data())
def test_convert_round_trips(sde_kind, sde_strategy, data):
    """Any output (consistent or not) survives p -> q -> p, and the cycle eps -> x0 -> v -> score -> eps."""
    sde = data.draw(sde_strategy(sde_kind))
    x, out, t = _draw(sde, data, shape=(5, 2, 3))
    a, s = col(sde.alpha(t), x.ndim), col(sde.sigma(t), x.ndim)
    # each output at its natural scale (a score is ~ eps / s); otherwise x + s^2 score cancels by design
    outs = {p: out / s if p == "score" else out for p in PREDICTIONS}
    for p, q in itertools.product(PREDICTIONS, PREDICTIONS):
        back = convert(convert(outs[p], x, a, s, p, q), x, a, s, q, p)
        _close(back, outs[p], rtol=1e-8)
    for start in PREDICTIONS:
        cycle = PREDICTIONS[PREDICTIONS.index(start) :] + PREDICTIONS[: PREDICTIONS.index(start) + 1]
        y = outs[start]
        for p, q in zip(cycle[:-1], cycle[1:]):
            y = convert(y, x, a, s, p, q)
        _close(y, outs[start], rtol=1e-8)
    assert PREDICTIONS == ("eps", "x0", "v", "score")  # the cycle above is eps -> x0 -> v -> score -> eps


@given(data=st.data())
def test_v_is_salimans_ho_for_vp(data):
    """VP paths (a^2 + s^2 = 1): v = a eps - s x0 (Salimans & Ho 2022, eq. 4)."""
    kind = data.draw(st.sampled_from(VP_KINDS))
    sde = sf.VPSDE(schedule=kind[3:]) if kind.startswith("vp") else getattr(sf.DiscreteVPSDE, kind[9:])(1000)
    x0, eps, t = _draw(sde, data)
    a, s = col(sde.alpha(t), 2), col(sde.sigma(t), 2)
    x = a * x0 + s * eps
    _close(convert(eps, x, a, s, "eps", "v"), a * eps - s * x0, rtol=1e-10)
    _close(convert(a * eps - s * x0, x, a, s, "v", "x0"), x0, rtol=1e-8)


@given(data=st.data())
def test_v_for_ve_and_subvp(data):
    """VE (a = 1): v = (eps - sigma x0)/sqrt(1 + sigma^2); sub-VP: v = (a eps - s x0)/sqrt(a^2 + s^2)."""
    for sde in (sf.VESDE(0.01, 50.0), sf.SubVPSDE(0.1, 20.0)):
        x0, eps, t = _draw(sde, data)
        a, s = col(sde.alpha(t), 2), col(sde.sigma(t), 2)
        x = a * x0 + s * eps
        expected = (a * eps - s * x0) / torch.sqrt(a**2 + s**2)
        if isinstance(sde, sf.VESDE):
            expected = (eps - s * x0) / torch.sqrt(1 + s**2)
        _close(convert(eps, x, a, s, "eps", "v"), expected, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------- Denoiser


class RandomNet(torch.nn.Module):
    """A fixed random nonlinear map (B, *shape) -> (B, *shape) that also uses t; records its inputs."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=F64) / d**0.5)
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.detach().clone())
        flat = x.reshape(x.shape[0], -1).to(F64)
        return torch.tanh(flat @ self.w + t.to(F64)[:, None]).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 1, 3)])
def test_denoiser_targets_consistent(sde_kind, make_sde, prediction, shape):
    sde = make_sde(sde_kind)
    net = RandomNet(int(np.prod(shape[1:])))
    den = sf.Denoiser(net, sde, prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=F64)
    t = torch.linspace(sde.eps, sde.T, shape[0], dtype=F64)
    with torch.no_grad():
        raw = net(x, t)
        out = {p: getattr(den, p)(x, t) for p in PREDICTIONS}
        pred = den.predict(x, t)
    assert torch.equal(out[prediction], raw)  # the net's own target comes back untouched
    a, s = col(sde.alpha(t), x.ndim), col(sde.sigma(t), x.ndim)
    r = torch.sqrt(a**2 + s**2)
    _close(out["x0"], (x - s * out["eps"]) / a)
    _close(out["score"], -out["eps"] / s)
    _close(out["v"], (a * out["eps"] - s * out["x0"]) / r)
    _close(pred.x0, out["x0"])
    _close(pred.eps, out["eps"])
    for p in PREDICTIONS:
        assert out[p].shape == shape and out[p].dtype == F64


def test_denoiser_float32_state_with_float64_time(make_sde):
    sde = make_sde("vp_cosine")
    den = sf.Denoiser(RandomNet(3), sde, prediction="v")
    x = torch.randn(5, 3)
    for p in PREDICTIONS:
        y = getattr(den, p)(x, torch.full((5,), 0.3, dtype=F64))
        assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())


def test_nfe_counts_calls_not_batch_size(make_sde):
    sde = make_sde("vp_linear")
    den = sf.Denoiser(RandomNet(2), sde, prediction="x0")
    assert den.nfe == 0
    den.eps(torch.randn(512, 2, dtype=F64), 0.5)  # one batched call
    assert den.nfe == 1
    for i, p in enumerate(PREDICTIONS, start=2):
        getattr(den, p)(torch.randn(3, 2, dtype=F64), torch.full((3,), 0.2, dtype=F64))
        assert den.nfe == i
    den.predict(torch.randn(3, 2, dtype=F64), 0.5)
    den.raw(torch.randn(3, 2, dtype=F64), 0.5)
    assert den.nfe == 7 == len(den.net.calls)
    den.reset_nfe()
    assert den.nfe == 0
    den.v(torch.randn(3, 2, dtype=F64), 0.5)
    assert den.nfe == 1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_time_input_index(dtype):
    """Discrete models see the DDPM step index t*N - 1 (t_n = (n+1)/N <-> n)."""
    N = 1000
    sde = sf.DiscreteVPSDE.linear(N)
    net = RandomNet(2)
    den = sf.Denoiser(net, sde, prediction="eps", time_input="index")
    n = torch.tensor([0, 1, 499, 998, 999])
    x = torch.randn(5, 2, dtype=dtype)
    den.eps(x, (n + 1).to(F64) / N)
    np.testing.assert_allclose(net.calls[-1].double().numpy(), n.double().numpy(), atol=1e-9 if dtype == F64 else 1e-4)
    den.x0(x, 1.0)  # scalar t broadcasts to (batch,)
    assert net.calls[-1].shape == (5,) and bool((net.calls[-1] == N - 1).all())


def test_time_input_callable_and_continuous():
    sde = sf.VPSDE()
    net = RandomNet(2)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    x = torch.randn(3, 2, dtype=F64)
    sf.Denoiser(net, sde, time_input=lambda u: 999 * u).eps(x, t)
    np.testing.assert_allclose(net.calls[-1].numpy(), 999 * t.numpy(), rtol=1e-15)
    sf.Denoiser(net, sde).eps(x, t)
    assert torch.equal(net.calls[-1], t)
    sf.Denoiser(net, sde).eps(x, 0.25)
    assert torch.equal(net.calls[-1], torch.full((3,), 0.25, dtype=F64))


def test_plain_function_net_and_kwargs():
    sde = sf.VESDE()
    seen = {}

    def net(x, t, label=None):
        seen["label"] = label
        return torch.zeros_like(x)

    den = sf.Denoiser(net, sde, prediction="eps")
    x = torch.randn(2, 3, dtype=F64)
    np.testing.assert_allclose(den.x0(x, 0.5, label=7).numpy(), x.numpy())  # eps = 0 -> x0 = x / a = x for VE
    assert seen["label"] == 7


@pytest.mark.parametrize(
    "bad_out", [lambda x: x[:, :1], lambda x: x.reshape(-1), lambda x: x[None], lambda x: x.detach().numpy()]
)
def test_net_output_of_wrong_shape_raises(bad_out):
    den = sf.Denoiser(lambda x, t: bad_out(x), sf.VPSDE())
    with pytest.raises(ValueError, match="net output"):
        den.eps(torch.randn(4, 3), 0.5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prediction="noise"), "prediction"),
        (dict(prediction="EPS"), "prediction"),
        (dict(time_input="sigma"), "time_input"),
        (dict(time_input=5), "time_input"),
        (dict(time_input="index"), "time_input"),  # continuous SDE has no step count N
    ],
)
def test_bad_denoiser_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sf.Denoiser(RandomNet(2), sf.VPSDE(), **kwargs)


def test_bad_call_arguments(make_sde):
    den = sf.Denoiser(RandomNet(2), make_sde("vp_linear"), prediction="eps")
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="t must"):
        den.eps(x, torch.full((5,), 0.5, dtype=F64))  # (batch,) mismatch
    for p in PREDICTIONS:  # outside [0, T], even when no conversion is needed
        with pytest.raises(ValueError, match="t must"):
            getattr(den, p)(x, 1.5)
    a = s = torch.ones(())
    with pytest.raises(ValueError, match="source"):
        convert(x, x, a, s, "noise", "eps")
    with pytest.raises(ValueError, match="target"):
        convert(x, x, a, s, "eps", "velocity")
    with pytest.raises(TypeError, match="net"):
        sf.Denoiser(None, make_sde("vp_linear"))
    with pytest.raises(TypeError, match="sde"):
        sf.Denoiser(RandomNet(2), "vp")
