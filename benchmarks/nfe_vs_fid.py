"""NFE-versus-quality benchmark behind `make bench`: every solver from NFE 5 to 1000 on two trained models.

1. **checkerboard** (2-D): the demo's MLP (128 wide, 3 residual blocks) trained for 10000 steps; every solver at
   NFE 5, 10, 20, 50, 100, 200, 500, 1000 and the tolerance-driven ones at rtol = atol = 1e-1 ... 1e-4; 2000 samples
   per cell scored by sliced Wasserstein, multi-scale MMD^2 and the Frechet distance against 2000 held-out draws.
2. **digits** (8x8 images, scikit-learn): a small U-Net (32 channels, multipliers 1, 2, 2, one residual block per
   level, attention at 4x4; 1.1 M parameters) trained for 3000 steps with the EDM recipe; a representative solver set
   (ddim, ddpm, dpm_solver++, unipc, heun, euler_maruyama, rk45) at NFE 5 ... 100 (``--digits-nfe``), then the
   reference cells that check issue 17's targets (the best solver at NFE 10 run at NFE 1000, rk45 at rtol 1e-3 and
   1e-4); 1000 samples per cell scored by FD_digits, the Frechet distance in the feature space of the hash-verified
   digits CNN (:mod:`sdeflow.evaluation.extractors`), against the statistics of all 1797 digits.

Checkpoints are reused when present (``runs/bench/<name>/ckpt.pt``), resumed when shorter than asked, trained
otherwise. Each part writes ``results.json``, ``table.md`` and ``nfe_vs_quality.png`` under ``runs/bench/<name>/``
(the protocol: sample count, seeds, reference statistics, extractor and checkpoint hashes, is in both files), and
``runs/bench/summary.md`` collects the tables and the time of every phase. ``sdeflow bench --ckpt ...`` runs the same
sweep on any checkpoint.

Time on 2 CPU cores (torch's default threads: one U-Net call on 1000 samples takes 1.95 s on one thread and 0.98 s
on two): see docs/benchmarks.md, "make bench", for the measured phases (no GPU run has been measured).

    .venv/bin/python benchmarks/nfe_vs_fid.py                 # both parts
    .venv/bin/python benchmarks/nfe_vs_fid.py --only digits   # one part
    .venv/bin/python benchmarks/nfe_vs_fid.py --quick         # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sdeflow.cli.common import int_at_least
from sdeflow.evaluation import report, sweep
from sdeflow.sampling import make_solver
from sdeflow.training import ensure_trained, load_run

PARTS = {
    "checkerboard": {
        "train": {"data": "checkerboard", "net": "mlp", "hidden": 128, "depth": 3, "save_every": 1000},
        "steps": 10000,
        "n": 2000,
        "nfes": list(sweep.DEFAULT_NFES),
        "tolerances": list(sweep.DEFAULT_TOLERANCES),
        # the small MLP loses to thread synchronisation: training took 87 s on one thread, 314 s on two
        "threads": 1,
    },
    "digits": {
        "train": {
            "data": "digits",
            "objective": "edm",  # the eps-objective model's PF-ODE plateaued at FD ~80 (docs/benchmarks.md)
            "net": "unet",
            "channels": 32,
            "channel_mult": [1, 2, 2],
            "num_res_blocks": 1,
            "attention_levels": [1],
            "batch_size": 128,
            "lr": 5e-4,
            "save_every": 500,
        },
        "steps": 3000,
        "n": 1000,
        "nfes": [5, 10, 20, 50, 100],
        "tolerances": [1e-1, 1e-2],
        # one U-Net call on 1000 samples costs about 1 s on 2 cores, so the digits part sweeps a representative set
        # (all 19 solvers with their references were on course for over 2 hours): the first-order ODE and SDE baselines, the two
        # multistep ODE solvers, EDM's Heun, and rk45 (`sdeflow bench --ckpt ... --solvers ...` sweeps any other)
        "solvers": ["ddim", "ddpm", "dpm_solver++", "unipc", "heun", "euler_maruyama", "rk45"],
        # issue 17's targets: the high-accuracy ODE within 2x of the data floor, the best solver at NFE 10 within
        # 1.1x of its own NFE 1000 (checked by `targets`, written into the summary)
        "reference": {"solvers": [], "nfes": [1000], "tolerances": [1e-3, 1e-4], "target_nfe": 10},
    },
}
QUICK = {"steps": 20, "n": 64, "nfes": [2, 4], "tolerances": [0.1], "solvers": ["euler", "dpm_solver++", "rk45"]}
QUICK_REFERENCE = {"solvers": ["heun"], "nfes": [8], "tolerances": [1e-2], "target_nfe": 4}
QUICK_TRAIN = {
    "checkerboard": {"hidden": 16, "depth": 1},
    "digits": {"channels": 8, "channel_mult": [1], "attention_levels": [], "batch_size": 16},
}


def run_part(name: str, out: Path, args: argparse.Namespace) -> str:
    """Train or reuse, sweep, write the outputs; returns the part's markdown section for the summary."""
    part = dict(PARTS[name])
    train = dict(part["train"])
    if args.quick:
        part.update(QUICK)
        train.update(QUICK_TRAIN[name])
    if name == "digits" and args.digits_nfe:
        part["nfes"] = args.digits_nfe
    run_dir = out / name
    torch.set_num_threads(args.threads or part.get("threads") or args.default_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    action = ensure_trained(run_dir, train, part["steps"], device=device, progress=not args.no_progress)
    t_train = time.perf_counter() - t0
    print(f"[bench] {name}: {action} ({t_train:.0f} s)", flush=True)
    den, config, ckpt = load_run(run_dir / "ckpt.pt", device=device)
    t1 = time.perf_counter()
    scorer = sweep.make_scorer(config, part["n"], seed=args.ref_seed, cache_dir=args.cache_dir, device=device)
    result = sweep.run_sweep(
        den,
        scorer,
        config["data"]["data_shape"],
        solvers=part.get("solvers"),
        nfes=part["nfes"],
        tolerances=part["tolerances"],
        n=part["n"],
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )
    t_sweep = time.perf_counter() - t1
    targets = ""
    if "reference" in part:
        ref = QUICK_REFERENCE if args.quick else part["reference"]
        t2 = time.perf_counter()
        result, targets = reference_phase(den, scorer, config, part, ref, result, args, device)
        t_sweep += time.perf_counter() - t2
    params = sum(p.numel() for p in den.net.parameters())
    note = (
        f"Model: {config['net']['name']} ({params:,} parameters), {config['sde']['name']} SDE, "
        f"{ckpt['step']} training steps. {action}; training {t_train:.0f} s this session, sweep {t_sweep:.0f} s "
        f"on {device} with {torch.get_num_threads()} torch thread(s)."
    )
    protocol = report.base_protocol(
        n=part["n"],
        seed=args.seed,
        scorer=scorer,
        device=device,
        dtype=next(den.net.parameters()).dtype,
        batch_size=args.batch_size,
        checkpoint=run_dir / "ckpt.pt",
        reference_seed=args.ref_seed,
        data=config["data"]["spec"],
        training_steps=ckpt["step"],
        seconds={"train": t_train, "sweep": t_sweep},
    )
    paths = report.write_outputs(result, run_dir, protocol, title=f"NFE versus quality: {name}", extra_markdown=note)
    grid = report.markdown_grid(result)
    print(grid, flush=True)
    print(f"[bench] {name}: sweep {t_sweep:.0f} s -> {paths['markdown']}, {paths['plot']}", flush=True)
    section = [f"## {name}", "", note, "", f"{result.metrics[0]}, lower is better:", "", grid, ""]
    if targets:
        section += [targets, ""]
        (run_dir / "targets.md").write_text(targets + "\n")
    adaptive = report.markdown_adaptive(result)
    if adaptive:
        section += [adaptive, ""]
    section += [f"Details: `{paths['markdown']}`, plot: `{paths['plot']}`.", ""]
    return "\n".join(section)


def stochastic(den: Any, label: str) -> bool:
    """Whether the solver a sweep row names (``name`` or ``name:key=value``) is stochastic."""
    spec = sweep.parse_solver(label)
    return bool(make_solver(den, spec.name, **spec.kwargs).stochastic)


def reference_phase(
    den: Any,
    scorer: Any,
    config: dict[str, Any],
    part: dict[str, Any],
    ref: dict[str, Any],
    result: sweep.SweepResult,
    args: argparse.Namespace,
    device: str,
) -> tuple[sweep.SweepResult, str]:
    """The high-accuracy cells (a few ODE solvers at NFE 1000, rk45 at tight tolerances, and the best solver at the
    target NFE run at NFE 1000 too), merged into ``result``, and the markdown that checks issue 17's two targets:
    the best high-accuracy ODE cell within 2x of the data floor, the best solver at ``target_nfe`` within 1.1x of
    its own value at the largest reference NFE."""
    metric = result.metrics[0]
    at_target = [c for c in result.cells if c.budget == ref["target_nfe"] and c.ok]
    best = min(at_target, key=lambda c: c.metrics[metric]) if at_target else None
    solvers = list(dict.fromkeys([*ref["solvers"], *([best.solver] if best else []), "rk45"]))
    extra = sweep.run_sweep(
        den,
        scorer,
        config["data"]["data_shape"],
        solvers=solvers,
        nfes=ref["nfes"],
        tolerances=ref["tolerances"],
        nfe_cap=1e9,
        n=part["n"],
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )
    merged = sweep.SweepResult(
        result.cells + extra.cells,
        result.metrics,
        result.floor,
        tuple(sorted({*result.nfes, *extra.nfes})),
        tuple(sorted({*result.tolerances, *extra.tolerances}, reverse=True)),
        result.samples,
        result.floor_std,
        result.seeds,
    )
    top = max(ref["nfes"])
    floor = result.floor.get(metric, math.nan)
    ode = [c for c in extra.cells if c.ok and (c.budget == top or c.tol == min(ref["tolerances"]))]
    ode = [c for c in ode if not stochastic(den, c.solver)]
    lines = [f"**Targets** ({metric}; data floor {floor:.3g}):", ""]
    if ode:
        hi = min(ode, key=lambda c: c.metrics[metric])
        where = f"NFE {hi.budget}" if hi.budget is not None else f"rtol = atol = {hi.tol:g}, NFE {hi.nfe:.0f}"
        ratio = hi.metrics[metric] / floor
        lines.append(
            f"- high-accuracy probability-flow ODE ({hi.solver}, {where}): {hi.metrics[metric]:.3g} = "
            f"{ratio:.2f}x the floor (target <= 2x): {'met' if ratio <= 2 else 'missed'}"
        )
    if best is not None:
        own = [c for c in extra.cells if c.solver == best.solver and c.budget == top and c.ok]
        if own:
            ratio = best.metrics[metric] / own[0].metrics[metric]
            lines.append(
                f"- best solver at NFE {ref['target_nfe']} ({best.solver}): {best.metrics[metric]:.3g}, its own NFE "
                f"{top}: {own[0].metrics[metric]:.3g}, ratio {ratio:.2f} (target <= 1.1): "
                f"{'met' if ratio <= 1.1 else 'missed'}"
            )
    return merged, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--only", choices=sorted(PARTS), default=None, help="run one part")
    p.add_argument("--digits-nfe", type=int, nargs="+", default=None, help="NFE budgets of the digits part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-seed", type=int, default=12345)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="digits extractor cache (default ~/.cache/sdeflow)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--threads",
        type=int_at_least(1),
        default=None,
        help="torch CPU threads (default: 1 for the checkerboard MLP, torch's default for the U-Net)",
    )
    p.add_argument("--quick", action="store_true", help="tiny models and sweeps (smoke test)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.default_threads = torch.get_num_threads()
    out = Path(args.out)
    start = time.perf_counter()
    sections = [run_part(name, out, args) for name in PARTS if args.only in (None, name)]
    summary = out / "summary.md"
    summary.write_text(
        "# sdeflow NFE-versus-quality benchmark\n\n"
        + "\n".join(sections)
        + f"\nTotal time: {time.perf_counter() - start:.0f} s.\n"
    )
    print(f"[bench] done in {time.perf_counter() - start:.0f} s -> {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
