"""EDM Heun's last step (Karras et al. 2022, Algorithm 1, line 6: Euler only where the next sigma is 0) and its NFE.

Oracles that share no code with sdeflow's stepper:

* k-diffusion 0.1.1's own ``get_sigmas_karras`` and ``sample_heun`` (its ``sampling.py``, loaded without the package's
  heavy imports as in test_new_solvers.py; skipped when k-diffusion is not installed: it is not a project dependency,
  ``.venv/bin/pip install --no-deps k-diffusion==0.1.1.post1`` to run it), deterministic and with churn on the same
  noise;
* Algorithm 1 transcribed below (runs without k-diffusion);

both on the exact Gaussian-mixture denoiser D(x; sigma), on k-diffusion's sigmas with their final 0 (the last step is
Euler, 2N - 1 NFE) and without it (ending at sigma_min: every step a full Heun step, 2N NFE), through ``from_edm`` and
through a VP path in the scaled variables x / a. The NFE budget of ``sample`` is never exceeded.
"""

from __future__ import annotations

import pytest
import torch
from test_new_solvers import KD  # k-diffusion's sampling module, or None

import sdeflow as sf
from sdeflow.grids import time_grid
from sdeflow.integrations import from_edm
from sdeflow.noise import TensorNoise
from sdeflow.sampling import make_stepper
from sdeflow.sdes import EDMPath

F64 = torch.float64
MIX = dict(means=[[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], stds=[0.5, 0.6, 0.45], weights=[0.3, 0.4, 0.3])
SIGMA_MIN, SIGMA_MAX, N = 0.002, 80.0, 10
needs_kd = pytest.mark.skipif(KD is None, reason="k-diffusion is not installed (not a project dependency)")


class CountedD:
    """The exact mixture denoiser D(x; sigma) on EDM's path (a = 1, s = sigma), counting its calls."""

    def __init__(self) -> None:
        self.gmm, self.path, self.calls = sf.GaussianMixture(**MIX), EDMPath(SIGMA_MIN, SIGMA_MAX), 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.gmm.x0(x, sigma.to(F64).expand(x.shape[0]), self.path)


def karras(n: int, with_zero: bool) -> torch.Tensor:
    """The rho = 7 ramp from sigma_max to sigma_min (k-diffusion's get_sigmas_karras, written out), optionally + 0."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    hi, lo = SIGMA_MAX ** (1 / 7), SIGMA_MIN ** (1 / 7)
    sig = (hi + ramp * (lo - hi)) ** 7
    return torch.cat([sig, torch.zeros(1, dtype=F64)]) if with_zero else sig


def kd_sigmas(n: int, with_zero: bool) -> torch.Tensor:
    """k-diffusion's own get_sigmas_karras (ends in 0) in float64, or the same without the trailing 0."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # its linspace takes the default dtype
    try:
        sig = KD.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0)
    finally:
        torch.set_default_dtype(prev)
    assert sig.dtype == F64 and float(sig[-1]) == 0.0
    return sig if with_zero else sig[:-1]


def edm_algorithm_1(D, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1 (sigma(t) = t, s(t) = 1), lines 2-8: Heun, Euler where t_{i+1} = 0."""
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        d = (x - D(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_next != 0:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def x_T(batch: int = 8) -> torch.Tensor:
    return SIGMA_MAX * torch.randn(batch, 2, generator=torch.Generator().manual_seed(3), dtype=F64)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------------ k-diffusion
@needs_kd
@pytest.mark.parametrize("with_zero", [True, False], ids=["ends-at-0", "ends-at-sigma_min"])
def test_heun_equals_kdiffusion_sample_heun(with_zero):
    sigmas = kd_sigmas(N, with_zero)
    torch.testing.assert_close(sigmas, karras(N, with_zero), rtol=1e-14, atol=0)  # our transcription of its ramp
    D = CountedD()
    den = from_edm(D, SIGMA_MIN, SIGMA_MAX)
    ours = sf.sample(den, "heun", x_T=x_T(), grid=sigmas)
    ours_calls, D.calls = D.calls, 0
    theirs = KD.sample_heun(lambda x, s: D(x, s), x_T(), sigmas, disable=True)
    steps = len(sigmas) - 1
    assert ours.nfe == ours_calls == D.calls == (2 * steps - 1 if with_zero else 2 * steps)
    assert max_diff(ours.x, theirs) < 1e-10, max_diff(ours.x, theirs)
    # the budget that makes this grid: 2N - 1 ends at 0, 2N at sigma_min (and nothing else fits the tensor)
    budget = ours.nfe
    assert sf.sample(den, "heun", nfe=budget, x_T=x_T(), grid=sigmas).nfe == budget
    with pytest.raises(ValueError, match="does not fit the grid tensor"):
        sf.sample(den, "heun", nfe=budget + 2, x_T=x_T(), grid=sigmas)


@needs_kd
@pytest.mark.parametrize("with_zero", [True, False], ids=["ends-at-0", "ends-at-sigma_min"])
def test_heun_churn_equals_kdiffusion_on_the_same_noise(with_zero, monkeypatch):
    """Algorithm 2 (churn), k-diffusion's sample_heun draws randn_like(x) once per step (used when gamma > 0): feed it
    the draws sdeflow's TensorNoise hands the stepper. S_tmax < sigma_max: sdeflow caps sigma_hat at sigma(T)."""
    sigmas = kd_sigmas(N, with_zero)
    steps = len(sigmas) - 1
    z = torch.randn(steps, 1, 8, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    opts = dict(S_churn=5.0, S_tmin=0.05, S_tmax=50.0)
    D = CountedD()
    den = from_edm(D, SIGMA_MIN, SIGMA_MAX)
    ours = sf.sample(den, "heun", x_T=x_T(), grid=sigmas, noise=TensorNoise(z), **opts)
    draws = iter(z[:, 0])
    monkeypatch.setattr(KD.torch, "randn_like", lambda x: next(draws))
    kw = dict(s_churn=5.0, s_tmin=0.05, s_tmax=50.0)
    theirs = KD.sample_heun(lambda x, s: D(x, s), x_T(), sigmas, disable=True, **kw)
    assert max_diff(ours.x, theirs) < 1e-10, max_diff(ours.x, theirs)
    assert ours.nfe == (2 * steps - 1 if with_zero else 2 * steps)


# ------------------------------------------------------------------------------------------------ Algorithm 1
@pytest.mark.parametrize("with_zero", [True, False], ids=["ends-at-0", "ends-at-sigma_min"])
def test_heun_equals_edm_algorithm_1_through_from_edm(with_zero):
    sigmas = karras(N, with_zero)
    D = CountedD()
    ours = sf.sample(from_edm(D, SIGMA_MIN, SIGMA_MAX), "heun", x_T=x_T(), grid=sigmas)
    ours_calls, D.calls = D.calls, 0
    theirs = edm_algorithm_1(D, x_T(), sigmas)
    assert ours.nfe == ours_calls == D.calls == 2 * N - (1 if with_zero else 2)
    assert max_diff(ours.x, theirs) < 1e-10, max_diff(ours.x, theirs)


@pytest.mark.parametrize("with_zero", [True, False], ids=["ends-at-t=0", "ends-at-eps"])
def test_heun_on_vp_equals_edm_algorithm_1_in_scaled_variables(with_zero):
    """On the VP path (not EDM's): Algorithm 1 on x / a and sigma = s / a, the grid ending at t = 0 (s(0) = 0, sigma
    = 0, last step Euler) or at t = eps (sigma > 0, full Heun)."""
    sde = sf.VPSDE()
    gmm = sf.GaussianMixture(**MIX)
    den = gmm.denoiser(sde)
    grid = time_grid(sde, N - 1, "karras")
    if with_zero:
        grid = torch.cat([grid, torch.zeros(1, dtype=F64)])
    sigmas = sde.edm_sigma(grid)
    assert (float(sigmas[-1]) == 0.0) == with_zero

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # the denoiser in the scaled state x / a
        t = grid[int((sigmas - sigma).abs().argmin())]
        return gmm.x0(sde.alpha(t) * x, t, sde)

    xT = sde.prior_sample((8, 2), torch.Generator().manual_seed(4), dtype=F64)
    ours = sf.sample(den, "heun", x_T=xT, grid=grid)
    theirs = edm_algorithm_1(D, xT / sde.alpha(grid[0]), sigmas)
    assert ours.nfe == 2 * (len(grid) - 1) - (1 if with_zero else 0)
    assert max_diff(ours.x / sde.alpha(grid[-1]), theirs) < 1e-10


# ------------------------------------------------------------------------------------------------ NFE accounting
@pytest.mark.parametrize("t_end,grid", [(None, "karras"), (0.0, "uniform")], ids=["sigma_end>0", "sigma_end=0"])
def test_sample_never_spends_more_than_the_budget(t_end, grid):
    """sample(nfe=k) takes floor(k / 2) full Heun steps on a grid ending at sigma > 0 (an odd k leaves one call), and
    (k + 1) // 2 steps ending at sigma = 0 (an even k leaves one call); res.nfe is what the net was called."""
    D = CountedD()
    den = from_edm(D, SIGMA_MIN, SIGMA_MAX)
    zero = t_end == 0.0
    st = make_stepper(den, "heun")
    assert st.ends_at_zero_sigma(t_end) == zero
    for k in range(1, 14):
        if not zero and k == 1:
            with pytest.raises(ValueError, match=r"nfe=1 is too small for solver 'heun'.*at least 2"):
                sf.sample(den, "heun", nfe=1, x_T=x_T(2), t_end=t_end, grid=grid)
            continue
        D.calls = 0
        res = sf.sample(den, "heun", nfe=k, x_T=x_T(2), t_end=t_end, grid=grid)
        steps = (k + 1) // 2 if zero else k // 2
        assert st.num_steps(k, t_end) == res.stats["steps"] == steps
        assert res.nfe == D.calls == (2 * steps - 1 if zero else 2 * steps) <= k
        assert res.nfe >= k - 1  # at most one call is left over
        assert bool(torch.isfinite(res.x).all())


def test_denoise_final_takes_its_call_from_the_budget():
    D = CountedD()
    den = from_edm(D, SIGMA_MIN, SIGMA_MAX)
    res = sf.sample(den, "heun", nfe=9, x_T=x_T(2), denoise_final=True)  # 8 for 4 full steps + 1
    assert res.nfe == D.calls == 9 and res.stats["steps"] == 4


# ------------------------------------------------------------------------------------------------ Picard window
@pytest.mark.parametrize("with_zero", [True, False], ids=["ends-at-0", "ends-at-sigma_min"])
def test_parallel_heun_is_the_sequential_heun(with_zero):
    """The window evaluator follows the stepper: every full Heun step batched, the Euler step to sigma = 0 alone."""
    sigmas = karras(N, with_zero)
    den = from_edm(CountedD(), SIGMA_MIN, SIGMA_MAX)
    seq = sf.sample(den, "heun", x_T=x_T(), grid=sigmas)
    par = sf.sample(den, "parallel", base="heun", x_T=x_T(), grid=sigmas, window=4, tol=1e-15)
    assert max_diff(par.x, seq.x) < 1e-12
    assert par.stats["sequential_steps"] == int(with_zero)
    assert par.nfe == 2 * (par.stats["rounds"] - with_zero) + with_zero
