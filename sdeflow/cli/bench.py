"""`sdeflow bench`: NFE-versus-quality sweep of the solvers on a training checkpoint.

Example::

    sdeflow bench --ckpt runs/cb/ckpt.pt --nfe 5 10 20 50 100 --n 2000 --out runs/bench/cb
    sdeflow bench --ckpt runs/digits/ckpt.pt --solvers ddim dpm_solver++ unipc "dpm_solver:order=3" \\
        --nfe 5 10 20 50 --n 1000 --out runs/bench/digits          # FD in digits-CNN feature space
    sdeflow bench --ckpt runs/cifar/ckpt.pt --extractor inception --inception-weights pt_inception-2015-12-05-6726825d.pth
    sdeflow bench --fid --images cifar10_train.npz --inception-weights pt_inception-2015-12-05-6726825d.pth \
        --ckpt runs/cifar/ckpt.pt --solvers ddim dpm_solver++ unipc --nfe 10 20 50 --out runs/bench/fid   # GPU

With ``--fid`` the sweep follows FID's standard protocol (:mod:`sdeflow.evaluation.fid_sweep`): ``--n`` 50000 samples per
cell, reference statistics of the ``--images`` set (a folder, .npy or .npz of uint8 images; cached under
``--cache-dir`` by a hash of the images and the weights), three ``--seeds`` (mean and spread), features streamed
batch by batch, CUDA when present. The model is ``--ckpt`` or a diffusers folder ``--diffusers DIR``.

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
    parser.add_argument(
        "--ckpt", default=None, help="checkpoint written by `sdeflow train` (required but with --diffusers)"
    )
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
    parser.add_argument(
        "--n", type=int_at_least(2), default=None, help="samples per cell (default 2000; 50000 with --fid)"
    )
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
    _configure_fid(parser)


def _configure_fid(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("FID against a real image set (--fid)")
    g.add_argument(
        "--fid",
        action="store_true",
        help="FID sweep under the standard protocol (needs --images and --inception-weights)",
    )
    g.add_argument("--images", default=None, help="real images: a folder, or a .npy / .npz of uint8 images")
    g.add_argument("--diffusers", default=None, help="a diffusers model folder instead of --ckpt (with --fid)")
    g.add_argument(
        "--seeds",
        type=int_at_least(0),
        nargs="+",
        default=None,
        help="sampling seeds, one sample set each (default 0 1 2)",
    )
    g.add_argument("--fid-batch-size", type=int_at_least(1), default=250, help="images per Inception forward pass")
    g.add_argument(
        "--keep", type=int_at_least(0), default=8, help="samples per cell kept for the sample grid (0: none)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the sweep and write the outputs; returns the exit status (2 on bad arguments)."""
    from ..training import CheckpointError, load_run

    report.require_extras("sdeflow bench", {"matplotlib": "plot"})
    if args.fid or args.diffusers or args.images:
        return run_fid(args)
    if args.ckpt is None:
        raise ValueError("--ckpt is required (a checkpoint written by `sdeflow train`)")
    args.n = 2000 if args.n is None else args.n
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


def run_fid(args: argparse.Namespace) -> int:
    """``sdeflow bench --fid``: the FID sweep of :mod:`sdeflow.evaluation.fid_sweep`; returns the exit status."""
    from ..evaluation import fid_sweep as fid
    from ..evaluation.inception import load_fid_inception
    from ..training import load_run

    if not args.fid:
        raise ValueError("--images and --diffusers belong to the FID sweep; add --fid")
    if args.images is None or args.inception_weights is None:
        raise ValueError("--fid needs --images (a folder / .npy / .npz of real images) and --inception-weights")
    if (args.ckpt is None) == (args.diffusers is None):
        raise ValueError("--fid needs exactly one model: --ckpt CKPT or --diffusers DIR")
    n = fid.DEFAULT_N if args.n is None else args.n
    seeds = tuple(args.seeds) if args.seeds else fid.DEFAULT_SEEDS
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    specs = solver_specs(args.solvers, args.option)  # every solver and option checked before any sampling
    check_output_dir(args.out, "--out", args.force, ("results.json", "table.md", "nfe_vs_fid.png"))
    images = fid.open_images(args.images)  # checks the set before any model is loaded
    start = time.perf_counter()
    if args.ckpt is not None:
        den, config, ckpt = load_run(args.ckpt, ema=not args.no_ema, device=device, dtype=dtype)
        shape = tuple(config["data"]["data_shape"])
        model_info = {"checkpoint": args.ckpt, "training_steps": ckpt.get("step"), "ema": not args.no_ema}
        name = Path(args.ckpt).parent.name or "checkpoint"
    else:
        den, shape = fid.load_diffusers_model(args.diffusers, device=device, dtype=dtype)
        model_info = {"diffusers": str(args.diffusers)}
        name = Path(args.diffusers).name
    if tuple(shape) != images.shape:
        print(f"sdeflow bench: note: samples are {tuple(shape)}, the real images {images.shape}", file=sys.stderr)
    net = load_fid_inception(args.inception_weights, device=device)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.out) / "fid_cache"
    ref = fid.reference_stats(
        images, net, batch_size=args.fid_batch_size, cache_dir=cache_dir, progress=progress_enabled(args)
    )
    print(
        f"sdeflow bench: reference statistics of {images.count} images "
        f"({'cached' if ref.cached else 'computed'}: {ref.path}); data floor FID {ref.floor:.4g} +- {ref.floor_std:.2g}",
        flush=True,
    )
    scorer = fid.FIDScorer(
        net,
        ref,
        batch_size=args.fid_batch_size,
        info={"name": "FID Inception-v3 pool3", "weights": str(args.inception_weights)},
    )
    t_sweep = time.perf_counter()
    result = sweep.run_sweep(
        den,
        scorer,
        shape,
        solvers=specs,
        nfes=args.nfe,
        tolerances=args.tolerances,
        nfe_cap=args.nfe_cap,
        n=n,
        seeds=seeds,
        batch_size=args.batch_size or min(n, 500),
        device=device,
        dtype=dtype,
        keep=args.keep,
        progress=progress_enabled(args),
    )
    t_sweep = time.perf_counter() - t_sweep
    protocol = report.base_protocol(
        n=n,
        seed=seeds[0],
        scorer=scorer,
        device=device,
        dtype=dtype,
        batch_size=args.batch_size or min(n, 500),
        checkpoint=args.ckpt,
        sampling_seeds=list(seeds),
        images={"path": str(args.images), "count": images.count, "shape": list(images.shape)},
        model=model_info,
        seconds={"total": time.perf_counter() - start, "sweep": t_sweep},
    )
    paths = report.write_outputs(
        result,
        args.out,
        protocol,
        title=f"FID versus NFE: {name} ({n} samples x {len(seeds)} seeds)",
        plot_name="nfe_vs_fid.png",
    )
    print(report.markdown_grid(result))
    extra = f", {paths['grid']}" if "grid" in paths else ""
    print(
        f"\nsdeflow bench: {len(result.cells)} cells in {time.perf_counter() - start:.1f} s -> "
        f"{paths['json']}, {paths['markdown']}, {paths['plot']}{extra}",
        flush=True,
    )
    return 0
