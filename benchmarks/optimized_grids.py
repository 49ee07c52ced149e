"""Optimized time grids: sdeflow's multistep solvers on grids fitted to the model, against diffusers' schedulers.

Problems: an exact-score Gaussian mixture (10 components, sharp modes in [-1, 1]^d, the recipe of
benchmarks/peers.py) in d = 2 and d = 64, under DDPM's linear schedule and the improved-DDPM cosine schedule (1000
steps, ``sf.DiscreteVPSDE.linear(1000)`` / ``.cosine(1000)``; diffusers' ``"linear"`` / ``"squaredcos_cap_v2"``).
Every contender integrates the probability-flow ODE in float32 from the same x_T at t = 1 (timestep 999) to
t = 1/N (timestep 0; diffusers with ``final_sigmas_type="sigma_min"``, the same end point), calling the same exact
eps-model with integer timesteps. Error: RMS over samples and coordinates of the final state against a float64 DOP853
reference of the same ODE from the same noise (``peers.reference``, rtol = atol = 1e-9).

Generalisation is the test: grids are fitted (``sf.grid_opt.fit_grid``, method ``"dp"``) on ``--fit-n`` noises
(fit_grid's default draw: stratified from a pool of 16x as many, ``stratified_noises``) drawn with one seed, and every
error is measured on ``--eval-n`` other noises. sdeflow runs each configuration on its
default grid (log-SNR uniform) and on the fitted grid; diffusers runs every solver order / variant / time spacing
(the peers benchmark's list) at the same NFE and at 1.5x and 2x the NFE. Fitting cost: one shared reference solve
per problem, then one fit per (configuration, NFE); wall times with one torch thread (``--threads``).

Writes runs/optimized_grids/results.json and table.md (printed).

    .venv/bin/python benchmarks/optimized_grids.py            # full run (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/optimized_grids.py --quick    # d = 2, linear, NFE 5 and 10, small sizes
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sdeflow as sf
from sdeflow.grid_opt import fit_grid, reference_solve, stratified_noises

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import reference, rms, run_peer

N_TRAIN = 1000
F64 = torch.float64
SCHEDULES = {"linear": ("linear", sf.DiscreteVPSDE.linear), "cosine": ("squaredcos_cap_v2", sf.DiscreteVPSDE.cosine)}

# sdeflow configurations: name -> (solver, options)
SDEFLOW: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm_solver++(3M)": ("dpm_solver++", {"order": 3}),
    "unipc(bh2,2)": ("unipc", {"order": 2, "variant": "bh2"}),
    "unipc(bh1,3)": ("unipc", {"order": 3, "variant": "bh1"}),
}


def make_problem(dim: int, schedule: str, seed: int) -> dict[str, Any]:
    """peers.make_problem's mixture (sharp modes in [-0.8, 0.8]^dim, stds 0.05-0.2) under ``schedule``."""
    g = torch.Generator().manual_seed(seed)
    components = 10
    means = torch.rand(components, dim, generator=g, dtype=F64) * 1.6 - 0.8
    stds = 0.05 + 0.15 * torch.rand(components, generator=g, dtype=F64)
    weights = torch.softmax(torch.randn(components, generator=g, dtype=F64) * 0.5, 0)
    gmm = sf.GaussianMixture(means, stds, weights)
    sde = SCHEDULES[schedule][1](N_TRAIN)

    def net(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = (timestep.to(F64) + 1.0) / N_TRAIN
        return gmm.eps(x, t, sde).to(x.dtype)

    return {"gmm": gmm, "sde": sde, "net": net, "t_end": 1.0 / N_TRAIN, "schedule": schedule, "dim": dim}


def peer_configs(schedule: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    base = dict(num_train_timesteps=N_TRAIN, beta_schedule=SCHEDULES[schedule][0], final_sigmas_type="sigma_min")
    if schedule == "linear":
        base.update(beta_start=1e-4, beta_end=0.02)
    out: dict[str, tuple[Any, dict[str, Any]]] = {
        # the schedulers' own defaults (only the end point set to sigma_min, as for every peer here)
        "DPMSolverMultistep default": (DPMSolverMultistepScheduler, dict(base)),
        "UniPCMultistep default": (UniPCMultistepScheduler, dict(base)),
    }
    spacings = {"linspace": {}, "trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True}}
    for sp, extra in spacings.items():
        for k in (2, 3):
            out[f"DPMSolverMultistep({k}) {sp}"] = (DPMSolverMultistepScheduler, dict(base, solver_order=k, **extra))
            for variant in ("bh1", "bh2"):
                out[f"UniPCMultistep({variant},{k}) {sp}"] = (
                    UniPCMultistepScheduler,
                    dict(base, solver_order=k, solver_type=variant, **extra),
                )
    for k in (2, 3):
        out[f"DPMSolverMultistep({k}) lu-lambdas"] = (
            DPMSolverMultistepScheduler,
            dict(base, solver_order=k, use_lu_lambdas=True),
        )
    return out


def default_rows(args: argparse.Namespace) -> str:
    """Markdown rows: every sdeflow configuration on its default grid, on the held-out noises (no fitting, no peers)."""
    lines = []
    for dim in args.dims:
        for schedule in args.schedules:
            prob = make_problem(dim, schedule, args.seed)
            den = sf.Denoiser(prob["net"], prob["sde"], "eps", time_input="index")
            x = torch.randn(args.eval_n, dim, generator=torch.Generator().manual_seed(args.seed + 100), dtype=F64)
            ref = reference({**prob, "x_T": x}, rtol=1e-9, atol=1e-9)
            for name, (solver, opts) in SDEFLOW.items():
                grid = sf.sampling.make_solver(den, solver, **opts).default_grid
                errs = [
                    f"{rms(sf.sample(den, solver, nfe=n, x_T=x.float(), t_end=prob['t_end'], **opts).x, ref):.2e}"
                    for n in args.nfe
                ]
                lines.append(f"| d={dim} {schedule} | {name} [default, {grid}] | " + " | ".join(errs) + " |")
    return "\n".join(lines)


def best(rows: dict[str, dict[int, float]], nfe: int) -> tuple[str, float]:
    cands = [(v[nfe], k) for k, v in rows.items() if nfe in v and math.isfinite(v[nfe])]
    if not cands:
        return "-", math.nan
    err, name = min(cands)
    return name, err


def run_problem(dim: int, schedule: str, args: argparse.Namespace) -> dict[str, Any]:
    prob = make_problem(dim, schedule, args.seed)
    sde, t_end = prob["sde"], prob["t_end"]
    den = sf.Denoiser(prob["net"], sde, "eps", time_input="index")
    # held-out evaluation noises and their float64 reference (DOP853)
    g_eval = torch.Generator().manual_seed(args.seed + 100)
    x_eval = torch.randn(args.eval_n, dim, generator=g_eval, dtype=F64)
    t0 = time.perf_counter()
    ref = reference({**prob, "x_T": x_eval}, rtol=1e-9, atol=1e-9)
    ref_s = time.perf_counter() - t0
    x32 = x_eval.float()
    out: dict[str, Any] = {"dim": dim, "schedule": schedule, "eval_reference_s": ref_s}

    # the fitting noises (fit_grid's default: fit_n of a pool of 16 fit_n, stratified by hardness) and their
    # reference, shared by every fit of this problem
    g_fit = torch.Generator().manual_seed(args.seed + 200)
    t0 = time.perf_counter()
    nfe0 = den.nfe
    x_fit, w = stratified_noises(den, (dim,), args.fit_n, 16 * args.fit_n, 0.25, g_fit, t_end)
    fit_ref = reference_solve(den, x_fit, t_end, steps=args.reference_steps, weights=w)
    out["fit_reference"] = {"s": time.perf_counter() - t0, "nfe": den.nfe - nfe0, "error": fit_ref.error}

    rows: dict[str, dict[int, float]] = {}
    fits: dict[str, dict[int, Any]] = {}
    for name, (solver, opts) in SDEFLOW.items():
        rows[f"{name} [default]"], rows[f"{name} [optimized]"], fits[name] = {}, {}, {}
        for nfe in args.nfe:
            res = sf.sample(den, solver, nfe=nfe, x_T=x32, t_end=t_end, **opts)
            assert res.nfe == nfe, (name, nfe, res.nfe)
            rows[f"{name} [default]"][nfe] = rms(res.x, ref)
            fit = fit_grid(
                den,
                solver,
                nfe,
                reference=fit_ref,
                method="dp",
                dtype=torch.float32,
                validation=args.validation,
                **opts,
            )
            res = sf.sample(den, solver, nfe=nfe, x_T=x32, grid=fit.grid, **opts)
            assert res.nfe == nfe, (name, nfe, res.nfe)
            rows[f"{name} [optimized]"][nfe] = rms(res.x, ref)
            fits[name][nfe] = {
                "grid": fit.grid.tolist(),
                "fit_error": fit.error,
                "fit_default_error": fit.default_error,
                "seconds": fit.seconds,
                "evaluations": fit.evaluations,
                "fit_nfe": fit.fit_nfe,
            }
            print(
                f"  d={dim} {schedule} {name} nfe={nfe}: default {rows[f'{name} [default]'][nfe]:.3e} optimized "
                f"{rows[f'{name} [optimized]'][nfe]:.3e} (fit {fit.error:.3e} vs {fit.default_error:.3e}, "
                f"{fit.seconds:.1f} s, {fit.evaluations} solves)",
                file=sys.stderr,
                flush=True,
            )
    peer_nfes = sorted({n for nfe in args.nfe for n in (nfe, math.ceil(1.5 * nfe), 2 * nfe)})
    peer_rows: dict[str, dict[int, float]] = {}
    for name, (cls, cfg) in peer_configs(schedule).items():
        peer_rows[name] = {}
        for nfe in peer_nfes:
            try:
                x, used = run_peer(cls, cfg, prob["net"], x32, nfe)
                err = rms(x, ref) if used == nfe and bool(torch.isfinite(x).all()) else math.nan
            except Exception as exc:  # a configuration diffusers rejects at this NFE
                print(f"  {name} nfe={nfe}: {type(exc).__name__}: {exc}", file=sys.stderr)
                err = math.nan
            peer_rows[name][nfe] = err
    out.update({"sdeflow": rows, "diffusers": peer_rows, "fits": fits, "peer_nfes": peer_nfes})
    return out


def markdown(result: dict[str, Any]) -> str:
    nfes = result["nfes"]
    lines = []
    for prob in result["problems"]:
        sd, df = prob["sdeflow"], prob["diffusers"]
        default = {k: v for k, v in sd.items() if k.endswith("[default]")}
        opt = {k: v for k, v in sd.items() if k.endswith("[optimized]")}
        fr = prob["fit_reference"]
        secs = [f["seconds"] for per in prob["fits"].values() for f in per.values()]
        lines += [
            f"**d = {prob['dim']}, {prob['schedule']} schedule** (fit: {result['fit_n']} noises; reference "
            f"{fr['nfe']} NFE in {fr['s']:.1f} s, its error {fr['error']:.1e}; one fit {min(secs):.1f}-"
            f"{max(secs):.1f} s; evaluated on {result['eval_n']} other noises)",
            "",
            "| NFE | sdeflow, default grid | sdeflow, optimized grid | diffusers, same NFE | diffusers, 1.5x NFE |"
            " diffusers, 2x NFE |",
            "|---:|---|---|---|---|---|",
        ]
        for n in nfes:
            cells = []
            for rows, m in ((default, n), (opt, n), (df, n), (df, math.ceil(1.5 * n)), (df, 2 * n)):
                name, err = best(rows, m)
                label = name.replace(" [default]", "").replace(" [optimized]", "")
                cells.append(f"{err:.2e} {label}" + (f" @{m}" if m != n else ""))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("All sdeflow configurations (RMS error, held-out noises):")
    lines.append("")
    lines.append("| problem | configuration | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    lines.append("|---|---|" + "---:|" * len(nfes))
    for prob in result["problems"]:
        for k, v in prob["sdeflow"].items():
            lines.append(
                f"| d={prob['dim']} {prob['schedule']} | {k} | " + " | ".join(f"{v[n]:.2e}" for n in nfes) + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/optimized_grids")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    p.add_argument("--schedules", nargs="+", default=["linear", "cosine"], choices=list(SCHEDULES))
    p.add_argument("--fit-n", type=int, default=256)
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--reference-steps", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation", type=float, default=0.0, help="fit_grid's held-out fraction (early stopping)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (several threads on a loaded machine cost ms)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--merge", nargs="+", help="only merge the results.json of these runs into --out's table")
    p.add_argument("--defaults-only", action="store_true", help="only the sdeflow configurations on their default grid")
    args = p.parse_args(argv)
    if args.merge:
        runs = [json.loads((Path(d) / "results.json").read_text()) for d in args.merge]
        merged = dict(runs[0], problems=[q for r in runs for q in r["problems"]])
        for q in merged["problems"]:  # JSON turned the NFE keys into strings
            for lib in ("sdeflow", "diffusers"):
                q[lib] = {k: {int(n): e for n, e in v.items()} for k, v in q[lib].items()}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(merged, indent=1, default=str))
        md = markdown(merged)
        (out / "table.md").write_text(md)
        print(md)
        return merged
    torch.set_num_threads(args.threads)
    if args.defaults_only:
        print(default_rows(args))
        return {}
    try:
        import diffusers
    except ImportError:
        sys.exit("benchmarks/optimized_grids.py needs diffusers: pip install -e '.[bench]' -c constraints.txt")
    if args.quick:
        args.nfe, args.dims, args.schedules, args.fit_n, args.eval_n = [5, 10], [2], ["linear"], 64, 256
    result: dict[str, Any] = {
        "nfes": args.nfe,
        "fit_n": args.fit_n,
        "eval_n": args.eval_n,
        "seed": args.seed,
        "validation": args.validation,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "problems": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dim in args.dims:
        for schedule in args.schedules:
            print(f"problem d={dim} {schedule}", file=sys.stderr, flush=True)
            result["problems"].append(run_problem(dim, schedule, args))
            (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "table.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
