"""Public-API fuzz: random wrong shapes, dtypes, NaN / inf, out-of-range times and unknown names into the SDE and
GaussianMixture constructors and methods, ``Denoiser(...)`` and ``sdeflow.grids.time_grid``.

The property (issue 16): every call either raises a ValueError / TypeError whose message names the offending argument,
or returns a finite, sane result (a constructed SDE is probed on [eps, T]: finite a, s > 0, g^2 >= 0, a decreasing
log-SNR). A raw error from inside torch, a RuntimeError, or a NaN fails the test. ``OUTCOMES`` counts the cases; run
``pytest tests/test_validation.py -s`` to print the tally.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf
from sdeflow import sdes
from sdeflow.grids import time_grid

OUTCOMES: Counter[str] = Counter()

NAN, INF = float("nan"), float("inf")
# values that are wrong for almost every real-number argument, and a few that are fine
BAD_NUMBERS: list[Any] = [
    NAN,
    INF,
    -INF,
    -1.0,
    0.0,
    -0.0,
    1e308,
    5e-324,
    "abc",
    None,
    [1.0],
    1j,
    torch.tensor([1.0, 2.0]),
]
NUMBERS = st.one_of(
    st.sampled_from(BAD_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(1e-4, 50.0),
    st.sampled_from([0.1, 0.5, 1.0, 20.0, True, torch.tensor(0.3, dtype=torch.float64)]),
)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64])


def _finite(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return not (v.is_floating_point() or v.is_complex()) or bool(torch.isfinite(v).all())
    if isinstance(v, float):
        return math.isfinite(v)
    return True


def expect(
    call: Callable[[], Any],
    names: tuple[str, ...],
    check: Callable[[Any], None] | None = None,
    nan_in: bool = False,
) -> str:
    """Run ``call``: a ValueError / TypeError must name one of ``names``; a result must be finite (and pass ``check``)
    unless ``nan_in``: the hot-path methods (marginal, drifts, the oracle's score) pass a NaN *input* through, to be
    caught downstream (the trainer's divergence flag, the solvers' NaN guard), and never make a NaN from finite
    inputs. Any other exception propagates and fails the test."""
    OUTCOMES["cases"] += 1
    try:
        out = call()
    except (ValueError, TypeError) as err:
        msg = str(err)
        assert any(n in msg for n in names), f"{type(err).__name__} does not name any of {names}: {msg}"
        OUTCOMES["clear errors"] += 1
        return "error"
    if check is not None:
        check(out)
    elif not nan_in:
        assert _finite(out), f"non-finite result {out}"
    OUTCOMES["finite results"] += 1
    return "ok"


@pytest.fixture(scope="module", autouse=True)
def _tally() -> Iterator[None]:
    yield
    print(f"\nfuzz tally: {dict(OUTCOMES)}")


# ---------------------------------------------------------------------- SDE constructors
def probe_sde(sde: sf.GaussianSDE) -> None:
    """A constructed SDE must be usable: finite schedule on [eps, T], s > 0, g^2 >= 0, a strictly decreasing log-SNR,
    a finite positive prior std, and a log-SNR inverse that lands in [0, T]."""
    # eps < T, except a one-step DDPM schedule (N = 1: eps = 1/N = T)
    assert math.isfinite(sde.T) and math.isfinite(sde.eps) and 0 < sde.eps <= sde.T, (sde.eps, sde.T)
    assert sde.eps < sde.T or getattr(sde, "N", None) == 1
    t = torch.linspace(sde.eps, sde.T, 17, dtype=torch.float64)
    a, s, g2, f, lam = sde.alpha(t), sde.sigma(t), sde.g2(t[:-1]), sde.f(t[:-1]), sde.log_snr(t)
    zero_terminal = getattr(sde, "zero_terminal_snr", False)  # a(T) = 0: f = -inf, g^2 = inf on the last segment
    for name, v in (("alpha", a), ("sigma", s), ("g2", g2), ("f", f)):
        ok = ~torch.isnan(v) if zero_terminal and name in ("g2", "f") else torch.isfinite(v)
        assert bool(ok.all()), (sde, name, v)
    assert bool((s > 0).all()) and bool((a >= 0).all()) and bool((g2 >= 0).all()), (sde, a, s, g2)
    assert not bool(torch.isnan(lam).any()) and bool((lam[1:] <= lam[:-1]).all()), (sde, lam)
    assert math.isfinite(sde.prior_std()) and sde.prior_std() > 0, sde
    back = sde.t_from_log_snr(lam[:-1])
    assert bool(torch.isfinite(back).all()) and bool(((back >= 0) & (back <= sde.T)).all()), (sde, back)


def _maybe(name: str, strategy: st.SearchStrategy) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), strategy.map(lambda v: {name: v}))


def _kwargs(*names: str) -> st.SearchStrategy[dict[str, Any]]:
    parts = [_maybe(n, NUMBERS) for n in names]
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


@given(kw=_kwargs("beta_min", "beta_max", "T", "eps"))
def test_vpsde_linear_constructor(kw):
    expect(lambda: sf.VPSDE(schedule="linear", **kw), tuple(kw) or ("VPSDE",), probe_sde)


@given(kw=_kwargs("cosine_s", "T", "eps"))
def test_vpsde_cosine_constructor(kw):
    expect(lambda: sf.VPSDE(schedule="cosine", **kw), tuple(kw) or ("VPSDE",), probe_sde)


@given(kw=_kwargs("sigmoid_start", "sigmoid_end", "sigmoid_tau", "alpha_bar_min", "eps"))
def test_vpsde_sigmoid_constructor(kw):
    expect(lambda: sf.VPSDE(schedule="sigmoid", **kw), tuple(kw) or ("VPSDE",), probe_sde)


@given(schedule=st.sampled_from(["quadratic", "", None, 3, "Linear", ["linear"]]))
def test_vpsde_unknown_schedule(schedule):
    assert expect(lambda: sf.VPSDE(schedule=schedule), ("schedule",)) == "error"


@given(kw=_kwargs("beta_min", "beta_max", "eps"))
def test_subvpsde_constructor(kw):
    expect(lambda: sf.SubVPSDE(**kw), tuple(kw) or ("SubVPSDE",), probe_sde)


@given(kw=_kwargs("sigma_min", "sigma_max", "eps"))
def test_vesde_constructor(kw):
    expect(lambda: sf.VESDE(**kw), tuple(kw) or ("VESDE",), probe_sde)


BAD_BETAS: list[Any] = [
    [],
    [0.0, 0.1],
    [0.1, NAN],
    [0.1, INF],
    [-0.1, 0.2],
    [0.5, 1.5],
    [[0.1, 0.2], [0.3, 0.4]],
    "abc",
    None,
    [0.1, "x"],
    torch.tensor([0.1, 0.2], dtype=torch.complex64),
    torch.tensor([1, 0]),
    0.1,
]


@given(
    betas=st.one_of(
        st.sampled_from(BAD_BETAS),
        st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=6),
        st.lists(st.floats(1e-6, 0.5), min_size=1, max_size=6),
    )
)
def test_discrete_vpsde_betas(betas):
    expect(lambda: sf.DiscreteVPSDE(betas), ("betas",), probe_sde)


@given(n=st.sampled_from([0, -3, 2.5, "10", None, True, 4]), kw=_kwargs("beta_start", "beta_end"))
def test_discrete_vpsde_linear(n, kw):
    expect(lambda: sf.DiscreteVPSDE.linear(n, **kw), ("n", *kw), probe_sde)


@given(n=st.sampled_from([0, -3, 2.5, "10", None, 4, 50]), kw=_kwargs("s", "max_beta"))
def test_discrete_vpsde_cosine(n, kw):
    expect(lambda: sf.DiscreteVPSDE.cosine(n, **kw), ("n", *kw), probe_sde)


def _rf_la(t: torch.Tensor) -> torch.Tensor:
    return torch.log1p(-t)


def _rf_ls(t: torch.Tensor) -> torch.Tensor:
    return torch.log(t)


@given(
    kw=_kwargs("T", "eps"),
    fns=st.sampled_from(
        [
            (_rf_la, _rf_ls),
            (None, _rf_ls),
            (_rf_la, "log"),
            (lambda t: torch.zeros(3), _rf_ls),  # wrong shape
            (lambda t: torch.zeros_like(t), lambda t: torch.zeros_like(t)),  # constant log-SNR
            (lambda t: -t, lambda t: t),  # log-SNR = -2t: fine
            (lambda t: torch.log1p(-t), lambda t: torch.full_like(t, NAN)),  # NaN sigma
            (lambda t: 2 * t, lambda t: torch.log(t)),  # increasing alpha: log-SNR not monotone for small t
        ]
    ),
)
def test_gaussian_path_constructor(kw, fns):
    la, ls = fns
    kw = {"T": 0.999, **kw}
    expect(lambda: sf.GaussianPath(la, ls, **kw), ("log_alpha", "log_sigma", *kw), probe_sde)


@given(kw=_kwargs("shift", "eps"))
def test_flow_matching_path_constructor(kw):
    expect(lambda: sdes.FlowMatchingPath(**kw), tuple(kw) or ("FlowMatchingPath",), _probe_flow)


def _probe_flow(sde: sf.GaussianSDE) -> None:
    # T = 1 is a legitimate endpoint with a(1) = 0, lambda(1) = -inf: probe strictly inside
    t = torch.linspace(sde.eps, 0.999, 9, dtype=torch.float64)
    for v in (sde.alpha(t), sde.sigma(t), sde.g2(t), sde.log_snr(t)):
        assert bool(torch.isfinite(v).all()), (sde, v)


@given(kw=_kwargs("sigma_min", "sigma_max"))
def test_edm_path_constructor(kw):
    expect(lambda: sdes.EDMPath(**kw), tuple(kw) or ("EDMPath",), probe_sde)


# ---------------------------------------------------------------------- SDE methods
def _sdes() -> list[sf.GaussianSDE]:
    return [
        sf.VPSDE(),
        sf.VPSDE(schedule="cosine"),
        sf.VPSDE(schedule="sigmoid"),
        sf.SubVPSDE(),
        sf.VESDE(),
        sf.DiscreteVPSDE.linear(100),
        sf.GaussianPath(_rf_la, _rf_ls, T=0.999),
    ]


SDES = _sdes()
BAD_TIMES: list[Any] = [
    NAN,
    INF,
    -INF,
    -0.5,
    1.5,
    "abc",
    None,
    [0.5],
    1j,
    torch.tensor([0.5, NAN]),
    torch.tensor([0.2, 2.0]),
    torch.tensor(0.5, dtype=torch.complex64),
    torch.tensor([[0.5]]),
    torch.tensor([], dtype=torch.float64),
]
TIMES = st.one_of(st.sampled_from(BAD_TIMES), st.floats(-2.0, 2.0), st.floats(allow_nan=True, allow_infinity=True))


@given(
    sde=st.sampled_from(SDES), t=TIMES, method=st.sampled_from(["alpha", "sigma", "log_snr", "f", "g2", "edm_sigma"])
)
def test_schedule_methods_with_bad_times(sde, t, method):
    def check(v: torch.Tensor) -> None:
        # the log-SNR is +inf at t = 0 (s(0) = 0): an infinity at the path's end is the right answer, NaN never is
        assert _finite(v) if method != "log_snr" else not bool(torch.isnan(v).any()), v

    expect(lambda: getattr(sde, method)(t), ("t",), check)


@given(sde=st.sampled_from(SDES), lam=TIMES)
def test_t_from_log_snr(sde, lam):
    expect(lambda: sde.t_from_log_snr(lam), ("lam",))


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, fill: str) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if fill == "nan" and x.numel():
        x.view(-1)[0] = NAN
    if fill == "inf" and x.numel():
        x.view(-1)[-1] = INF
    return x.to(dtype)


TENSORS = st.builds(
    _tensor,
    st.sampled_from([(4, 2), (4, 3), (1, 2), (2,), (), (0, 2), (4, 1, 2)]),
    DTYPES,
    st.sampled_from(["ok", "ok", "nan", "inf"]),
)


@given(sde=st.sampled_from(SDES), x0=TENSORS, noise=TENSORS, t=st.one_of(TIMES, st.sampled_from([0.5, "batch"])))
def test_marginal(sde, x0, noise, t):
    if isinstance(t, str) and t == "batch":
        t = torch.full(x0.shape[:1], 0.5, dtype=torch.float64)
    expect(lambda: sde.marginal(x0, t, noise), ("x0", "noise", "t"), nan_in=not (_finite(x0) and _finite(noise)))


@given(sde=st.sampled_from(SDES), x=TENSORS, score=TENSORS, drift=st.sampled_from(["reverse", "probability_flow"]))
def test_drifts(sde, x, score, drift):
    fn = sde.reverse_drift if drift == "reverse" else sde.probability_flow_drift
    expect(lambda: fn(x, 0.5, score), ("x", "score"), nan_in=not (_finite(x) and _finite(score)))


@given(
    sde=st.sampled_from(SDES),
    shape=st.sampled_from([(4, 2), (0, 2), (-1, 2), (2.5,), "ab", None, [3, 2], (3, None), torch.Size([2, 2]), 5]),
    dtype=DTYPES,
)
def test_prior_sample(sde, shape, dtype):
    def check(x: torch.Tensor) -> None:
        assert x.dtype == dtype and tuple(x.shape) == (tuple(shape) if not isinstance(shape, int) else (shape,))
        assert _finite(x)

    expect(lambda: sde.prior_sample(shape, dtype=dtype), ("shape", "dtype"), check)


@given(sde=st.sampled_from(SDES), x=TENSORS)
def test_prior_log_prob(sde, x):
    def check(v: torch.Tensor) -> None:
        assert v.shape == x.shape[:1] and _finite(v)

    expect(lambda: sde.prior_log_prob(x), ("x",), check)


# ---------------------------------------------------------------------- GaussianMixture
BAD_MEANS: list[Any] = [
    [[0.0, 0.0], [1.0, NAN]],
    [[0.0, INF]],
    [0.0, 1.0],
    [],
    [[]],
    "abc",
    None,
    torch.zeros(2, 2, dtype=torch.complex64),
    [[0.0, 0.0], [1.0, 1.0]],
    torch.zeros(2, 2, dtype=torch.long),
]
BAD_STDS: list[Any] = [0.5, [0.5, 1.0], [[0.5, 0.5], [1.0, 1.0]], 0.0, -1.0, NAN, INF, [0.5], "abc", None, [0.5, NAN]]
BAD_WEIGHTS: list[Any] = [
    None,
    [0.5, 0.5],
    [0.3, 0.7],
    [NAN, 1.0],
    [INF, 0.0],
    [-0.5, 1.5],
    [1.0],
    [0.2, 0.2],
    "abc",
    [0.0, 0.0],
    [[0.5, 0.5]],
    1e-300,
]


@given(means=st.sampled_from(BAD_MEANS), stds=st.sampled_from(BAD_STDS), weights=st.sampled_from(BAD_WEIGHTS))
def test_gaussian_mixture_constructor(means, stds, weights):
    def check(g: sf.GaussianMixture) -> None:
        assert torch.isfinite(g.means).all() and (g.stds > 0).all() and torch.isfinite(g.stds).all()
        assert (g.weights >= 0).all() and abs(float(g.weights.sum()) - 1) < 1e-6
        x = g.sample(8, generator=torch.Generator().manual_seed(0))
        assert _finite(g.log_prob(x)) and _finite(g.score(x, 0.5, sf.VPSDE()))

    expect(lambda: sf.GaussianMixture(means, stds, weights), ("means", "stds", "weights"), check)


GMM = sf.GaussianMixture(torch.tensor([[-1.0, 0.0], [2.0, 1.0]]), torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.6]))


@given(x=TENSORS, method=st.sampled_from(["log_prob", "score", "eps", "x0", "marginal_log_prob"]), t=TIMES)
def test_gaussian_mixture_methods(x, method, t):
    sde = sf.VPSDE()
    fn = getattr(GMM, method)
    call = (lambda: fn(x)) if method == "log_prob" else (lambda: fn(x, t, sde))
    expect(call, ("x", "t", "sde"), nan_in=not _finite(x))


@given(n=st.sampled_from([0, 3, -1, 2.5, "3", None, True]), dtype=DTYPES)
def test_gaussian_mixture_sample(n, dtype):
    def check(x: torch.Tensor) -> None:
        assert x.dtype == dtype and x.shape == (n, 2) and _finite(x)

    expect(lambda: GMM.sample(n, dtype=dtype), ("n", "dtype"), check)


@given(prediction=st.sampled_from(["eps", "x0", "v", "score", "bogus", None, 3]))
def test_gaussian_mixture_denoiser(prediction):
    expect(lambda: GMM.denoiser(sf.VPSDE(), prediction), ("prediction",), lambda d: None)


# ---------------------------------------------------------------------- Denoiser and time_grid (others' modules)
def _net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@given(
    net=st.sampled_from([_net, None, "net", 3]),
    sde=st.sampled_from([sf.VPSDE(), sf.DiscreteVPSDE.linear(10), None, "vp"]),
    prediction=st.sampled_from(["eps", "x0", "v", "score", "bogus", None, 3, ""]),
    time_input=st.sampled_from(["t", "index", "bogus", None, 3, torch.exp]),
)
def test_denoiser_constructor(net, sde, prediction, time_input):
    expect(
        lambda: sf.Denoiser(net, sde, prediction=prediction, time_input=time_input),
        ("net", "sde", "prediction", "time_input"),
        lambda d: None,
    )


def _check_grid(sde: sf.GaussianSDE) -> Callable[[torch.Tensor], None]:
    def check(g: torch.Tensor) -> None:
        assert g.dtype == torch.float64 and g.ndim == 1 and g.numel() >= 2 and _finite(g)
        assert bool((g[1:] < g[:-1]).all()), g
        assert float(g[0]) <= sde.T + 1e-12 and float(g[-1]) >= 0

    return check


@given(
    sde=st.sampled_from(SDES),
    steps=st.sampled_from([1, 10, 0, -2, 2.5, "10", None, True]),
    kind=st.sampled_from(["uniform", "logsnr", "quadratic", "karras", "bogus", None, 3, "leading", "trailing"]),
    t_end=st.sampled_from([None, 0.0, 1e-3, -0.1, NAN, INF, 0.9999, "a"]),
    rho=st.sampled_from([7.0, 0.0, -1.0, NAN, INF]),
)
def test_time_grid(sde, steps, kind, t_end, rho):
    expect(
        lambda: time_grid(sde, steps, kind, t_end=t_end, rho=rho),
        ("steps", "kind", "t_end", "t_start", "rho", "spacing"),
        _check_grid(sde),
    )


@given(
    sde=st.sampled_from(SDES),
    grid=st.sampled_from(
        [
            torch.tensor([1.0, 0.5, 0.001]),
            torch.tensor([1.0, NAN, 0.001]),
            torch.tensor([0.5, 1.0]),
            torch.tensor([2.0, 0.5]),
            torch.tensor([1.0]),
            torch.tensor([[1.0, 0.5]]),
            torch.tensor([1, 0]),
            torch.tensor([1.0, 1.0, 0.5]),
        ]
    ),
)
def test_time_grid_tensor(sde, grid):
    expect(lambda: time_grid(sde, 10, grid), ("grid", "kind", "t"), _check_grid(sde))


# ---------------------------------------------------------------------- the cases, by name
def _gmm(**kw: Any) -> sf.GaussianMixture:
    args = {"means": [[0.0, 0.0], [1.0, 1.0]], "stds": [0.5, 0.5], "weights": [0.5, 0.5], **kw}
    return sf.GaussianMixture(args["means"], args["stds"], args["weights"])


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: _gmm(weights=[NAN, 1.0]), "weights must be finite"),
        (lambda: _gmm(weights=[INF, 0.0]), "weights must be finite"),
        (lambda: _gmm(weights=[-0.5, 1.5]), "weights must be non-negative"),
        (lambda: _gmm(weights=[0.2, 0.2]), "weights must sum to 1"),
        (lambda: _gmm(weights=[1.0]), r"weights must have shape \(K,\) = \(2,\)"),
        (lambda: _gmm(means=[[0.0, NAN], [1.0, 1.0]]), "means must be finite"),
        (lambda: _gmm(means=[0.0, 1.0]), r"means must have shape \(K, d\)"),
        (lambda: _gmm(stds=[0.5, NAN]), "stds must be positive and finite"),
        (lambda: _gmm(stds=[0.5, -1.0]), "stds must be positive and finite"),
        (lambda: _gmm(stds=[0.5, 0.5, 0.5]), r"stds must have shape \(K,\)"),
        (lambda: _gmm(means="abc"), "means must be a tensor"),
        (lambda: sf.VPSDE(beta_max=INF), r"beta_max must lie in \(0, 1e\+100\]"),
        (lambda: sf.VPSDE(beta_min=NAN), "beta_min must lie in"),
        (lambda: sf.VPSDE(beta_min=20.0, beta_max=0.1), "beta_min must be < beta_max"),
        (lambda: sf.VPSDE(T=NAN), "T must lie in"),
        (lambda: sf.VPSDE(eps=INF), "eps must be a positive finite number"),
        (lambda: sf.VPSDE(eps=5e-324), "eps must be >= 1e-100"),
        (lambda: sf.VPSDE(schedule="sigmoid", sigmoid_start=-INF), "sigmoid_start must be a finite number"),
        (lambda: sf.VPSDE(schedule="sigmoid", sigmoid_start=-2000.0), "sigmoid_start / sigmoid_tau"),
        (lambda: sf.VPSDE(schedule="cosine", cosine_s=1e308), r"cosine_s must lie in \(0, 100\]"),
        (lambda: sf.VPSDE(beta_min="0.1"), "beta_min must be a real number"),
        (lambda: sf.VPSDE(schedule=None), "schedule must be a string"),
        (lambda: sf.SubVPSDE(beta_max=INF), "beta_max must lie in"),
        (lambda: sf.VESDE(1.0, 0.5), "sigma_min must be < sigma_max"),
        (lambda: sf.VESDE(0.01, 0.01), "sigma_min must be < sigma_max"),
        (lambda: sf.VESDE(0.01, INF), "sigma_max must be a positive finite number"),
        (lambda: sf.VESDE(eps=2.0), "eps must be < T = 1.0"),
        (lambda: sf.DiscreteVPSDE([0.1, NAN]), r"betas must lie in \[1e-100, 1\)"),
        (lambda: sf.DiscreteVPSDE([[0.1, 0.2], [0.3, 0.4]]), "betas must be 1-D"),
        (lambda: sf.DiscreteVPSDE("abc"), "betas must be a 1-D sequence"),
        (lambda: sf.DiscreteVPSDE.linear(2.5), "n must be an int"),
        (lambda: sf.DiscreteVPSDE.linear(10, beta_start=0.0), r"beta_start must lie in \(0, 1\)"),
        (lambda: sf.DiscreteVPSDE.linear(4, beta_end=1e-68), r"beta_end=1e-68 give unusable betas: betas\[3\]"),
        (lambda: sf.VPSDE(schedule="sigmoid", alpha_bar_min=1e-300), r"alpha_bar_min must lie in \[1e-12, 1\)"),
        (lambda: sf.GaussianPath(_rf_la, _rf_ls, T=INF), "T must be a positive finite number"),
        (lambda: sf.GaussianPath(_rf_la, _rf_ls, T=0.5, eps=0.5), "eps must be < T = 0.5"),
        (lambda: sf.GaussianPath(_rf_la, _rf_ls, eps=NAN), "eps must be a positive finite number"),
        (lambda: sf.GaussianPath(_rf_la, "log", T=0.9), "log_sigma must be a callable"),
        (lambda: sf.GaussianPath(lambda t: torch.zeros_like(t), lambda t: torch.zeros_like(t)), "strictly decreasing"),
        (lambda: sf.GaussianPath(_rf_la, _rf_ls, T=1.0), r"log_alpha\(t\) must be finite"),
        (lambda: sf.VPSDE().prior_sample((4, -1)), "shape must be a tuple of non-negative ints"),
        (lambda: sf.VPSDE().prior_sample((4, 2), dtype=torch.int64), "dtype must be a floating-point"),
        (lambda: sf.VPSDE().marginal(torch.ones(4, 2, dtype=torch.long), 0.5, torch.ones(4, 2)), "x0 must be a float"),
        (lambda: sf.VPSDE().marginal(torch.ones(4, 2), torch.full((3,), 0.5), torch.ones(4, 2)), r"t must be a scalar"),
        (lambda: sf.VPSDE().reverse_drift(torch.ones(4, 2), 0.5, torch.ones(1, 2)), "score must have the shape of x"),
        (lambda: sf.VPSDE().sigma("abc"), "t must be a real number"),
        (lambda: sf.VPSDE().t_from_log_snr(NAN), "lam must not be NaN"),
        (lambda: GMM.score(torch.ones(4, 2, dtype=torch.long), 0.5, sf.VPSDE()), "x must be a floating-point"),
        (lambda: GMM.sample(2.5), "n must be an int"),
    ],
)
def test_named_errors(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_edges_that_now_give_finite_correct_values():
    """Silent NaNs the fuzz found, now exact: times within check_time's slack below 0, the log-SNR inverse at and
    beyond lambda(T) (overflowing exp), the mixture score at t = 0, a generic path's g^2 at s(0) = 0."""
    vp, sub = sf.VPSDE(), sf.SubVPSDE()
    assert float(vp.sigma(-1e-251)) == 0.0
    for sde in (vp, sub):
        lam = torch.tensor([-INF, -1e4, float(sde.log_snr(sde.T))], dtype=torch.float64)
        torch.testing.assert_close(sde.t_from_log_snr(lam), torch.full((3,), sde.T, dtype=torch.float64))
    # a saturated sigmoid schedule: lambda is flat near T to float64 precision, so any t there is an inverse; the
    # answer must map back to lambda(T) (it was NaN)
    flat = sf.VPSDE(schedule="sigmoid", sigmoid_tau=0.0625)
    lam_T = float(flat.log_snr(flat.T))
    back = flat.log_snr(flat.t_from_log_snr(torch.tensor([-INF, -1e4, lam_T], dtype=torch.float64)))
    torch.testing.assert_close(back, torch.full((3,), lam_T, dtype=torch.float64), rtol=0, atol=1e-6)
    # the SubVP inverse (its overflow-safe asinh branch) recovers the times it came from
    t = torch.tensor([1e-3, 0.3, 0.9, 0.999], dtype=torch.float64)
    torch.testing.assert_close(sub.t_from_log_snr(sub.log_snr(t)), t, rtol=1e-9, atol=1e-12)
    x = torch.tensor([[0.3, -0.2], [2.0, 1.0]], dtype=torch.float64)
    # t = 0: p_0 is the mixture itself, grad log p_0 = -sum_k r_k (x - mu_k)/sigma_k^2, checked against autograd
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(GMM.log_prob(xg).sum(), xg)
    torch.testing.assert_close(GMM.score(x, 0.0, vp), grad)
    rf = sf.GaussianPath(_rf_la, _rf_ls, T=0.999)
    assert abs(float(rf.g2(0.0))) < 1e-10  # s = t: g^2 = 2t + 2t^2/(1-t) -> 0
    assert float(sf.VPSDE().prior_log_prob(torch.zeros(0, 2)).numel()) == 0
