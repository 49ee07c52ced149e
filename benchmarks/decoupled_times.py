"""Experiment (issue 15, not a library feature): does decoupling the network's input time from the solver's grid
(LD3-style, Tong et al. 2024) close the last missed target, NFE 5 on the d = 64 cosine mixture?

The problem, the held-out noises (2000, DOP853 reference) and the fitting noises (stratified, ``--fit-n`` of 16x as
many) are those of ``benchmarks/optimized_grids.py``. Steps: fit UniPC(bh2, 2)'s grid with ``fit_grid`` (``"dp"``);
then, keeping the grid, fit an offset delta_i of the log-SNR at which the net is evaluated at each grid time t_i
(the net sees t'_i = t(lambda(t_i) + delta_i); the solver's coefficients still use t_i) by golden-section
coordinate descent on the same weighted end error; report the fitting and held-out errors of both.

    .venv/bin/python benchmarks/decoupled_times.py --nfe 5 --fit-n 256    # about a minute

Measured (2 cores, loaded): fit-n 256: grid 5.52e-2 fit / 6.39e-2 held-out, + offsets 2.61e-2 fit / 5.42e-2
held-out; fit-n 1024: grid 7.46e-2 / 7.06e-2, + offsets 5.08e-2 / 5.44e-2. The peers' best at NFE 10 is 5.09e-2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sdeflow as sf
from sdeflow.cli.common import int_at_least
from sdeflow.grid_opt import _golden, fit_grid, reference_solve, stratified_noises

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimized_grids import make_problem
from peers import reference, rms

F64 = torch.float64
OPTS: dict[str, Any] = {"order": 2, "variant": "bh2"}


class Warp:
    """The net's time, warped piecewise linearly through (knots_t -> knots_s); identity while knots_t is None."""

    def __init__(self) -> None:
        self.knots_t: torch.Tensor | None = None
        self.knots_s: torch.Tensor | None = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.knots_t is None or self.knots_s is None:
            return t
        kt, ks = self.knots_t.flip(0), self.knots_s.flip(0)
        idx = torch.searchsorted(kt, t.clamp(kt[0], kt[-1])).clamp(1, kt.numel() - 1)
        w = (t - kt[idx - 1]) / (kt[idx] - kt[idx - 1])
        return ks[idx - 1] + w * (ks[idx] - ks[idx - 1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nfe", type=int_at_least(2), default=5)
    p.add_argument("--fit-n", type=int_at_least(8), default=256)
    p.add_argument("--dim", type=int_at_least(1), default=64)
    p.add_argument("--schedule", default="cosine", choices=["linear", "cosine"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    prob = make_problem(args.dim, args.schedule, 0)
    sde, t_end, gmm = prob["sde"], prob["t_end"], prob["gmm"]
    warp = Warp()

    def net(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return gmm.eps(x, warp((timestep.to(F64) + 1.0) / 1000), sde).to(x.dtype)

    den = sf.Denoiser(net, sde, "eps", time_input="index")
    x_eval = torch.randn(2000, args.dim, generator=torch.Generator().manual_seed(100), dtype=F64)
    ref = reference({**prob, "x_T": x_eval}, rtol=1e-9, atol=1e-9)
    x_fit, w = stratified_noises(
        den, (args.dim,), args.fit_n, 16 * args.fit_n, 0.25, torch.Generator().manual_seed(200), t_end
    )
    fit_ref = reference_solve(den, x_fit, t_end, steps=384, weights=w)
    t0 = time.perf_counter()
    fit = fit_grid(den, "unipc", args.nfe, reference=fit_ref, dtype=torch.float32, **OPTS)
    grid = fit.grid

    def held() -> float:
        return rms(sf.sample(den, "unipc", nfe=args.nfe, x_T=x_eval.float(), grid=grid, **OPTS).x, ref)

    print(f"grid: fit {fit.error:.3e} held-out {held():.3e} ({time.perf_counter() - t0:.0f} s)", flush=True)
    lam = sde.log_snr(grid).to(F64)
    ref_end = fit_ref.trajectory[-1]

    def err_with(delta: torch.Tensor) -> float:
        warp.knots_t, warp.knots_s = grid.clone(), sde.t_from_log_snr(lam + delta).to(F64)
        try:
            x = sf.sample(den, "unipc", nfe=args.nfe, x_T=x_fit.float(), grid=grid, **OPTS).x
        finally:
            warp.knots_t = None
        e = float(((w * (x.to(F64) - ref_end).pow(2).mean(1)).sum() / w.sum()).sqrt())
        return e if math.isfinite(e) else math.inf

    delta = torch.zeros_like(lam)
    err = err_with(delta)
    for _ in range(3):
        for k in range(lam.numel() - 1):  # the last knot is never evaluated

            def f(v: float, k: int = k) -> float:
                d = delta.clone()
                d[k] = v
                return err_with(d)

            v, e = _golden(f, -1.0, 1.0, float(delta[k]), err, 12)
            if e < err:
                delta[k], err = v, e
    warp.knots_t, warp.knots_s = grid.clone(), sde.t_from_log_snr(lam + delta).to(F64)
    print(f"grid + net-time offsets {[round(float(d), 3) for d in delta]}: fit {err:.3e} held-out {held():.3e}")


if __name__ == "__main__":
    main()
