"""Likelihood benchmark: sdeflow.log_likelihood against the closed form and against the score_sde approach.

What it measures (GaussianMixture data, exact denoiser, VP SDE, float64, so every error is solver error):

1. accuracy and cost as rtol = atol goes 1e-3 .. 1e-7, d = 2, 8, 64: mean |log p_eps error| per dimension of the ODE
   part (the prior swapped for the exact log p_T, see docs/likelihood.md), NFE, CPU seconds and ms per sample; for
   sdeflow (torchdiffeq dopri5 on the device, float64 state, one net call per evaluation, vectorized divergence) and
   for the score_sde approach at the same tolerance;
2. exact against Hutchinson divergence: cost and the spread of log p over probe draws;
3. the same comparison with a neural net (sdeflow's MLPScoreNet, random weights) where the net dominates the cost;
4. divergence estimators on their own (sdeflow.divergence, batch 256, float32, one evaluation): the exact trace
   against ``torch.func.vmap(torch.func.jacrev(f))`` for d = 2, 64, 256 (reverse mode over basis chunks, forward mode),
   and Hutchinson's cost per unit variance (CPU seconds x empirical variance of the estimate over repeated draws)
   with several probes in one batched call and with Hutch++, against the one-probe scheme of score_sde (one forward
   and one backward per probe);
5. the variational bounds (sdeflow.vlb) next to the ODE NLL and the exact NLL: the continuous VDM bound and the
   discrete DDPM bound with their Monte-Carlo standard errors, exact models;
6. NFE against err_ode (issue 19, item 1), d = 64 mixture, exact divergence: adaptive dopri5 in t (the reference) and
   in the log-SNR (``variable="logsnr"``) over a tolerance sweep, fixed-grid solvers (``solver=``, ``nfe=``) in t and
   in the log-SNR with their error against the closed form and against the adaptive answer at rtol = atol = 1e-5,
   and the same model on a 1000-step DDPM schedule (``DiscreteVPSDE``, the diffusers convention) in t and in the
   log-SNR.

The score_sde approach, written here from Song et al. (2021, App. D.2) and the structure of their likelihood code:
``scipy.integrate.solve_ivp(method="RK45")`` on a flat float64 numpy state [x, delta]; each evaluation copies the state
into a torch tensor, calls the model once for the drift and once more inside autograd for the divergence (Hutchinson:
grad of <v, eps>; exact: one autograd pass per dimension), and copies both back to numpy.

Timings are process CPU seconds with one torch thread (the machine is shared; CPU time is the stable measure), best
of ``--repeats``. Output: runs/likelihood/results.json and runs/likelihood/table.md (printed too).

    .venv/bin/python benchmarks/likelihood.py            # full run
    .venv/bin/python benchmarks/likelihood.py --quick    # smoke test
    .venv/bin/python benchmarks/likelihood.py --parts divergence,hutchinson_cost,vlb   # parts 4 and 5 only
    .venv/bin/python benchmarks/likelihood.py --parts nfe --n 32                        # part 6
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.integrate
import torch

import sdeflow as sf

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ the baseline
def score_sde_likelihood(
    den: sf.Denoiser,
    x: torch.Tensor,
    rtol: float,
    atol: float,
    divergence: str = "exact",
    probes: torch.Tensor | None = None,
    t_eps: float | None = None,
) -> dict[str, Any]:
    """Probability-flow likelihood the score_sde way: scipy RK45, numpy round trips, two model calls per evaluation."""
    sde = den.sde
    shape, B = x.shape, x.shape[0]
    model_dtype = x.dtype
    t_eps = sde.eps if t_eps is None else t_eps

    def drift_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sde.probability_flow_drift(xt, t, den.score(xt, t))

    def div_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            v = drift_fn(xt, t)
            if divergence == "hutchinson":
                (g,) = torch.autograd.grad((v * probes).sum(), xt)
                return (g * probes).reshape(B, -1).sum(1)
            flat = v.reshape(B, -1)
            div = torch.zeros(B, dtype=v.dtype, device=v.device)
            for i in range(flat.shape[1]):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xt, retain_graph=True)
                div = div + g.reshape(B, -1)[:, i]
            return div

    def ode_func(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y[:-B].reshape(shape)).to(device=x.device, dtype=model_dtype)
        tt = torch.tensor(t, dtype=F64)
        drift = drift_fn(xt, tt).detach().cpu().numpy().reshape(-1)
        div = div_fn(xt, tt).detach().cpu().numpy()
        return np.concatenate([drift, div])

    init = np.concatenate([x.detach().cpu().numpy().reshape(-1).astype(np.float64), np.zeros(B)])
    sol = scipy.integrate.solve_ivp(ode_func, (t_eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    end = sol.y[:, -1]
    x_T = torch.from_numpy(end[:-B].reshape(shape).copy())
    delta = torch.from_numpy(end[-B:].copy())
    return {"x_T": x_T, "delta": delta, "log_prob": sde.prior_log_prob(x_T) + delta, "nfe": int(sol.nfev)}


# ------------------------------------------------------------------------------------------------ helpers
def make_gmm(d: int, K: int = 4, seed: int = 0) -> sf.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(K, d, generator=g, dtype=F64) / math.sqrt(max(1.0, d / 4))
    stds = 0.2 + 0.6 * torch.rand(K, d, generator=g, dtype=F64)
    return sf.GaussianMixture(means, stds, torch.softmax(torch.randn(K, generator=g, dtype=F64), 0))


def cpu_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def fmt(v: float, spec: str = ".2e") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# ------------------------------------------------------------------------------------------------ parts
def problem(sde, d: int, n: int):
    """The d-dimensional mixture, its exact denoiser, n test points and their exact log p at sde.eps."""
    gmm = make_gmm(d)
    x = gmm.sample(n, generator=torch.Generator().manual_seed(1))
    return gmm, gmm.denoiser(sde), x, gmm.marginal_log_prob(x, sde.eps, sde)


def tolerance_sweep(dims, tols, base_tols, n, repeats) -> list[dict[str, Any]]:
    """Error of the ODE part against the closed form, NFE and CPU time for sdeflow (dopri5, dopri8) and score_sde."""
    rows = []
    sde = sf.VPSDE()
    for d in dims:
        gmm, den, x, ref = problem(sde, d, n)

        def err(x_T: torch.Tensor, delta: torch.Tensor) -> float:
            return float(((delta + gmm.marginal_log_prob(x_T, sde.T, sde) - ref).abs() / d).mean())

        def record(method: str, tol: float, seconds: float, e: float, nfe: int) -> None:
            rows.append(
                {
                    "d": d,
                    "n": n,
                    "method": method,
                    "tol": tol,
                    "err": e,
                    "nfe": nfe,
                    "s": seconds,
                    "ms_per_sample": 1e3 * seconds / n,
                }
            )
            print(f"  d={d} {method:<15} tol={tol:.0e}: err {e:.2e} nfe {nfe} {seconds:.3f}s", flush=True)

        for method, method_tols in (("dopri5", tols), ("dopri8", tols[:-1])):
            for tol in method_tols:
                with torch.no_grad():
                    sec, res = cpu_seconds(
                        lambda: sf.log_likelihood(den, x, rtol=tol, atol=tol, method=method), repeats
                    )
                record(f"sdeflow {method}", tol, sec, err(res.x_T, res.delta_log_prob), res.nfe)
        for tol in base_tols:
            sec, base = cpu_seconds(lambda: score_sde_likelihood(den, x, tol, tol), 1 if d > 8 else repeats)
            record("score_sde RK45", tol, sec, err(base["x_T"], base["delta"]), base["nfe"])
    return rows


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """CPU time a method needs for error <= target: along its runs sorted by time, the running best error, with
    log-log interpolation between the two runs that bracket the target; None if no run reached it."""
    pts = sorted(points, key=lambda p: p[1])
    best, env = float("inf"), []
    for e, sec in pts:
        best = min(best, e)
        env.append((best, sec))
    for i, (e, sec) in enumerate(env):
        if e <= target:
            if i == 0 or env[i - 1][0] <= e or e <= 0:
                return sec
            (e0, s0), (e1, s1) = env[i - 1], (e, sec)
            w = math.log(e0 / target) / math.log(e0 / e1)
            return math.exp((1 - w) * math.log(s0) + w * math.log(s1))
    return None


def equal_accuracy(rows: list[dict[str, Any]], targets) -> list[dict[str, Any]]:
    out = []
    methods = ("score_sde RK45", "sdeflow dopri5", "sdeflow dopri8")
    for d in sorted({r["d"] for r in rows}):
        curves = {m: [(r["err"], r["s"]) for r in rows if r["d"] == d and r["method"] == m] for m in methods}
        for target in targets:
            times = {m: time_to_reach(curves[m], target) for m in methods}
            base = times["score_sde RK45"]
            out.append(
                {
                    "d": d,
                    "target_err": target,
                    **{f"s[{m}]": times[m] for m in methods},
                    "speedup_dopri5": base / times["sdeflow dopri5"] if base and times["sdeflow dopri5"] else None,
                    "speedup_dopri8": base / times["sdeflow dopri8"] if base and times["sdeflow dopri8"] else None,
                }
            )
    return out


def exact_vs_hutchinson(dims, n, draws, tol, repeats) -> list[dict[str, Any]]:
    """Cost at one tolerance, and the spread of log p over probe draws (n points, ``draws`` probes each)."""
    rows = []
    sde = sf.VPSDE()
    for d in dims:
        gmm, den, x, ref = problem(sde, d, n)
        with torch.no_grad():
            t_ex, ex = cpu_seconds(lambda: sf.log_likelihood(den, x, rtol=tol, atol=tol), repeats)
        rows.append(
            {
                "d": d,
                "divergence": "exact",
                "probe": "-",
                "s": t_ex,
                "nfe": ex.nfe,
                "std_per_dim": 0.0,
                "bias_se_per_dim": None,
                "bias_per_dim": float(
                    (ex.log_prob - ex.prior_log_prob + gmm.marginal_log_prob(ex.x_T, sde.T, sde) - ref).mean() / d
                ),
            }
        )
        for probe in ("rademacher", "gaussian"):
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                t_h, h = cpu_seconds(
                    lambda: sf.log_likelihood(den, x, "hutchinson", tol, tol, generator=g, probe=probe), repeats
                )
                many = sf.log_likelihood(den, x.repeat(draws, 1), "hutchinson", tol, tol, generator=g, probe=probe)
            lp = many.log_prob.reshape(draws, n)
            exact_part = many.log_prob - many.prior_log_prob + gmm.marginal_log_prob(many.x_T, sde.T, sde)
            rows.append(
                {
                    "d": d,
                    "divergence": "hutchinson",
                    "probe": probe,
                    "s": t_h,
                    "nfe": h.nfe,
                    "std_per_dim": float(lp.std(0).mean() / d),
                    "bias_per_dim": float((exact_part.reshape(draws, n).mean(0) - ref).mean() / d),
                    "bias_se_per_dim": float(lp.var(0).sum().sqrt() / math.sqrt(draws) / n / d),
                }
            )
        print(f"  exact vs hutchinson d={d} done", flush=True)
    return rows


def neural_net_comparison(d, n, tol, repeats) -> list[dict[str, Any]]:
    """Cost with a real network (the net dominates): sdeflow against score_sde at equal tolerance, both divergences."""
    from sdeflow.nets import MLPScoreNet

    torch.manual_seed(0)
    net = MLPScoreNet(dim=d, hidden=256, depth=3).eval().requires_grad_(False)
    den = sf.Denoiser(net, sf.VPSDE(), prediction="eps")
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    rows = []
    for divergence in ("hutchinson", "exact"):
        probes = torch.randint(0, 2, (1, n, d), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
        with torch.no_grad():
            t_ours, res = cpu_seconds(
                lambda: sf.log_likelihood(den, x, divergence, tol, tol, generator=torch.Generator().manual_seed(2)),
                repeats,
            )
        t_base, base = cpu_seconds(lambda: score_sde_likelihood(den, x, tol, tol, divergence, probes[0]), 1)
        rows.append(
            {
                "d": d,
                "n": n,
                "divergence": divergence,
                "tol": tol,
                "ours_s": t_ours,
                "ours_nfe": res.nfe,
                "base_s": t_base,
                "base_nfe": base["nfe"],
                "speedup": t_base / t_ours,
                "mean_log_prob_diff_per_dim": float((res.log_prob - base["log_prob"]).mean() / d),
            }
        )
        print(
            f"  mlp {divergence}: ours {t_ours:.2f}s nfe {res.nfe} | score_sde {t_base:.2f}s nfe {base['nfe']}",
            flush=True,
        )
    return rows


# ------------------------------------------------------------------------------------------------ divergences
def _field_net(d: int, kind: str) -> torch.nn.Module:
    from sdeflow.nets import MLPScoreNet, UNet

    torch.manual_seed(0)
    if kind == "unet":  # the digits U-Net of `sdeflow train --data digits --net unet` (1 x 8 x 8, d = 64)
        net: torch.nn.Module = UNet(in_channels=1, channels=64, channel_mult=(1, 2, 2), num_res_blocks=2)
    else:
        net = MLPScoreNet(dim=d, hidden=256, depth=3)
    for m in net.modules():  # zero-initialised output layers (a constant Jacobian): torch's default init instead
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.reset_parameters()
    return net.eval().requires_grad_(False)


def divergence_fields(d: int, kind: str, net_only: bool = False):
    """A (B, *shape) -> (B, *shape) field at t = 0.5, float32: the probability-flow drift of the d-dimensional mixture
    ("gmm"), of an MLPScoreNet eps-net (hidden 256, depth 3, random weights, "mlp") or of the digits U-Net at 8x8
    ("unet"). ``net_only``: the net's raw output alone, what log_likelihood differentiates (the drift is
    c_x x + c_o net(x), so div = c_x d + c_o div net)."""
    sde = sf.VPSDE()
    t = torch.tensor(0.5, dtype=F64)
    if kind == "gmm":
        den = make_gmm(d).denoiser(sde)
        return lambda z: sde.probability_flow_drift(z, t, den.score(z, t))
    den = sf.Denoiser(_field_net(d, kind), sde, prediction="eps")
    if net_only:
        return lambda z: den.raw(z, t)
    return lambda z: sde.probability_flow_drift(z, t, den.score(z, t))


def _field_input(d: int, kind: str, batch: int) -> torch.Tensor:
    shape = (batch, 1, 8, 8) if kind == "unet" else (batch, d)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def divergence_timing(shapes, repeats: int) -> list[dict[str, Any]]:
    """CPU ms per sample of the exact trace: ``vmap(jacrev)`` against sdeflow.divergence's modes and chunks, the
    one-off autotuned choice (``mode="auto"``, timed on its second call) and, for the nets, auto on the net alone
    (log_likelihood's path). ``shapes``: (field, d, batch) triples."""
    from sdeflow.divergence import clear_autotune_cache, divergence

    rows = []
    for kind, d, batch in shapes:
        f = divergence_fields(d, kind)
        x = _field_input(d, kind, batch)

        def jacrev_trace() -> torch.Tensor:
            J = torch.func.vmap(torch.func.jacrev(lambda z: f(z[None])[0]))(x)
            return J.reshape(batch, d, d).diagonal(dim1=1, dim2=2).sum(1)

        jacrev_trace()  # warm-up: first-call costs of torch.func out of the timing
        divergence(f, x, mode="forward", chunk=16)
        divergence(f, x, mode="vjp", chunk=16)
        t_ref, ref = cpu_seconds(jacrev_trace, max(1, min(repeats, 2)))
        variants: list[tuple[str, int | None, bool]] = [
            ("reverse", None, False),
            ("reverse", 16, False),
            ("vjp", 64, False),
            ("forward", 16, False),
            ("auto", None, False),
        ]
        if kind != "gmm":
            variants.append(("auto", None, True))
        for mode, chunk, net_only in variants:
            g = divergence_fields(d, kind, net_only=True) if net_only else f
            if mode == "auto":
                clear_autotune_cache()
                divergence(g, x, mode="auto")  # the one-off timing of the candidates
            sec, res = cpu_seconds(lambda: divergence(g, x, mode=mode, chunk=chunk), repeats)
            value = res.value
            if net_only:  # drift = c_x x + c_o eps_hat(x) with eps_hat = net output: div = c_x d + c_o div net
                sde, t = sf.VPSDE(), 0.5
                cx, co = float(sde.f(t)), float(sde.g2(t)) / (2 * float(sde.sigma(t)))
                value = cx * d + co * value
            err = float((value - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            label = mode if mode != "auto" else f"auto -> {res.mode} {res.chunk}"
            rows.append(
                {
                    "field": kind,
                    "d": d,
                    "batch": batch,
                    "mode": label + (" (net only)" if net_only else ""),
                    "chunk": res.chunk if chunk is None else chunk,
                    "ms_per_sample": 1e3 * sec / batch,
                    "jacrev_ms_per_sample": 1e3 * t_ref / batch,
                    "ratio": sec / t_ref,
                    "max_rel_diff": err,
                }
            )
            print(f"  {kind} d={d} {rows[-1]['mode']} chunk={rows[-1]['chunk']}: {sec / t_ref:.3f} x", flush=True)
    return rows


def divergence_profile(shapes) -> list[dict[str, Any]]:
    """torch.profiler over one evaluation of vmap(jacrev) and of sdeflow's reverse / vjp modes: total self CPU time, the
    share of the GEMM / convolution kernels, the calls of the top kernel."""
    from torch.profiler import ProfilerActivity, profile

    from sdeflow.divergence import divergence

    heavy = ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution_backward", "aten::mkldnn_convolution",
             "aten::_slow_conv2d_backward", "aten::_slow_conv2d_forward")  # fmt: skip
    rows = []
    for kind, d, batch in shapes:
        f = divergence_fields(d, kind)
        x = _field_input(d, kind, batch)
        runs = {
            "vmap(jacrev)": lambda: torch.func.vmap(torch.func.jacrev(lambda z: f(z[None])[0]))(x),
            "reverse 16": lambda: divergence(f, x, mode="reverse", chunk=16),
            "vjp 64": lambda: divergence(f, x, mode="vjp", chunk=64),
        }
        for name, run in runs.items():
            run()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            ev = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in ev)
            top = max(ev, key=lambda e: e.self_cpu_time_total)
            rows.append(
                {
                    "field": kind,
                    "d": d,
                    "batch": batch,
                    "run": name,
                    "self_ms": total / 1e3,
                    "heavy_share": sum(e.self_cpu_time_total for e in ev if e.key in heavy) / total,
                    "top_op": top.key,
                    "top_share": top.self_cpu_time_total / total,
                    "top_calls": top.count,
                }
            )
            print(f"  profile {kind} d={d} {name}: {total / 1e3:.0f} ms, top {top.key} x{top.count}", flush=True)
    return rows


def hutchinson_cost(d: int, batch: int, draws: int, repeats: int, kinds=("gmm", "mlp")) -> list[dict[str, Any]]:
    """Cost per unit variance of the divergence estimate (CPU seconds x mean per-sample variance over ``draws``
    independent draws), relative to score_sde's one-probe scheme (one forward and one backward per probe)."""
    from sdeflow.divergence import divergence

    rows = []
    for kind in kinds:
        f = divergence_fields(d, kind)
        x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1))
        exact = divergence(f, x).value

        def one_probe(g: torch.Generator, probe: str) -> torch.Tensor:
            z = (
                torch.randn(x.shape, generator=g)
                if probe == "gaussian"
                else torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
            )
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                (gr,) = torch.autograd.grad((f(xr) * z).sum(), xr)
            return (gr * z).sum(1)

        def score_sde_scheme(n: int, probe: str, g: torch.Generator) -> torch.Tensor:
            return torch.stack([one_probe(g, probe) for _ in range(n)]).mean(0)

        configs: list[tuple[str, str, int]] = [
            ("score_sde one-probe", "rademacher", 1),
            ("score_sde one-probe", "gaussian", 1),
            ("score_sde one-probe x4", "rademacher", 4),
        ]
        configs += [("sdeflow hutchinson", "rademacher", n) for n in (1, 4, 16)]
        configs += [("sdeflow hutchinson", "gaussian", 4)]
        configs += [("sdeflow hutch++", "rademacher", n) for n in (6, 12, 24)]
        configs += [
            ("sdeflow hutchinson + control f(t)", "gaussian", 4),
            ("sdeflow hutch++ + control f(t)", "rademacher", 12),
            ("sdeflow hutchinson + control tr/d (oracle)", "gaussian", 4),
            ("sdeflow hutch++ + control tr/d (oracle)", "rademacher", 12),
        ]
        # controls: the velocity's linear part f(t) (t = 0.5), and the oracle c = tr J / d (the best constant: how
        # much an estimate of it from independent probes could gain at most)
        controls = {"f(t)": float(sf.VPSDE().f(0.5)), "tr/d (oracle)": exact / d}
        base_cost = None
        for name, probe, n in configs:
            g = torch.Generator().manual_seed(0)
            if name.startswith("score_sde"):
                run = lambda: score_sde_scheme(n, probe, g)
            else:
                method = "hutch++" if "++" in name else "hutchinson"
                ctrl = controls[name.split("control ")[1]] if "control" in name else None
                run = lambda: divergence(f, x, method, n_probes=n, probe=probe, generator=g, control=ctrl).value
            sec, _ = cpu_seconds(run, repeats)
            est = torch.stack([run() for _ in range(draws)])
            var = float(est.var(0).mean())
            se_mean = math.sqrt(var / draws / batch)
            bias_z = float((est.mean(0) - exact).mean()) / se_mean if var > 1e-9 else float("nan")
            cost = sec * var
            if base_cost is None:
                base_cost = cost
            rows.append(
                {
                    "field": kind,
                    "d": d,
                    "batch": batch,
                    "scheme": name,
                    "probe": probe,
                    "products": n,
                    "ms_per_sample": 1e3 * sec / batch,
                    "variance": var,
                    "cost_x_variance_rel": cost / base_cost,
                    "bias_z": bias_z,
                }
            )
            print(f"  {kind} {name} {probe} n={n}: {1e3 * sec / batch:.4f} ms/sample var {var:.3g}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ bounds
def vlb_table(n: int, n_t: int, n_t_ddpm: int) -> list[dict[str, Any]]:
    """The VDM bound (exact mixture denoiser, VP) and the DDPM bound (exact Gaussian denoiser, 1000 linear steps)
    in bits/dim with their standard errors, next to the ODE NLL and the exact NLL of the data."""
    from sdeflow.vlb import continuous_vlb, ddpm_vlb, discretized_gaussian_log_likelihood

    rows = []
    sde = sf.VPSDE()
    for d in (2, 8):
        gmm = make_gmm(d)
        den = gmm.denoiser(sde)
        x = gmm.sample(n, generator=torch.Generator().manual_seed(1))
        ln2d = d * math.log(2)
        t0 = time.process_time()
        b = continuous_vlb(den, x, n_t=n_t, generator=torch.Generator().manual_seed(2))
        sec = time.process_time() - t0
        exact_ps = -gmm.log_prob(x) / ln2d
        exact = float(exact_ps.mean())
        gap = b.bits_per_dim - exact_ps
        try:
            with torch.no_grad():
                ode = sf.log_likelihood(den, x, rtol=1e-6, atol=1e-6)
            ode_bpd = float(ode.bits_per_dim.mean())
        except Exception as err:  # the likelihood API is being redesigned: report, do not fail
            print(f"  ODE NLL unavailable: {err}", flush=True)
            ode_bpd = None
        rows.append(
            {
                "bound": "VDM continuous (gaussian decoder)",
                "data": f"mixture d={d}",
                "n": n,
                "n_t": n_t,
                "bpd": b.mean_bits_per_dim,
                "se": b.mean_std_error,
                "per_sample_se": float(b.std_error.mean()) if b.std_error is not None else None,
                "ode_bpd": ode_bpd,
                "exact_bpd": exact,
                "gap": float(gap.mean()),
                "gap_se": float(gap.std() / math.sqrt(n)),
                "nfe": b.nfe,
                "s": sec,
            }
        )
        print(f"  VDM d={d}: {b.mean_bits_per_dim:.4f} +- {b.mean_std_error:.4f} (exact {exact:.4f})", flush=True)
    # DDPM: Gaussian data in [-1, 1] quantized to 8 bits, exact denoiser of the continuous Gaussian
    dsde = sf.DiscreteVPSDE.linear(1000)
    mu, s = torch.tensor([0.1, -0.2], dtype=F64), 0.3
    gauss = sf.GaussianMixture(mu[None], torch.tensor([s], dtype=F64))
    xc = gauss.sample(n, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    x = torch.round((xc + 1) * 127.5) / 127.5 - 1
    nll = -sum(
        discretized_gaussian_log_likelihood(
            x[:, j], torch.full_like(x[:, j], float(mu[j])), torch.full_like(x[:, j], math.log(s))
        )
        for j in range(2)
    )
    nll_bpd = nll / (2 * math.log(2))
    entropy_bpd = float(nll_bpd.mean())
    for label, kwargs in (("exact sum", {}), (f"Monte Carlo n_t={n_t_ddpm}", {"n_t": n_t_ddpm})):
        t0 = time.process_time()
        r = ddpm_vlb(gauss.denoiser(dsde), x, generator=torch.Generator().manual_seed(4), **kwargs)
        sec = time.process_time() - t0
        rows.append(
            {
                "bound": f"DDPM ({label}, fixed_small)",
                "data": "8-bit Gaussian d=2",
                "n": n,
                "n_t": kwargs.get("n_t"),
                "bpd": r.mean_bits_per_dim,
                "se": r.mean_std_error,
                "per_sample_se": float(r.std_error.mean()) if r.std_error is not None else None,
                "ode_bpd": None,
                "exact_bpd": entropy_bpd,
                "gap": float((r.bits_per_dim - nll_bpd).mean()),
                "gap_se": float((r.bits_per_dim - nll_bpd).std() / math.sqrt(n)),
                "nfe": r.nfe,
                "s": sec,
            }
        )
        print(f"  DDPM {label}: {r.mean_bits_per_dim:.4f} +- {r.mean_std_error:.4f} (entropy {entropy_bpd:.4f})")
    return rows


def markdown_new_parts(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if results.get("divergence"):
        r0 = results["divergence"][0]
        lines += [
            "",
            "Exact divergence, one evaluation, float32, CPU ms per sample (sdeflow.divergence against "
            "torch.func.vmap(torch.func.jacrev(f)) on the probability-flow drift; gmm = mixture, mlp = MLPScoreNet "
            "hidden 256 depth 3, unet = the digits U-Net (64 channels, mult 1,2,2, 1 x 8 x 8), torch's default init "
            "in place of the zero output layers; auto = the autotuned choice on its second call; net only = auto on "
            "the net's raw output plus the affine part, what log_likelihood does):",
            "",
            "| field | d | batch | mode | chunk | ms/sample | vmap(jacrev) ms/sample | ratio | max rel diff |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["divergence"]:
            lines.append(
                f"| {r['field']} | {r['d']} | {r['batch']} | {r['mode']} | {r['chunk']} | {r['ms_per_sample']:.4f} | "
                f"{r['jacrev_ms_per_sample']:.4f} | {r['ratio']:.3f} | {fmt(r['max_rel_diff'])} |"
            )
    if results.get("divergence_profile"):
        lines += [
            "",
            "Where the time goes (torch.profiler, one evaluation; heavy = GEMM and convolution kernels, mm / addmm / "
            "bmm / convolution_backward / mkldnn_convolution / slow_conv2d):",
            "",
            "| field | d | batch | run | self CPU ms | heavy kernels | top op | its share | its calls |",
            "|---|---:|---:|---|---:|---:|---|---:|---:|",
        ]
        for r in results["divergence_profile"]:
            lines.append(
                f"| {r['field']} | {r['d']} | {r['batch']} | {r['run']} | {r['self_ms']:.0f} | "
                f"{100 * r['heavy_share']:.0f}% | {r['top_op']} | {100 * r['top_share']:.0f}% | {r['top_calls']} |"
            )
    if results.get("hutchinson_cost"):
        r0 = results["hutchinson_cost"][0]
        lines += [
            "",
            f"Stochastic divergence, d = {r0['d']}, batch {r0['batch']}, float32: cost per unit variance = CPU time x "
            "mean per-sample variance of the estimate over repeated draws, relative to score_sde's one-probe scheme "
            "(Rademacher); bias_z = (mean over draws - exact) / its standard error:",
            "",
            "| field | scheme | probe | products | ms/sample | variance | cost x variance (rel.) | bias_z |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["hutchinson_cost"]:
            lines.append(
                f"| {r['field']} | {r['scheme']} | {r['probe']} | {r['products']} | {r['ms_per_sample']:.4f} | "
                f"{r['variance']:.3g} | {r['cost_x_variance_rel']:.3f} | {fmt(r['bias_z'], '.2f')} |"
            )
    if results.get("vlb"):
        lines += [
            "",
            "Variational bounds (exact models), bits/dim, mean over the batch and its standard error; exact = "
            "-log p_0(x) of the mixture (continuous) or -log P(x) of the quantized data (DDPM; its mean is the "
            "entropy); bound - exact paired per sample (must be >= 0 up to its SE); ODE = sf.log_likelihood at "
            "rtol = atol = 1e-6:",
            "",
            "| bound | data | n | n_t | bits/dim | SE | per-sample SE | ODE NLL | exact | bound - exact | its SE | NFE | s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["vlb"]:
            lines.append(
                f"| {r['bound']} | {r['data']} | {r['n']} | {r['n_t'] if r['n_t'] is not None else 'all'} | "
                f"{r['bpd']:.4f} | {r['se']:.4f} | {fmt(r['per_sample_se'], '.3f')} | {fmt(r['ode_bpd'], '.4f')} | "
                f"{r['exact_bpd']:.4f} | {r['gap']:.4f} | {r['gap_se']:.4f} | {r['nfe']} | {r['s']:.2f} |"
            )
    return lines


# ------------------------------------------------------------------------------------------------ NFE vs error
def nfe_at_error(curve: list[tuple[float, float]], target: float) -> float | None:
    """NFE a method needs for err_ode <= target: log-log interpolation between the two runs of its (err, nfe) sweep
    that bracket the target (along the running best error); None outside the sweep (no extrapolation)."""
    pts = sorted(curve, key=lambda p: p[1])
    if not pts or target > pts[0][0]:
        return None
    return time_to_reach(pts, target)


def _err(lp: torch.Tensor, ref: torch.Tensor, d: int) -> float:
    return float(((lp - ref).abs() / d).mean())


class SemilinearPrototype:
    r"""Benchmark-only prototype of the semilinear forms of the augmented probability-flow ODE (not in sdeflow: they
    did not pay, see docs/likelihood.md). With :math:`\sigma = s/a = e^{-\lambda}`:

    * ``"eps"``: y = x / a, :math:`dy/d\sigma = \hat\varepsilon(a y)` (DDIM / DEIS form, the linear part exact),
      :math:`d\Delta/d\sigma = a\,\nabla_x\!\cdot\hat\varepsilon`;
    * ``"x0"``: y = x / s, :math:`dy/d\lambda = e^\lambda \hat x_0(s y)` (DPM-Solver++ form),
      :math:`d\Delta/d\lambda = a\,\nabla_x\!\cdot\hat x_0`;

    and :math:`\log p_{t_\epsilon}(x) = \log p_T(c_T y_T) + \Delta + d\log(c_T/c_\epsilon)` (c = a or s), in the
    integration variable w = log sigma, sigma^(1/rho) or sigma. ``rhs`` feeds torchdiffeq; ``multistep`` is the fixed-grid
    exponential-integrator version: the predictions (not the products with the known weights) are interpolated by a
    polynomial in w through the last k nodes and integrated against the exact weight (24-point Gauss-Legendre per step),
    predictor of order k, corrector of order k + 1 with the next evaluation (PEC), as DEIS / UniPC do for sampling."""

    def __init__(self, gmm, sde, form: str, var: str, rho: float = 7.0) -> None:
        self.gmm, self.sde, self.form, self.var, self.rho = gmm, sde, form, var, rho
        self.nfe = 0

    def lam(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lambda(w) and dlambda/dw."""
        if self.var == "logsigma":
            return -w, -torch.ones_like(w)
        if self.var == "sigma":
            return -torch.log(w), -1 / w
        return -self.rho * torch.log(w), -self.rho / w  # sigma^(1/rho)

    def w_of_t(self, t: float) -> float:
        sig = float(self.sde.edm_sigma(t))
        return {"logsigma": math.log(sig), "sigma": sig}.get(self.var, sig ** (1 / self.rho))

    def scale(self, t) -> torch.Tensor:
        return self.sde.alpha(t) if self.form == "eps" else self.sde.sigma(t)

    def weights(self, w: torch.Tensor) -> torch.Tensor:
        lam, dlam = self.lam(w)
        if self.form == "eps":  # dsigma/dw = -sigma dlambda/dw, the same weight for both parts
            return -torch.exp(-lam) * dlam
        return torch.exp(lam) * dlam

    def predictions(self, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_x, G_Delta): eps_hat and a div eps_hat, or x0_hat and a div x0_hat, at x = c y."""
        from sdeflow.divergence import divergence

        lam, _ = self.lam(w)
        t = self.sde.t_from_log_snr(lam).clamp(self.sde.eps, self.sde.T)
        a = self.sde.alpha(t)
        k = 0 if self.form == "eps" else 1
        res = divergence(lambda z: self.gmm._eps_x0(z, t, self.sde)[k], y * self.scale(t), "exact")
        self.nfe += 1
        return res.f_x, a * res.value

    def rhs(self, w: torch.Tensor, state):
        gx, gd = self.predictions(w, state[0])
        wx = self.weights(w)
        if self.form == "eps":
            return wx * gx, wx * gd
        return wx * gx, self.lam(w)[1] * gd

    def finish(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        sde, d = self.sde, x.shape[1]
        c0, c1 = float(self.scale(sde.eps)), float(self.scale(sde.T))
        return self.gmm.marginal_log_prob(y * c1, sde.T, sde) + delta + d * math.log(c1 / c0)

    def adaptive(self, x: torch.Tensor, tol: float) -> torch.Tensor:
        import torchdiffeq

        times = torch.tensor([self.w_of_t(self.sde.eps), self.w_of_t(self.sde.T)], dtype=F64)
        y0 = (x / float(self.scale(self.sde.eps)), torch.zeros(x.shape[0], dtype=F64))
        ys = torchdiffeq.odeint(self.rhs, y0, times, rtol=tol, atol=tol, method="dopri5", options={"step_t": times})
        return self.finish(x, ys[0][-1], ys[1][-1])

    def multistep(self, x: torch.Tensor, grid: torch.Tensor, order: int = 4) -> torch.Tensor:
        gl_x, gl_w = np.polynomial.legendre.leggauss(24)

        def integrals(nodes: list[float], a: float, b: float) -> list[tuple[float, float]]:
            q = torch.tensor(0.5 * (b - a) * gl_x + 0.5 * (b + a), dtype=F64)
            qw = torch.tensor(0.5 * (b - a) * gl_w, dtype=F64)
            phx = self.weights(q)
            phd = phx if self.form == "eps" else self.lam(q)[1]
            out = []
            for j in range(len(nodes)):
                ell = torch.ones_like(q)
                for m in range(len(nodes)):
                    if m != j:
                        ell = ell * (q - nodes[m]) / (nodes[j] - nodes[m])
                out.append((float((qw * phx * ell).sum()), float((qw * phd * ell).sum())))
            return out

        ws = [float(w) for w in grid]
        y, D = x / float(self.scale(self.sde.eps)), torch.zeros(x.shape[0], dtype=F64)
        hist = [(ws[0], *self.predictions(grid[0], y))]
        for i in range(len(ws) - 1):
            H = hist[-order:]
            W = integrals([h[0] for h in H], ws[i], ws[i + 1])
            yp = y + sum(wj[0] * h[1] for wj, h in zip(W, H))
            gx, gd = self.predictions(grid[i + 1], yp)
            Hc = [*H, (ws[i + 1], gx, gd)]
            Wc = integrals([h[0] for h in Hc], ws[i], ws[i + 1])
            y = y + sum(wj[0] * h[1] for wj, h in zip(Wc, Hc))
            D = D + sum(wj[1] * h[2] for wj, h in zip(Wc, Hc))
            hist.append((ws[i + 1], gx, gd))
        return self.finish(x, y, D)


def _sigma_grid(sde, kind: str, n: int, to_w: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """n + 1 nodes from sde.eps to T in w: uniform in log sigma, EDM's rho = 7 (uniform in sigma^(1/7)), or uniform in
    log sigma up to sigma = 20 with one last step to sigma(T) ("clipped")."""
    l0, l1 = math.log(float(sde.edm_sigma(sde.eps))), math.log(float(sde.edm_sigma(sde.T)))
    if kind == "uniform log sigma":
        ls = torch.linspace(l0, l1, n + 1, dtype=F64)
    elif kind == "EDM rho=7":
        ls = 7 * torch.log(torch.linspace(math.exp(l0 / 7), math.exp(l1 / 7), n + 1, dtype=F64))
    else:
        ls = torch.cat([torch.linspace(l0, math.log(20.0), n, dtype=F64), torch.tensor([l1], dtype=F64)])
    return to_w(torch.exp(ls))


def where_evaluations(den: sf.Denoiser, x: torch.Tensor, prior, variable: str, tol: float = 1e-5) -> dict[str, Any]:
    """Net calls of one dopri5 solve per decade of sigma = s/a (the times the Denoiser's net is called at)."""
    with torch.no_grad():  # the exact divergence's one-off autotuning (extra net calls) out of the count
        sf.log_likelihood(den, x, rtol=1e-2, atol=1e-2, variable=variable, prior=prior)
    seen: list[float] = []
    orig = sf.Denoiser.raw

    def spy(self, xx, t, *a, **k):
        seen.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return orig(self, xx, t, *a, **k)

    sf.Denoiser.raw = spy  # type: ignore[method-assign]  # reason: a benchmark-local spy, restored below
    try:
        with torch.no_grad():
            res = sf.log_likelihood(den, x, rtol=tol, atol=tol, variable=variable, prior=prior)
    finally:
        sf.Denoiser.raw = orig  # type: ignore[method-assign]  # reason: restoring the method
    dec = [math.floor(math.log10(float(den.sde.edm_sigma(t)))) for t in seen]
    return {"variable": variable, "nfe": res.nfe, **{f"[1e{k}, 1e{k + 1})": dec.count(k) for k in (-2, -1, 0, 1, 2)}}


def nfe_comparison(d: int, n: int, tols, fixed_nfes, quick: bool = False) -> dict[str, list[dict[str, Any]]]:
    """err_ode (mean |error| per dim of the ODE part against the closed form) against NFE for every integration
    variable and integrator, on the continuous linear VP SDE and the 1000-step DDPM schedule; the NFE dopri5 in t needs
    for the same error (log-log interpolation along its tolerance sweep) over the method's NFE is the ratio the issue's
    target (>= 3) is about. Also: the semilinear prototypes, where dopri5's evaluations go, and other paths."""
    out: dict[str, list[dict[str, Any]]] = {"rows": [], "where": [], "paths": []}
    rows = out["rows"]
    gmm = make_gmm(d)
    x = gmm.sample(n, generator=torch.Generator().manual_seed(1))
    models = (("VP linear", sf.VPSDE()), ("DDPM linear N=1000", sf.DiscreteVPSDE.linear(1000)))
    for label, sde in models:
        den = gmm.denoiser(sde)
        ref = gmm.marginal_log_prob(x, sde.eps, sde)
        exact_prior = lambda z, sde=sde: gmm.marginal_log_prob(z, sde.T, sde)
        ddpm = label.startswith("DDPM")
        best = "vp_time" if ddpm else "t"  # the default (variable="auto")

        def run(**kw: Any) -> tuple[sf.LikelihoodResult, float]:
            t0 = time.process_time()
            with torch.no_grad():
                res = sf.log_likelihood(den, x, prior=exact_prior, **kw)
            return res, time.process_time() - t0

        answer, _ = run(rtol=1e-9, atol=1e-9, variable=best)  # the adaptive float64 answer

        def record(integrator: str, tol: float | None, res: sf.LikelihoodResult, sec: float) -> None:
            rows.append(
                {
                    "model": label,
                    "integrator": integrator,
                    "tol": tol,
                    "nfe": res.nfe,
                    "err_ode": _err(res.log_prob, ref, d),
                    "err_vs_adaptive": _err(res.log_prob, answer.log_prob, d),
                    "s": sec,
                }
            )
            print(f"  {label} {integrator} tol={tol}: nfe {res.nfe} err {rows[-1]['err_ode']:.2e}", flush=True)

        sweeps = [("dopri5", "t", (1e-2,) + tols + ((1e-7,) if not quick else ()))]
        sweeps += [("dopri5", "logsnr", tols), ("dopri5", "vp_time", tols) if ddpm else ("dopri5", "logsnr", ())]
        sweeps += [("adams", best, (1e-2,) + tols)]
        if ddpm:  # in t the adaptive solver spends hundreds of steps on the 1000 jumps of f(t): two tolerances
            sweeps[0] = ("dopri5", "t", (1e-3, 1e-5))
        for method, variable, sweep in sweeps:
            for tol in sweep:
                res, sec = run(rtol=tol, atol=tol, variable=variable, method=method)
                record(f"{method} in {variable}", tol, res, sec)
        for solver, variable in (("abm3", best), ("abm4", best), ("abm4", "logsnr"), ("rk4", best)):
            for nfe in fixed_nfes if solver != "rk4" else tuple(4 * (k // 4) for k in fixed_nfes[1:]) + (96,):
                res, sec = run(solver=solver, nfe=nfe, variable=variable)
                record(f"{solver} in {variable} (fixed grid)", None, res, sec)
        if not ddpm and not quick:  # the semilinear prototypes (benchmark code, same problem)
            for form, var in (("eps", "logsigma"), ("eps", "sigma^(1/7)"), ("eps", "sigma"), ("x0", "logsigma")):
                for tol in tols:
                    proto = SemilinearPrototype(gmm, sde, form, var)
                    t0 = time.process_time()
                    with torch.no_grad():
                        lp = proto.adaptive(x, tol)
                    rows.append(
                        {
                            "model": label,
                            "integrator": f"prototype dopri5, {form} form in {var}",
                            "tol": tol,
                            "nfe": proto.nfe,
                            "err_ode": _err(lp, ref, d),
                            "err_vs_adaptive": _err(lp, answer.log_prob, d),
                            "s": time.process_time() - t0,
                        }
                    )
                    print(f"  prototype {form} {var} tol={tol}: nfe {proto.nfe} err {rows[-1]['err_ode']:.2e}")
            for form, grid_kind in (
                ("eps", "uniform log sigma"),
                ("eps", "EDM rho=7"),
                ("x0", "uniform log sigma"),
                ("x0", "clipped log sigma"),
            ):
                for nfe in fixed_nfes:
                    proto = SemilinearPrototype(gmm, sde, form, "logsigma")
                    t0 = time.process_time()
                    with torch.no_grad():
                        lp = proto.multistep(x, _sigma_grid(sde, grid_kind, nfe - 1, torch.log))
                    rows.append(
                        {
                            "model": label,
                            "integrator": f"prototype exponential AB4/AM5, {form} form, {grid_kind} (fixed grid)",
                            "tol": None,
                            "nfe": proto.nfe,
                            "err_ode": _err(lp, ref, d),
                            "err_vs_adaptive": _err(lp, answer.log_prob, d),
                            "s": time.process_time() - t0,
                        }
                    )
                    print(f"  prototype multistep {form} {grid_kind} nfe={nfe}: err {rows[-1]['err_ode']:.2e}")
        # where dopri5's evaluations go (tol 1e-5): counts per decade of sigma = s/a
        if not ddpm:
            for variable in ("t", "logsnr"):
                out["where"].append(where_evaluations(den, x, exact_prior, variable))
    # ratio of the NFE dopri5 in t needs at the same error
    for label in {r["model"] for r in rows}:
        curve = [(r["err_ode"], r["nfe"]) for r in rows if r["model"] == label and r["integrator"] == "dopri5 in t"]
        for r in rows:
            if r["model"] == label:
                need = nfe_at_error(curve, r["err_ode"])
                r["nfe_ratio"] = need / r["nfe"] if need else None
    # other paths: dopri5 against adams, in t and vp_time
    if not quick:
        from sdeflow.sdes import EDMPath

        others = (
            ("sub-VP", sf.SubVPSDE()),
            ("VP cosine", sf.VPSDE(schedule="cosine")),
            ("DDPM cosine N=1000", sf.DiscreteVPSDE.cosine(1000)),
            ("VE", sf.VESDE()),
            ("EDM", EDMPath(0.002, 80.0)),
        )
        for label, sde in others:
            den = gmm.denoiser(sde)
            ref = gmm.marginal_log_prob(x, sde.eps, sde)
            prior = lambda z, sde=sde: gmm.marginal_log_prob(z, sde.T, sde)
            curves: dict[str, list[tuple[float, float]]] = {}
            for method, variable in (("dopri5", "t"), ("dopri5", "vp_time"), ("adams", "t"), ("adams", "vp_time")):
                if label.startswith("DDPM") and variable == "t":
                    continue
                pts = []
                for tol in (1e-3, 1e-4, 1e-5, 1e-6):
                    with torch.no_grad():
                        res = sf.log_likelihood(
                            den, x, rtol=tol, atol=tol, method=method, variable=variable, prior=prior
                        )
                    pts.append((_err(res.log_prob, ref, d), res.nfe))
                curves[f"{method} in {variable}"] = pts
                print(f"  {label} {method} {variable}: " + " ".join(f"{nf}:{e:.1e}" for e, nf in pts), flush=True)
            base = curves.get("dopri5 in t") or curves["dopri5 in vp_time"]
            for name, pts in curves.items():
                ratios = [nfe_at_error(base, e) / nf if nfe_at_error(base, e) else None for e, nf in pts]
                out["paths"].append(
                    {"path": label, "integrator": name, "points": pts, "ratios": ratios,
                     "base": "dopri5 in t" if "dopri5 in t" in curves else "dopri5 in vp_time"}
                )  # fmt: skip
    return out


def markdown_nfe(results: dict[str, Any]) -> list[str]:
    res = results.get("nfe")
    if not res:
        return []
    m = results["meta"]
    lines = [
        "",
        f"NFE against err_ode (mixture d = {m.get('nfe_d', 64)}, n = {m.get('nfe_n')}, exact divergence, exact log p_T "
        "in place of the prior, float64; err_ode = mean |log p error| per dim against the closed form; vs adaptive = "
        "against the float64 answer of dopri5 at rtol = atol = 1e-9 in the default variable; NFE ratio = the NFE "
        "dopri5 in t needs for the same err_ode (log-log interpolation along its sweep) / this NFE, the issue's target "
        "being >= 3):",
        "",
        "| model | integrator | tol | NFE | err_ode | vs adaptive | NFE ratio | CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['model']} | {r['integrator']} | {fmt(r['tol'], '.0e') if r['tol'] else '-'} | {r['nfe']} | "
            f"{fmt(r['err_ode'])} | {fmt(r.get('err_vs_adaptive'))} | {fmt(r.get('nfe_ratio'), '.2f')} | "
            f"{r['s']:.2f} |"
        )
    if res.get("where"):
        keys = [k for k in res["where"][0] if k.startswith("[")]
        lines += [
            "",
            "Where dopri5's evaluations go (VP linear, rtol = atol = 1e-5): net calls per decade of sigma = s/a:",
            "",
            "| variable | NFE | " + " | ".join(f"sigma in {k}" for k in keys) + " |",
            "|---|---:|" + "---:|" * len(keys),
        ]
        for r in res["where"]:
            lines.append(f"| {r['variable']} | {r['nfe']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    if res.get("paths"):
        lines += [
            "",
            "Other paths (same mixture; tolerances 1e-3, 1e-4, 1e-5, 1e-6): NFE:err_ode per tolerance and the NFE ratio "
            "against dopri5 in t (DDPM cosine: in vp_time) at equal err_ode:",
            "",
            "| path | integrator | NFE:err_ode | NFE ratio |",
            "|---|---|---|---|",
        ]
        for r in res["paths"]:
            pts = " ".join(f"{nf}:{e:.1e}" for e, nf in r["points"])
            rat = " ".join(fmt(v, ".2f") for v in r["ratios"])
            lines.append(f"| {r['path']} | {r['integrator']} | {pts} | {rat} |")
    return lines


# ------------------------------------------------------------------------------------------------ report
def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        f"### Likelihood (probability-flow ODE), {m['device']}, torch {m['torch']}, 1 thread, CPU seconds",
        "",
        f"GaussianMixture (K = 4), exact denoiser, VP SDE, float64, n = {m['n']} samples per solve. err = mean |log p_eps"
        " error| per dim of the ODE part (the prior swapped for the exact log p_T). score_sde = scipy RK45 + numpy "
        "round trips + 2 model calls per evaluation, same (exact) divergence.",
    ]
    sweep = results.get("sweep", [])
    if sweep:
        lines += [
            "",
            "Equal tolerance (rtol = atol), sdeflow dopri5 against score_sde RK45 (both Dormand-Prince 5(4)):",
            "",
            "| d | tol | sdeflow err | NFE | s | ms/sample | score_sde err | NFE | s | speed-up |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in sweep:
        if r["method"] != "sdeflow dopri5":
            continue
        b = next(
            (q for q in sweep if q["d"] == r["d"] and q["tol"] == r["tol"] and q["method"] == "score_sde RK45"), None
        )
        lines.append(
            f"| {r['d']} | {r['tol']:.0e} | {fmt(r['err'])} | {r['nfe']} | {r['s']:.3f} | {r['ms_per_sample']:.3g} | "
            + (f"{fmt(b['err'])} | {b['nfe']} | {b['s']:.3f} | {b['s'] / r['s']:.1f} |" if b else "- | - | - | - |")
        )
    if results.get("equal_accuracy"):
        lines += [
            "",
            "Equal accuracy: CPU seconds to reach a mean error per dim (log-log interpolation along each method's own "
            'tolerance sweep; sdeflow dopri8 is the same API with method="dopri8"):',
            "",
            "| d | target err | score_sde RK45 s | sdeflow dopri5 s | sdeflow dopri8 s | speed-up dopri5 | speed-up dopri8 |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in results.get("equal_accuracy", []):
        lines.append(
            f"| {r['d']} | {r['target_err']:.0e} | {fmt(r['s[score_sde RK45]'], '.3f')} | "
            f"{fmt(r['s[sdeflow dopri5]'], '.3f')} | {fmt(r['s[sdeflow dopri8]'], '.3f')} | "
            f"{fmt(r['speedup_dopri5'], '.1f')} | {fmt(r['speedup_dopri8'], '.1f')} |"
        )
    if results.get("hutchinson"):
        lines += [
            "",
            f"Exact against Hutchinson (rtol = atol = {m['hutch_tol']:.0e}, one probe per sample, {m['draws']} draws "
            "per point for the spread; bias = mean over draws minus exact, per dim):",
            "",
            "| d | divergence | probe | s | NFE | std of log p per dim | bias per dim | its std. error |",
            "|---:|---|---|---:|---:|---:|---:|---:|",
        ]
    for r in results.get("hutchinson", []):
        lines.append(
            f"| {r['d']} | {r['divergence']} | {r['probe']} | {r['s']:.3f} | {r['nfe']} | "
            f"{fmt(r['std_per_dim'])} | {fmt(r['bias_per_dim'])} | {fmt(r.get('bias_se_per_dim'))} |"
        )
    if results.get("mlp"):
        r0 = results["mlp"][0]
        lines += [
            "",
            f"Neural net (MLPScoreNet d = {r0['d']}, hidden 256, depth 3, random weights, float32), n = {r0['n']}, "
            f"rtol = atol = {r0['tol']:.0e}:",
            "",
            "| divergence | sdeflow s | sdeflow NFE | score_sde s | score_sde NFE | speed-up | mean log p diff per dim |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["mlp"]:
            lines.append(
                f"| {r['divergence']} | {r['ours_s']:.3f} | {r['ours_nfe']} | {r['base_s']:.3f} | "
                f"{r['base_nfe']} | {r['speedup']:.1f} | {fmt(r['mean_log_prob_diff_per_dim'])} |"
            )
    lines += markdown_new_parts(results)
    lines += markdown_nfe(results)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--n", type=int, default=128, help="samples per solve")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/likelihood")
    p.add_argument(
        "--parts",
        default="sweep,hutchinson,mlp,divergence,hutchinson_cost,vlb,nfe",
        help="comma-separated subset of sweep,hutchinson,mlp,divergence,hutchinson_cost,vlb,nfe",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dims = (2, 8) if args.quick else (2, 8, 64)
    tols = (1e-3, 1e-5, 1e-7) if args.quick else (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    base_tols = tols + ((1e-9,) if not args.quick else ())
    targets = (1e-3, 1e-5) if args.quick else (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    n = 16 if args.quick else args.n
    repeats = 1 if args.quick else args.repeats
    draws = 8 if args.quick else 32
    hutch_tol = 1e-5
    results: dict[str, Any] = {
        "meta": {
            "device": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "n": n,
            "repeats": repeats,
            "draws": draws,
            "hutch_tol": hutch_tol,
            "quick": args.quick,
        },
    }
    parts = set(args.parts.split(","))
    warm = make_gmm(2)  # first-call costs (autograd engine, lazy imports) out of the timings
    with torch.no_grad():
        sf.log_likelihood(warm.denoiser(sf.VPSDE()), warm.sample(4), rtol=1e-3, atol=1e-3)
    score_sde_likelihood(warm.denoiser(sf.VPSDE()), warm.sample(4), 1e-3, 1e-3)
    if "sweep" in parts:
        print("tolerance sweep", flush=True)
        results["sweep"] = tolerance_sweep(dims, tols, base_tols, n, repeats)
        results["equal_accuracy"] = equal_accuracy(results["sweep"], targets)
    if "hutchinson" in parts:
        print("exact vs hutchinson", flush=True)
        results["hutchinson"] = exact_vs_hutchinson(dims, min(n, 16), draws, hutch_tol, repeats)
    if "mlp" in parts:
        print("neural net", flush=True)
        results["mlp"] = neural_net_comparison(16 if args.quick else 64, n, hutch_tol, repeats)
    if "divergence" in parts:
        print("exact divergence against vmap(jacrev)", flush=True)
        shapes = (
            [("gmm", 8, 64), ("mlp", 8, 64)]
            if args.quick
            else [("gmm", 64, 256), ("gmm", 256, 256), ("mlp", 64, 256), ("mlp", 256, 256), ("unet", 64, 8)]
        )
        results["divergence"] = divergence_timing(shapes, repeats)
        results["divergence_profile"] = divergence_profile(
            [("mlp", 8, 64)] if args.quick else [("mlp", 256, 64), ("unet", 64, 4)]
        )
    if "hutchinson_cost" in parts:
        print("hutchinson cost per unit variance", flush=True)
        results["hutchinson_cost"] = hutchinson_cost(
            8 if args.quick else 64, 64 if args.quick else 256, 4 if args.quick else 32, repeats
        )
    if "vlb" in parts:
        print("variational bounds", flush=True)
        results["vlb"] = vlb_table(64 if args.quick else 1000, 2 if args.quick else 256, 2 if args.quick else 64)
    if "nfe" in parts:
        print("NFE against err_ode", flush=True)
        nd, nn = (8, 8) if args.quick else (64, min(args.n, 32))
        results["meta"].update(nfe_d=nd, nfe_n=nn)
        results["nfe"] = nfe_comparison(
            nd,
            nn,
            (1e-3, 1e-5) if args.quick else (1e-3, 1e-4, 1e-5, 1e-6),
            (17, 25) if args.quick else (17, 25, 33, 49),
            quick=args.quick,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
