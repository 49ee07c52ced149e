"""`sdeflow train`: denoising score matching on a toy, a Gaussian mixture, digits, a .npy file or an image folder.

Example::

    sdeflow train --data checkerboard --sde vp --net mlp --steps 5000 --out runs/cb
    sdeflow train --data digits --net unet --conditional --steps 20000 --out runs/digits
    sdeflow train --out runs/cb --steps 10000 --resume        # continue the saved run to 10000 steps

Writes ``OUT/ckpt.pt`` (and keeps the previous one as ``OUT/ckpt.prev.pt``) and ``OUT/config.json``. SIGINT/SIGTERM
write a checkpoint and exit with status 128 + signal number.

Under torchrun (``torchrun --nproc_per_node=N -m sdeflow.cli train ...``) every process trains its share of the
global batch ``--batch-size`` with DistributedDataParallel on ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo); rank 0
prints and writes the checkpoints, and a stop signal takes effect at the next log point (``--log-every``). A run
resumes with any number of processes (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..denoiser import PREDICTIONS
from ..distributed import DistributedContext, run_cli
from ..nets.embeddings import EMBEDDINGS
from ..training.checkpoint import CheckpointError, previous_path
from ..training.config import NET_NAMES, SDE_NAMES
from ..training.data import DataSource
from ..training.losses import TIME_SAMPLINGS, WEIGHTINGS
from ..training.run import VP_SCHEDULES, prepare_run, run_config


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `train` options to ``parser``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        help="toy (8gaussians, checkerboard, moons, swissroll, 2spirals, rings), gmm, digits, "
        "a .npy file or an image folder",
    )
    g.add_argument("--image-size", type=int, default=None, help="resize folder images to this square size")
    g.add_argument("--conditional", action="store_true", help="train class-conditionally on the data's labels")
    g.add_argument(
        "--p-uncond",
        type=float,
        default=None,
        help="label dropout for classifier-free guidance (default 0.1 with --conditional)",
    )
    g = parser.add_argument_group("SDE")
    g.add_argument("--sde", default="vp", choices=SDE_NAMES)
    g.add_argument("--schedule", default="linear", choices=VP_SCHEDULES, help="VP schedule")
    g.add_argument("--beta-min", type=float, default=0.1)
    g.add_argument("--beta-max", type=float, default=20.0)
    g.add_argument("--sigma-min", type=float, default=0.01)
    g.add_argument("--sigma-max", type=float, default=None, help="VE sigma_max (default 10 for 2-D data, 50 else)")
    g = parser.add_argument_group("net")
    g.add_argument("--net", default="mlp", choices=NET_NAMES)
    g.add_argument("--prediction", default="eps", choices=PREDICTIONS)
    g.add_argument("--embedding", default="sinusoidal", choices=EMBEDDINGS)
    g.add_argument("--hidden", type=int, default=256, help="MLP width")
    g.add_argument("--depth", type=int, default=3, help="MLP residual blocks")
    g.add_argument("--channels", type=int, default=64, help="U-Net base width")
    g.add_argument("--channel-mult", type=_ints, default=[1, 2, 2], help="U-Net multipliers, e.g. 1,2,2")
    g.add_argument("--num-res-blocks", type=int, default=2)
    g.add_argument("--attention-levels", type=_ints, default=[1], help="U-Net levels with attention, e.g. 1,2")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--no-input-scaling", action="store_true", help="feed x_t unscaled (default: EDM c_in scaling)")
    g.add_argument("--sigma-data", type=float, default=None, help="data scale for c_in (default 0.5 images, 1 else)")
    g = parser.add_argument_group("loss")
    g.add_argument("--weighting", default="simple", choices=WEIGHTINGS)
    g.add_argument(
        "--time-sampling",
        default=None,
        choices=TIME_SAMPLINGS,
        help="default: importance for --weighting likelihood, uniform otherwise",
    )
    g.add_argument("--stratified", action="store_true", help="stratify t across the batch")
    g.add_argument("--min-snr-gamma", type=float, default=5.0)
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="total steps (default 5000; with --resume: the saved total)")
    g.add_argument("--batch-size", type=int, default=None, help="default 256 (mlp) / 64 (unet)")
    g.add_argument("--lr", type=float, default=None, help="default 1e-3 (mlp) / 2e-4 (unet)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=int, default=100)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder (ckpt.pt, ckpt.prev.pt, config.json)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint period in steps (0: end only)")
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun: cuda:LOCAL_RANK)",
    )
    g.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA only)")
    g.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace, data: DataSource | None = None) -> dict[str, Any]:
    """The run config (plain primitives) for parsed `train` arguments: :func:`sdeflow.training.run_config` with the
    flags as keywords (``data``: the source ``--data`` names, when already built)."""
    return run_config(
        args.data,
        data_source=data,
        image_size=args.image_size,
        conditional=args.conditional,
        p_uncond=args.p_uncond,
        sde=args.sde,
        schedule=args.schedule,
        beta_min=args.beta_min,
        beta_max=args.beta_max,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        net=args.net,
        prediction=args.prediction,
        embedding=args.embedding,
        hidden=args.hidden,
        depth=args.depth,
        channels=args.channels,
        channel_mult=args.channel_mult,
        num_res_blocks=args.num_res_blocks,
        attention_levels=args.attention_levels,
        dropout=args.dropout,
        input_scaling=not args.no_input_scaling,
        sigma_data=args.sigma_data,
        weighting=args.weighting,
        time_sampling=args.time_sampling,
        stratified=args.stratified,
        min_snr_gamma=args.min_snr_gamma,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        seed=args.seed,
        amp=args.amp,
        save_every=args.save_every,
        log_every=args.log_every,
    )


def run(args: argparse.Namespace) -> int:
    """Train (or resume) a run; returns the exit status (128 + signal number when interrupted).

    Under torchrun all ranks run this together (see the module docstring)."""
    return run_cli("sdeflow train", lambda ctx: _run(args, ctx), device=args.device)


def _run(args: argparse.Namespace, ctx: DistributedContext) -> int:
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    main = ctx.is_main
    device = str(ctx.device) if ctx.distributed else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = not args.no_progress
    try:
        if args.resume:
            if not ckpt_path.exists() and not previous_path(ckpt_path).exists():
                raise FileNotFoundError(f"--resume: no checkpoint in {out}")
            trainer, config, steps = prepare_run(
                None, out, resume=True, steps=args.steps, device=device, progress=progress, amp=args.amp
            )
        else:
            if ckpt_path.exists():
                raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it or choose another --out")
            if not args.data:
                raise ValueError("--data is required for a new run")
            trainer, config, steps = prepare_run(config_from_args(args), out, device=device, progress=progress)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, ImportError) as err:
        if main:
            print(f"sdeflow train: error: {err}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in trainer.net.parameters())
    where = f"{ctx.world_size} processes ({ctx.backend}, {ctx.device.type})" if ctx.distributed else device
    if main:
        print(
            f"sdeflow train: {config['net']['name']} ({n_params:,} parameters) on {config['data']['spec']}, "
            f"{config['sde']['name']} SDE, {config['loss']['prediction']}-prediction, {where}; "
            f"steps {trainer.step} -> {steps}, writing {ckpt_path}",
            flush=True,
        )
    result = trainer.fit(steps)
    if result.interrupted is not None:
        if main:
            print(
                f"sdeflow train: interrupted by signal {result.interrupted} at step {result.step}; "
                f"checkpoint written to {result.checkpoint}",
                file=sys.stderr,
                flush=True,
            )
        return 128 + int(result.interrupted)
    if main:
        print(
            f"sdeflow train: done, step {result.step}, loss {result.loss:.4g}, {result.seconds:.1f} s "
            f"({result.step / max(result.seconds, 1e-9):.1f} steps/s this session) -> {result.checkpoint}",
            flush=True,
        )
    return 0
