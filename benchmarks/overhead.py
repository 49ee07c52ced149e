"""Per-step overhead: sdeflow's solvers against the peers implementing the same method, on a free model.

Every contender samples 20 NFE with a model that costs (almost) nothing, in float32, d = 64, at batch 1 and 4096; the
time per network evaluation is the solver's own overhead (grid set-up, coefficients, state updates, Python). Pairs
(same method, same model convention):

* DDIM: sdeflow ``ddim`` on ``DiscreteVPSDE.linear(1000)`` (eps model, integer timesteps) vs diffusers'
  ``DDIMScheduler``; and vs k-diffusion's ``sample_euler`` (Euler in sigma = DDIM) with sdeflow's ``ddim`` on an EDM
  (VE, x0-prediction) model, the convention k-diffusion uses.
* Heun: sdeflow ``heun`` vs k-diffusion's ``sample_heun`` (EDM Algorithm 1), EDM model, Karras sigmas.
* DPM-Solver++(2M): ``dpm_solver++`` vs diffusers' ``DPMSolverMultistepScheduler`` (discrete eps model) and
  k-diffusion's ``sample_dpmpp_2m`` (EDM model).
* UniPC-2: ``unipc`` vs diffusers' ``UniPCMultistepScheduler``.

Timings are the minimum over interleaved repeats (load on a shared machine only adds time); the ratio sdeflow/peer is
what docs/benchmarks.md reports (<= 1: sdeflow is at least as cheap). k-diffusion's ``sampling.py`` is loaded from
its installed wheel without its package ``__init__`` (which needs torchvision, clip, ...); if it is not installed its
rows are skipped. Writes runs/overhead/overhead.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import sdeflow as sf

N_TRAIN = 1000
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def load_kdiffusion_sampling() -> types.ModuleType | None:
    """k-diffusion's sampling module (the installed wheel's file) with a stub ``k_diffusion.utils``; None if absent."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.submodule_search_locations is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []  # a namespace for the stub
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims  # type: ignore[attr-defined]  # the one helper sampling.py uses
    pkg.utils = utils  # type: ignore[attr-defined]  # idem
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    try:
        sspec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        assert sspec is not None and sspec.loader is not None
        mod = importlib.util.module_from_spec(sspec)
        sspec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


def diffusers_loop(cls: Any, config: dict[str, Any], net: Callable, x: torch.Tensor, nfe: int) -> torch.Tensor:
    """diffusers' sampling loop: one model call and one scheduler.step per timestep."""
    sched = cls(**config)
    sched.set_timesteps(nfe)
    for t in sched.timesteps:
        x = sched.step(net(x, t), t, x).prev_sample
    return x


def jobs(x: torch.Tensor, nfe: int, kd: types.ModuleType | None) -> dict[str, dict[str, Callable[[], Any]]]:
    """method -> {contender: a zero-argument sampling call}."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    def free_eps(x: torch.Tensor, t: Any) -> torch.Tensor:
        return x

    def free_d(x: torch.Tensor, sigma: Any, **kw: Any) -> torch.Tensor:
        return x

    disc = sf.Denoiser(free_eps, sf.DiscreteVPSDE.linear(N_TRAIN), "eps", time_input="index")
    ve = sf.VESDE(SIGMA_MIN, SIGMA_MAX)
    edm = sf.Denoiser(free_d, ve, "x0", time_input=ve.sigma)
    base = dict(num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    ddim_cfg = dict(base, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    dpm_cfg = dict(base, solver_order=2, final_sigmas_type="sigma_min")
    out: dict[str, dict[str, Callable[[], Any]]] = {
        "DDIM (discrete eps)": {
            "sdeflow ddim": lambda: sf.sample(disc, "ddim", nfe=nfe, x_T=x, grid="uniform"),
            "diffusers DDIMScheduler": lambda: diffusers_loop(DDIMScheduler, ddim_cfg, free_eps, x, nfe),
        },
        "DPM-Solver++(2M) (discrete eps)": {
            "sdeflow dpm_solver++": lambda: sf.sample(disc, "dpm_solver++", nfe=nfe, x_T=x),
            "diffusers DPMSolverMultistep": lambda: diffusers_loop(
                DPMSolverMultistepScheduler, dpm_cfg, free_eps, x, nfe
            ),
        },
        "UniPC-2 (discrete eps)": {
            "sdeflow unipc": lambda: sf.sample(disc, "unipc", nfe=nfe, x_T=x),
            "diffusers UniPCMultistep": lambda: diffusers_loop(UniPCMultistepScheduler, dpm_cfg, free_eps, x, nfe),
        },
    }
    if kd is not None:
        # the sigmas are built inside each call (a sampling call's set-up, as sf.sample and set_timesteps do):
        # nfe steps ending at sigma 0 for Euler and 2M (nfe NFE), nfe // 2 + 1 for Heun (2N - 1 NFE, final Euler);
        # sdeflow's heun takes its Euler last step only where the grid ends at sigma = 0, which the VE path never
        # reaches (s(0) = sigma_min): it runs on EDM's path (from_edm) on the same sigmas, final 0 included
        from sdeflow.integrations import from_edm

        edm0 = from_edm(free_d, SIGMA_MIN, SIGMA_MAX)

        def karras_to_zero(n: int) -> torch.Tensor:  # get_sigmas_karras's formula, in float64 (sdeflow's time)
            ramp = torch.linspace(0, 1, n, dtype=torch.float64)
            hi, lo = SIGMA_MAX ** (1 / 7), SIGMA_MIN ** (1 / 7)
            return torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1, dtype=torch.float64)])

        def karras(n: int) -> torch.Tensor:
            return kd.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX)

        xe = x * SIGMA_MAX
        out["Euler in sigma = DDIM (EDM x0)"] = {
            "sdeflow ddim": lambda: sf.sample(edm, "ddim", nfe=nfe, x_T=xe, grid="karras"),
            "k-diffusion sample_euler": lambda: kd.sample_euler(free_d, xe, karras(nfe), disable=True),
        }
        out["Heun (EDM x0)"] = {
            "sdeflow heun": lambda: sf.sample(edm0, "heun", x_T=xe, grid=karras_to_zero(nfe // 2 + 1)),
            "k-diffusion sample_heun": lambda: kd.sample_heun(free_d, xe, karras(nfe // 2 + 1), disable=True),
        }
        out["DPM-Solver++(2M) (EDM x0)"] = {
            "sdeflow dpm_solver++": lambda: sf.sample(edm, "dpm_solver++", nfe=nfe, x_T=xe, grid="karras"),
            "k-diffusion sample_dpmpp_2m": lambda: kd.sample_dpmpp_2m(free_d, xe, karras(nfe), disable=True),
        }
    return out


def measure(batches: list[int], dim: int, nfe: int, reps: int) -> dict[str, Any]:
    kd = load_kdiffusion_sampling()
    torch.set_grad_enabled(False)
    result: dict[str, Any] = {"nfe": nfe, "dim": dim, "kdiffusion": kd is not None, "rows": {}}
    for B in batches:
        x = torch.randn(B, dim, generator=torch.Generator().manual_seed(0))
        table = jobs(x, nfe, kd)
        flat = {(m, c): f for m, cs in table.items() for c, f in cs.items()}
        best = dict.fromkeys(flat, float("inf"))
        for f in flat.values():  # warm-up
            f()
        for _ in range(reps):
            for k, f in flat.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
        for method, cs in table.items():
            names = list(cs)
            us = {c: 1e6 * best[(method, c)] / nfe for c in names}
            mine = next(c for c in names if c.startswith("sdeflow"))
            peers = {c: us[mine] / us[c] for c in names if c != mine}
            result["rows"].setdefault(method, {})[B] = {"us_per_nfe": us, "ratio": peers}
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Overhead per network evaluation (us), free model, float32, d = {result['dim']}, {result['nfe']} NFE; "
        "ratio = sdeflow / peer (<= 1: sdeflow at least as cheap).",
        "",
        "| method | batch | sdeflow (us/NFE) | peer | peer (us/NFE) | ratio |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for method, per_b in result["rows"].items():
        for B, row in per_b.items():
            us = row["us_per_nfe"]
            mine = next(c for c in us if c.startswith("sdeflow"))
            for peer, ratio in row["ratio"].items():
                lines.append(f"| {method} | {B} | {us[mine]:.1f} | {peer} | {us[peer]:.1f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4096])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="runs/overhead")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.batches, args.dim, args.nfe, args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "overhead.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
