"""Shared test configuration: a hypothesis profile and one instance of every SDE class.

Fixtures (all session-scoped, so they mix with ``@given``):

* ``sde_kind``: a test that takes this argument runs once per entry of ``SDE_KINDS`` (one per SDE class/schedule).
* ``make_sde``: ``make_sde(kind)`` -> the default instance of that kind.
* ``sde_strategy``: ``sde_strategy(kind)`` -> a hypothesis strategy over instances with random schedule parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import sdeflow as sf

settings.register_profile(
    "sdeflow",
    max_examples=20,
    deadline=None,
    derandomize=True,  # reproducible CI runs; `--hypothesis-profile=explore` draws fresh examples
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", max_examples=300, deadline=None)
settings.load_profile("sdeflow")

# The suite runs many tiny tensor ops: on 2 shared cores a second intra-op thread only adds wake-up latency (a small
# softmax took 22 ms with 2 threads against 4 us with 1 on a loaded machine). Tests that need more set it themselves.
torch.set_num_threads(1)


def _rectified_flow(T: float = 0.999, eps: float = 1e-3) -> sf.GaussianPath:
    """The rectified-flow path a = 1 - t, s = t (Liu et al. 2022) as a generic GaussianPath (bisection inverse)."""
    return sf.GaussianPath(lambda t: torch.log1p(-t), lambda t: torch.log(t), T=T, eps=eps)


_DEFAULTS: dict[str, Callable[[], sf.GaussianSDE]] = {
    "vp_linear": lambda: sf.VPSDE(0.1, 20.0, "linear"),
    "vp_cosine": lambda: sf.VPSDE(schedule="cosine"),
    "vp_sigmoid": lambda: sf.VPSDE(schedule="sigmoid"),
    "subvp": lambda: sf.SubVPSDE(0.1, 20.0),
    "ve": lambda: sf.VESDE(0.01, 50.0),
    "discrete_linear": lambda: sf.DiscreteVPSDE.linear(1000),
    "discrete_cosine": lambda: sf.DiscreteVPSDE.cosine(1000),
    "gaussian_path": _rectified_flow,
}
SDE_KINDS = tuple(_DEFAULTS)

_f = st.floats  # shorthand


def _strategies() -> dict[str, st.SearchStrategy[sf.GaussianSDE]]:
    vp_lin = st.builds(lambda b0, db: sf.VPSDE(b0, b0 + db, "linear"), _f(0.01, 2.0), _f(0.5, 40.0))
    return {
        "vp_linear": vp_lin,
        "vp_cosine": st.builds(
            lambda s, T: sf.VPSDE(schedule="cosine", cosine_s=s, T=T), _f(1e-3, 0.05), _f(0.6, 0.9946)
        ),
        "vp_sigmoid": st.builds(
            lambda a, b, tau, d: sf.VPSDE(
                schedule="sigmoid", sigmoid_start=a, sigmoid_end=b, sigmoid_tau=tau, alpha_bar_min=d
            ),
            _f(-6.0, -0.5),
            _f(0.5, 6.0),
            _f(0.5, 2.0),
            _f(1e-6, 1e-2),
        ),
        "subvp": st.builds(lambda b0, db: sf.SubVPSDE(b0, b0 + db), _f(0.01, 2.0), _f(0.5, 40.0)),
        "ve": st.builds(lambda smin, r: sf.VESDE(smin, smin * 10**r), _f(1e-3, 1.0), _f(1.0, 5.0)),
        "discrete_linear": st.builds(
            lambda n, b0, b1: sf.DiscreteVPSDE.linear(n, b0, b1),
            st.integers(2, 1000),
            _f(1e-5, 1e-3),
            _f(5e-3, 5e-2),
        ),
        "discrete_cosine": st.builds(sf.DiscreteVPSDE.cosine, st.integers(2, 1000)),
        "gaussian_path": st.builds(lambda T: _rectified_flow(T=T), _f(0.9, 0.999)),
    }


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sde_kind" in metafunc.fixturenames:
        metafunc.parametrize("sde_kind", SDE_KINDS)


@pytest.fixture(scope="session")
def make_sde() -> Callable[[str], sf.GaussianSDE]:
    return lambda kind: _DEFAULTS[kind]()


@pytest.fixture(scope="session")
def sde_strategy() -> Callable[[str], st.SearchStrategy[sf.GaussianSDE]]:
    strategies = _strategies()
    return lambda kind: st.one_of(st.just(_DEFAULTS[kind]()), strategies[kind])


@pytest.fixture(scope="session")
def times() -> Callable[[sf.GaussianSDE], st.SearchStrategy[float]]:
    """times(sde): a strategy over t in [sde.eps, sde.T] (float64)."""
    return lambda sde: _f(sde.eps, sde.T, allow_nan=False)
