"""`sdeflow train`: denoising score matching on a toy, a Gaussian mixture, digits, a .npy file or an image folder.

Example::

    sdeflow train --data checkerboard --sde vp --net mlp --steps 5000 --out runs/cb
    sdeflow train --data digits --net unet --conditional --steps 20000 --out runs/digits
    sdeflow train --data checkerboard --sde flow --steps 5000 --out runs/flow    # flow matching: velocity eps - x0
    sdeflow train --out runs/cb --steps 10000 --resume        # continue the saved run to 10000 steps

Writes ``OUT/ckpt.pt`` (and keeps the previous one as ``OUT/ckpt.prev.pt``) and ``OUT/config.json``. SIGINT/SIGTERM
write a checkpoint and exit with status 128 + signal number. A new run into a folder that holds a checkpoint is
refused unless ``--resume`` (continue it) or ``--overwrite`` (replace it). With ``--resume`` the run keeps the
checkpoint's config: a flag that contradicts it (``--hidden 64`` for a run trained with 256) is an error, and
``--steps`` is the new total, at least the step already reached.

Under torchrun (``torchrun --nproc_per_node=N -m sdeflow.cli train ...``) every process trains its share of the
global batch ``--batch-size`` with DistributedDataParallel on ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo); rank 0
prints and writes the checkpoints, and a stop signal takes effect at the next log point (``--log-every``). A run
resumes with any number of processes (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..denoiser import ALL_PREDICTIONS
from ..distributed import DistributedContext, run_cli
from ..nets.embeddings import EMBEDDINGS
from ..training.checkpoint import load_checkpoint, previous_path
from ..training.config import NET_NAMES, SDE_NAMES, build_trainer
from ..training.data import DataSource
from ..training.losses import OBJECTIVES, TIME_SAMPLINGS, WEIGHTINGS
from ..training.run import VP_SCHEDULES, prepare_run, run_config
from .common import CLIError, add_progress, device_arg, float_in, int_at_least, progress_enabled

#: run-config flags: dest -> (default for a new run, where the checkpoint's config keeps it). The parser's defaults
#: are None, so that a flag given with --resume can be told from one left out and checked against the checkpoint.
CONFIG_FLAGS: dict[str, tuple[Any, tuple[str, str]]] = {
    "data": (None, ("data", "spec")),
    "image_size": (None, ("data", "size")),
    "conditional": (False, ("train", "conditional")),
    "p_uncond": (None, ("loss", "p_uncond")),
    "sde": ("vp", ("sde", "name")),
    "schedule": ("linear", ("sde", "schedule")),
    "beta_min": (0.1, ("sde", "beta_min")),
    "beta_max": (20.0, ("sde", "beta_max")),
    "sigma_min": (0.01, ("sde", "sigma_min")),
    "sigma_max": (None, ("sde", "sigma_max")),
    "shift": (None, ("sde", "shift")),
    "net": ("mlp", ("net", "name")),
    "prediction": (None, ("loss", "prediction")),
    "embedding": ("sinusoidal", ("net", "embedding")),
    "hidden": (256, ("net", "hidden")),
    "depth": (3, ("net", "depth")),
    "channels": (64, ("net", "channels")),
    "channel_mult": ([1, 2, 2], ("net", "channel_mult")),
    "num_res_blocks": (2, ("net", "num_res_blocks")),
    "attention_levels": ([1], ("net", "attention_levels")),
    "dropout": (0.0, ("net", "dropout")),
    "no_input_scaling": (False, ("net", "input_scaling")),
    "sigma_data": (None, ("net", "sigma_data")),
    "weighting": ("simple", ("loss", "weighting")),
    "time_sampling": (None, ("loss", "time_sampling")),
    "stratified": (False, ("loss", "stratified")),
    "min_snr_gamma": (5.0, ("loss", "min_snr_gamma")),
    "objective": ("dsm", ("loss", "objective")),
    "p_mean": (-1.2, ("loss", "p_mean")),
    "p_std": (1.2, ("loss", "p_std")),
    "batch_size": (None, ("train", "batch_size")),
    "lr": (None, ("train", "lr")),
    "weight_decay": (0.0, ("train", "weight_decay")),
    "warmup": (100, ("train", "warmup")),
    "grad_clip": (1.0, ("train", "grad_clip")),
    "ema_decay": (0.999, ("train", "ema_decay")),
    "seed": (0, ("train", "seed")),
    "save_every": (1000, ("train", "save_every")),
    "log_every": (50, ("train", "log_every")),
}

# library keyword -> the flag that sets it, for library messages such as "net='unet' needs image data"
_KEYWORD_FLAGS = {**{k: "--" + k.replace("_", "-") for k in CONFIG_FLAGS}, "size": "--image-size", "name": "--data"}
_KEYWORD = re.compile(r"(?<![\w.-])(" + "|".join(sorted(_KEYWORD_FLAGS, key=len, reverse=True)) + r")=")


def flag_message(message: str) -> str:
    """A library message with its keywords named as the flags that set them: ``net='unet'`` -> ``--net 'unet'``."""
    return _KEYWORD.sub(lambda m: _KEYWORD_FLAGS[m.group(1)] + " ", message)


def _ints(low: int) -> Any:
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {low}, got {text!r}")
        return values

    parse.__name__ = "comma-separated integers"
    return parse


def _default(dest: str) -> str:
    value = CONFIG_FLAGS[dest][0]
    return "" if value is None else f" (default {','.join(map(str, value)) if isinstance(value, list) else value})"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `train` options to ``parser``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    positive = float_in(0.0, low_open=True)
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        help="toy (8gaussians, checkerboard, moons, swissroll, 2spirals, rings), gmm, digits, "
        "a .npy file or an image folder",
    )
    g.add_argument("--image-size", type=int_at_least(1), help="resize folder images to this square size")
    g.add_argument(
        "--conditional", action="store_true", default=None, help="train class-conditionally on the data's labels"
    )
    g.add_argument(
        "--p-uncond",
        type=float_in(0.0, 1.0),
        help="label dropout for classifier-free guidance (default 0.1 with --conditional)",
    )
    g = parser.add_argument_group("SDE")
    g.add_argument("--sde", choices=SDE_NAMES, help="the forward SDE" + _default("sde"))
    g.add_argument("--schedule", choices=VP_SCHEDULES, help="VP schedule" + _default("schedule"))
    g.add_argument("--beta-min", type=positive, help="VP / sub-VP" + _default("beta_min"))
    g.add_argument("--beta-max", type=positive, help="VP / sub-VP" + _default("beta_max"))
    g.add_argument("--sigma-min", type=positive, help="VE" + _default("sigma_min"))
    g.add_argument("--sigma-max", type=positive, help="VE sigma_max (default 10 for 2-D data, 50 else)")
    g.add_argument("--shift", type=positive, help="flow: SD3's time shift of the path a = 1 - t, s = t (default 1)")
    g = parser.add_argument_group("net")
    g.add_argument("--net", choices=NET_NAMES, help="score network" + _default("net"))
    g.add_argument(
        "--prediction",
        choices=ALL_PREDICTIONS,
        help="what the net predicts; flow: the velocity a' x0 + s' eps (default flow for --sde flow, eps else)",
    )
    g.add_argument("--embedding", choices=EMBEDDINGS, help="time embedding" + _default("embedding"))
    g.add_argument("--hidden", type=int_at_least(1), help="MLP width" + _default("hidden"))
    g.add_argument("--depth", type=int_at_least(0), help="MLP residual blocks" + _default("depth"))
    g.add_argument("--channels", type=int_at_least(1), help="U-Net base width" + _default("channels"))
    g.add_argument("--channel-mult", type=_ints(1), help="U-Net multipliers, e.g. 1,2,2" + _default("channel_mult"))
    g.add_argument("--num-res-blocks", type=int_at_least(1), help="U-Net blocks per level" + _default("num_res_blocks"))
    g.add_argument(
        "--attention-levels", type=_ints(0), help="U-Net levels with attention, e.g. 1,2" + _default("attention_levels")
    )
    g.add_argument("--dropout", type=float_in(0.0, 1.0, high_open=True), help="dropout rate" + _default("dropout"))
    g.add_argument(
        "--no-input-scaling", action="store_true", default=None, help="feed x_t unscaled (default: EDM c_in scaling)"
    )
    g.add_argument("--sigma-data", type=positive, help="data scale for c_in (default 0.5 images, 1 else)")
    g = parser.add_argument_group("loss")
    g.add_argument("--weighting", choices=WEIGHTINGS, help="loss weighting" + _default("weighting"))
    g.add_argument(
        "--time-sampling",
        choices=TIME_SAMPLINGS,
        help="default: importance for --weighting likelihood, uniform otherwise",
    )
    g.add_argument("--stratified", action="store_true", default=None, help="stratify t across the batch")
    g.add_argument("--min-snr-gamma", type=positive, help="min-SNR weighting's gamma" + _default("min_snr_gamma"))
    g.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="dsm: denoising score matching with --prediction/--weighting; edm: Karras et al. 2022's loss "
        "(lambda(sigma) weighting, log-normal sigma) with EDM preconditioning" + _default("objective"),
    )
    g.add_argument("--p-mean", type=float_in(-20.0, 20.0), help="EDM log-normal mean of ln sigma" + _default("p_mean"))
    g.add_argument("--p-std", type=positive, help="EDM log-normal std of ln sigma" + _default("p_std"))
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int_at_least(1), help="total steps (default 5000; with --resume: the saved total)")
    g.add_argument("--batch-size", type=int_at_least(1), help="default 256 (mlp) / 64 (unet)")
    g.add_argument("--lr", type=positive, help="peak learning rate, default 1e-3 (mlp) / 2e-4 (unet)")
    g.add_argument("--weight-decay", type=float_in(0.0), help="AdamW weight decay" + _default("weight_decay"))
    g.add_argument("--warmup", type=int_at_least(0), help="linear warm-up steps" + _default("warmup"))
    g.add_argument("--grad-clip", type=float_in(0.0), help="gradient-norm clip, 0: none" + _default("grad_clip"))
    g.add_argument("--ema-decay", type=float_in(0.0, 1.0, high_open=True), help="EMA decay" + _default("ema_decay"))
    g.add_argument("--seed", type=int_at_least(0), help="seed of the data and loss draws" + _default("seed"))
    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder (ckpt.pt, ckpt.prev.pt, config.json)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out (its config is kept)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in --out even though it holds another run's checkpoint",
    )
    g.add_argument(
        "--save-every", type=int_at_least(0), help="checkpoint period in steps, 0: end only" + _default("save_every")
    )
    g.add_argument("--log-every", type=int_at_least(1), help="steps between loss checks" + _default("log_every"))
    g.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun: cuda:LOCAL_RANK)",
    )
    g.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA only)")
    add_progress(g)


def _value(args: argparse.Namespace, dest: str) -> Any:
    value = getattr(args, dest, None)
    return CONFIG_FLAGS[dest][0] if value is None else value


def config_from_args(args: argparse.Namespace, data: DataSource | None = None) -> dict[str, Any]:
    """The run config (plain primitives) for parsed `train` arguments: :func:`sdeflow.training.run_config` with the
    flags as keywords, the flags left out at their defaults (``data``: the source ``--data`` names, when already
    built)."""
    return run_config(
        args.data,
        data_source=data,
        image_size=args.image_size,
        conditional=bool(_value(args, "conditional")),
        p_uncond=args.p_uncond,
        sde=_value(args, "sde"),
        schedule=_value(args, "schedule"),
        beta_min=_value(args, "beta_min"),
        beta_max=_value(args, "beta_max"),
        sigma_min=_value(args, "sigma_min"),
        sigma_max=args.sigma_max,
        shift=args.shift,
        net=_value(args, "net"),
        prediction=args.prediction,
        embedding=_value(args, "embedding"),
        hidden=_value(args, "hidden"),
        depth=_value(args, "depth"),
        channels=_value(args, "channels"),
        channel_mult=_value(args, "channel_mult"),
        num_res_blocks=_value(args, "num_res_blocks"),
        attention_levels=_value(args, "attention_levels"),
        dropout=_value(args, "dropout"),
        input_scaling=not _value(args, "no_input_scaling"),
        sigma_data=args.sigma_data,
        weighting=_value(args, "weighting"),
        time_sampling=args.time_sampling,
        stratified=bool(_value(args, "stratified")),
        min_snr_gamma=_value(args, "min_snr_gamma"),
        objective=_value(args, "objective"),
        p_mean=_value(args, "p_mean"),
        p_std=_value(args, "p_std"),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=_value(args, "weight_decay"),
        warmup=_value(args, "warmup"),
        grad_clip=_value(args, "grad_clip"),
        ema_decay=_value(args, "ema_decay"),
        seed=_value(args, "seed"),
        amp=bool(args.amp),
        save_every=_value(args, "save_every"),
        log_every=_value(args, "log_every"),
    )


def resume_conflicts(args: argparse.Namespace, config: dict[str, Any]) -> list[str]:
    """The run-config flags given on the command line that contradict a checkpoint's ``config`` (as
    ``--flag VALUE (the checkpoint has key=VALUE)``); empty when every given flag agrees."""
    out = []
    for dest, (_, (section, key)) in CONFIG_FLAGS.items():
        given = getattr(args, dest, None)
        if given is None:
            continue
        saved = config.get(section, {}).get(key)
        if dest == "no_input_scaling":
            given, shown = not given, "--no-input-scaling"
            saved = saved if saved is not None else True
        else:
            shown = f"--{dest.replace('_', '-')}" + ("" if isinstance(given, bool) else f" {given}")
        if dest in ("conditional", "stratified"):
            saved = bool(saved)
        if isinstance(given, list):
            saved = list(saved) if isinstance(saved, (list, tuple)) else saved
        if given != saved:
            out.append(f"{shown} (the checkpoint has {key}={saved!r})")
    return out


def run(args: argparse.Namespace) -> int:
    """Train (or resume) a run; returns the exit status (128 + signal number when interrupted).

    Under torchrun all ranks run this together (see the module docstring)."""
    return run_cli("sdeflow train", lambda ctx: _run(args, ctx), device=args.device)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is an existing file; --out names the run folder")
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CLIError(f"--out {out}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out}: {probe} is not writable (permission denied)")


def _prepare(args: argparse.Namespace, device: str, progress: bool, is_main: bool) -> tuple[Any, dict[str, Any], int]:
    """Every check of the command line, then the trainer: (trainer, config, total steps)."""
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    _check_out(out)
    if args.amp and torch.device(device).type != "cuda":
        raise CLIError(f"--amp needs a CUDA device, got --device {device}")
    existing = [p for p in (ckpt_path, previous_path(ckpt_path)) if p.exists()]
    if args.resume:
        if args.overwrite:
            raise CLIError("--resume continues the run in --out and --overwrite replaces it: pass only one")
        if not existing:
            raise CLIError(f"--resume: no checkpoint in {out} (ckpt.pt or ckpt.prev.pt)")
        state = load_checkpoint(ckpt_path)
        conflicts = resume_conflicts(args, state.get("config") or {})
        if conflicts:
            raise CLIError(
                f"--resume keeps the run's config, but {'; '.join(conflicts)}: drop "
                f"{'this flag' if len(conflicts) == 1 else 'these flags'}, or start a new run with another --out "
                "(or --overwrite)"
            )
        reached = int(state.get("step", 0))
        if args.steps is not None and args.steps < reached:
            raise CLIError(
                f"--steps {args.steps} is below the step {reached} the checkpoint has reached (--steps is the total, "
                f"not the number of further steps): pass --steps {reached} or more"
            )
        del state
        return prepare_run(None, out, resume=True, steps=args.steps, device=device, progress=progress, amp=args.amp)
    if not args.data:
        raise CLIError("--data is required for a new run (or pass --resume to continue the run in --out)")
    if existing and not args.overwrite:
        raise CLIError(
            f"--out {out} already holds a checkpoint ({existing[0].name}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    try:
        config = config_from_args(args)
    except ValueError as err:
        raise CLIError(flag_message(str(err))) from err
    if not existing:
        return prepare_run(config, out, device=device, progress=progress)
    trainer = build_trainer(config, out_dir=out, progress=progress, device=device)
    trainer.overwrite = True  # --overwrite: this new run may replace the checkpoint in --out
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return trainer, config, int(config["train"]["steps"])


def _run(args: argparse.Namespace, ctx: DistributedContext) -> int:
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    main = ctx.is_main
    device = str(ctx.device) if ctx.distributed else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trainer, config, steps = _prepare(args, device, progress_enabled(args), main)
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
