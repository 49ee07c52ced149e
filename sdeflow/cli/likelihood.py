"""`sdeflow likelihood`: exact log-likelihood and bits/dim of a data file under a training checkpoint.

    sdeflow likelihood --ckpt runs/cb/ckpt.pt --data test.npy --divergence exact --out ll.json
    sdeflow likelihood --ckpt runs/cb/ckpt.pt --data test.npy --solver abm4 --nfe 33        # a fixed budget
    sdeflow likelihood --ckpt runs/cb/ckpt.pt --data test.npy --divergence hutchinson --n-probes 8  # + std errors

Integration (docs/likelihood.md): ``--variable`` (t, logsnr, vp_time; auto: vp_time for DDPM schedules, t otherwise),
``--method`` (an adaptive torchdiffeq method, or adams: sdeflow's one-evaluation-per-step Adams pair) with
``--rtol/--atol``, or ``--solver NAME --nfe N`` for exactly N evaluations on a fixed grid (euler, midpoint, heun,
heun3, rk4, abm3, abm4). With ``--divergence hutchinson --n-probes M`` (M >= 2; hutch++: >= 2 residual probes) every
sample gets the standard error of its log p from its M per-probe integrals; the summary prints their mean and the
probe noise of the mean log p, and ``--out`` holds them per sample.

Data: a .npy (``allow_pickle=False``) or .pt (``weights_only=True``) array of shape (N, *data_shape), or ``digits``
(scikit-learn's 8x8 digits, integer levels 0..16). Floating-point data is taken as it is, in the model's units.
Integer data (uint8 images, digits) is dequantized uniformly, ``x = low + (high - low)/levels * (k + u)``, and its
bits/dim include the offset ``log2(levels/(high - low))`` (docs/likelihood.md); the defaults (256 levels on [-1, 1))
are the score_sde convention, for digits the cells have the training spacing 1/8 starting at -1.

The data is evaluated in chunks of ``--batch-size`` samples (each chunk is one adaptive solve); the chunk that starts at
sample i draws its dequantization noise and Hutchinson probes from a generator seeded with ``--seed + i``. Under
torchrun (``torchrun --nproc_per_node=N -m sdeflow.cli -- likelihood ...``) the chunks are split across the ranks and
the per-sample values gathered on rank 0, which prints and writes the summary: the values are bitwise those of a
one-process run with the same ``--batch-size``.

Every input is checked before the first solve: the numbers, the data file (a readable array of the model's data
shape, finite), the device and ``--out`` (not a folder; an existing file is replaced only with ``--force``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import DistributedContext, map_chunks, run_cli
from ..likelihood import (
    ADAPTIVE_METHODS,
    DIVERGENCES,
    FIXED_METHODS,
    GRID_SOLVERS,
    METHODS,
    PROBES,
    VARIABLES,
    UniformDequantization,
    log_likelihood,
)
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
    progress_enabled,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    positive = float_in(0.0, low_open=True)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `sdeflow train`")
    parser.add_argument("--data", required=True, help="a .npy / .pt array (N, *data_shape), or 'digits'")
    parser.add_argument("--n", type=int_at_least(1), default=None, help="use the first N samples (default: all)")
    parser.add_argument("--divergence", choices=DIVERGENCES, default="exact")
    parser.add_argument("--n-probes", type=int_at_least(1), default=1, help="Hutchinson probes per sample")
    parser.add_argument("--probe", choices=PROBES, default="rademacher")
    parser.add_argument("--rtol", type=positive, default=1e-5, help="relative tolerance of the ODE (default 1e-5)")
    parser.add_argument("--atol", type=positive, default=1e-5, help="absolute tolerance of the ODE (default 1e-5)")
    parser.add_argument("--t-eps", type=positive, default=None, help="start time in (0, T) (default: the SDE's eps)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="adaptive integrator: a torchdiffeq method or adams (default dopri5)",
    )
    parser.add_argument("--step-size", type=positive, default=None, help="step of torchdiffeq's fixed-grid methods")
    parser.add_argument(
        "--variable",
        choices=VARIABLES,
        default="auto",
        help="integration variable (default auto: vp_time on DDPM, else t)",
    )
    parser.add_argument(
        "--solver", choices=tuple(GRID_SOLVERS), default=None, help="fixed-grid solver taking exactly --nfe evaluations"
    )
    parser.add_argument("--nfe", type=int_at_least(1), default=None, help="evaluations of the fixed-grid --solver")
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=256, help="samples per solve (the unit split across ranks)"
    )
    parser.add_argument("--levels", type=int_at_least(2), default=None, help="integer levels (default 256; digits: 17)")
    parser.add_argument("--low", type=float_in(), default=None, help="model value of the lowest cell's lower edge")
    parser.add_argument("--high", type=float_in(), default=None, help="model value of the highest cell's upper edge")
    parser.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed of the probes and the dequantization noise"
    )
    parser.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help="cpu, cuda, ... (default: cuda if available; under torchrun, cuda means cuda:LOCAL_RANK)",
    )
    add_dtype(parser, "the net's floating-point type")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--out", default=None, help="write a JSON summary with per-sample values here (.json)")
    add_force(parser)
    add_progress(parser)


def load_data(spec: str) -> tuple[torch.Tensor, UniformDequantization | None]:
    """(data, default dequantization or None) from a file path or 'digits'; errors name ``--data``."""
    if spec == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise CLIError("--data digits needs scikit-learn: pip install 'sdeflow[digits]'") from err
        k = torch.as_tensor(load_digits().images.reshape(-1, 1, 8, 8), dtype=torch.int64)
        # training maps k -> k/8 - 1: cells of width 1/8 with the training points on their lower edges
        return k, UniformDequantization(levels=17, low=-1.0, high=-1.0 + 17 / 8)
    path = Path(spec)
    if not path.is_file():
        raise CLIError(f"--data {spec!r}: no such file (expected a .npy / .pt file or 'digits')")
    try:
        if path.suffix == ".npy":
            import numpy as np

            x = torch.from_numpy(np.ascontiguousarray(np.load(path, allow_pickle=False)))
        elif path.suffix in (".pt", ".pth"):
            x = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(x, torch.Tensor):
                raise CLIError(f"--data {spec!r}: the .pt file must hold one tensor, got {type(x).__name__}")
        else:
            raise CLIError(f"--data {spec!r}: unsupported suffix {path.suffix!r}; allowed: '.npy', '.pt', or 'digits'")
    except CLIError:
        raise
    except Exception as err:  # a damaged or foreign file: numpy / torch say why in their words
        raise CLIError(f"--data {spec!r} cannot be read as an array ({type(err).__name__}: {err})") from err
    if x.dtype == torch.bool or x.is_complex():
        raise CLIError(f"--data {spec!r}: expected real numbers, got dtype {x.dtype}")
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        raise CLIError(f"--data {spec!r} holds NaN or infinite values")
    return x, (None if x.is_floating_point() else UniformDequantization())


def _dequantization(args: argparse.Namespace, default: UniformDequantization | None) -> UniformDequantization | None:
    if default is None:
        if any(v is not None for v in (args.levels, args.low, args.high)):
            raise CLIError("--levels/--low/--high apply to integer data only; this data is floating-point")
        return None
    levels = args.levels if args.levels is not None else default.levels
    low = args.low if args.low is not None else default.low
    high = args.high if args.high is not None else default.high
    if not low < high:
        raise CLIError(f"--low must be below --high, got --low {low:g} --high {high:g}")
    return UniformDequantization(levels=levels, low=low, high=high)


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.double().cpu()
    n = v.numel()
    return {"mean": float(v.mean()), "stderr": float(v.std() / math.sqrt(n)) if n > 1 else float("nan")}


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint and the data, compute the likelihood, print (and optionally save) the summary.

    Under torchrun all ranks run this together; rank 0 prints and writes ``--out``."""
    return run_cli("sdeflow likelihood", lambda ctx: _run(args, ctx), device=args.device)


def _run(args: argparse.Namespace, ctx: DistributedContext) -> int:
    from ..training import load_run

    dtype = DTYPES[args.dtype]
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = ctx.device if ctx.distributed else torch.device(args.device or default_device)
    out_path = check_output_file(args.out, "--out", args.force, (".json",)) if args.out else None
    check_tolerance(args.rtol, "--rtol", dtype)
    check_tolerance(args.atol, "--atol", dtype)
    if args.solver is not None:
        if args.method is not None or args.step_size is not None:
            flag = "--method" if args.method is not None else "--step-size"
            raise CLIError(f"{flag} and --solver exclude each other: --solver {args.solver} --nfe N is a fixed grid")
        least = 2 if GRID_SOLVERS[args.solver][0] == "adams" else GRID_SOLVERS[args.solver][1]
        if args.nfe is None:
            raise CLIError(f"--solver {args.solver} needs --nfe N (evaluations, >= {least})")
        if args.nfe < least:
            raise CLIError(f"--nfe must be >= {least} (one step of --solver {args.solver}), got {args.nfe}")
    elif args.nfe is not None:
        raise CLIError(f"--nfe is the budget of a fixed-grid --solver ({', '.join(GRID_SOLVERS)}): pass --solver")
    method = args.method or "dopri5"
    if args.step_size is not None and method in ADAPTIVE_METHODS:
        raise CLIError(f"--step-size applies to the fixed-grid methods (rk4, euler, ...), not --method {method}")
    if args.step_size is None and method in FIXED_METHODS:
        raise CLIError(f"--method {method} is a fixed-grid method: pass --step-size H (e.g. --step-size 0.01)")
    if args.divergence == "hutch++" and args.n_probes < 3:
        raise CLIError(
            f"--n-probes must be >= 3 for --divergence hutch++ (sketch, projection, residual), got {args.n_probes}"
        )
    try:
        den, config, _ = load_run(args.ckpt, ema=not args.no_ema, device=device, dtype=dtype)
    except FileNotFoundError as err:
        raise CLIError(f"--ckpt {args.ckpt}: {err}") from err
    except RuntimeError as err:  # CheckpointError
        raise CLIError(f"--ckpt: {err}") from err
    T = float(den.sde.T)
    if args.t_eps is not None and not args.t_eps < T:
        raise CLIError(f"--t-eps must lie in (0, T) = (0, {T:g}), got {args.t_eps:g}")
    data, default_deq = load_data(args.data)
    deq = _dequantization(args, default_deq)
    shape = tuple(config.get("data", {}).get("data_shape", ()))
    if data.ndim < 1 or data.shape[0] < 1:
        raise CLIError(f"--data {args.data!r} holds no samples (shape {tuple(data.shape)})")
    if shape and tuple(data.shape[1:]) != shape:
        raise CLIError(
            f"--data {args.data!r} has samples of shape {tuple(data.shape[1:])}, the model's data shape is {shape}"
        )
    if deq is not None and (int(data.min()) < 0 or int(data.max()) >= deq.levels):
        raise CLIError(
            f"--data {args.data!r} holds integers in [{int(data.min())}, {int(data.max())}], outside the "
            f"--levels range 0..{deq.levels - 1}"
        )
    if args.n is not None:
        data = data[: args.n]
    if args.variable in ("logsnr", "vp_time") and not math.isfinite(float(den.sde.log_snr(den.sde.T))):
        raise CLIError(f"--variable {args.variable} needs a finite log-SNR at T; {den.sde!r} reaches a(T) = 0: use t")
    options = None if args.step_size is None else {"step_size": args.step_size}

    def chunk(idx: range) -> dict[str, Any]:
        xb = data[idx.start : idx.stop].to(device=device, dtype=dtype if data.is_floating_point() else data.dtype)
        gen = torch.Generator(device=device).manual_seed(args.seed + idx.start)
        with torch.no_grad():
            res = log_likelihood(
                den,
                xb,
                divergence=args.divergence,
                rtol=args.rtol,
                atol=args.atol,
                t_eps=args.t_eps,
                generator=gen,
                n_probes=args.n_probes,
                probe=args.probe,
                method=method,
                solver=args.solver,
                nfe=args.nfe,
                variable=args.variable,
                dequantize=deq,
                options=options,
            )
        return {
            "log_prob": res.log_prob,
            "bits_per_dim": res.bits_per_dim,
            "prior_gap": res.prior_gap_bound,
            "std_error": res.std_error,
            "probe_variance": res.probe_variance,
            "nfe": res.nfe,
            "evaluations": res.stats["evaluations"],
            "t_eps": res.t_eps,
            "offset": res.dequantization_offset,
            "variable": res.stats["variable"],
        }

    start = time.perf_counter()
    parts = map_chunks(
        chunk, int(data.shape[0]), args.batch_size, progress=progress_enabled(args), desc="log-likelihood"
    )
    if parts is None:  # not rank 0
        return 0
    seconds = time.perf_counter() - start
    log_prob = torch.cat([p["log_prob"] for p in parts])
    bits_per_dim = torch.cat([p["bits_per_dim"] for p in parts])
    gap = None if parts[0]["prior_gap"] is None else torch.cat([p["prior_gap"] for p in parts])
    se = None if parts[0]["std_error"] is None else torch.cat([p["std_error"] for p in parts]).double()
    pv = None if parts[0]["probe_variance"] is None else torch.cat([p["probe_variance"] for p in parts]).double()
    nfe = sum(p["nfe"] for p in parts)
    offset = parts[0]["offset"]
    n_out = int(data.shape[0])
    out: dict[str, Any] = {
        "ckpt": str(args.ckpt),
        "data": str(args.data),
        "n": n_out,
        "sde": repr(den.sde),
        "divergence": args.divergence,
        "n_probes": args.n_probes if args.divergence != "exact" else 0,
        "method": None if args.solver else method,
        "solver": args.solver,
        "nfe_budget": args.nfe,
        "variable": parts[0]["variable"],
        "rtol": args.rtol,
        "atol": args.atol,
        "t_eps": parts[0]["t_eps"],
        "dequantization": None if deq is None else {"levels": deq.levels, "low": deq.low, "high": deq.high},
        "dequantization_offset_bits": offset,
        "log_prob": _summary(log_prob),
        "bits_per_dim": _summary(bits_per_dim),
        "prior_gap_bound_nats": float(gap.mean()) if gap is not None else None,
        # the probes' share of the uncertainty: the mean per-sample standard error, and that of the mean log p
        "probe_std_error_mean": float(se.mean()) if se is not None else None,
        "probe_std_error_of_mean_log_prob": float(se.pow(2).sum().sqrt() / n_out) if se is not None else None,
        "nfe": nfe,
        "evaluations": sum(p["evaluations"] for p in parts),
        "seconds": seconds,
        "world_size": ctx.world_size,
    }
    lp, bpd = out["log_prob"], out["bits_per_dim"]
    integ = (
        f"solver={args.solver}, nfe={args.nfe}"
        if args.solver
        else f"method={method}, rtol={args.rtol}, atol={args.atol}"
    )
    print(
        f"{out['n']} samples, {den.sde!r}, divergence={args.divergence}, {integ}, variable={out['variable']}\n"
        f"log p (nats/sample): {lp['mean']:.6g} +- {lp['stderr']:.2g}\n"
        f"bits/dim:            {bpd['mean']:.6g} +- {bpd['stderr']:.2g}"
        + (f"  (dequantization offset {offset:.4f} bits)" if deq is not None else "")
        + (
            f"\nprobe std. error:    {out['probe_std_error_mean']:.3g} nats/sample (mean over samples; "
            f"{out['probe_std_error_of_mean_log_prob']:.2g} for the mean log p)"
            if se is not None
            else ""
        )
        + f"\nprior gap bound:     {out['prior_gap_bound_nats']:.3g} nats/sample (mean)\n"
        f"nfe {nfe}, {seconds:.2f} s ({seconds / out['n'] * 1e3:.3g} ms/sample)"
        + (f" on {ctx.world_size} ranks" if ctx.distributed else "")
    )
    if out_path is not None:
        out["per_sample"] = {"log_prob": log_prob.tolist(), "bits_per_dim": bits_per_dim.tolist()}
        if se is not None and pv is not None:
            out["per_sample"]["std_error"] = se.tolist()
            out["per_sample"]["probe_variance"] = pv.tolist()
        atomic_write_bytes(out_path, (json.dumps(out, indent=2) + "\n").encode())
        print(f"wrote {out_path}", file=sys.stderr)
    return 0
