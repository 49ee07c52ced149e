"""Optimized grids on a trained model: FD_digits of the digits U-Net at NFE 5 and 10, default grid against a grid
fitted to the model (``sf.grid_opt.fit_grid``, method ``"dp"``).

The model is `make bench`'s digits U-Net (``runs/bench/digits/ckpt.pt``, EDM objective; train it with
``benchmarks/nfe_vs_fid.py --only digits`` first). For each solver and NFE the grid is fitted on ``--fit-n`` prior
noises (fit_grid's own stratified draw, seeded) against its float64 reference solve of the same model; then ``--n``
samples from other noises are drawn on the default and on the fitted grid and scored by FD_digits (the digits CNN of
``sdeflow.evaluation.extractors``) against all 1797 digits, as in `make bench`. Reports the fit's cost (reference
NFE, wall time) next to the scores.

    .venv/bin/python benchmarks/digits_grids.py --fit-n 128 --solvers unipc   # about 40 minutes on one core
    .venv/bin/python benchmarks/digits_grids.py --ckpt /tmp/x/ckpt.pt --n 64 --fit-n 16 --nfe 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sdeflow as sf
from sdeflow.cli.common import int_at_least
from sdeflow.evaluation import sweep
from sdeflow.grid_opt import fit_grid
from sdeflow.training import load_run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/bench/digits/ckpt.pt")
    p.add_argument("--out", default="runs/digits_grids")
    p.add_argument("--solvers", nargs="+", default=["unipc", "dpm_solver++"])
    p.add_argument("--nfe", type=int_at_least(1), nargs="+", default=[5, 10])
    p.add_argument("--n", type=int_at_least(2), default=1000, help="samples scored per cell")
    p.add_argument("--fit-n", type=int_at_least(1), default=256, help="fitting noises")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    den, config, ckpt = load_run(args.ckpt)
    shape = tuple(config["data"]["data_shape"])
    scorer = sweep.make_scorer(config, args.n, seed=12345)
    floor = scorer.floor.get("fd_digits")
    x_T = den.sde.prior_sample((args.n, *shape), generator=torch.Generator().manual_seed(args.seed))
    rows: dict[str, Any] = {}
    for solver in args.solvers:
        for nfe in args.nfe:
            t0 = time.perf_counter()
            fit = fit_grid(den, solver, nfe, shape=shape, n=args.fit_n, generator=torch.Generator().manual_seed(1))
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                default = sf.sample(den, solver, nfe=nfe, x_T=x_T).x
                fitted = sf.sample(den, solver, nfe=nfe, x_T=x_T, grid=fit.grid).x
            row = {
                "default": scorer.score(default)["fd_digits"],
                "optimized": scorer.score(fitted)["fd_digits"],
                "default_grid": sf.sampling.make_solver(den, solver).default_grid,
                "grid": fit.grid.tolist(),
                "fit_rms": fit.error,
                "fit_default_rms": fit.default_error,
                "reference_nfe": fit.reference_nfe,
                "fit_nfe": fit.fit_nfe,
                "seconds": seconds,
            }
            rows[f"{solver} nfe={nfe}"] = row
            print(f"{solver} nfe={nfe}", json.dumps({k: v for k, v in row.items() if k != "grid"}), file=sys.stderr)
    lines = [
        f"FD_digits, {args.n} samples (data floor {floor:.3g}); grids fitted on {args.fit_n} other noises "
        f"(checkpoint step {ckpt['step']}).",
        "",
        "| solver | NFE | default grid | FD default | FD optimized | fit: RMS default -> optimized | fit cost |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for key, r in rows.items():
        solver, nfe = key.split(" nfe=")
        lines.append(
            f"| {solver} | {nfe} | {r['default_grid']} | {r['default']:.3g} | {r['optimized']:.3g} | "
            f"{r['fit_default_rms']:.3g} -> {r['fit_rms']:.3g} | {r['fit_nfe']} NFE, "
            f"{r['seconds']:.0f} s |"
        )
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits_grids.json").write_text(json.dumps(rows, indent=1))
    (out / "digits_grids.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
