"""`sdeflow likelihood`: exact log-likelihood and bits/dim of a data file under a training checkpoint.

    sdeflow likelihood --ckpt runs/cb/ckpt.pt --data test.npy --divergence exact --out ll.json

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
from ..likelihood import DIVERGENCES, METHODS, PROBES, UniformDequantization, log_likelihood

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
    parser.add_argument("--batch-size", type=int, default=256, help="samples per solve (the unit split across ranks)")
    parser.add_argument("--levels", type=int, default=None, help="integer levels (default 256; digits: 17)")
    parser.add_argument("--low", type=float, default=None, help="model value of the lowest cell's lower edge")
    parser.add_argument("--high", type=float, default=None, help="model value of the highest cell's upper edge")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes and the dequantization noise")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="under torchrun, cuda means cuda:LOCAL_RANK",
    )
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
    """Load the checkpoint and the data, compute the likelihood, print (and optionally save) the summary.

    Under torchrun all ranks run this together; rank 0 prints and writes ``--out``."""
    return run_cli("sdeflow likelihood", lambda ctx: _run(args, ctx), device=args.device)


def _run(args: argparse.Namespace, ctx: DistributedContext) -> int:
    from ..training import load_denoiser

    dtype = _DTYPES[args.dtype]
    device = ctx.device if ctx.distributed else torch.device(args.device)
    if not (isinstance(args.batch_size, int) and args.batch_size >= 1):
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    den = load_denoiser(args.ckpt, ema=not args.no_ema, device=device, dtype=dtype)
    data, default_deq = load_data(args.data)
    deq = _dequantization(args, default_deq)
    if args.n is not None:
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        data = data[: args.n]
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
                method=args.method,
                dequantize=deq,
                options=options,
            )
        return {
            "log_prob": res.log_prob,
            "bits_per_dim": res.bits_per_dim,
            "prior_gap": res.prior_gap_bound,
            "nfe": res.nfe,
            "evaluations": res.stats["evaluations"],
            "t_eps": res.t_eps,
            "offset": res.dequantization_offset,
        }

    start = time.perf_counter()
    parts = map_chunks(chunk, int(data.shape[0]), args.batch_size, progress=not args.no_progress, desc="log-likelihood")
    if parts is None:  # not rank 0
        return 0
    seconds = time.perf_counter() - start
    log_prob = torch.cat([p["log_prob"] for p in parts])
    bits_per_dim = torch.cat([p["bits_per_dim"] for p in parts])
    gap = None if parts[0]["prior_gap"] is None else torch.cat([p["prior_gap"] for p in parts])
    nfe = sum(p["nfe"] for p in parts)
    offset = parts[0]["offset"]
    out: dict[str, Any] = {
        "ckpt": str(args.ckpt),
        "data": str(args.data),
        "n": int(data.shape[0]),
        "sde": repr(den.sde),
        "divergence": args.divergence,
        "rtol": args.rtol,
        "atol": args.atol,
        "t_eps": parts[0]["t_eps"],
        "dequantization": None if deq is None else {"levels": deq.levels, "low": deq.low, "high": deq.high},
        "dequantization_offset_bits": offset,
        "log_prob": _summary(log_prob),
        "bits_per_dim": _summary(bits_per_dim),
        "prior_gap_bound_nats": float(gap.mean()) if gap is not None else None,
        "nfe": nfe,
        "evaluations": sum(p["evaluations"] for p in parts),
        "seconds": seconds,
        "world_size": ctx.world_size,
    }
    lp, bpd = out["log_prob"], out["bits_per_dim"]
    print(
        f"{out['n']} samples, {den.sde!r}, divergence={args.divergence}, rtol={args.rtol}, atol={args.atol}\n"
        f"log p (nats/sample): {lp['mean']:.6g} +- {lp['stderr']:.2g}\n"
        f"bits/dim:            {bpd['mean']:.6g} +- {bpd['stderr']:.2g}"
        + (f"  (dequantization offset {offset:.4f} bits)" if deq is not None else "")
        + f"\nprior gap bound:     {out['prior_gap_bound_nats']:.3g} nats/sample (mean)\n"
        f"nfe {nfe}, {seconds:.2f} s ({seconds / out['n'] * 1e3:.3g} ms/sample)"
        + (f" on {ctx.world_size} ranks" if ctx.distributed else "")
    )
    if args.out:
        out["per_sample"] = {"log_prob": log_prob.tolist(), "bits_per_dim": bits_per_dim.tolist()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
