"""Parallel-in-time sampling (ParaDiGMS Picard windows) against the sequential run of the same stepper.

Oracle: the wrapped stepper's own sequential run with the same x_T and the same noise (the exact GMM denoiser, float64,
so there is no model error); Picard's fixed point IS that run, so tol -> 0 must reproduce it to float64 rounding.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

import sdeflow as sf
from sdeflow.noise import IIDNoise, TensorNoise
from sdeflow.parallel import AutoWindow, choose_window, picard_solve, prior_overhead, step_noise_variance
from sdeflow.solvers import SOLVERS
from sdeflow.solvers.base import SolverError

F64 = torch.float64

# (base, options, nfe): every wrapped stepper that has landed in SOLVERS
CASES = [
    ("euler", {}, 40),
    ("ddim", {}, 40),
    ("ddim", {"eta": 0.5}, 40),
    ("ddpm", {}, 40),
    ("euler_maruyama", {}, 40),
    ("heun", {}, 40),
    ("heun", {"S_churn": 10.0}, 40),
    ("pc", {}, 40),
    ("dpm_solver++", {}, 40),
    ("dpm_solver++", {"order": 3}, 40),
    ("dpm_solver++", {"sde": True}, 40),
]
CASES = [c for c in CASES if c[0] in SOLVERS]
IDS = [f"{b}{''.join(f'-{k}={v}' for k, v in o.items())}" for b, o, _ in CASES]


@pytest.fixture(scope="module")
def den() -> sf.Denoiser:
    g = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(3, 3, generator=g, dtype=F64)
    gmm = sf.GaussianMixture(means, torch.full((3,), 0.6, dtype=F64), torch.tensor([0.3, 0.3, 0.4], dtype=F64))
    return gmm.denoiser(sf.VPSDE())


@pytest.fixture(scope="module")
def x_T() -> torch.Tensor:
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_pair(den, x_T, base, opts, nfe, **par):
    seq = sf.sample(den, base, nfe=nfe, x_T=x_T, generator=gen(), **opts)
    res = sf.sample(den, "parallel", base=base, nfe=nfe, x_T=x_T, generator=gen(), **opts, **par)
    return seq, res


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square difference, shape (B,)."""
    return (a - b).reshape(a.shape[0], -1).pow(2).mean(1).sqrt()


# ------------------------------------------------------------------------------------------ agreement with sequential
@pytest.mark.parametrize("base,opts,nfe", CASES, ids=IDS)
def test_matches_sequential_within_tol(den, x_T, base, opts, nfe):
    tol = 0.1
    seq, res = run_pair(den, x_T, base, opts, nfe, window=16, tol=tol)
    steps = seq.stats["steps"]
    assert res.stats["steps"] == steps
    # the final error of a converged Picard solve is of the order of tol (in data units, x_T ~ N(0, I))
    assert float(rms(res.x, seq.x).mean()) <= tol
    assert res.stats["rounds"] < steps  # it actually ran in parallel
    assert res.stats["converged"]
    # NFE honesty: one batched call per net call of a step per round (Heun's grid ends at sigma(eps) > 0: every step
    # is a full Heun step, batched; a last Euler step to sigma = 0 runs on its own, tests/solvers/test_heun_edm.py)
    k = SOLVERS[base](den, **opts).nfe_per_step
    assert res.stats["sequential_steps"] == 0 and seq.nfe == k * steps
    assert res.nfe == k * res.stats["rounds"]
    assert res.stats["evaluations"] >= seq.nfe  # Picard never evaluates fewer steps than the sequential run


@pytest.mark.parametrize("base,opts,nfe", CASES, ids=IDS)
def test_tol_to_zero_reproduces_sequential(den, x_T, base, opts, nfe):
    seq, res = run_pair(den, x_T, base, opts, nfe, window=12, tol=1e-15)
    scale = float(seq.x.abs().max())
    assert float((res.x - seq.x).abs().max()) <= 64 * torch.finfo(F64).eps * max(1.0, scale)
    assert res.stats["rounds"] <= seq.stats["steps"]


@pytest.mark.parametrize("base,opts,nfe", CASES, ids=IDS)
def test_window_one_is_exactly_sequential(den, x_T, base, opts, nfe):
    seq, res = run_pair(den, x_T, base, opts, nfe, window=1, tol=0.1)
    assert torch.equal(res.x, seq.x)
    assert res.nfe == seq.nfe
    assert res.stats["rounds"] == seq.stats["steps"]


def test_error_shrinks_with_tol(den, x_T):
    seq = sf.sample(den, "ddim", nfe=100, x_T=x_T)
    errs = []
    for tol in (1e-2, 1e-4, 1e-6):
        res = sf.sample(den, "parallel", base="ddim", nfe=100, x_T=x_T, window=32, tol=tol)
        errs.append(float(rms(res.x, seq.x).max()))
        assert errs[-1] <= tol
    assert errs[0] > 10 * errs[1] > 100 * errs[2]


@pytest.mark.parametrize("base", ["ddpm", "euler_maruyama"])
def test_stochastic_path_equals_presampled_noise_run(den, x_T, base):
    """The parallel run draws step j's noise from the generator in step order: the sequential run fed the same draws
    as a TensorNoise follows the same Brownian path, so the two agree to rounding as tol -> 0."""
    if base not in SOLVERS:
        pytest.skip(f"{base} has not landed")
    steps = 50
    g = gen(3)
    z = torch.stack([torch.randn(1, *x_T.shape, generator=g, dtype=F64) for _ in range(steps)])
    seq = sf.sample(den, base, nfe=steps, x_T=x_T, noise=TensorNoise(z))
    res = sf.sample(den, "parallel", base=base, nfe=steps, x_T=x_T, generator=gen(3), window=16, tol=1e-15)
    assert float((res.x - seq.x).abs().max()) <= 1e-12
    other = sf.sample(den, base, nfe=steps, x_T=x_T, generator=gen(4))  # a different path is far away
    assert float((other.x - seq.x).abs().max()) > 1e-2


# ------------------------------------------------------------------------------------------ rounds and windows
@pytest.mark.parametrize("window,tol,nfe", [(2, 0.5, 7), (5, 1e-3, 23), (8, 0.1, 64), (64, 1e-8, 30), (3, 1e-12, 11)])
@pytest.mark.parametrize("base", ["ddim", "ddpm"])
def test_rounds_never_exceed_steps(den, x_T, base, window, tol, nfe):
    res = sf.sample(den, "parallel", base=base, nfe=nfe, x_T=x_T, generator=gen(), window=window, tol=tol)
    steps = res.stats["steps"]
    assert 1 <= res.stats["rounds"] <= steps
    assert res.nfe == res.stats["rounds"]
    assert res.stats["window"] == min(window, steps)
    assert res.stats["iterations"] <= min(window, steps)
    assert steps <= res.stats["evaluations"] <= res.stats["rounds"] * min(window, steps)


def test_max_iters_caps_the_sweeps(den, x_T):
    res = sf.sample(den, "parallel", base="ddim", nfe=40, x_T=x_T, window=8, tol=1e-12, max_iters=1)
    assert res.stats["rounds"] == 5  # every round accepts the whole window: plain block Jacobi with one sweep
    assert res.stats["iterations"] == 1 and res.stats["converged"] is False
    res = sf.sample(den, "parallel", base="ddim", nfe=40, x_T=x_T, window=8, tol=1e-12, max_iters=3)
    assert res.stats["iterations"] <= 3


def test_trajectory_and_callback(den, x_T):
    seq = sf.sample(den, "ddpm", nfe=30, x_T=x_T, generator=gen(), return_trajectory=True)
    seen = []
    res = sf.sample(
        den,
        "parallel",
        base="ddpm",
        nfe=30,
        x_T=x_T,
        generator=gen(),
        window=8,
        tol=1e-14,
        return_trajectory=True,
        callback=lambda p: seen.append((p["i"], p["x"].clone(), p["x0"])),
    )
    assert res.trajectory.shape == seq.trajectory.shape == (31, *x_T.shape)
    assert float((res.trajectory - seq.trajectory).abs().max()) <= 1e-12
    assert [i for i, _, _ in seen] == list(range(30))
    assert all(torch.equal(xi, res.trajectory[i + 1]) for i, xi, _ in seen)
    assert all(x0 is not None and x0.shape == x_T.shape for _, _, x0 in seen)


def test_step_noise_variance_is_the_ddpm_posterior_variance():
    n = 1000
    sde = sf.DiscreteVPSDE.linear(n)
    grid = torch.arange(n, 0, -1, dtype=F64) / n  # t = (m + 1)/N: every discrete timestep m = N-1 .. 0
    var = step_noise_variance(sde, grid)  # the steps m -> m - 1
    abar = sde.alphas_cumprod
    m = torch.arange(n - 1, 0, -1)
    beta = 1 - abar[m] / abar[m - 1]
    expected = (1 - abar[m - 1]) / (1 - abar[m]) * beta  # DDPM's beta-tilde (Ho et al. 2020, eq. 7)
    torch.testing.assert_close(var, expected, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------ window="auto"
def test_choose_window_from_costs():
    flat = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.05, 16: 1.1, 32: 1.3, 64: 2.0}  # latency-bound: batching is nearly free
    w = choose_window(flat)
    assert w >= 16
    speedup = {v: v * flat[1] / c / prior_overhead(v) for v, c in flat.items()}
    assert speedup[w] == max(speedup.values())
    assert choose_window({1: 1.0, 2: 2.0, 4: 4.1, 8: 8.3}) == 1  # compute-bound: no window pays
    assert choose_window({1: 1.0}) == 1
    mid = {1: 1.0, 8: 4.8}  # e(8) = 1.67: pays for DDIM (k0 = 1.47), not for DDPM (k0 = 1.71)
    assert choose_window(mid, stochastic=False) == 8 and choose_window(mid, stochastic=True) == 1


def test_auto_window_falls_back_when_the_overhead_eats_the_gain():
    aw = AutoWindow({1: 1.0, 16: 5.0})  # e(16) = 3.2 > prior k(16) = 1.67: start with W = 16
    assert aw.window == 16
    assert all(aw.keep_parallel(16, 2) for _ in range(15))  # k = 8, but a cold window gets W rounds
    assert not aw.keep_parallel(16, 2)
    aw = AutoWindow({1: 1.0, 16: 5.0})
    assert all(aw.keep_parallel(16, 1) for _ in range(3))  # the cold start: one step per round ...
    assert all(aw.keep_parallel(16, 12) for _ in range(30))  # ... then k ~ 1.4 < 3.2: parallel pays
    assert aw.keep_parallel(8, 1)  # the shrinking tail windows are not judged


def test_auto_fallback_continues_the_same_path(den, x_T):
    """After a fallback the remaining steps run one by one with the noise already drawn: still the same path."""
    from sdeflow.grids import time_grid

    steps = 60
    grid = time_grid(den.sde, steps)
    stepper = SOLVERS["ddpm"](den)
    seq = sf.solve(stepper, x_T, grid, IIDNoise(gen(5)))
    res = picard_solve(stepper, x_T, grid, IIDNoise(gen(5)), window=AutoWindow({1: 1.0, 16: 5.0}), tol=1e-13)
    assert 0 < res.stats["sequential_steps"] < steps
    assert res.stats["rounds"] <= steps
    assert float((res.x - seq.x).abs().max()) <= 1e-12


def test_auto_window_through_sample(den, x_T):
    res = sf.sample(den, "parallel", base="ddim", nfe=50, x_T=x_T, window="auto", tol=0.1)
    seq = sf.sample(den, "ddim", nfe=50, x_T=x_T)
    st = res.stats
    assert st["auto"] and set(st["costs"]) >= {1} and st["window"] >= 1
    assert res.nfe == st["rounds"] + st["calibration_nfe"]  # calibration calls are counted, not hidden
    assert float(rms(res.x, seq.x).mean()) <= 0.1
    again = sf.sample(den, "parallel", base="ddim", nfe=50, x_T=x_T, window="auto", tol=0.1)
    assert again.stats["calibration_nfe"] == 0  # measured once per net and configuration


# ------------------------------------------------------------------------------------------ input checks
@pytest.mark.parametrize(
    "opts,match",
    [
        ({"base": "nope"}, "base"),
        ({"base": "parallel"}, "base"),
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"window": 2.5}, "window"),
        ({"window": "big"}, "window"),
        ({"window": True}, "window"),
        ({"tol": 0}, "tol"),
        ({"tol": -0.1}, "tol"),
        ({"tol": math.nan}, "tol"),
        ({"tol": math.inf}, "tol"),
        ({"max_iters": 0}, "max_iters"),
        ({"group": "all"}, "group"),
        ({"eta": 2.0}, "eta"),  # the base solver validates its own options
    ],
)
def test_bad_input_raises(den, x_T, opts, match):
    with pytest.raises(ValueError, match=match):
        sf.sample(den, "parallel", nfe=10, x_T=x_T, **opts)


def test_base_stepper_instance(den, x_T):
    seq = sf.sample(den, "ddim", nfe=30, x_T=x_T, eta=0.3, generator=gen())
    res = sf.sample(den, "parallel", base=SOLVERS["ddim"](den, eta=0.3), nfe=30, x_T=x_T, generator=gen(), window=1)
    assert torch.equal(res.x, seq.x)
    other = sf.GaussianMixture(torch.zeros(1, 3, dtype=F64), torch.ones(1, dtype=F64)).denoiser(sf.VPSDE())
    with pytest.raises(ValueError, match="same denoiser"):
        sf.sample(den, "parallel", base=SOLVERS["ddim"](other), nfe=30, x_T=x_T)
    with pytest.raises(ValueError, match="base options"):
        sf.sample(den, "parallel", base=SOLVERS["ddim"](den), nfe=30, x_T=x_T, eta=0.5)


@pytest.mark.parametrize("base", ["rk45", "unipc", "dpm_solver", "torchsde", "adaptive_sde"])
def test_unsupported_bases_raise(den, x_T, base):
    if base not in SOLVERS:
        pytest.skip(f"{base} has not landed")
    with pytest.raises(ValueError, match="base"):
        sf.sample(den, "parallel", base=base, nfe=10, x_T=x_T)


def test_nonfinite_model_raises(x_T):
    sde = sf.VPSDE()
    den = sf.Denoiser(lambda x, t: torch.where(t[:, None] < 0.5, torch.full_like(x, math.nan), x), sde)
    with pytest.raises(SolverError, match="non-finite"):
        sf.sample(den, "parallel", base="ddim", nfe=20, x_T=x_T, window=8)


# ------------------------------------------------------------------------------------------ dtype and ranks
def test_float32(den, x_T):
    x32 = x_T.float()
    seq = sf.sample(den, "ddim", nfe=40, x_T=x32)
    res = sf.sample(den, "parallel", base="ddim", nfe=40, x_T=x32, window=16, tol=0.1)
    assert res.x.dtype == torch.float32
    assert float(rms(res.x, seq.x).mean()) <= 0.1


def _rank_main(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(3, 3, generator=g, dtype=F64)
    den = sf.GaussianMixture(means, torch.full((3,), 0.6, dtype=F64), torch.tensor([0.3, 0.3, 0.4], dtype=F64))
    den = den.denoiser(sf.VPSDE())
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    res = sf.sample(den, "parallel", base="ddpm", nfe=40, x_T=x, generator=gen(), window=7, tol=0.1, group=True)
    torch.save({"x": res.x, "rounds": res.stats["rounds"], "nfe": res.nfe}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def _launch_ranks(folder: str, world: int = 2) -> None:
    """Fork ``world`` gloo ranks from a fresh interpreter (forking the test process itself, whose OpenMP pool is
    already running, can deadlock; spawning re-imports torch per rank, which is slow)."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(world, folder), nprocs=world, start_method="fork")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_split_the_window(den, x_T):
    """Two processes split each window (7 steps: chunks of 4 and 3 + 1 pad) and both return the single-process
    result bit for bit."""
    import subprocess
    import sys

    single = sf.sample(den, "parallel", base="ddpm", nfe=40, x_T=x_T, generator=gen(), window=7, tol=0.1)
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as folder:
        code = f"import sys; sys.path.insert(0, {here!r}); import test_parallel as t; t._launch_ranks({folder!r})"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
        out = [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]
    for o in out:
        assert torch.equal(o["x"], single.x)
        assert o["rounds"] == single.stats["rounds"] == o["nfe"]  # one (half-size) call per round on each rank
