"""`sdeflow bench`: NFE-versus-quality sweep of the solvers on a training checkpoint.

Example::

    sdeflow bench --ckpt runs/cb/ckpt.pt --nfe 5 10 20 50 100 --n 2000 --out runs/bench/cb
    sdeflow bench --ckpt runs/digits/ckpt.pt --solvers ddim dpm_solver++ unipc "dpm_solver:order=3" \\
        --nfe 5 10 20 50 --n 1000 --out runs/bench/digits          # FD in digits-CNN feature space
    sdeflow bench --ckpt runs/cifar/ckpt.pt --extractor inception --inception-weights pt_inception-2015-12-05-6726825d.pth

For every solver (``name`` or ``name:key=value,...``; default: every solver in ``sdeflow.solvers.available()`` but
``parallel``) and every NFE budget, draws ``--n`` samples from the same x_T and scores them against reference data
(2-D data: sliced Wasserstein, MMD^2 and Frechet distance of the coordinates against held-out draws; images: Frechet
distance of features). Tolerance-driven solvers run at each ``--tolerances`` value and report the NFE they spent.
Writes ``OUT/results.json`` (protocol and every cell), ``OUT/table.md`` and ``OUT/nfe_vs_quality.png``, and prints
the summary table. See :mod:`sdeflow.evaluation.sweep` for the protocol.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..evaluation import report, sweep
from .common import (
    DTYPES,
    CLIError,
    add_dtype,
    add_force,
    add_progress,
    check_output_dir,
    device_arg,
    float_in,
    int_at_least,
    one_line,
    option_arg,
    progress_enabled,
    solver_specs,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `bench` options to ``parser``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `sdeflow train`")
    parser.add_argument(
        "--solvers",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="solver specs, e.g. ddim 'ddim:eta=1.0' 'dpm_solver:order=3' (default: all but parallel)",
    )
    parser.add_argument("--nfe", type=int_at_least(1), nargs="+", default=list(sweep.DEFAULT_NFES), help="NFE budgets")
    parser.add_argument(
        "--tolerances",
        type=float_in(0.0, low_open=True),
        nargs="+",
        default=list(sweep.DEFAULT_TOLERANCES),
        help="rtol = atol values of the tolerance-driven solvers",
    )
    parser.add_argument(
        "--nfe-cap",
        type=float_in(0.0, low_open=True),
        default=None,
        help="stop tightening a tolerance once a cell spends more NFE (default 2 x max --nfe)",
    )
    parser.add_argument("--n", type=int_at_least(2), default=2000, help="samples per cell")
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=None, help="samples per solver call (default --n)"
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed (the same x_T for every cell)")
    parser.add_argument("--ref-seed", type=int_at_least(0), default=12345, help="seed of the reference / held-out data")
    parser.add_argument(
        "--extractor",
        default="auto",
        choices=["auto", "digits", "inception", "raw"],
        help="image features (auto: digits CNN for digits, Inception with --inception-weights, else raw pixels)",
    )
    parser.add_argument("--inception-weights", default=None, help="pytorch-fid's Inception weight file (FID)")
    parser.add_argument("--cache-dir", default=None, help="where the digits extractor is cached (~/.cache/sdeflow)")
    parser.add_argument("--out", default="runs/bench", help="output folder")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--device", type=device_arg, default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_dtype(parser, "floating-point type of sampling")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--option",
        type=option_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="solver option for every solver of --solvers, repeatable (e.g. --option eta=1.0)",
    )
    add_force(parser)
    add_progress(parser)


def run(args: argparse.Namespace) -> int:
    """Run the sweep and write the outputs; returns the exit status (2 on bad arguments)."""
    from ..training import CheckpointError, load_run

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    specs = solver_specs(args.solvers, args.option)  # every solver and option checked before any sampling
    check_output_dir(args.out, "--out", args.force, ("results.json", "table.md", "nfe_vs_quality.png"))
    if not Path(args.ckpt).is_file():
        raise CLIError(f"--ckpt {args.ckpt}: no such file (a checkpoint written by `sdeflow train`)")
    start = time.perf_counter()
    try:
        den, config, ckpt = load_run(args.ckpt, ema=not args.no_ema, device=device, dtype=dtype)
        scorer = sweep.make_scorer(
            config,
            args.n,
            seed=args.ref_seed,
            extractor=args.extractor,
            inception_weights=args.inception_weights,
            cache_dir=args.cache_dir,
            device=device,
        )
        result = sweep.run_sweep(
            den,
            scorer,
            config["data"]["data_shape"],
            solvers=specs,
            nfes=args.nfe,
            tolerances=args.tolerances,
            nfe_cap=args.nfe_cap,
            n=args.n,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            dtype=dtype,
            progress=progress_enabled(args),
        )
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        print(f"sdeflow bench: error: {one_line(err)}", file=sys.stderr)
        return 2
    protocol = report.base_protocol(
        n=args.n,
        seed=args.seed,
        scorer=scorer,
        device=device,
        dtype=dtype,
        batch_size=args.batch_size,
        checkpoint=args.ckpt,
        reference_seed=args.ref_seed,
        data=config["data"].get("spec"),
        training_steps=ckpt.get("step"),
        ema=not args.no_ema,
    )
    name = Path(args.ckpt).parent.name or "checkpoint"
    paths = report.write_outputs(
        result, args.out, protocol, title=f"NFE versus quality: {name} ({config['data'].get('spec')})"
    )
    print(report.markdown_grid(result))
    adaptive = report.markdown_adaptive(result)
    if adaptive:
        print("\n" + adaptive)
    print(
        f"\nsdeflow bench: {len(result.cells)} cells in {time.perf_counter() - start:.1f} s -> "
        f"{paths['json']}, {paths['markdown']}, {paths['plot']}",
        flush=True,
    )
    return 0
