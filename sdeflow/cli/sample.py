"""`sdeflow sample`: draw samples from a training checkpoint with any solver, save them as .npy and plot them.

Example::

    sdeflow sample --ckpt runs/cb/ckpt.pt --solver dpm_solver++ --nfe 10 --n 10000 --out samples.npy --plot samples.png
    sdeflow sample --ckpt runs/digits/ckpt.pt --class 3 --cfg-scale 2 --n 64 --out threes.npy --plot threes.png
    sdeflow sample --ckpt runs/cb/ckpt.pt --solver ddim --nfe 50 --option eta=1.0 --out s.npy

Samples are saved in the data's training units (2-D toys: roughly unit variance; images: [-1, 1], layout (N, C, H, W)).
The plot is a scatter plot for 2-D data and an image grid (at most 64 images, mapped to [0, 1]) for images.

Seeds: sample i draws its x_T and its solver noise from its own generator seeded with ``--seed + i``
(:class:`~sdeflow.noise.PerSampleGenerator`), so sample i does not depend on the batch it is drawn in. Under torchrun
(``torchrun --nproc_per_node=N -m sdeflow.cli sample ...``) the batches of ``--batch-size`` samples are split across
the ranks and gathered on rank 0, which writes the file: the output is bitwise the one-process output for the same
``--batch-size`` (a batch's floating-point rounding can depend on its size, so keep it fixed to compare runs).
``--split window`` instead splits each Picard window of ``--solver parallel`` across the ranks (every rank then
draws every sample).

Everything is checked before sampling starts: the numbers, the solver and its ``--option`` values, the device, and the
output files (``--out`` and ``--plot`` must not be folders, and existing files are replaced only with ``--force``).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import DistributedContext, run_cli, sample_sharded
from ..grids import GRIDS, SPACINGS
from ..sampling import DEFAULT_SOLVER
from ..training.config import load_run
from ..training.data import to_unit_range
from .common import (
    DTYPES,
    CLIError,
    add_dtype,
    add_force,
    add_progress,
    atomic_write_bytes,
    check_output_file,
    check_tolerance,
    device_arg,
    float_in,
    int_at_least,
    option_arg,
    progress_enabled,
    solver_option_error,
)

DEFAULT_BATCH = 1024  # samples per solver call unless --batch-size says otherwise (independent of the world size)
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `sample` options to ``parser``."""
    from ..solvers import available

    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `sdeflow train`")
    parser.add_argument(
        "--solver",
        default=DEFAULT_SOLVER,
        choices=available(),
        metavar="SOLVER",
        help="one of: " + ", ".join(available()) + f" (default {DEFAULT_SOLVER})",
    )
    parser.add_argument("--nfe", type=int_at_least(1), default=10, help="net-evaluation budget (fixed-step solvers)")
    parser.add_argument("--n", type=int_at_least(1), default=1000, help="number of samples")
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help=f"samples per solver call (default: min(n, {DEFAULT_BATCH})); the unit split across ranks",
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="sample i uses the seed --seed + i")
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--plot", default=None, help="optional image (.png, .pdf, .svg): scatter plot (2-D) or grid")
    add_force(parser)
    parser.add_argument(
        "--grid",
        default=None,
        choices=GRIDS + SPACINGS,
        help="time grid (default: the solver's); leading/trailing/linspace: diffusers' spacings for discrete models",
    )
    parser.add_argument(
        "--t-end", type=float_in(0.0, low_open=True), default=None, help="final time (default sde.eps), below T"
    )
    parser.add_argument("--denoise-final", action="store_true", help="finish with the Tweedie denoising step")
    parser.add_argument("--rtol", type=float_in(0.0, low_open=True), default=None, help="adaptive solvers")
    parser.add_argument("--atol", type=float_in(0.0, low_open=True), default=None, help="adaptive solvers")
    parser.add_argument(
        "--max-steps", type=int_at_least(1), default=None, help="adaptive solvers: cap on the steps (default 100000)"
    )
    parser.add_argument(
        "--option",
        type=option_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="solver option, repeatable (e.g. --option eta=1.0 --option order=3)",
    )
    parser.add_argument(
        "--class", dest="label", type=int_at_least(0), default=None, help="class label (conditional nets)"
    )
    parser.add_argument(
        "--cfg-scale", type=float_in(), default=None, help="classifier-free guidance weight (with --class)"
    )
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help="cpu, cuda, ... (default: cuda if available; under torchrun: cuda:LOCAL_RANK)",
    )
    parser.add_argument(
        "--split",
        choices=["samples", "window"],
        default="samples",
        help="under torchrun: split the samples across ranks (default), or the Picard windows of --solver parallel",
    )
    add_dtype(parser, "floating-point type of sampling")
    add_progress(parser)


def plot_samples(x: torch.Tensor | np.ndarray, path: str | Path, title: str = "") -> None:
    """Save a scatter plot (data of shape (N, 2)) or an image grid (N, C, H, W) in [-1, 1] to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if x.ndim == 2 and x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1.0, alpha=min(1.0, 2000 / max(len(x), 1)), linewidths=0)
        ax.set_aspect("equal")
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        k = min(len(x), 64)
        cols = math.ceil(math.sqrt(k))
        rows = math.ceil(k / cols)
        _, c, h, w = x.shape
        grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
        for i, img in enumerate(to_unit_range(x[:k])):
            r, q = divmod(i, cols)
            grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = img
        fig, ax = plt.subplots(figsize=(min(12, 1 + cols * max(w, 8) / 16),) * 2)
        if c == 1:
            ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.axis("off")
    else:
        raise ValueError(f"can plot data of shape (N, 2) or (N, 1|3, H, W), got {tuple(x.shape)}")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Sample from a checkpoint; returns the exit status (all ranks run this together under torchrun)."""
    return run_cli("sdeflow sample", lambda ctx: _run(args, ctx), device=args.device)


def _guided(den: Any, args: argparse.Namespace) -> Any:
    num_classes = getattr(den.net, "num_classes", None)
    if args.label is None:
        return den
    if num_classes is None:
        raise CLIError("--class needs a class-conditional checkpoint (trained with --conditional)")
    if not 0 <= args.label < num_classes:
        raise CLIError(f"--class must lie in 0..{num_classes - 1}, got {args.label}")
    from ..guidance import ClassifierFreeGuidance, ConditionalDenoiser

    if args.cfg_scale is None:
        return ConditionalDenoiser(den, args.label)
    return ClassifierFreeGuidance(den, args.label, scale=args.cfg_scale)


def _run(args: argparse.Namespace, ctx: DistributedContext) -> int:
    from ..sampling import make_solver

    main = ctx.is_main
    options = dict(args.option)
    if args.cfg_scale is not None and args.label is None:
        raise CLIError("--cfg-scale needs --class")
    if args.split == "window":
        if args.solver != "parallel":
            raise CLIError(f"--split window needs --solver parallel, got --solver {args.solver}")
        if ctx.distributed:
            options["group"] = True
    elif "group" in options:
        raise CLIError("--option group=... splits Picard windows: pass --split window instead")
    for key, flag in (("rtol", "--rtol"), ("atol", "--atol"), ("max_steps", "--max-steps")):
        if key in options:
            raise CLIError(f"--option {key}=... : pass {flag} instead")
    out = check_output_file(args.out, "--out", args.force, (".npy",))
    plot = check_output_file(args.plot, "--plot", args.force, PLOT_SUFFIXES) if args.plot else None
    if plot is not None and plot.resolve() == out.resolve():
        raise CLIError("--plot and --out name the same file")
    device = str(ctx.device) if ctx.distributed else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    check_tolerance(args.rtol, "--rtol", dtype)
    check_tolerance(args.atol, "--atol", dtype)
    try:
        den, config, _ = load_run(args.ckpt, ema=not args.no_ema, device=device, dtype=dtype)
    except FileNotFoundError as err:
        raise CLIError(f"--ckpt {args.ckpt}: {err}") from err
    except RuntimeError as err:  # CheckpointError and friends
        raise CLIError(f"--ckpt: {err}") from err
    if args.t_end is not None and not args.t_end < float(den.sde.T):
        raise CLIError(f"--t-end must lie in (0, T) = (0, {float(den.sde.T):g}), got {args.t_end:g}")
    den = _guided(den, args)
    tolerances = {k: v for k, v in (("rtol", args.rtol), ("atol", args.atol)) if v is not None}
    try:  # the solver refuses unknown or bad options here, before any sampling
        built = make_solver(den, args.solver, **options, **tolerances)
    except (ValueError, TypeError) as err:
        raise CLIError(
            solver_option_error(den, args.solver, {**options, **tolerances}, err, {"rtol": "--rtol", "atol": "--atol"})
        ) from err
    if args.max_steps is not None and (built.tolerances is None or built.integrator() is not None):
        raise CLIError(
            f"--max-steps caps the steps of sdeflow's adaptive driver (--solver adaptive_sde, dpm_solver with "
            f"--option adaptive=True); --solver {args.solver} does not use it"
        )
    shape = tuple(config["data"]["data_shape"])
    batch = args.batch_size or min(args.n, DEFAULT_BATCH)
    extra = {} if args.max_steps is None else {"max_steps": args.max_steps}
    start = time.perf_counter()
    x, nfe = sample_sharded(
        den,
        args.n,
        shape,
        seed=args.seed,
        batch_size=batch,
        device=device,
        progress=progress_enabled(args),
        shard=args.split == "samples",
        solver=args.solver,
        nfe=args.nfe,
        t_end=args.t_end,
        grid=args.grid,
        denoise_final=args.denoise_final,
        dtype=dtype,
        rtol=args.rtol,
        atol=args.atol,
        **extra,
        **options,
    )
    if not main:
        return 0
    assert x is not None  # sample_sharded gathers the samples on rank 0
    seconds = time.perf_counter() - start
    buf = io.BytesIO()
    np.save(buf, x.numpy().astype(np.float32))
    atomic_write_bytes(out, buf.getvalue())  # the exact --out name (np.save would append .npy), never half written
    if not bool(torch.isfinite(x).all()):
        print("sdeflow sample: warning: some samples are not finite", file=sys.stderr)
    label = (
        f", class {args.label}" + (f", cfg {args.cfg_scale}" if args.cfg_scale is not None else "")
        if args.label is not None
        else ""
    )
    ranks = f" on {ctx.world_size} ranks" if ctx.distributed else ""
    print(
        f"sdeflow sample: {args.n} samples {tuple(x.shape[1:])} with {args.solver} (NFE {nfe}{label}) in "
        f"{seconds:.2f} s{ranks} -> {out}",
        flush=True,
    )
    if plot is not None:
        plot_samples(x, plot, f"{args.solver}, NFE {args.nfe}{label} ({Path(args.ckpt).parent.name})")
        print(f"sdeflow sample: plot -> {plot}", flush=True)
    return 0
