"""Likelihood benchmark: sdeflow.log_likelihood against the closed form and against the score_sde approach.

What it measures (GaussianMixture data, exact denoiser, VP SDE, float64, so every error is solver error):

1. accuracy and cost as rtol = atol goes 1e-3 .. 1e-7, d = 2, 8, 64: mean |log p_eps error| per dimension of the ODE
   part (the prior swapped for the exact log p_T, see docs/likelihood.md), NFE, CPU seconds and ms per sample; for
   sdeflow (torchdiffeq dopri5 on the device, float64 state, one net call per evaluation, vectorized divergence) and
   for the score_sde approach at the same tolerance;
2. exact against Hutchinson divergence: cost and the spread of log p over probe draws;
3. the same comparison with a neural net (sdeflow's MLPScoreNet, random weights) where the net dominates the cost.

The score_sde approach, written here from Song et al. (2021, App. D.2) and the structure of their likelihood code:
``scipy.integrate.solve_ivp(method="RK45")`` on a flat float64 numpy state [x, delta]; each evaluation copies the state
into a torch tensor, calls the model once for the drift and once more inside autograd for the divergence (Hutchinson:
grad of <v, eps>; exact: one autograd pass per dimension), and copies both back to numpy.

Timings are process CPU seconds with one torch thread (the machine is shared; CPU time is the stable measure), best
of ``--repeats``. Output: runs/likelihood/results.json and runs/likelihood/table.md (printed too).

    .venv/bin/python benchmarks/likelihood.py            # full run
    .venv/bin/python benchmarks/likelihood.py --quick    # smoke test
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


# ------------------------------------------------------------------------------------------------ report
def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        f"### Likelihood (probability-flow ODE), {m['device']}, torch {m['torch']}, 1 thread, CPU seconds",
        "",
        f"GaussianMixture (K = 4), exact denoiser, VP SDE, float64, n = {m['n']} samples per solve. err = mean |log p_eps"
        " error| per dim of the ODE part (the prior swapped for the exact log p_T). score_sde = scipy RK45 + numpy "
        "round trips + 2 model calls per evaluation, same (exact) divergence.",
        "",
        "Equal tolerance (rtol = atol), sdeflow dopri5 against score_sde RK45 (both Dormand-Prince 5(4)):",
        "",
        "| d | tol | sdeflow err | NFE | s | ms/sample | score_sde err | NFE | s | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sweep = results["sweep"]
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
    lines += [
        "",
        "Equal accuracy: CPU seconds to reach a mean error per dim (log-log interpolation along each method's own "
        'tolerance sweep; sdeflow dopri8 is the same API with method="dopri8"):',
        "",
        "| d | target err | score_sde RK45 s | sdeflow dopri5 s | sdeflow dopri8 s | speed-up dopri5 | speed-up dopri8 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["equal_accuracy"]:
        lines.append(
            f"| {r['d']} | {r['target_err']:.0e} | {fmt(r['s[score_sde RK45]'], '.3f')} | "
            f"{fmt(r['s[sdeflow dopri5]'], '.3f')} | {fmt(r['s[sdeflow dopri8]'], '.3f')} | "
            f"{fmt(r['speedup_dopri5'], '.1f')} | {fmt(r['speedup_dopri8'], '.1f')} |"
        )
    lines += [
        "",
        f"Exact against Hutchinson (rtol = atol = {m['hutch_tol']:.0e}, one probe per sample, {m['draws']} draws "
        "per point for the spread; bias = mean over draws minus exact, per dim):",
        "",
        "| d | divergence | probe | s | NFE | std of log p per dim | bias per dim | its std. error |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["hutchinson"]:
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--n", type=int, default=128, help="samples per solve")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/likelihood")
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
    warm = make_gmm(2)  # first-call costs (autograd engine, lazy imports) out of the timings
    with torch.no_grad():
        sf.log_likelihood(warm.denoiser(sf.VPSDE()), warm.sample(4), rtol=1e-3, atol=1e-3)
    score_sde_likelihood(warm.denoiser(sf.VPSDE()), warm.sample(4), 1e-3, 1e-3)
    print("tolerance sweep", flush=True)
    results["sweep"] = tolerance_sweep(dims, tols, base_tols, n, repeats)
    results["equal_accuracy"] = equal_accuracy(results["sweep"], targets)
    print("exact vs hutchinson", flush=True)
    results["hutchinson"] = exact_vs_hutchinson(dims, min(n, 16), draws, hutch_tol, repeats)
    print("neural net", flush=True)
    results["mlp"] = neural_net_comparison(16 if args.quick else 64, n, hutch_tol, repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
