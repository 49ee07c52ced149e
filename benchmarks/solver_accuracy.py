"""Work-precision of the probability-flow ODE samplers: error against a float64 reference against NFE and time.

Setting (every error is solver error, there is no model error): GaussianMixture data with its exact denoiser, the
linear VP SDE (beta 0.1 .. 20), float64, t from T = 1 to t_end = 1e-3, the same x_T for every solver. Problems: d = 2
(3 components) and d = 64 (4 components). The reference endpoint of every trajectory comes from scipy's DOP853 at
rtol = 1e-10, atol = 1e-12 on the flattened batch.

For every deterministic solver in ``sdeflow.solvers.SOLVERS`` (default options, each on its own default grid) plus
the option variants in ``VARIANTS``, and every NFE budget, it records the RMS error per coordinate of x(t_end), the
NFE actually spent (Heun takes nfe // 2 full steps: the grid ends at sigma(t_end) > 0), the wall time and the process CPU time (medians of
``--repeats`` runs, one torch thread; on a shared machine the CPU time is the stable one). ``rk45`` (adaptive) is
swept over rtol = atol instead and reported at the NFE it chose.

Output under runs/solver_accuracy/ (git-ignored): results.json, table.md (printed too) and work_precision.png
(log-log error against NFE, one panel per problem).

    .venv/bin/python benchmarks/solver_accuracy.py            # full run (about a minute)
    .venv/bin/python benchmarks/solver_accuracy.py --quick    # d = 2, NFE 5/10/20, a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp

import sdeflow as sf
from sdeflow.solvers import SOLVERS, available

F64 = torch.float64
NFES = (5, 10, 20, 50, 100, 200)
RK45_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
#: option variants benchmarked besides each solver's defaults (skipped when a solver does not accept them)
VARIANTS: dict[str, list[dict]] = {
    "dpm_solver": [{"order": 2}],
    "dpm_solver++": [{"order": 3}],
    "unipc": [{"order": 3}],
}
#: not ODE samplers in their own right: parallel reproduces its base solver; rk45 is swept over tolerances
SKIP = {"parallel", "rk45"}


def problems(batch: int, dims: tuple[int, ...]) -> list[dict[str, Any]]:
    out = []
    for d in dims:
        g = torch.Generator().manual_seed(1234 + d)
        if d == 2:
            gmm = sf.GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], [0.5, 0.6, 0.45], [0.3, 0.4, 0.3])
        else:
            means = 1.5 * torch.randn(4, d, generator=g, dtype=F64)
            stds = 0.3 + 0.3 * torch.rand(4, generator=g, dtype=F64)
            gmm = sf.GaussianMixture(means, stds)
        sde = sf.VPSDE(0.1, 20.0)
        x_T = sde.prior_sample((batch, d), g, dtype=F64)
        out.append({"name": f"mixture d={d}", "d": d, "sde": sde, "gmm": gmm, "x_T": x_T})
    return out


def reference(p: dict[str, Any], t_end: float) -> torch.Tensor:
    """x(t_end) of the probability-flow ODE from every x_T: scipy DOP853, float64, on the flattened batch."""
    sde, gmm, x_T = p["sde"], p["gmm"], p["x_T"]

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        x, tt = torch.from_numpy(y).reshape(x_T.shape), torch.tensor(t, dtype=F64)
        return (sde.f(tt) * x - 0.5 * sde.g2(tt) * gmm.score(x, tt, sde)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (sde.T, t_end), x_T.reshape(-1).numpy(), method="DOP853", rtol=1e-10, atol=1e-12)
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(x_T.shape)


def solver_list(names: list[str] | None) -> list[tuple[str, str, dict]]:
    den = sf.GaussianMixture([[0.0]], [1.0]).denoiser(sf.VPSDE())
    out = []
    for name in names or available():
        if name in SKIP or name not in SOLVERS:
            continue
        for opts in [{}] + VARIANTS.get(name, []):
            try:
                st = SOLVERS[name](den, **opts)
            except ValueError:
                continue
            if st.stochastic or st.integrator() is not None or st.tolerances is not None:
                continue
            label = name + "".join(f" {k}={v}" for k, v in opts.items())
            out.append((label, name, opts))
    return out


def timed(fn, repeats: int) -> tuple[Any, float, float]:
    """(result, median wall seconds, median process CPU seconds) over ``repeats`` runs."""
    walls, cpus, res = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return res, statistics.median(walls), statistics.median(cpus)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    t_end = 1e-3
    results: dict[str, Any] = {
        "setting": {
            "sde": "VPSDE(0.1, 20, linear)",
            "t_end": t_end,
            "batch": args.batch,
            "dtype": "float64",
            "reference": "scipy DOP853 rtol 1e-10 atol 1e-12",
            "threads": args.threads,
            "repeats": args.repeats,
            "machine": platform.platform(),
            "torch": torch.__version__,
        },
        "problems": [],
    }
    for p in problems(args.batch, tuple(args.dims)):
        ref = reference(p, t_end)
        den = p["gmm"].denoiser(p["sde"])
        rows = []
        for label, name, opts in solver_list(args.solvers):
            for nfe in args.nfe:

                def go():
                    return sf.sample(den, name, nfe=nfe, x_T=p["x_T"], t_end=t_end, **opts)

                try:
                    res, wall, cpu = timed(go, args.repeats)
                except ValueError as e:  # budget too small for this solver
                    rows.append(
                        {
                            "solver": label,
                            "budget": nfe,
                            "nfe": None,
                            "error": None,
                            "seconds": None,
                            "cpu_seconds": None,
                            "note": str(e),
                        }
                    )
                    continue
                err = float((res.x - ref).pow(2).mean().sqrt())
                rows.append(
                    {"solver": label, "budget": nfe, "nfe": res.nfe, "error": err, "seconds": wall, "cpu_seconds": cpu}
                )
                print(f"{p['name']:>14} {label:>24} nfe {res.nfe:>4}  rms error {err:9.2e}  {wall * 1e3:8.1f} ms")
        if "rk45" in SOLVERS and (not args.solvers or "rk45" in args.solvers):
            for tol in args.rk45_tols:

                def go():
                    return sf.sample(den, "rk45", x_T=p["x_T"], t_end=t_end, rtol=tol, atol=tol)

                res, wall, cpu = timed(go, args.repeats)
                err = float((res.x - ref).pow(2).mean().sqrt())
                rows.append(
                    {
                        "solver": "rk45",
                        "rtol": tol,
                        "nfe": res.nfe,
                        "error": err,
                        "seconds": wall,
                        "cpu_seconds": cpu,
                        "accepted": res.stats["accepted"],
                        "rejected": res.stats["rejected"],
                    }
                )
                print(
                    f"{p['name']:>14} {f'rk45 tol={tol:g}':>24} nfe {res.nfe:>4}  rms error {err:9.2e}  "
                    f"{wall * 1e3:8.1f} ms"
                )
        results["problems"].append({"name": p["name"], "d": p["d"], "rows": rows})
    return results


def markdown(results: dict[str, Any], nfes: list[int]) -> str:
    s = results["setting"]
    lines = [
        f"RMS error per coordinate of x(t_end) against the reference ({s['reference']}), {s['sde']}, t_end = "
        f"{s['t_end']}, batch {s['batch']}, {s['dtype']}, exact mixture denoiser. Columns: NFE budget; cells: error "
        f"(wall ms / CPU ms, medians of {s['repeats']} runs, {s['threads']} torch thread). Heun takes nfe "
        "// 2 full steps (the grid ends at sigma(t_end) > 0).",
        "",
    ]
    for prob in results["problems"]:
        fixed = [r for r in prob["rows"] if "budget" in r]
        labels = list(dict.fromkeys(r["solver"] for r in fixed))
        lines += [
            f"**{prob['name']}**",
            "",
            "| solver | " + " | ".join(str(n) for n in nfes) + " |",
            "|---|" + "---|" * len(nfes),
        ]
        for lab in labels:
            cells = []
            for n in nfes:
                r = next((r for r in fixed if r["solver"] == lab and r["budget"] == n), None)
                cells.append(
                    "-"
                    if r is None or r["error"] is None
                    else f"{r['error']:.2e} ({r['seconds'] * 1e3:.0f} / {r['cpu_seconds'] * 1e3:.0f})"
                )
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        adaptive = [r for r in prob["rows"] if "rtol" in r]
        if adaptive:
            lines += [
                "",
                "| rk45 (torchdiffeq dopri5) rtol = atol | NFE | accepted / rejected | error | wall / CPU ms |",
                "|---|---|---|---|---|",
            ]
            for r in adaptive:
                lines.append(
                    f"| {r['rtol']:g} | {r['nfe']} | {r['accepted']} / {r['rejected']} | {r['error']:.2e} | "
                    f"{r['seconds'] * 1e3:.0f} / {r['cpu_seconds'] * 1e3:.0f} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = results["problems"]
    fig, axes = plt.subplots(1, len(probs), figsize=(6 * len(probs), 4.5), squeeze=False)
    for ax, prob in zip(axes[0], probs):
        labels = list(dict.fromkeys(r["solver"] for r in prob["rows"]))
        for lab in labels:
            rs = [r for r in prob["rows"] if r["solver"] == lab and r["error"] is not None]
            rs.sort(key=lambda r: r["nfe"])
            ax.loglog(
                [r["nfe"] for r in rs], [r["error"] for r in rs], "o-" if lab != "rk45" else "s--", label=lab, ms=3
            )
        ax.set_title(prob["name"])
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error of x(t_end)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="d = 2 only, NFE 5/10/20, two rk45 tolerances, 1 repeat")
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--solvers", nargs="+", default=None, help="names in sdeflow.solvers.SOLVERS (default: all)")
    ap.add_argument("--rk45-tols", type=float, nargs="+", default=list(RK45_TOLS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/solver_accuracy"))
    args = ap.parse_args(argv)
    if args.quick:
        args.nfe, args.dims, args.rk45_tols, args.repeats, args.batch = [5, 10, 20], [2], [1e-3, 1e-5], 1, 16
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, args.nfe)
    (args.out / "table.md").write_text(table)
    plot(results, args.out / "work_precision.png")
    print()
    print(table)
    print(f"wrote {args.out}/results.json, table.md, work_precision.png")


if __name__ == "__main__":
    main()
