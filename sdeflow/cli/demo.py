"""The main job behind `make demo`: train a small model on 2-D data, then ask "which solver, how many NFE?".

Steps (about 3 to 5 minutes on 2 CPU cores; ``--quick`` is a seconds-long smoke run):

1. train an MLP score net on a 2-D toy (default: checkerboard, 4000 steps) with
   :func:`sdeflow.training.ensure_trained`, or reuse
   ``OUT/ckpt.pt`` (an interrupted run is resumed to ``--steps``);
2. sample 2000 points with every solver in ``sdeflow.solvers.available()`` (but ``parallel``) at NFE 5, 10, 20, 50,
   and the tolerance-driven ones at rtol = atol = 0.1, 0.01, 0.001, all from the same x_T;
3. score each set against held-out data (sliced Wasserstein, MMD^2, Frechet distance;
   :mod:`sdeflow.evaluation.sweep`) and
   against the data floor (real vs real);
4. compute the test NLL with :func:`sdeflow.log_likelihood` (exact divergence) on 500 held-out points and compare it
   with the data's exact entropy where it is known (checkerboard: log 6 nats);
5. print the tables and write ``OUT/table.md``, ``OUT/results.json``, ``OUT/nfe_vs_quality.png`` and
   ``OUT/samples.png``.

Usage: ``python -m sdeflow.cli.demo [--out runs/demo] [--data checkerboard] [--steps 4000] [--quick]`` (or
``sdeflow demo ...``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .common import CLIError, check_output_dir, option_arg, progress_enabled, solver_specs

#: exact differential entropy (nats) of the toys that have one: the lowest expected NLL any model can reach
#: checkerboard: uniform on 8 unit squares scaled by sqrt(3)/2, area 8 * 3/4 = 6
EXACT_ENTROPY: dict[str, float] = {"checkerboard": math.log(6.0)}

#: the data sets the demo trains on: the 2-D toys and the Gaussian mixture
DATA = ("8gaussians", "checkerboard", "moons", "swissroll", "2spirals", "rings", "gmm")

QUICK = {
    "steps": 40,
    "hidden": 32,
    "depth": 1,
    "n": 256,
    "nfe": [4, 8],
    "tolerances": [0.1],
    "solvers": ["euler", "ddim", "rk45"],
    "nll_points": 16,
    "nll_tol": 1e-3,
}


def configure(p: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``p``."""
    from .common import add_force, add_progress, float_in, int_at_least

    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="runs/demo", help="run folder (ckpt.pt is reused when present)")
    p.add_argument(
        "--data",
        default="checkerboard",
        choices=DATA,
        metavar="DATA",
        help="a 2-D toy: 8gaussians, checkerboard, moons, swissroll, 2spirals, rings, or gmm",
    )
    p.add_argument("--steps", type=int_at_least(1), default=4000, help="training steps")
    p.add_argument("--hidden", type=int_at_least(1), default=128, help="MLP width")
    p.add_argument("--depth", type=int_at_least(0), default=3, help="MLP residual blocks")
    p.add_argument("--n", type=int_at_least(2), default=2000, help="samples per (solver, NFE) cell")
    p.add_argument("--nfe", type=int_at_least(1), nargs="+", default=[5, 10, 20, 50], help="NFE budgets")
    p.add_argument(
        "--tolerances",
        type=float_in(0.0, low_open=True),
        nargs="+",
        default=[1e-1, 1e-2, 1e-3],
        help="rtol = atol of the adaptive solvers",
    )
    p.add_argument("--solvers", nargs="+", default=None, help="solver specs (default: every solver but parallel)")
    p.add_argument(
        "--option",
        type=option_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="solver option for every solver of --solvers, repeatable",
    )
    p.add_argument("--nll-points", type=int_at_least(0), default=500, help="held-out points for the test NLL (0: skip)")
    p.add_argument(
        "--nll-tol", type=float_in(0.0, low_open=True), default=1e-5, help="rtol = atol of the likelihood ODE"
    )
    p.add_argument("--seed", type=int_at_least(0), default=0, help="training and sampling seed")
    p.add_argument(
        "--threads", type=int_at_least(1), default=1, help="torch threads (small nets run fastest on one; default 1)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (tests)")
    add_force(p)
    add_progress(p)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m sdeflow.cli.demo``."""
    from .common import Parser

    p = Parser(prog="python -m sdeflow.cli.demo")
    configure(p)
    return p


def test_nll(den: Any, spec: str, n: int, seed: int, tol: float = 1e-5) -> dict[str, float]:
    """Mean test NLL (nats per point) of n fresh held-out draws of ``spec`` (generator seeded by ``seed``), with the
    exact divergence and rtol = atol = ``tol``; ``stderr`` is the standard error of the mean."""
    import sdeflow as sf

    from ..evaluation.sweep import model_device_dtype
    from ..training import make_data

    device, dtype = model_device_dtype(den)
    x = make_data(spec).sample(n, torch.Generator().manual_seed(seed))[0].to(device, dtype)
    start = time.perf_counter()
    with torch.no_grad():
        ll = sf.log_likelihood(den, x, rtol=tol, atol=tol)
    lp = ll.log_prob.double()
    out = {
        "nll": float(-lp.mean()),
        "stderr": float(lp.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "bits_per_dim": float(ll.bits_per_dim.double().mean()),
        "nfe": float(ll.nfe),
        "n": n,
        "tol": tol,
        "seconds": time.perf_counter() - start,
        "prior_gap_bound": float(torch.as_tensor(ll.prior_gap_bound).max()),
    }
    if spec in EXACT_ENTROPY:
        out["exact_entropy"] = EXACT_ENTROPY[spec]
    return out


def plot_samples_grid(result: Any, reference: torch.Tensor, path: str | Path, title: str = "") -> None:
    """Scatter plots: one column per solver (and the held-out data first), one row per NFE budget (tolerance-driven
    solvers: per tolerance, with the NFE spent in the panel title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result.by_solver()
    solvers = [s for s, cs in groups.items() if any(c.ok for c in cs)]
    rows = max(len(result.nfes), len(result.tolerances))
    cols = len(solvers) + 1
    lim = 1.1 * float(reference.abs().max())
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols, 1.75 * rows + 0.4), squeeze=False)
    primary = result.metrics[0]
    for ax in axes.flat:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    ref = reference[:1000].numpy()
    axes[0, 0].scatter(ref[:, 0], ref[:, 1], s=0.4, c="k", linewidths=0)
    axes[0, 0].set_title("held-out data", fontsize=6)
    for ax in axes[1:, 0]:
        ax.axis("off")
    for j, solver in enumerate(solvers, start=1):
        cs = [c for c in groups[solver] if c.budget is not None or c.tol is not None]
        for i in range(rows):
            ax = axes[i, j]
            if i >= len(cs) or not cs[i].ok:
                ax.axis("off")
                continue
            c = cs[i]
            x = result.samples.get((solver, c.budget if c.budget is not None else c.tol))
            if x is not None:
                x = x.float().clamp(-lim, lim).numpy()
                ax.scatter(x[:, 0], x[:, 1], s=0.4, c="C0", linewidths=0)
            what = f"NFE {c.nfe:g}" if c.tol is None else f"tol {c.tol:g}: NFE {c.nfe:g}"
            ax.set_title(f"{solver}\n{what}, {primary} {c.metrics[primary]:.3g}", fontsize=5.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, h_pad=0.6, rect=(0, 0, 1, 1 - 0.35 / (1.75 * rows + 0.4)))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sdeflow.cli.demo``: parse ``argv`` and :func:`run` (errors as one line, like ``sdeflow demo``)."""
    from .common import debug_enabled, report_error

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Exception as err:
        if debug_enabled(args):
            raise
        return report_error("sdeflow demo", err)


def _check_reuse(out: Path, args: argparse.Namespace) -> None:
    """A checkpoint already in ``out`` is reused only when it was trained with the given --data, --hidden, --depth."""
    from ..training import load_checkpoint

    ckpt = out / "ckpt.pt"
    if not ckpt.exists():
        return
    config = load_checkpoint(ckpt).get("config") or {}
    saved = {
        "--data": config.get("data", {}).get("spec"),
        "--hidden": config.get("net", {}).get("hidden"),
        "--depth": config.get("net", {}).get("depth"),
    }
    given = {"--data": args.data, "--hidden": args.hidden, "--depth": args.depth}
    bad = [
        f"{flag} {given[flag]} (it was trained on {flag} {saved[flag]})" for flag in given if given[flag] != saved[flag]
    ]
    if bad:
        raise CLIError(
            f"--out {out} holds a checkpoint trained on other settings: {'; '.join(bad)}; choose another --out"
        )


def run(args: argparse.Namespace) -> int:
    """Train or reuse, sweep, NLL, write the outputs; returns the exit status (2 on bad arguments)."""
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    from ..evaluation import report, sweep
    from ..training import ensure_trained, load_run, make_data

    out = check_output_dir(
        args.out, "--out", args.force, ("table.md", "results.json", "nfe_vs_quality.png", "samples.png"), own="ckpt.pt"
    )
    specs = solver_specs(args.solvers, args.option)  # every solver and option checked before training
    _check_reuse(out, args)
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    options = {
        "data": args.data,
        "net": "mlp",
        "hidden": args.hidden,
        "depth": args.depth,
        "seed": args.seed,
        "save_every": 1000,
    }
    try:
        action = ensure_trained(out, options, args.steps, device="cpu", progress=progress_enabled(args))
    except RuntimeError as err:  # interrupted by a signal: the checkpoint it wrote resumes on the next run
        raise CLIError(str(err)) from err
    den, config, ckpt = load_run(out / "ckpt.pt")
    t_train = time.perf_counter() - t0
    print(f"[demo] {action}: {t_train:.1f} s", flush=True)

    ref_seed = 10_000 + args.seed  # held-out draws: a seed the training stream never uses
    scorer = sweep.make_scorer(config, args.n, seed=ref_seed)
    t1 = time.perf_counter()
    result = sweep.run_sweep(
        den,
        scorer,
        config["data"]["data_shape"],
        solvers=specs,
        nfes=args.nfe,
        tolerances=args.tolerances,
        n=args.n,
        seed=args.seed,
        keep=1000,
        progress=progress_enabled(args),
    )
    t_sweep = time.perf_counter() - t1
    print(f"[demo] sampled and scored {sum(c.ok for c in result.cells)} cells: {t_sweep:.1f} s", flush=True)

    nll = None
    if args.nll_points > 0:
        nll = test_nll(den, args.data, args.nll_points, ref_seed + 1, args.nll_tol)
        print(f"[demo] test NLL on {args.nll_points} held-out points: {nll['seconds']:.1f} s", flush=True)

    nll_md = ""
    if nll is not None:
        nll_md = (
            f"**Test NLL** ({nll['n']} held-out points, exact divergence, rtol = atol = {nll['tol']:g}, "
            f"{nll['nfe']:g} NFE): {nll['nll']:.3f} +- {nll['stderr']:.3f} nats per point"
        )
        if "exact_entropy" in nll:
            nll_md += (
                f"; the data's exact entropy, the lowest expected NLL any model can reach, is "
                f"{nll['exact_entropy']:.3f} (gap {nll['nll'] - nll['exact_entropy']:.3f} nats)"
            )
        nll_md += "."
    net = den.net
    assert isinstance(net, torch.nn.Module)  # load_run builds an nn.Module
    train_md = (
        f"Model: MLP score net ({sum(p.numel() for p in net.parameters()):,} parameters), "
        f"{config['sde']['name']} SDE, {config['loss']['prediction']}-prediction, {ckpt['step']} training "
        f"steps on `{args.data}`. Samples per cell: {args.n}; every cell starts from the same x_T."
    )
    protocol = report.base_protocol(
        n=args.n,
        seed=args.seed,
        scorer=scorer,
        device="cpu",
        dtype=next(net.parameters()).dtype,
        checkpoint=out / "ckpt.pt",
        reference_seed=ref_seed,
        data=args.data,
        training_steps=ckpt["step"],
        test_nll=nll,
        seconds={"train": t_train, "sweep": t_sweep},
    )
    title = f"sdeflow demo: {args.data}, NFE versus quality"
    paths = report.write_outputs(result, out, protocol, title=title, extra_markdown=train_md + "\n\n" + nll_md)
    reference = make_data(args.data).sample(1000, torch.Generator().manual_seed(ref_seed))[0]
    samples_png = out / "samples.png"
    plot_samples_grid(result, reference, samples_png, title=f"{args.data}: samples by solver and NFE")

    print()
    print(
        f"{result.metrics[0]} (sliced 2-Wasserstein to held-out data, lower is better; NFE spent in brackets when "
        "it differs from the budget):"
    )
    print(report.markdown_grid(result))
    print("\nmmd2 (multi-scale Gaussian-kernel MMD^2 to held-out data; more sensitive to fine structure):")
    print(report.markdown_grid(result, "mmd2"))
    adaptive = report.markdown_adaptive(result)
    if adaptive:
        print("\nTolerance-driven solvers:")
        print(adaptive)
    if nll_md:
        print("\n" + nll_md.replace("**", ""))
    print(
        f"\nwrote {paths['markdown']}, {paths['json']}, {paths['plot']}, {samples_png} "
        f"(total {time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
