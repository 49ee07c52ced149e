"""Peers benchmark: sdeflow's fast solvers against diffusers' schedulers on the same exact model.

Every contender integrates the probability-flow ODE of ``sf.DiscreteVPSDE.linear(1000)`` (DDPM's betas) from the same
x_T at t = 1 (timestep 999) to t = 1/N (timestep 0), calling the same exact Gaussian-mixture eps-model with integer
timesteps (sdeflow through ``Denoiser(time_input="index")``, which maps t to t*N - 1). Measured:

* accuracy: RMS error of the final state against a float64 reference (scipy DOP853, rtol = atol = 1e-10, integrated
  in log-SNR where the path is smooth), at NFE 5, 10, 15, 20, 25, 50. Each library gets its own configurations
  (orders, variants, time spacings); the table reports every configuration and the best one of each library;
* overhead per step: wall time per NFE of a whole sampling call with a model that costs nothing (``net(x, t) = x``),
  minimum over interleaved repeats, float32, as sdeflow/peer ratios of the matching solvers measured in one run;
* harness check: sdeflow's DPM-Solver++(2M) and UniPC on diffusers' own time grid reproduce diffusers' outputs (to
  diffusers' float32 schedule tables), so the two libraries solve the same problem;
* the adaptive_sde anchor (Jolicoeur-Martineau et al. 2021 report 2-10x fewer NFE than Euler-Maruyama at equal
  quality): Frechet distance of reverse-SDE samples to exact samples of p_{t_end}, adaptive_sde over rtol against
  euler_maruyama over NFE, on the same mixture (VP, float32).

diffusers is a benchmark-only extra (``pip install -e '.[bench]' -c constraints.txt``), never a runtime dependency.
Writes ``runs/peers/peers.json`` and ``runs/peers/peers.md``. ``--quick`` runs a small version (CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.integrate
import torch

import sdeflow as sf

N_TRAIN = 1000
F64 = torch.float64


# ------------------------------------------------------------------------------------------------ the problem
def make_problem(dim: int, components: int, batch: int, seed: int) -> dict[str, Any]:
    """A Gaussian mixture in [-1, 1]^dim with sharp modes (image-like data), its exact eps-net, and x_T."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(components, dim, generator=g, dtype=F64) * 1.6 - 0.8
    stds = 0.05 + 0.15 * torch.rand(components, generator=g, dtype=F64)
    weights = torch.softmax(torch.randn(components, generator=g, dtype=F64) * 0.5, 0)
    gmm = sf.GaussianMixture(means, stds, weights)
    sde = sf.DiscreteVPSDE.linear(N_TRAIN)

    def net(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = (timestep.to(F64) + 1.0) / N_TRAIN
        return gmm.eps(x, t, sde).to(x.dtype)

    x_T = torch.randn(batch, dim, generator=g, dtype=F64)
    return {"gmm": gmm, "sde": sde, "net": net, "x_T": x_T, "t_end": 1.0 / N_TRAIN}


def reference(problem: dict[str, Any], rtol: float = 1e-10, atol: float = 1e-10) -> torch.Tensor:
    r"""The probability-flow ODE in log-SNR, :math:`d(x/s)/d\lambda = e^\lambda \hat x_0(x, \lambda)`, by DOP853."""
    gmm, sde, x_T = problem["gmm"], problem["sde"], problem["x_T"]
    lam0, lam1 = float(sde.log_snr(sde.T)), float(sde.log_snr(problem["t_end"]))
    shape = x_T.shape

    def rhs(lam: float, u: np.ndarray) -> np.ndarray:
        t = sde.t_from_log_snr(torch.tensor(lam, dtype=F64))
        x = torch.from_numpy(u).reshape(shape) * sde.sigma(t)
        return (math.exp(lam) * gmm.x0(x, t, sde)).reshape(-1).numpy()

    u0 = (x_T / sde.sigma(sde.T)).reshape(-1).numpy()
    sol = scipy.integrate.solve_ivp(rhs, (lam0, lam1), u0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape) * sde.sigma(problem["t_end"])


def rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(F64) - ref).pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------------ contenders
# sdeflow: (solver, options); every configuration runs on every grid in SDEFLOW_GRIDS
SDEFLOW: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("ddim", {}),
    "dpm_solver-2": ("dpm_solver", {"order": 2}),
    "dpm_solver-3": ("dpm_solver", {"order": 3}),
    "dpm_solver++(2M)": ("dpm_solver++", {"order": 2}),
    "dpm_solver++(2M) no-lof": ("dpm_solver++", {"order": 2, "lower_order_final": False}),
    "dpm_solver++(3M)": ("dpm_solver++", {"order": 3}),
    "dpm_solver++(3M) no-lof": ("dpm_solver++", {"order": 3, "lower_order_final": False}),
    "unipc(bh1,2)": ("unipc", {"order": 2, "variant": "bh1"}),
    "unipc(bh2,2)": ("unipc", {"order": 2, "variant": "bh2"}),
    "unipc(bh1,3)": ("unipc", {"order": 3, "variant": "bh1"}),
    "unipc(bh2,3)": ("unipc", {"order": 3, "variant": "bh2"}),
    "unipc(bh2,3) no-lof": ("unipc", {"order": 3, "variant": "bh2", "lower_order_final": False}),
}
SDEFLOW_GRIDS = ("logsnr", "quadratic", "uniform")


def peers() -> dict[str, tuple[Any, dict[str, Any]]]:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    base = dict(num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    out: dict[str, tuple[Any, dict[str, Any]]] = {
        # trailing spacing + set_alpha_to_one=False: 999 -> ... -> timestep 0, one NFE per step
        "DDIM": (DDIMScheduler, dict(base, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)),
    }
    spacings = {"linspace": {}, "trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True}}
    for sp, extra in spacings.items():
        for k in (2, 3):
            out[f"DPMSolverMultistep({k}) {sp}"] = (
                DPMSolverMultistepScheduler,
                dict(base, solver_order=k, final_sigmas_type="sigma_min", **extra),
            )
        for k in (2, 3):
            for variant in ("bh1", "bh2"):
                out[f"UniPCMultistep({variant},{k}) {sp}"] = (
                    UniPCMultistepScheduler,
                    dict(base, solver_order=k, solver_type=variant, final_sigmas_type="sigma_min", **extra),
                )
    lu = dict(base, final_sigmas_type="sigma_min", use_lu_lambdas=True)
    out["DPMSolverMultistep(2) lu-lambdas"] = (DPMSolverMultistepScheduler, dict(lu, solver_order=2))
    out["DPMSolverMultistep(3) lu-lambdas"] = (DPMSolverMultistepScheduler, dict(lu, solver_order=3))
    return out


def run_peer(cls: Any, config: dict[str, Any], net: Callable, x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
    """diffusers' sampling loop: one model call and one scheduler.step per timestep."""
    sched = cls(**config)
    sched.set_timesteps(nfe)
    x, calls = x_T, 0
    for t in sched.timesteps:
        eps = net(x, t.expand(x.shape[0]))
        calls += 1
        x = sched.step(eps, t, x).prev_sample
    return x, calls


def run_sdeflow(
    den: sf.Denoiser, solver: str, opts: dict[str, Any], x_T: torch.Tensor, nfe: int, grid: Any, t_end: float
) -> tuple[torch.Tensor, int]:
    res = sf.sample(den, solver, nfe=nfe, x_T=x_T, grid=grid, t_end=t_end, **opts)
    return res.x, res.nfe


def diffusers_grid(cls: Any, config: dict[str, Any], nfe: int) -> torch.Tensor:
    """The times diffusers visits, as sdeflow times: timestep n -> t = (n + 1)/N, then the final t = 1/N."""
    sched = cls(**config)
    sched.set_timesteps(nfe)
    ts = (sched.timesteps.to(F64) + 1.0) / N_TRAIN
    return torch.cat([ts, torch.tensor([1.0 / N_TRAIN], dtype=F64)])


# ------------------------------------------------------------------------------------------------ measurements
def accuracy(problem: dict[str, Any], ref: torch.Tensor, nfes: list[int], quick: bool) -> dict[str, Any]:
    den = sf.Denoiser(problem["net"], problem["sde"], "eps", time_input="index")
    x_T, t_end = problem["x_T"], problem["t_end"]
    rows: dict[str, dict[int, float]] = {}
    for name, (solver, opts) in SDEFLOW.items():
        for grid in SDEFLOW_GRIDS if not quick else ("logsnr",):
            key = f"{name} [{grid}]"
            rows[key] = {}
            for nfe in nfes:
                x, used = run_sdeflow(den, solver, opts, x_T, nfe, grid, t_end)
                if used != nfe:
                    raise AssertionError(f"{key} spent {used} NFE, asked {nfe}")
                rows[key][nfe] = rms(x, ref)
    peer_rows: dict[str, dict[int, float]] = {}
    for name, (cls, cfg) in peers().items():
        peer_rows[name] = {}
        for nfe in nfes:
            try:
                x, used = run_peer(cls, cfg, problem["net"], x_T, nfe)
                err = rms(x, ref) if used == nfe and bool(torch.isfinite(x).all()) else float("nan")
            except Exception as exc:  # a configuration diffusers rejects at this NFE
                print(f"  {name} nfe={nfe}: {type(exc).__name__}: {exc}", file=sys.stderr)
                err = float("nan")
            peer_rows[name][nfe] = err
    return {"sdeflow": rows, "diffusers": peer_rows}


def best(rows: dict[str, dict[int, float]], nfe: int) -> tuple[str, float]:
    cands = [(v[nfe], k) for k, v in rows.items() if math.isfinite(v[nfe])]
    err, name = min(cands)
    return name, err


def harness_check(problem: dict[str, Any], nfes: list[int]) -> dict[str, float]:
    """sdeflow on diffusers' exact grid must reproduce diffusers (same problem, same method)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    den = sf.Denoiser(problem["net"], problem["sde"], "eps", time_input="index")
    x_T = problem["x_T"]
    base = dict(
        num_train_timesteps=N_TRAIN,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        final_sigmas_type="sigma_min",
    )
    out = {}
    for nfe in nfes:
        cfg = dict(base, solver_order=2)
        g = diffusers_grid(DPMSolverMultistepScheduler, cfg, nfe)
        ours = sf.sample(den, "dpm_solver++", nfe=nfe, x_T=x_T, grid=g, order=2, lower_order_final=nfe < 15).x
        theirs = run_peer(DPMSolverMultistepScheduler, cfg, problem["net"], x_T, nfe)[0]
        out[f"dpm_solver++(2M) vs DPMSolverMultistep(2), nfe={nfe}"] = rms(ours, theirs) / rms(theirs, 0 * theirs)
        cfg = dict(base, solver_order=2, solver_type="bh2", lower_order_final=nfe < 15)  # sdeflow's rule
        g = diffusers_grid(UniPCMultistepScheduler, cfg, nfe)
        ours = sf.sample(den, "unipc", nfe=nfe, x_T=x_T, grid=g, order=2, variant="bh2").x
        theirs = run_peer(UniPCMultistepScheduler, cfg, problem["net"], x_T, nfe)[0]
        out[f"unipc(bh2,2) vs UniPCMultistep(bh2,2), nfe={nfe}"] = rms(ours, theirs) / rms(theirs, 0 * theirs)
    return out


def overhead(shapes: dict[str, tuple[int, ...]], nfe: int, reps: int) -> dict[str, Any]:
    """Seconds per step of whole sampling calls with a free model, min over interleaved repeats."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    sde = sf.DiscreteVPSDE.linear(N_TRAIN)

    def free(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    den = sf.Denoiser(free, sde, "eps", time_input="index")
    base = dict(num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    pairs = {
        "DDIM": (
            ("dpm_solver", {"order": 1}),
            (DDIMScheduler, dict(base, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)),
        ),
        "2M": (
            ("dpm_solver++", {"order": 2}),
            (DPMSolverMultistepScheduler, dict(base, solver_order=2, final_sigmas_type="sigma_min")),
        ),
        "3M": (
            ("dpm_solver++", {"order": 3}),
            (DPMSolverMultistepScheduler, dict(base, solver_order=3, final_sigmas_type="sigma_min")),
        ),
        "UniPC-2": (
            ("unipc", {"order": 2}),
            (UniPCMultistepScheduler, dict(base, solver_order=2, final_sigmas_type="sigma_min")),
        ),
        "UniPC-3": (
            ("unipc", {"order": 3}),
            (UniPCMultistepScheduler, dict(base, solver_order=3, final_sigmas_type="sigma_min")),
        ),
    }
    out: dict[str, Any] = {}
    for sname, shape in shapes.items():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        jobs: dict[str, Callable[[], Any]] = {}
        for pname, ((solver, opts), (cls, cfg)) in pairs.items():
            jobs[f"sdeflow {pname}"] = lambda s=solver, o=opts: sf.sample(den, s, nfe=nfe, x_T=x, **o)
            jobs[f"diffusers {pname}"] = lambda c=cls, k=cfg: run_peer(c, k, free, x, nfe)
        times = {k: float("inf") for k in jobs}
        for _ in range(reps):
            for k, job in jobs.items():
                t0 = time.perf_counter()
                job()
                times[k] = min(times[k], (time.perf_counter() - t0) / nfe)
        out[sname] = {
            "shape": list(shape),
            "per_step_us": {k: 1e6 * v for k, v in times.items()},
            "ratio": {p: times[f"sdeflow {p}"] / times[f"diffusers {p}"] for p in pairs},
        }
    return out


def adaptive_sde_anchor(dim: int, components: int, n: int, seed: int, quick: bool) -> dict[str, Any]:
    """Frechet distance to exact p_{t_end} samples: adaptive_sde (rtol sweep, atol = 0.0078) vs euler_maruyama."""
    from sdeflow.evaluation.metrics import frechet_distance

    sde = sf.VPSDE()
    prob = make_problem(dim, components, 1, seed)
    gmm = prob["gmm"]
    den = gmm.denoiser(sde)
    g = torch.Generator().manual_seed(seed + 1)
    t_end = sde.eps
    a, s = float(sde.alpha(t_end)), float(sde.sigma(t_end))

    def exact(m: int) -> torch.Tensor:
        return (a * gmm.sample(m, g) + s * torch.randn(m, dim, generator=g, dtype=F64)).float()

    target = exact(20 * n)
    floor = frechet_distance(exact(n), target)
    x_T = sde.prior_sample((n, dim), generator=g)
    em = []
    for nfe in [20, 50] if quick else [25, 50, 100, 200, 400, 800]:
        res = sf.sample(den, "euler_maruyama", nfe=nfe, x_T=x_T, generator=torch.Generator().manual_seed(seed + 2))
        em.append({"nfe": nfe, "fd": frechet_distance(res.x, target)})
    ad = []
    for rtol in [0.2] if quick else [0.5, 0.2, 0.1, 0.05]:
        res = sf.sample(
            den, "adaptive_sde", x_T=x_T, rtol=rtol, atol=0.0078, generator=torch.Generator().manual_seed(seed + 2)
        )
        per_sample = 2.0 * float((res.stats["accepted_per_sample"] + res.stats["rejected_per_sample"]).double().mean())
        ad.append(
            {
                "rtol": rtol,
                "nfe": res.nfe,
                "per_sample_evals": per_sample,
                "fd": frechet_distance(res.x, target),
                "rejected_fraction": res.stats["rejected"] / max(1, res.stats["accepted"] + res.stats["rejected"]),
            }
        )
    for row in ad:  # the EM budget with the same quality, log-log interpolated
        fds = [r["fd"] for r in em]
        nfes = [r["nfe"] for r in em]
        row["em_nfe_same_fd"] = (
            float(np.exp(np.interp(-np.log(row["fd"]), -np.log(fds), np.log(nfes))))
            if min(fds) <= row["fd"] <= max(fds)
            else None
        )
    return {"dim": dim, "n": n, "fd_floor": floor, "euler_maruyama": em, "adaptive_sde": ad}


# ------------------------------------------------------------------------------------------------ report
def markdown(result: dict[str, Any]) -> str:
    nfes = result["nfes"]
    lines = ["## Peers: sdeflow vs diffusers (exact GMM eps-model, DiscreteVPSDE.linear(1000))", ""]
    acc = result.get("accuracy")
    if acc:
        lines.append(
            f"RMS error of x at t = 1/N against a float64 DOP853 reference; batch {result['batch']}, "
            f"dim {result['dim']}, {result['components']} components. Best configuration of each library "
            "per NFE; ratio = sdeflow best / diffusers best (< 1: sdeflow more accurate)."
        )
        lines.append("")
        lines.append("| NFE | sdeflow best | error | diffusers best | error | ratio |")
        lines.append("|---:|---|---:|---|---:|---:|")
        for n in nfes:
            sn, se = best(acc["sdeflow"], n)
            pn, pe = best(acc["diffusers"], n)
            lines.append(f"| {n} | {sn} | {se:.3e} | {pn} | {pe:.3e} | {se / pe:.3f} |")
        lines.append("")
    oh = result.get("overhead")
    if oh:
        lines.append(
            "Overhead per step (model that costs nothing, NFE 20, float32, min over interleaved repeats; "
            "sdeflow/diffusers):"
        )
        lines.append("")
        pairs = list(next(iter(oh.values()))["ratio"])
        lines.append("| data | " + " | ".join(pairs) + " |")
        lines.append("|---|" + "---:|" * len(pairs))
        for sname, o in oh.items():
            cells = [
                f"{o['per_step_us'][f'sdeflow {p}']:.0f}/{o['per_step_us'][f'diffusers {p}']:.0f} us = "
                f"{o['ratio'][p]:.2f}"
                for p in pairs
            ]
            lines.append(f"| {sname} {tuple(o['shape'])} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("harness"):
        lines.append(
            "Harness check (sdeflow on diffusers' own grid, relative RMS difference): "
            + ", ".join(f"{k}: {v:.1e}" for k, v in result["harness"].items())
        )
        lines.append("")
    anchor = result.get("anchor")
    if anchor:
        lines.append(
            f"adaptive_sde vs euler_maruyama (VP, mixture d = {anchor['dim']}, n = {anchor['n']}, Frechet "
            f"distance to exact p_t_end samples; MC floor {anchor['fd_floor']:.2e}):"
        )
        lines.append("")
        lines.append(
            "| adaptive_sde rtol | NFE (batched calls) | evaluations per sample | rejected | FD | "
            "Euler-Maruyama NFE for the same FD |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for r in anchor["adaptive_sde"]:
            same = f"{r['em_nfe_same_fd']:.0f}" if r["em_nfe_same_fd"] else "out of range"
            lines.append(
                f"| {r['rtol']} | {r['nfe']} | {r['per_sample_evals']:.0f} | {r['rejected_fraction']:.0%} | "
                f"{r['fd']:.2e} | {same} |"
            )
        lines.append("")
        lines.append(
            "Euler-Maruyama: " + ", ".join(f"NFE {r['nfe']}: FD {r['fd']:.2e}" for r in anchor["euler_maruyama"])
        )
        lines.append("")
    if acc:
        lines.append("All configurations (RMS error):")
        lines.append("")
        lines.append("| library | configuration | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        lines.append("|---|---|" + "---:|" * len(nfes))
        for lib in ("sdeflow", "diffusers"):
            for k, v in acc[lib].items():
                lines.append(f"| {lib} | {k} | " + " | ".join(f"{v[n]:.2e}" for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/peers")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 15, 20, 25, 50])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=15, help="interleaved repeats of the overhead timing")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--anchor-n", type=int, default=10000, help="samples of the adaptive_sde anchor")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["accuracy", "harness", "overhead", "anchor"],
        choices=["accuracy", "harness", "overhead", "anchor"],
    )
    args = p.parse_args(argv)
    try:
        import diffusers
    except ImportError:
        sys.exit("benchmarks/peers.py needs diffusers: pip install -e '.[bench]' -c constraints.txt")
    if args.quick:
        args.nfe, args.batch, args.reps = [5, 10], 16, 2
    problem = make_problem(args.dim, args.components, args.batch, args.seed)
    out = Path(args.out)
    old = json.loads((out / "peers.json").read_text()) if (out / "peers.json").exists() else {}
    if "accuracy" in old:  # JSON turned the NFE keys into strings
        old["accuracy"] = {
            lib: {k: {int(n): e for n, e in v.items()} for k, v in rows.items()}
            for lib, rows in old["accuracy"].items()
        }
    result = {
        "nfes": args.nfe,
        "batch": args.batch,
        "dim": args.dim,
        "components": args.components,
        "seed": args.seed,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }
    for part in ("accuracy", "harness", "overhead", "anchor"):  # parts not asked for are kept from the last run
        if part not in args.parts and part in old:
            result[part] = old[part]
    if "accuracy" in args.parts:
        t0 = time.perf_counter()
        ref = reference(problem)
        print(f"reference: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        result["accuracy"] = accuracy(problem, ref, args.nfe, args.quick)
    if "harness" in args.parts:
        result["harness"] = harness_check(problem, [10, 20] if not args.quick else [10])
    if "overhead" in args.parts:
        shapes = {"small": (64, 2), "image": (8, 3, 64, 64)} if not args.quick else {"small": (8, 2)}
        result["overhead"] = overhead(shapes, 20, args.reps)
    if "anchor" in args.parts:
        result["anchor"] = adaptive_sde_anchor(
            args.dim, args.components, 500 if args.quick else args.anchor_n, args.seed, args.quick
        )
    if "accuracy" in result:
        acc = result["accuracy"]
        result["best"] = {
            n: {"sdeflow": best(acc["sdeflow"], n), "diffusers": best(acc["diffusers"], n)} for n in result["nfes"]
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "peers.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
