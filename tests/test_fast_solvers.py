"""Fast solvers (DPM-Solver, DPM-Solver++, UniPC, adaptive_sde) against independent oracles.

* the exponential-integrator core: phi_k against numerical quadrature of its integral, node weights exact for
  polynomials (scipy quad), the published 2-node weights;
* empirical orders 1-4 on VP, sub-VP, VE and discrete VP with exact mixture scores against a float64 DOP853 reference
  integrated in log-SNR (independent of the solvers' code);
* DPM-Solver-1 = DDIM(eta = 0) and SDE-DPM-Solver++1 = DDIM(eta = 1) to float64 rounding;
* multistep history and step plans against straightforward re-implementations of the papers' formulas (DPM-Solver
  Alg. 1/2, DPM-Solver++ Alg. 2 + the 3M Newton form, UniPC's linear system solved with numpy) for every nfe 1..8;
* NFE spent exactly as asked; per-sample time tensors; adaptive solvers (tolerance, per-sample steps); thresholding;
  prediction types; bad input; diffusers' schedulers (when installed) reproduced on their own grids.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import torch

import sdeflow as sf
from sdeflow.grids import time_grid
from sdeflow.integrate import solve
from sdeflow.noise import TensorNoise
from sdeflow.sampling import make_stepper
from sdeflow.solvers import MultistepStepper
from sdeflow.solvers.dpm_solver import nfe_split
from sdeflow.solvers.exponential import dynamic_threshold, lagrange_basis, phi, quadrature

F64 = torch.float64
SDES = {
    "vp": lambda: sf.VPSDE(0.1, 20.0),
    "subvp": lambda: sf.SubVPSDE(0.1, 20.0),
    "ve": lambda: sf.VESDE(0.01, 50.0),
    "discrete": lambda: sf.DiscreteVPSDE.linear(1000),
}
ALL_SDES = dict(SDES, vp_cosine=lambda: sf.VPSDE(schedule="cosine"), vp_sigmoid=lambda: sf.VPSDE(schedule="sigmoid"))
MIX = dict(means=[[-1.0, 0.5], [1.0, -0.5]], stds=[0.6, 0.8], weights=[0.5, 0.5])


def _x_T(sde, n=8, d=2, seed=1) -> torch.Tensor:
    return sde.prior_std() * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def lam_reference(gmm, sde, x_T: torch.Tensor, t_end: float) -> torch.Tensor:
    r"""DOP853 (rtol = atol = 1e-11) on :math:`d(x/s)/d\lambda = e^\lambda \hat x_0`: the probability-flow ODE in
    log-SNR, smooth even where f(t) is not (the discrete schedule)."""
    lam0, lam1 = float(sde.log_snr(sde.T)), float(sde.log_snr(t_end))
    shape = x_T.shape

    def rhs(lam, u):
        t = sde.t_from_log_snr(torch.tensor(lam, dtype=F64))
        x = torch.from_numpy(u).reshape(shape) * sde.sigma(t)
        return (math.exp(lam) * gmm.x0(x, t, sde)).reshape(-1).numpy()

    u0 = (x_T / sde.sigma(sde.T)).reshape(-1).numpy()
    sol = scipy.integrate.solve_ivp(rhs, (lam0, lam1), u0, method="DOP853", rtol=1e-11, atol=1e-11)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).reshape(shape) * sde.sigma(t_end)


_REFS: dict = {}


def _problem(kind: str):
    if kind not in _REFS:
        sde = SDES[kind]()
        gmm = sf.GaussianMixture(**MIX)
        x_T = _x_T(sde)
        _REFS[kind] = (sde, gmm.denoiser(sde), x_T, lam_reference(gmm, sde, x_T, sde.eps))
    return _REFS[kind]


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------------ the core
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_phi_matches_its_integral(k):
    for z in [-40.0, -3.0, -1.0, -0.999, -0.3, -1e-4, 0.0, 1e-7, 0.5, 1.0, 2.5]:
        exact = scipy.integrate.quad(
            lambda th: math.exp((1 - th) * z) * th ** (k - 1) / math.factorial(k - 1), 0, 1, epsabs=1e-300, epsrel=1e-13
        )[0]
        assert phi(k, z) == pytest.approx(exact, rel=1e-13, abs=1e-300)
    zs = torch.tensor([-40.0, -1.0, -0.3, 0.0, 0.5, 2.5], dtype=F64)
    torch.testing.assert_close(phi(k, zs), torch.tensor([phi(k, float(z)) for z in zs], dtype=F64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("kappa", [1.0, -1.0, -2.0])
@pytest.mark.parametrize("h", [0.05, 0.7, 2.0])
def test_quadrature_exact_for_polynomials(kappa, h):
    rng = np.random.default_rng(0)
    for nodes in ([0.0], [0.0, 0.5], [0.0, -0.8], [0.0, -0.7, -1.6], [0.0, 1 / 3, 2 / 3], [0.0, -0.9, -1.7, 1.0]):
        n = len(nodes)
        coef = rng.normal(size=n)
        poly = lambda tau: sum(c * (tau / h) ** j for j, c in enumerate(coef))
        exact = scipy.integrate.quad(
            lambda tau: math.exp(kappa * (h - tau)) * poly(tau), 0, h, epsabs=1e-300, epsrel=1e-13
        )[0]
        w = quadrature(nodes, h, kappa)
        approx = sum(wm * poly(r * h) for wm, r in zip(w, nodes))
        assert approx == pytest.approx(exact, rel=1e-12)
        basis = lagrange_basis(nodes)
        for m in range(n):  # L_m(r_i) = delta_mi
            for i, r in enumerate(nodes):
                assert sum(c * r**j for j, c in enumerate(basis[m])) == pytest.approx(float(m == i), abs=1e-12)


def test_two_node_rules_are_the_published_weights():
    """bh2 on nodes (0, r1) is DPM-Solver-2's (e^h - 1)/(2 r1) (Lu et al. 2022, Alg. 1) = DPM-Solver++(2M)'s midpoint
    rule; bh1 is UniPC's B(h) = h with a_1 = 1/2."""
    h, r1 = 0.8, 0.5
    w0, w1 = quadrature([0.0, r1], h, 1.0, "bh2")
    assert w1 == pytest.approx(math.expm1(h) / (2 * r1), rel=1e-14)
    assert w0 + w1 == pytest.approx(math.expm1(h), rel=1e-14)
    r = -0.7  # DPM-Solver++(2M): x0 weights (1 + 1/(2r)) and -1/(2r) times (1 - e^{-h}), r = h_prev/h = 0.7
    w0, w1 = quadrature([0.0, r], h, -1.0, "bh2")
    assert w0 == pytest.approx(-math.expm1(-h) * (1 + 1 / (2 * 0.7)), rel=1e-14)
    assert w1 == pytest.approx(math.expm1(-h) / (2 * 0.7), rel=1e-14)
    w0, w1 = quadrature([0.0, r], h, -1.0, "bh1")
    assert w1 == pytest.approx(0.5 * h / r, rel=1e-14)


# ------------------------------------------------------------------------------------------------ equivalences
@pytest.mark.parametrize("kind", list(ALL_SDES))
def test_dpm_solver_1_is_ddim(kind):
    sde = ALL_SDES[kind]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    x = _x_T(sde, 6)
    for grid in ("logsnr", "uniform"):
        g = time_grid(sde, 12, grid)
        a = solve(make_stepper(den, "dpm_solver", order=1), x, g).x
        b = solve(make_stepper(den, "ddim", eta=0.0), x, g).x
        c = solve(make_stepper(den, "dpm_solver++", order=1), x, g).x
        d = solve(make_stepper(den, "unipc", order=1, corrector=False), x, g).x
        scale = float(b.abs().max())
        for y in (a, c, d):
            assert float((y - b).abs().max()) <= 1e-13 * scale


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_sde_dpm_solver_pp_1_is_ddim_eta_1(kind):
    sde = SDES[kind]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    x, g = _x_T(sde, 6), time_grid(sde, 10, "logsnr")
    z = torch.randn(10, 1, 6, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    a = solve(make_stepper(den, "dpm_solver++", order=1, sde=True), x, g, TensorNoise(z)).x
    b = solve(make_stepper(den, "ddim", eta=1.0), x, g, TensorNoise(z)).x
    assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


# ------------------------------------------------------------------------------------------------ orders
ORDER_CASES = [
    ("dpm_solver", {"order": 1}),
    ("dpm_solver", {"order": 2}),
    ("dpm_solver", {"order": 3}),
    ("dpm_solver++", {"order": 2}),
    ("dpm_solver++", {"order": 3}),
    ("unipc", {"order": 1}),
    ("unipc", {"order": 2}),
    ("unipc", {"order": 3}),
]


@pytest.mark.parametrize("kind", list(SDES))
def test_empirical_orders(kind):
    """Slope of log error vs log steps on 32, 64, 128 log-SNR steps within 0.3 of the declared order (1 to 4)."""
    sde, den, x_T, ref = _problem(kind)
    report = []
    for name, opts in ORDER_CASES:
        st = make_stepper(den, name, **opts)
        ns = (32, 64, 128)
        errs = [_rms(solve(st, x_T, time_grid(sde, n, "logsnr")).x, ref) for n in ns]
        slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
        report.append((name, opts, st.order, round(float(slope), 2), errs))
        assert min(errs) > 1e-10  # above the reference's accuracy
    bad = [r for r in report if abs(r[3] - r[2]) > 0.3]
    assert not bad, bad


# ------------------------------------------------------------------------------------------------ reference implementations
def _coords(sde, t):
    t = torch.as_tensor(t, dtype=F64)
    return float(sde.log_snr(t)), float(sde.alpha(t)), float(sde.sigma(t))


def _ref_plan(steps: int, order: int, lof: bool) -> list[int]:
    return [min(order, i + 1, steps - i if (lof and steps < 15) else order) for i in range(steps)]


def ref_dpm_solver_pp(den, sde, grid, x, order, solver_type, lof):
    """DPM-Solver++(1/2M/3M), Lu et al. 2022b Alg. 2; 3M: the quadratic through the last three x0 in Newton form,
    integrated exactly (weights h phi_1, h phi_2, 2 h phi_3 at -h written out with expm1)."""
    K = grid.numel() - 1
    ms, lams = [], []
    for i, k in enumerate(_ref_plan(K, order, lof)):
        l0, _, s0 = _coords(sde, grid[i])
        l1, a1, s1 = _coords(sde, grid[i + 1])
        ms.insert(0, den.x0(x, grid[i]))
        lams.insert(0, l0)
        h = l1 - l0
        em = math.expm1(-h)
        k = min(k, len(ms))
        if k == 1:
            x = s1 / s0 * x - a1 * em * ms[0]
        elif k == 2:
            r = (lams[0] - lams[1]) / h
            if solver_type == "midpoint":
                x = s1 / s0 * x - a1 * em * ((1 + 1 / (2 * r)) * ms[0] - 1 / (2 * r) * ms[1])
            else:
                x = s1 / s0 * x - a1 * em * ms[0] + a1 * (em / h + 1) * (ms[0] - ms[1]) / r
        else:
            r0, r1 = (lams[0] - lams[1]) / h, (lams[1] - lams[2]) / h
            d10, d11 = (ms[0] - ms[1]) / r0, (ms[1] - ms[2]) / r1
            D1 = d10 + r0 / (r0 + r1) * (d10 - d11)
            D2 = (d10 - d11) / (r0 + r1)
            x = s1 / s0 * x - a1 * em * ms[0] + a1 * (em / h + 1) * D1 + 2 * a1 * (0.5 - (h + em) / h**2) * D2
    return x


def _unipc_update(x, m_hist, lam_hist, l0, l1, s0, s1, a0, a1, order, variant, predict_x0, m_new=None):
    """UniPC's bh update as written in the paper (eq. 9: R a = phi/B solved with numpy; a = 1/2 when one unknown)."""
    h = l1 - l0
    hh = -h if predict_x0 else h
    m0 = m_hist[0]
    rks = [(lam_hist[j] - l0) / h for j in range(1, order)] + [1.0]
    D1s = [(m_hist[j] - m0) / rks[j - 1] for j in range(1, order)]
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B = hh if variant == "bh1" else math.expm1(hh)
    R, b, fact = [], [], 1
    for i in range(1, order + 1):
        R.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * fact / B)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = np.array(R), np.array(b)
    if predict_x0:
        base, c = s1 / s0 * x - a1 * h_phi_1 * m0, -a1 * B
    else:
        base, c = a1 / a0 * x - s1 * h_phi_1 * m0, -s1 * B
    if m_new is None:  # predictor UniP
        if order == 1:
            return base
        rho = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        return base + c * sum(float(r) * d for r, d in zip(rho, D1s))
    rho = [0.5] if order == 1 else np.linalg.solve(R, b)  # corrector UniC
    res = sum((float(r) * d for r, d in zip(rho[:-1], D1s)), 0 * x) + float(rho[-1]) * (m_new - m0)
    return base + c * res


def ref_unipc(den, sde, grid, x, order, variant, lof, corrector=True, predict_x0=True):
    K = grid.numel() - 1
    model = den.x0 if predict_x0 else den.eps
    ms, lams, prev = [], [], None
    for i, k in enumerate(_ref_plan(K, order, lof)):
        l0, a0, s0 = _coords(sde, grid[i])
        l1, a1, s1 = _coords(sde, grid[i + 1])
        m = model(x, grid[i])
        if corrector and prev is not None:
            xp, lp, ap, sp, kp = prev
            x = _unipc_update(xp, ms, lams, lp, l0, sp, s0, ap, a0, kp, variant, predict_x0, m_new=m)
        ms.insert(0, m)
        lams.insert(0, l0)
        k = min(k, len(ms))
        prev = (x, l0, a0, s0, k)
        x = _unipc_update(x, ms, lams, l0, l1, s0, s1, a0, a1, k, variant, predict_x0)
    return x


def ref_dpm_solver(den, sde, grid, x, plan):
    """DPM-Solver-1/2/3, Lu et al. 2022 Alg. 1 (r1 = 1/2) and Alg. 2 (r1 = 1/3, r2 = 2/3), noise prediction."""
    for i, k in enumerate(plan):
        s, t = grid[i], grid[i + 1]
        ls, a_s, _ = _coords(sde, s)
        lt, a_t, s_t = _coords(sde, t)
        h = lt - ls
        e0 = den.eps(x, s)

        def at(r):
            tr = sde.t_from_log_snr(torch.tensor(ls + r * h, dtype=F64))
            return (tr,) + _coords(sde, tr)[1:]

        if k == 1:
            x = a_t / a_s * x - s_t * math.expm1(h) * e0
        elif k == 2:
            r1 = 0.5
            t1, a1, s1 = at(r1)
            u = a1 / a_s * x - s1 * math.expm1(r1 * h) * e0
            e1 = den.eps(u, t1)
            x = a_t / a_s * x - s_t * math.expm1(h) * e0 - s_t / (2 * r1) * math.expm1(h) * (e1 - e0)
        else:
            r1, r2 = 1 / 3, 2 / 3
            t1, a1, s1 = at(r1)
            t2, a2, s2 = at(r2)
            u1 = a1 / a_s * x - s1 * math.expm1(r1 * h) * e0
            D1 = den.eps(u1, t1) - e0
            u2 = a2 / a_s * x - s2 * math.expm1(r2 * h) * e0 - s2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * D1
            D2 = den.eps(u2, t2) - e0
            x = a_t / a_s * x - s_t * math.expm1(h) * e0 - s_t / r2 * (math.expm1(h) / h - 1) * D2
    return x


def _nfe_run(den, solver, nfe, x, **opts):
    den.reset_nfe()
    res = sf.sample(den, solver, nfe=nfe, x_T=x, **opts)
    assert res.nfe == nfe == den.nfe, (solver, opts, nfe, res.nfe)
    return res


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_multistep_history_matches_the_papers_formulas(kind):
    sde = SDES[kind]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    x = _x_T(sde, 4)
    for nfe in range(1, 9):
        g = time_grid(sde, nfe, "logsnr")
        for order in (1, 2, 3):
            for lof in (True, False):
                for st in ("midpoint", "taylor"):
                    ours = _nfe_run(
                        den, "dpm_solver++", nfe, x, order=order, solver_type=st, lower_order_final=lof, grid="logsnr"
                    ).x
                    ref = ref_dpm_solver_pp(den, sde, g, x, order, st, lof)
                    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
                for variant in ("bh1", "bh2"):
                    ours = _nfe_run(
                        den, "unipc", nfe, x, order=order, variant=variant, lower_order_final=lof, grid="logsnr"
                    ).x
                    ref = ref_unipc(den, sde, g, x, order, variant, lof)
                    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
        for opts in ({"corrector": False}, {"predict_x0": False}):
            ours = _nfe_run(den, "unipc", nfe, x, order=3, variant="bh1", grid="logsnr", **opts).x
            ref = ref_unipc(den, sde, g, x, 3, "bh1", True, **opts)
            torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)


def test_multistep_lower_order_final_only_below_15_steps():
    sde = SDES["vp"]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    x = _x_T(sde, 4)
    for nfe in (14, 15):
        a = _nfe_run(den, "dpm_solver++", nfe, x, order=3, lower_order_final=True).x
        b = _nfe_run(den, "dpm_solver++", nfe, x, order=3, lower_order_final=False).x
        assert bool((a == b).all()) == (nfe >= 15)


@pytest.mark.parametrize("kind", ["vp", "discrete"])
def test_singlestep_plan_and_steps_match_the_paper(kind):
    """NFE n: the paper's split (order 3: K = n//3 + 1 steps, [3,...,3,2,1] / [.., 1] / [.., 2]), exactly n net calls,
    and every step equal to Algorithms 1 and 2."""
    assert nfe_split(10, 3) == [3, 3, 3, 1] and nfe_split(9, 3) == [3, 3, 2, 1] and nfe_split(11, 3) == [3, 3, 3, 2]
    assert nfe_split(7, 2) == [2, 2, 2, 1] and nfe_split(8, 2) == [2] * 4 and nfe_split(3, 1) == [1] * 3
    sde = SDES[kind]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    x = _x_T(sde, 4)
    for order in (1, 2, 3):
        for nfe in range(1, 13):
            plan = nfe_split(nfe, order)
            assert sum(plan) == nfe and max(plan) <= order
            ours = _nfe_run(den, "dpm_solver", nfe, x, order=order, grid="logsnr").x
            ref = ref_dpm_solver(den, sde, time_grid(sde, len(plan), "logsnr"), x, plan)
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_nfe_is_exact_for_every_variant():
    sde = SDES["vp"]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    x = _x_T(sde, 3)
    for nfe in (1, 2, 5, 7, 16):
        for solver, opts in [
            ("dpm_solver", {"order": 3, "solver_type": "taylor"}),
            ("dpm_solver", {"predict_x0": True}),
            ("dpm_solver++", {"sde": True}),
            ("unipc", {"predict_x0": False}),
        ]:
            _nfe_run(den, solver, nfe, x, generator=torch.Generator().manual_seed(0), **opts)
        _nfe_run(den, "dpm_solver++", nfe, x, denoise_final=True) if nfe > 1 else None


# ------------------------------------------------------------------------------------------------ per-sample times
PER_SAMPLE = [
    ("dpm_solver", {"order": 1}),
    ("dpm_solver", {"order": 2}),
    ("dpm_solver", {"order": 3}),
    ("dpm_solver", {"order": 3, "adaptive": True}),
    ("dpm_solver++", {"order": 2}),
    ("dpm_solver++", {"sde": True}),
    ("unipc", {"order": 2}),
    ("adaptive_sde", {}),
]


@pytest.mark.parametrize("kind", list(SDES))
def test_per_sample_times_equal_scalar_steps(kind):
    """step() with times batched along the leading axis (parallel-in-time, per-sample adaptive) equals the scalar
    steps of each sample."""
    sde = SDES[kind]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    B = 4
    x = _x_T(sde, B)
    t0 = torch.tensor([1.0, 0.7, 0.31, 0.05], dtype=F64) * sde.T
    t1 = torch.tensor([0.9, 0.4, 0.30, 0.01], dtype=F64) * sde.T
    z = torch.randn(1, B, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

    def first(st, x, t0, t1):  # a multistep method's state for its first step (it refuses to step without one)
        return st.init(x, torch.stack([t0.max(), t1.min()])) if isinstance(st, MultistepStepper) else None

    for name, opts in PER_SAMPLE:
        st = make_stepper(den, name, **opts)
        res = st.step(t0, t1, x, first(st, x, t0, t1), z if st.noise_draws else None)
        for b in range(B):
            xb, zb = x[b : b + 1], z[:, b : b + 1] if st.noise_draws else None
            one = st.step(t0[b], t1[b], xb, first(st, xb, t0[b], t1[b]), zb)
            torch.testing.assert_close(res.x[b : b + 1], one.x, rtol=1e-12, atol=1e-12, msg=f"{name}{opts}")
            if res.error is not None:
                torch.testing.assert_close(res.error[b : b + 1], one.error, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------ adaptive
@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_dpm_solver(kind, order):
    sde, den, x_T, ref = _problem(kind)
    nfes, errs = [], []
    for tol in (1e-2, 1e-3, 1e-4):
        res = sf.sample(den, "dpm_solver", x_T=x_T, adaptive=True, order=order, rtol=tol, atol=tol)
        err = float(((res.x - ref).abs() / (1 + ref.abs())).max())
        nfes.append(res.nfe)
        errs.append(err)
        assert err < 30 * tol, (tol, err)
        acc = res.stats["accepted_per_sample"]
        assert int(acc.max()) > int(acc.min()), "per-sample step sizes should give per-sample step counts"
        assert res.nfe == res.stats["rounds"] * order  # 2 (DPM-Solver-12) or 3 (-23) evaluations per round
    assert nfes[0] < nfes[1] < nfes[2] and errs[0] > errs[2]


def test_adaptive_sde_matches_the_exact_law_in_high_dimension():
    """Gaussian data N(mu, S^2 I) in d = 32 from the exact p_T: the output matches p_{t_end} (mean, variance) within
    Monte-Carlo error; looser tolerance, fewer NFE; rejections reported."""
    sde = SDES["vp"]()
    d, B, mu, S = 32, 256, 0.3, 0.5
    den = sf.GaussianMixture(torch.full((1, d), mu, dtype=F64), [S]).denoiser(sde)
    g = torch.Generator().manual_seed(0)
    aT, sT = float(sde.alpha(sde.T)), float(sde.sigma(sde.T))
    x_T = aT * mu + math.sqrt(aT**2 * S**2 + sT**2) * torch.randn(B, d, generator=g, dtype=F64)
    ae, se = float(sde.alpha(sde.eps)), float(sde.sigma(sde.eps))
    nfes = []
    for rtol in (0.1, 0.03):
        res = sf.sample(
            den, "adaptive_sde", x_T=x_T, rtol=rtol, atol=rtol / 5, generator=torch.Generator().manual_seed(1)
        )
        nfes.append(res.nfe)
        assert res.stats["rejected"] > 0 and res.nfe == 2 * res.stats["rounds"]
        v_ratio = float(res.x.var(0).mean()) / (ae**2 * S**2 + se**2)
        assert abs(v_ratio - 1) < 0.08, v_ratio  # MC: 1.6 % per-dimension average
        assert abs(float(res.x.mean()) - ae * mu) < 0.03
    assert nfes[0] < nfes[1]


def test_adaptive_sde_norm_and_controller_are_the_papers():
    den = sf.GaussianMixture(**MIX).denoiser(SDES["vp"]())
    st = make_stepper(den, "adaptive_sde", rtol=0.05, atol=0.01, exponent=0.9, safety=0.9)
    g = torch.Generator().manual_seed(2)
    x_old, x_new, err = (torch.randn(3, 5, generator=g, dtype=F64) for _ in range(3))
    delta = torch.maximum(torch.full_like(x_old, 0.01), 0.05 * torch.maximum((x_new + err).abs(), x_old.abs()))
    expect = ((err / delta) ** 2).mean(1).sqrt()
    torch.testing.assert_close(st.error_norm(err, x_old, x_new, 0.05, 0.01), expect)
    E = torch.tensor([0.3, 0.9, 2.0], dtype=F64)
    fac = st.controller.factor(E, torch.ones(3, dtype=F64), st.error_order)
    torch.testing.assert_close(fac, torch.minimum(0.9 * E**-0.9, torch.tensor([1e3, 1e3, 1.0], dtype=F64)))


# ------------------------------------------------------------------------------------------------ options, dtypes, inputs
def test_dynamic_thresholding():
    g = torch.Generator().manual_seed(0)
    x0 = 3 * torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    y = dynamic_threshold(x0, 0.9, 1.0)
    assert float(y.abs().max()) <= 1.0 + 1e-12
    s = torch.quantile(x0.reshape(5, -1).abs(), 0.9, dim=1).clamp(min=1.0)
    torch.testing.assert_close(
        y, torch.maximum(torch.minimum(x0, s[:, None, None, None]), -s[:, None, None, None]) / s[:, None, None, None]
    )
    inside = 0.5 * torch.tanh(x0)
    assert torch.equal(dynamic_threshold(inside, 0.995, 1.0), inside)
    # a solve whose x0 predictions stay in [-1, 1] is unchanged; one outside is pulled in
    sde = SDES["vp"]()
    den = sf.GaussianMixture([[0.4, -0.3], [-0.2, 0.1]], [0.1, 0.1]).denoiser(sde)
    x = _x_T(sde, 4)
    for solver in ("dpm_solver++", "unipc"):
        a = sf.sample(den, solver, nfe=8, x_T=x).x
        b = sf.sample(den, solver, nfe=8, x_T=x, thresholding=True).x
        assert torch.equal(a, b)
    far = sf.GaussianMixture([[3.0, -3.0]], [0.1]).denoiser(sde)
    c = sf.sample(far, "dpm_solver++", nfe=8, x_T=x, thresholding=True, threshold_max=1.0).x
    assert float(c.abs().max()) < 1.05


@pytest.mark.parametrize("prediction", ["x0", "v", "score"])
def test_prediction_types_give_the_same_solution(prediction):
    sde = SDES["ve"]() if prediction == "score" else SDES["vp"]()
    gmm = sf.GaussianMixture(**MIX)
    x = _x_T(sde, 4)
    for solver, opts in [("dpm_solver", {}), ("dpm_solver++", {"order": 3}), ("unipc", {})]:
        a = sf.sample(gmm.denoiser(sde), solver, nfe=9, x_T=x, **opts).x
        b = sf.sample(gmm.denoiser(sde, prediction=prediction), solver, nfe=9, x_T=x, **opts).x
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_float32_follows_float64():
    sde = SDES["vp"]()
    den = sf.GaussianMixture(**MIX).denoiser(sde)
    x = _x_T(sde, 16)
    for solver in ("dpm_solver", "dpm_solver++", "unipc"):
        a = sf.sample(den, solver, nfe=15, x_T=x).x
        b = sf.sample(den, solver, nfe=15, x_T=x.float()).x
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4)


def test_bad_options_raise():
    den = sf.GaussianMixture(**MIX).denoiser(SDES["vp"]())
    cases = [
        ("dpm_solver", {"order": 4}, "order"),
        ("dpm_solver", {"solver_type": "heun"}, "solver_type"),
        ("dpm_solver", {"adaptive": True, "order": 1}, "order=1"),
        ("dpm_solver", {"thresholding": True}, "thresholding"),
        ("dpm_solver", {"adaptive": True, "rtol": 0.0}, "rtol"),
        ("dpm_solver++", {"solver_type": "dpmsolver"}, "solver_type"),
        ("dpm_solver++", {"lower_order_final": 1}, "lower_order_final"),
        ("dpm_solver++", {"thresholding": True, "threshold_ratio": 1.5}, "threshold_ratio"),
        ("unipc", {"variant": "bh3"}, "variant"),
        ("unipc", {"order": 0}, "order"),
        ("unipc", {"thresholding": True, "predict_x0": False}, "thresholding"),
        ("adaptive_sde", {"rtol": -1}, "rtol"),
        ("adaptive_sde", {"safety": 2.0}, "safety"),
        ("unipc", {"eta": 0.5}, "eta"),
    ]
    for solver, opts, word in cases:
        with pytest.raises(ValueError, match=word):
            make_stepper(den, solver, **opts)
    for solver in ("dpm_solver", "dpm_solver++", "unipc"):
        with pytest.raises(ValueError, match="t_end"):
            sf.sample(den, solver, nfe=4, shape=(2, 2), t_end=0.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_diffusers_schedulers_are_reproduced_on_their_grids():
    """An independent implementation: diffusers' DPMSolverMultistepScheduler (2M, midpoint) and
    UniPCMultistepScheduler (bh2, with corrector) on DiscreteVPSDE.linear(1000), same eps-model and x_T; sdeflow on
    diffusers' time grid agrees to diffusers' float32 schedule tables."""
    diffusers = pytest.importorskip("diffusers")
    sde = sf.DiscreteVPSDE.linear(1000)
    gmm = sf.GaussianMixture(**MIX)

    def net(x, ts):
        return gmm.eps(x, (ts.to(F64) + 1) / 1000, sde)

    den = sf.Denoiser(net, sde, "eps", time_input="index")
    x_T = _x_T(sde, 4)
    base = dict(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        final_sigmas_type="sigma_min",
        solver_order=2,
    )
    for nfe in (8, 16):
        for solver, cls, cfg, opts in [
            ("dpm_solver++", diffusers.DPMSolverMultistepScheduler, {}, {"order": 2}),
            ("unipc", diffusers.UniPCMultistepScheduler, {"solver_type": "bh2"}, {"order": 2, "variant": "bh2"}),
        ]:
            sched = cls(**base, **cfg, lower_order_final=nfe < 15)  # sdeflow lowers the final order below 15 steps
            sched.set_timesteps(nfe)
            x = x_T
            for t in sched.timesteps:
                x = sched.step(net(x, t.expand(x.shape[0])), t, x).prev_sample
            grid = torch.cat([(sched.timesteps.to(F64) + 1) / 1000, torch.tensor([1e-3], dtype=F64)])
            ours = sf.sample(den, solver, nfe=nfe, x_T=x_T, grid=grid, **opts).x
            assert _rms(ours, x) < 1e-5 * float(x.pow(2).mean().sqrt()), (solver, nfe, _rms(ours, x))


def test_default_grid_follows_the_path():
    """The measured exponential integrators take the path's default grid (quadratic on VP-type paths, log-SNR on VE;
    benchmarks/default_grids.py), the others keep their own, and sample() uses it."""
    for sde, want in (
        (sf.VPSDE(), "quadratic"),
        (sf.SubVPSDE(), "quadratic"),
        (sf.DiscreteVPSDE.cosine(1000), "quadratic"),
        (sf.FlowMatchingPath(), "quadratic"),
        (sf.VESDE(), "logsnr"),
    ):
        den = sf.GaussianMixture(**MIX).denoiser(sde)
        for name in ("dpm_solver", "dpm_solver++", "unipc", "deis"):
            assert make_stepper(den, name).default_grid == want, (type(sde).__name__, name)
        assert make_stepper(den, "sa_solver").default_grid == "logsnr"
        if isinstance(sde, sf.FlowMatchingPath):  # an eps model cannot start at a(T) = 0 (tests/integrations)
            continue
        x = _x_T(sde, 3)
        res = sf.sample(den, "unipc", nfe=6, x_T=x)
        torch.testing.assert_close(res.times, time_grid(sde, 6, want, t_end=float(sde.eps)).to(res.times))
