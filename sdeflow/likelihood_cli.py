"""`sdeflow likelihood`: exact log-likelihood and bits/dim of a data file under a training checkpoint.

    sdeflow likelihood --ckpt runs/cb/ckpt.pt --data test.npy --divergence exact --out ll.json

Data: a .npy (``allow_pickle=False``) or .pt (``weights_only=True``) array of shape (N, *data_shape), or ``digits``
(scikit-learn's 8x8 digits, integer levels 0..16). Floating-point data is taken as it is, in the model's units.
Integer data (uint8 images, digits) is dequantized uniformly, ``x = low + (high - low)/levels * (k + u)``, and its
bits/dim include the offset ``log2(levels/(high - low))`` (docs/likelihood.md); the defaults (256 levels on [-1, 1))
are the score_sde convention, for digits the cells have the training spacing 1/8 starting at -1.
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

from .likelihood import DIVERGENCES, METHODS, PROBES, UniformDequantization, log_likelihood

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `sdeflow train`")
    parser.add_argument("--data", required=True, help="a .npy / .pt array (N, *data_shape), or 'digits'")
    parser.add_argument("--n", type=int, default=None, help="use the first N samples (default: all)")
    parser.add_argument("--divergence", choices=DIVERGENCES, default="exact")
    parser.add_argument("--n-probes", type=int, default=1, help="Hutchinson probes per sample")
    parser.add_argument("--probe", choices=PROBES, default="rademacher")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--t-eps", type=float, default=None, help="start time (default: the SDE's eps)")
    parser.add_argument("--method", choices=METHODS, default="dopri5", help="torchdiffeq method")
    parser.add_argument("--step-size", type=float, default=None, help="step of the fixed-grid methods (rk4, ...)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--levels", type=int, default=None, help="integer levels (default 256; digits: 17)")
    parser.add_argument("--low", type=float, default=None, help="model value of the lowest cell's lower edge")
    parser.add_argument("--high", type=float, default=None, help="model value of the highest cell's upper edge")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes and the dequantization noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="the net's dtype")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--out", default=None, help="write a JSON summary with per-sample values here")
    parser.add_argument("--no-progress", action="store_true")


def load_data(spec: str) -> tuple[torch.Tensor, UniformDequantization | None]:
    """(data, default dequantization or None) from a file path or 'digits'."""
    if spec == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise SystemExit("the digits data set needs scikit-learn: pip install 'sdeflow[digits]'") from err
        k = torch.as_tensor(load_digits().images.reshape(-1, 1, 8, 8), dtype=torch.int64)
        # training maps k -> k/8 - 1: cells of width 1/8 with the training points on their lower edges
        return k, UniformDequantization(levels=17, low=-1.0, high=-1.0 + 17 / 8)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--data {spec!r}: no such file (expected a .npy / .pt file or 'digits')")
    if path.suffix == ".npy":
        import numpy as np

        x = torch.from_numpy(np.ascontiguousarray(np.load(path, allow_pickle=False)))
    elif path.suffix in (".pt", ".pth"):
        x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"--data {spec!r}: the .pt file must hold one tensor, got {type(x).__name__}")
    else:
        raise ValueError(f"--data {spec!r}: unsupported suffix {path.suffix!r}; allowed: '.npy', '.pt', or 'digits'")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"--data {spec!r}: expected real numbers, got dtype {x.dtype}")
    return x, (None if x.is_floating_point() else UniformDequantization())


def _dequantization(args: argparse.Namespace, default: UniformDequantization | None) -> UniformDequantization | None:
    if default is None:
        if any(v is not None for v in (args.levels, args.low, args.high)):
            raise ValueError("--levels/--low/--high apply to integer data only; this data is floating-point")
        return None
    return UniformDequantization(
        levels=args.levels if args.levels is not None else default.levels,
        low=args.low if args.low is not None else default.low,
        high=args.high if args.high is not None else default.high,
    )


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.double().cpu()
    n = v.numel()
    return {"mean": float(v.mean()), "stderr": float(v.std() / math.sqrt(n)) if n > 1 else float("nan")}


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint and the data, compute the likelihood, print (and optionally save) the summary."""
    from .training import load_denoiser

    dtype = _DTYPES[args.dtype]
    den = load_denoiser(args.ckpt, ema=not args.no_ema, device=args.device, dtype=dtype)
    data, default_deq = load_data(args.data)
    deq = _dequantization(args, default_deq)
    if args.n is not None:
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        data = data[: args.n]
    data = data.to(device=args.device, dtype=dtype if data.is_floating_point() else data.dtype)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        res = log_likelihood(
            den, data, divergence=args.divergence, rtol=args.rtol, atol=args.atol, t_eps=args.t_eps,
            generator=gen, n_probes=args.n_probes, probe=args.probe, method=args.method, dequantize=deq,
            options=None if args.step_size is None else {"step_size": args.step_size},
            batch_size=args.batch_size, progress=not args.no_progress,
        )
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "ckpt": str(args.ckpt), "data": str(args.data), "n": int(data.shape[0]), "sde": repr(den.sde),
        "divergence": args.divergence, "rtol": args.rtol, "atol": args.atol, "t_eps": res.t_eps,
        "dequantization": None if deq is None else {"levels": deq.levels, "low": deq.low, "high": deq.high},
        "dequantization_offset_bits": res.dequantization_offset,
        "log_prob": _summary(res.log_prob), "bits_per_dim": _summary(res.bits_per_dim),
        "prior_gap_bound_nats": float(res.prior_gap_bound.mean()) if res.prior_gap_bound is not None else None,
        "nfe": res.nfe, "evaluations": res.stats["evaluations"], "seconds": seconds,
    }
    lp, bpd = out["log_prob"], out["bits_per_dim"]
    print(
        f"{out['n']} samples, {den.sde!r}, divergence={args.divergence}, rtol={args.rtol}, atol={args.atol}\n"
        f"log p (nats/sample): {lp['mean']:.6g} +- {lp['stderr']:.2g}\n"
        f"bits/dim:            {bpd['mean']:.6g} +- {bpd['stderr']:.2g}"
        + (f"  (dequantization offset {res.dequantization_offset:.4f} bits)" if deq is not None else "")
        + f"\nprior gap bound:     {out['prior_gap_bound_nats']:.3g} nats/sample (mean)\n"
        f"nfe {res.nfe}, {seconds:.2f} s ({seconds / out['n'] * 1e3:.3g} ms/sample)"
    )
    if args.out:
        out["per_sample"] = {"log_prob": res.log_prob.cpu().tolist(), "bits_per_dim": res.bits_per_dim.cpu().tolist()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
