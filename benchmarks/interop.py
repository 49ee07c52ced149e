"""Interop benchmark: sdeflow's default sampler against diffusers' default scheduler on the same model and noise.

Three diffusers-style models (called ``model(x, timestep) -> .sample`` with diffusers' timesteps), each an exact
Gaussian-mixture prediction in images of shape 3x8x8 (so that samples have a realistic scale and sharp modes) plus
0.1 x a randomly initialised tiny ``UNet2DModel`` (so that the model is not smooth in x the way the analytic part is):

* ``linear-eps``: DDPM's linear betas (N = 1000), epsilon prediction; diffusers' default
  ``DPMSolverMultistepScheduler()`` (2M, linspace spacing, final sigma 0);
* ``cosine-v``: ``squaredcos_cap_v2`` betas, v prediction; ``DPMSolverMultistepScheduler(beta_schedule=...,
  prediction_type="v_prediction")``;
* ``flow``: flow matching with SD3's shift 3 (velocity eps - x0 in sigma); ``FlowMatchEulerDiscreteScheduler(shift=3)``.

sdeflow runs ``sf.sample(from_diffusers(model, scheduler), nfe=n, x_T=x_T)`` with every default (solver, grid,
t_end). Error: RMS over all entries of the final state against a tight reference solve of the same model from the same
x_T to the same final time (scipy DOP853, rtol = atol = 1e-9: in EDM's sigma, d(x/a)/dsigma = eps_hat, for the DDPM
models; in diffusers' sigma, dx/dsigma = eps - x0, for the flow model). Writes ``runs/interop/interop.json`` and a
markdown table. ``--quick``: one seed, NFE 10.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import scipy.integrate
import torch

import sdeflow as sf
from sdeflow.integrations import from_diffusers
from sdeflow.integrations.diffusers import diffusers_sde
from sdeflow.sdes import FlowMatchingPath

F64 = torch.float64
SHAPE = (3, 8, 8)
N_TRAIN = 1000


def mixture(seed: int) -> sf.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(SHAPE))
    means = torch.rand(8, d, generator=g, dtype=F64) * 1.6 - 0.8
    stds = 0.05 + 0.15 * torch.rand(8, generator=g, dtype=F64)
    return sf.GaussianMixture(means, stds, torch.softmax(torch.randn(8, generator=g, dtype=F64), 0))


def tiny_unet(seed: int) -> Any:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return unet.eval().requires_grad_(False).double()


class Output:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


def problem(kind: str, seed: int) -> dict[str, Any]:
    """The model (diffusers-style), its diffusers scheduler factory, and its sdeflow Denoiser."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    gmm, unet = mixture(seed), tiny_unet(seed)
    if kind == "linear-eps":
        make = lambda: DPMSolverMultistepScheduler()
    elif kind == "cosine-v":
        make = lambda: DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    elif kind == "flow":
        make = lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"kind={kind!r}: allowed 'linear-eps', 'cosine-v', 'flow'")
    sde = diffusers_sde(make())
    flat = FlowMatchingPath(1.0) if kind == "flow" else sde

    def model(x: torch.Tensor, timestep: torch.Tensor) -> Output:
        ts = torch.as_tensor(timestep, dtype=F64).reshape(-1).expand(x.shape[0])
        t = ts / N_TRAIN if kind == "flow" else (ts + 1.0) / N_TRAIN  # flow: sigma itself (the shift-1 path's t)
        xf = x.reshape(x.shape[0], -1).to(F64)
        x0, eps = gmm.x0(xf, t, flat), gmm.eps(xf, t, flat)
        if kind == "linear-eps":
            out = eps
        elif kind == "cosine-v":
            a, s = flat.alpha(t)[:, None], flat.sigma(t)[:, None]
            out = a * eps - s * x0
        else:
            out = eps - x0
        rnd = unet(x.to(F64), ts).sample
        return Output((out.reshape(x.shape) + 0.1 * rnd).to(x.dtype))

    den = from_diffusers(model, make())
    return {"kind": kind, "model": model, "make": make, "den": den, "sde": den.sde}


def reference(prob: dict[str, Any], x_T: torch.Tensor, t_end: float, rtol: float = 1e-9) -> torch.Tensor:
    """Tight DOP853 solve of the probability-flow ODE from sde.T to t_end (module docstring)."""
    den, sde, shape = prob["den"], prob["sde"], x_T.shape
    if isinstance(sde, FlowMatchingPath):
        model = prob["model"]

        def rhs(sig: float, y: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(y).reshape(shape)
            return model(x, torch.tensor(sig * N_TRAIN, dtype=F64)).sample.reshape(-1).numpy()

        s0, s1 = 1.0, float(sde.shifted(torch.tensor(t_end, dtype=F64)))
        sol = scipy.integrate.solve_ivp(rhs, (s0, s1), x_T.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=rtol)
        if not sol.success:
            raise RuntimeError(sol.message)
        return torch.from_numpy(sol.y[:, -1]).reshape(shape)

    def rhs(sig: float, y: np.ndarray) -> np.ndarray:  # x~ = x / a, d x~ / d sigma = eps_hat(a x~, t(sigma))
        t = sde.t_from_edm_sigma(torch.tensor(sig, dtype=F64)) if sig > 0 else torch.tensor(0.0, dtype=F64)
        a = float(sde.alpha(t))
        x = torch.from_numpy(y).reshape(shape) * a
        return den.eps(x, t).reshape(-1).numpy()

    s0, s1 = float(sde.edm_sigma(sde.T)), float(sde.edm_sigma(t_end)) if t_end > 0 else 0.0
    y0 = (x_T / sde.alpha(sde.T)).reshape(-1).numpy()
    sol = scipy.integrate.solve_ivp(rhs, (s0, s1), y0, method="DOP853", rtol=rtol, atol=rtol)
    if not sol.success:
        raise RuntimeError(sol.message)
    return torch.from_numpy(sol.y[:, -1]).reshape(shape) * sde.alpha(t_end)


def diffusers_default(prob: dict[str, Any], x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, float]:
    """diffusers' loop with its default scheduler; returns the state and the sdeflow time it ends at."""
    sched = prob["make"]()
    sched.set_timesteps(nfe)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(prob["model"](x, t).sample, t, x).prev_sample
    final = float(sched.sigmas[-1])
    if isinstance(prob["sde"], FlowMatchingPath):
        return x, float(prob["sde"].unshifted(torch.tensor(final, dtype=F64)))
    return x, 0.0 if final == 0.0 else 1.0 / N_TRAIN


#: sdeflow configurations reported next to the default: name -> (solver, grid)
ALTERNATIVES = {"ddim/uniform": ("ddim", "uniform"), "dpm_solver++/trailing": ("dpm_solver++", "trailing")}


def rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(F64) - ref.to(F64)).pow(2).mean().sqrt())


def run(kinds: list[str], nfes: list[int], seeds: list[int], batch: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for kind in kinds:
        for seed in seeds:
            prob = problem(kind, seed)
            x_T = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
            refs: dict[float, torch.Tensor] = {}
            for nfe in nfes:
                key = f"{kind} seed={seed} nfe={nfe}"
                with torch.no_grad():
                    theirs, t_theirs = diffusers_default(prob, x_T, nfe)
                    if t_theirs not in refs:
                        refs[t_theirs] = reference(prob, x_T, t_theirs)
                    row: dict[str, Any] = {"diffusers": rms(theirs, refs[t_theirs]), "diffusers_t_end": t_theirs}
                    try:
                        ours = sf.sample(prob["den"], nfe=nfe, x_T=x_T)
                        t_ours = float(ours.times[-1])
                        if t_ours not in refs:
                            refs[t_ours] = reference(prob, x_T, t_ours)
                        row.update(sdeflow=rms(ours.x, refs[t_ours]), sdeflow_t_end=t_ours)
                    except Exception as exc:  # a default that does not run on this model is a result too
                        row.update(sdeflow=float("nan"), sdeflow_error=f"{type(exc).__name__}: {exc}")
                    for name, (solver, grid) in ALTERNATIVES.items():  # other sdeflow configurations, for context
                        if grid == "trailing" and isinstance(prob["sde"], FlowMatchingPath):
                            continue
                        alt = sf.sample(prob["den"], solver, nfe=nfe, x_T=x_T, grid=grid)
                        t_alt = float(alt.times[-1])
                        if t_alt not in refs:
                            refs[t_alt] = reference(prob, x_T, t_alt)
                        row[name] = rms(alt.x, refs[t_alt])
                row["ratio"] = row["sdeflow"] / row["diffusers"]
                rows[key] = row
                print(key, json.dumps(row), file=sys.stderr)
    return rows


def markdown(rows: dict[str, Any]) -> str:
    alts = list(ALTERNATIVES)
    lines = [
        "| model | NFE | sdeflow default (RMS) | diffusers default (RMS) | ratio (target <= 0.5) | "
        + " | ".join(f"sdeflow {a}" for a in alts)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(alts),
    ]
    for key, r in rows.items():
        kind, seed, nfe = key.split(" ")
        ours = f"{r['sdeflow']:.3e}" if math.isfinite(r["sdeflow"]) else f"fails ({r.get('sdeflow_error', '')[:40]})"
        extra = " | ".join(f"{r[a]:.3e}" if a in r else "-" for a in alts)
        lines.append(f"| {kind} ({seed}) | {nfe[4:]} | {ours} | {r['diffusers']:.3e} | {r['ratio']:.2f} | {extra} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/interop")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--kinds", nargs="+", default=["linear-eps", "cosine-v", "flow"])
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    kinds = args.kinds
    nfes = [10] if args.quick else [10, 20]
    seeds = args.seeds if args.seeds is not None else [0] if args.quick else [0, 1]
    rows = run(kinds, nfes, seeds, args.batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "interop.json").write_text(json.dumps(rows, indent=1))
    md = markdown(rows)
    (out / "interop.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
