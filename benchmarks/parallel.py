"""Parallel-in-time sampling benchmark: ParaDiGMS Picard windows against the sequential solver, on this machine.

What it measures, for DDIM and DDPM at 100 and 1000 steps (VP SDE, uniform grid, tol = 0.1) and batch 1, 8, 64:

* Picard rounds (the sequential depth) against steps, total net calls (``res.nfe``, one batched call per round) and
  per-step evaluations inside them, the RMS difference to the sequential sample (same x_T, same noise);
* wall-clock speed-up over the sequential solver, for window = 64 and window = "auto" (its one-off calibration,
  cached per net and configuration, is timed apart and not included).

Two models, d = 64: the exact GaussianMixture denoiser (an analytic model: cheap, elementwise-heavy) and sdeflow's
MLPScoreNet (hidden 256, depth 3, sinusoidal time embedding: 0.5 M parameters), trained here for ``--train-steps``
steps of DSM on the same mixture (about a minute on a 2-core CPU; a rough model, but a real network's cost and a
realistic, non-linear vector field for the Picard iteration). Plus a window sweep for the MLP at 1000 DDIM steps.

Timing: sequential and parallel runs interleaved, best of ``--repeats``, wall clock and process CPU time; speed-ups are
ratios measured in the same run. ``--threads`` sets torch's thread count (default 1: on a shared, oversubscribed
machine OpenMP threads spin-wait and a 2-thread timing measures the neighbours, not the sampler; on a quiet machine
pass ``--threads 2``). With one thread the batched call gains only from amortized per-call overhead and denser GEMMs,
so the speed-ups are conservative for a multi-core CPU. The load average at the start is recorded with the results.

    .venv/bin/python benchmarks/parallel.py            # full run (~10 min on 2 cores)
    .venv/bin/python benchmarks/parallel.py --quick    # smoke test

Output: runs/parallel/results.json and runs/parallel/table.md (printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import sdeflow as sf
from sdeflow.nets import MLPScoreNet
from sdeflow.training import DenoisingScoreMatching, SampledData, Trainer

D = 64


def mixture(d: int = D, k: int = 8, seed: int = 0) -> sf.GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    stds = 0.3 + 0.4 * torch.rand(k, generator=g, dtype=torch.float64)
    return sf.GaussianMixture(means, stds, torch.full((k,), 1.0 / k, dtype=torch.float64))


def trained_mlp(gmm: sf.GaussianMixture, sde: sf.GaussianSDE, steps: int, seed: int = 0) -> tuple[sf.Denoiser, dict]:
    torch.manual_seed(seed)
    net = MLPScoreNet(D, hidden=256, depth=3)
    data = SampledData(lambda n, g: gmm.sample(n, generator=g), (D,), {"name": "gmm64"})
    trainer = Trainer(
        net,
        DenoisingScoreMatching(sde),
        data,
        batch_size=256,
        lr=1e-3,
        warmup=100,
        ema_decay=0.995,
        seed=seed,
        progress=False,
    )
    tic = time.perf_counter()
    fit = trainer.fit(steps)
    info = {
        "train_steps": steps,
        "train_seconds": time.perf_counter() - tic,
        "final_loss": fit.loss,
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    return sf.Denoiser(trainer.ema.eval(), sde, prediction="eps"), info


def timed(fn: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    """((wall seconds, process CPU seconds), fn())."""
    tic, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - tic, time.process_time() - cpu), out


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS distance, (B,) float64."""
    return (a - b).double().pow(2).mean(1).sqrt()


def compare(den: sf.Denoiser, solver: str, steps: int, batch: int, windows: list, repeats: int, seed: int = 0) -> dict:
    """Sequential vs parallel with each window in ``windows``, interleaved, best (wall, CPU) time of ``repeats``."""
    x_T = torch.randn(batch, D, generator=torch.Generator().manual_seed(seed))

    def seq():
        return sf.sample(den, solver, nfe=steps, x_T=x_T, generator=torch.Generator().manual_seed(seed + 1))

    def par(w):
        return lambda: sf.sample(
            den,
            "parallel",
            base=solver,
            nfe=steps,
            x_T=x_T,
            window=w,
            tol=0.1,
            generator=torch.Generator().manual_seed(seed + 1),
        )

    row: dict[str, Any] = {"solver": solver, "steps": steps, "batch": batch}
    with torch.inference_mode():
        ref = seq()  # warm-up and reference
        runs = {}
        for w in windows:
            t_first, runs[w] = timed(par(w))  # warm-up; for "auto" this includes the one-off calibration
            if w == "auto":
                row["auto_calibration_s"] = t_first[0]
                row["auto_costs_ms"] = {str(k): 1e3 * v for k, v in runs[w].stats["costs"].items()}
        times: dict[Any, list[tuple[float, float]]] = {"seq": [], **{w: [] for w in windows}}
        for _ in range(repeats):
            times["seq"].append(timed(seq)[0])
            for w in windows:
                times[w].append(timed(par(w))[0])
    best = {k: (min(t[0] for t in v), min(t[1] for t in v)) for k, v in times.items()}
    t_seq, c_seq = best["seq"]
    row["seq_s"], row["seq_cpu_s"] = t_seq, c_seq
    row["seq_nfe"] = ref.nfe
    for w in windows:
        r = runs[w]
        st = r.stats
        key = str(w)
        row[key] = {
            "window": st["window"],
            "rounds": st["rounds"],
            "nfe": r.nfe - st.get("calibration_nfe", 0),
            "evaluations": st["evaluations"],
            "sequential_steps": st["sequential_steps"],
            "converged": st["converged"],
            "rms_vs_sequential": float(rms(r.x, ref.x).mean()),
            "rms_median": float(rms(r.x, ref.x).median()),
            "rms_max": float(rms(r.x, ref.x).max()),
            "seconds": best[w][0],
            "cpu_seconds": best[w][1],
            "speedup": t_seq / best[w][0],
            "cpu_speedup": c_seq / best[w][1],
        }
    return row


def markdown(rows: list[dict], sweep: list[dict], meta: dict) -> str:
    out = [
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']} ({meta['threads']} threads), "
        f"load average at start {meta['load']}. tol = 0.1, VP SDE, d = {D}. Speed-up = sequential wall time / parallel "
        "wall time (best of repeats, interleaved; CPU-time ratios in results.json).",
        "",
        "| model | solver | steps | batch | seq s | W=64 rounds | W=64 nfe / evals | W=64 speed-up | auto W "
        "| auto rounds | auto speed-up | RMS vs seq: mean / median (W=64) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a, f = r["auto"], r["64"]
        auto_w = f"{a['window']}" + (
            f" (seq after {r['steps'] - a['sequential_steps']})" if a["sequential_steps"] and a["window"] > 1 else ""
        )
        if a["window"] == 1:
            auto_w = "1 (sequential)"
        out.append(
            f"| {r['model']} | {r['solver']} | {r['steps']} | {r['batch']} | {r['seq_s']:.3f} | {f['rounds']} | "
            f"{f['nfe']} / {f['evaluations']} | {f['speedup']:.2f}x | {auto_w} | {a['rounds']} | {a['speedup']:.2f}x | "
            f"{f['rms_vs_sequential']:.1e} / {f['rms_median']:.1e} |"
        )
    if sweep:
        out += [
            "",
            f"Window sweep: MLP, DDIM, {sweep[0]['steps']} steps, batch {sweep[0]['batch']}.",
            "",
            "| window | rounds | evaluations | speed-up | RMS vs seq |",
            "|---:|---:|---:|---:|---:|",
        ]
        for s in sweep:
            out.append(
                f"| {s['window']} | {s['rounds']} | {s['evaluations']} | {s['speedup']:.2f}x | "
                f"{s['rms_vs_sequential']:.1e} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny training, 100 steps, batch 1 and 8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the module docstring)")
    ap.add_argument("--out", default="runs/parallel")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps_list = [100] if args.quick else [100, 1000]
    batches = [1, 8] if args.quick else [1, 8, 64]
    repeats = 1 if args.quick else args.repeats

    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    sde = sf.VPSDE()
    gmm = mixture()
    mlp, info = trained_mlp(gmm, sde, 50 if args.quick else args.train_steps)
    meta["mlp"] = info
    print(f"MLP: {info}", flush=True)
    models = {"GMM (exact)": gmm.denoiser(sde), "MLP (trained)": mlp}

    rows = []
    for name, den in models.items():
        for solver in ("ddim", "ddpm"):
            for steps in steps_list:
                for batch in batches:
                    row = compare(den, solver, steps, batch, [64, "auto"], repeats)
                    row["model"] = name
                    rows.append(row)
                    print(
                        f"{name:14s} {solver} {steps:5d} B={batch:3d}: seq {row['seq_s']:.3f}s, W=64 rounds "
                        f"{row['64']['rounds']} x{row['64']['speedup']:.2f}, auto W={row['auto']['window']} "
                        f"rounds {row['auto']['rounds']} x{row['auto']['speedup']:.2f}",
                        flush=True,
                    )
    sweep = []
    steps = steps_list[-1]
    windows = [4, 16, 64, 256] if not args.quick else [4, 16]
    row = compare(mlp, "ddim", steps, 1, windows, repeats)
    for w in windows:
        sweep.append({"window": w, "steps": steps, "batch": 1, **row[str(w)]})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "sweep": sweep}, indent=1))
    table = markdown(rows, sweep, meta)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
