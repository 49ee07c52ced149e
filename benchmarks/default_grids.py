"""Default grids: which named time grid each solver should take by default on each kind of path.

Problems: an exact-score Gaussian mixture (10 components, sharp modes in [-0.8, 0.8]^d, stds 0.05-0.2; the recipe of
benchmarks/optimized_grids.py) in d = 2 and d = 64 under six paths: DDPM's discrete linear and cosine schedules (1000
steps, integer-timestep model, t_end = 1/N), the continuous VP (linear and cosine), sub-VP (t_end = 1e-3) and VE
(t_end = 1e-5). Every configuration integrates the probability-flow ODE in float32 from the same 128 draws of the
prior; error: RMS over samples and coordinates of the final state against a float64 DOP853 reference of the same ODE
(``peers.reference``, rtol = atol = 1e-9). Grids: the four named ones of ``sdeflow.grids.time_grid``.

The summary row per (solver, path family) is the geometric mean over problems and NFE of error(grid) / error(logsnr)
and how many cells each grid wins. docs/solvers.md ("Default grids") keeps the table that justified the defaults.

    .venv/bin/python benchmarks/default_grids.py             # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/default_grids.py --quick     # d = 2, two paths, NFE 10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

import sdeflow as sf
from sdeflow.grids import GRIDS, time_grid
from sdeflow.sampling import make_solver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import reference, rms

F64 = torch.float64
N_TRAIN = 1000
PATHS = {
    "ddpm-linear": lambda: sf.DiscreteVPSDE.linear(N_TRAIN),
    "ddpm-cosine": lambda: sf.DiscreteVPSDE.cosine(N_TRAIN),
    "vp": lambda: sf.VPSDE(),
    "vp-cosine": lambda: sf.VPSDE(schedule="cosine"),
    "subvp": lambda: sf.SubVPSDE(),
    "ve": lambda: sf.VESDE(),
}
SOLVERS = ("dpm_solver++", "unipc", "deis", "dpm_solver")


def mixture(dim: int, seed: int = 0) -> sf.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(10, dim, generator=g, dtype=F64) * 1.6 - 0.8
    stds = 0.05 + 0.15 * torch.rand(10, generator=g, dtype=F64)
    return sf.GaussianMixture(means, stds, torch.softmax(torch.randn(10, generator=g, dtype=F64) * 0.5, 0))


def denoiser(gmm: sf.GaussianMixture, sde: sf.GaussianSDE) -> sf.Denoiser:
    if isinstance(sde, sf.DiscreteVPSDE):  # diffusers' convention: integer timesteps, t = (k + 1) / N

        def net(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return gmm.eps(x.to(F64), (k.to(F64) + 1.0) / N_TRAIN, sde).to(x.dtype)

        return sf.Denoiser(net, sde, "eps", time_input="index")
    return sf.Denoiser(lambda x, t: gmm.eps(x.to(F64), t.to(F64), sde).to(x.dtype), sde, "eps")


def run(dims: list[int], paths: list[str], solvers: list[str], nfes: list[int], n: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for dim in dims:
        gmm = mixture(dim)
        for name in paths:
            sde = PATHS[name]()
            den = denoiser(gmm, sde)
            t_end = 1.0 / N_TRAIN if isinstance(sde, sf.DiscreteVPSDE) else float(sde.eps)
            x_T = torch.randn(n, dim, generator=torch.Generator().manual_seed(100), dtype=F64) * sde.sigma(sde.T)
            ref = reference({"gmm": gmm, "sde": sde, "x_T": x_T, "t_end": t_end}, rtol=1e-9, atol=1e-9)
            for solver in solvers:
                for nfe in nfes:
                    steps = make_solver(den, solver).num_steps(nfe, t_end)
                    errs = {}
                    for kind in GRIDS:
                        g = time_grid(sde, steps, kind, t_end=t_end)
                        with torch.no_grad():
                            errs[kind] = rms(sf.sample(den, solver, x_T=x_T.float(), grid=g).x, ref)
                    errs["default"] = make_solver(den, solver).default_grid
                    key = f"d={dim} {name} {solver} nfe={nfe}"
                    rows[key] = errs
                    print(key, json.dumps(errs), file=sys.stderr, flush=True)
    return rows


def family(path: str) -> str:
    return "ve" if path == "ve" else "vp-type"


def markdown(rows: dict[str, Any]) -> str:
    lines = ["| problem | solver | NFE | " + " | ".join(GRIDS) + " | default |", "|---|---|---:|" + "---:|" * 5]
    for key, e in rows.items():
        dim, path, solver, nfe = key.split(" ")
        best = min(GRIDS, key=lambda k: e[k])
        cells = [f"**{e[k]:.2e}**" if k == best else f"{e[k]:.2e}" for k in GRIDS]
        lines.append(f"| {dim} {path} | {solver} | {nfe[4:]} | " + " | ".join(cells) + f" | {e['default']} |")
    lines += ["", "| solver | paths | " + " | ".join(f"{k}: geo-mean ratio to logsnr (wins)" for k in GRIDS) + " |"]
    lines.append("|---|---|" + "---|" * len(GRIDS))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key, e in rows.items():
        _, path, solver, _ = key.split(" ")
        groups.setdefault((solver, family(path)), []).append(e)
    for (solver, fam), es in groups.items():
        cells = []
        for k in GRIDS:
            geo = math.exp(sum(math.log(e[k] / e["logsnr"]) for e in es) / len(es))
            wins = sum(min(GRIDS, key=lambda g: e[g]) == k for e in es)
            cells.append(f"{geo:.2f} ({wins}/{len(es)})")
        lines.append(f"| {solver} | {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/default_grids")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        rows = run([2], ["ddpm-cosine", "ve"], ["dpm_solver++"], [10], 32)
    else:
        rows = run([2, 64], list(PATHS), list(SOLVERS), [6, 10, 20], 128)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_grids.json").write_text(json.dumps(rows, indent=1))
    md = markdown(rows)
    (out / "default_grids.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
