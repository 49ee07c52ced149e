"""Outputs of an NFE-versus-quality sweep: markdown tables, the metric-versus-NFE plot, the protocol block and the
files (``results.json``, ``table.md``, the plot) that :func:`write_outputs` writes. matplotlib is imported only by
:func:`plot_sweep`."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .sweep import EXCLUDED_BY_DEFAULT, Cell, Scorer, SweepResult

__all__ = ["markdown_grid", "markdown_adaptive", "markdown_cells", "plot_sweep", "base_protocol", "write_outputs"]


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "nan" if isinstance(v, float) else "-"
    return f"{v:.{digits}g}"


def _status_word(cell: Cell) -> str:
    return cell.status.split(":")[0]


def _floor_text(result: SweepResult, metric: str) -> str:
    std = result.floor_std.get(metric)
    text = _fmt(result.floor[metric])
    return text + (f" +- {_fmt(std, 2)} (mean +- std over draws)" if std is not None and math.isfinite(std) else "")


def markdown_grid(result: SweepResult, metric: str | None = None) -> str:
    """Solver x NFE table of one metric (default the primary one) for the budget-driven solvers, with the best
    solver per column; a cell whose spent NFE differs from the budget shows it in brackets."""
    metric = metric or result.metrics[0]
    rows = {s: cs for s, cs in result.by_solver().items() if any(c.budget is not None for c in cs)}
    head = "| solver | " + " | ".join(f"NFE {b}" for b in result.nfes) + " |"
    lines = [head, "|---" * (len(result.nfes) + 1) + "|"]
    best: dict[int, tuple[float, str]] = {}
    for solver, cs in rows.items():
        at = {c.budget: c for c in cs}
        cells = []
        for b in result.nfes:
            c = at.get(b)
            if c is None:
                cells.append("-")
            elif not c.ok:
                cells.append(_status_word(c))
            else:
                v = c.metrics[metric]
                text = _fmt(v)
                if c.nfe is not None and abs(c.nfe - b) > 1e-9:
                    text += f" ({c.nfe:g})"
                cells.append(text)
                if math.isfinite(v) and (b not in best or v < best[b][0]):
                    best[b] = (v, solver)
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    lines.append("| **best** | " + " | ".join(best[b][1] if b in best else "-" for b in result.nfes) + " |")
    if metric in result.floor:
        lines.append(f"\nData floor (real data scored by the same protocol): {metric} = {_floor_text(result, metric)}.")
    return "\n".join(lines)


def markdown_adaptive(result: SweepResult) -> str:
    """The tolerance-driven cells: tolerance, NFE spent, every metric, seconds ('' when there are none)."""
    cells = [c for c in result.cells if c.tol is not None]
    if not cells:
        return ""
    lines = [
        "| solver | rtol = atol | NFE spent | " + " | ".join(result.metrics) + " | seconds |",
        "|---" * (len(result.metrics) + 4) + "|",
    ]
    for c in cells:
        vals = [_fmt(c.metrics.get(m)) for m in result.metrics] if c.ok else [_status_word(c)] * len(result.metrics)
        lines.append(f"| {c.solver} | {c.tol:g} | {_fmt(c.nfe, 4)} | " + " | ".join(vals) + f" | {_fmt(c.seconds)} |")
    return "\n".join(lines)


def markdown_cells(result: SweepResult) -> str:
    """Every cell: solver, budget or tolerance, NFE spent, every metric, seconds, status."""
    lines = [
        "| solver | budget | NFE spent | " + " | ".join(result.metrics) + " | seconds | status |",
        "|---" * (len(result.metrics) + 5) + "|",
    ]
    for c in result.cells:
        budget = str(c.budget) if c.budget is not None else (f"tol {c.tol:g}" if c.tol is not None else "-")
        vals = [_fmt(c.metrics.get(m)) for m in result.metrics]
        status = c.status if len(c.status) <= 60 else c.status[:57] + "..."
        lines.append(
            f"| {c.solver} | {budget} | {_fmt(c.nfe, 4)} | "
            + " | ".join(vals)
            + f" | {_fmt(c.seconds)} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def plot_sweep(result: SweepResult, path: str | Path, title: str = "") -> None:
    """One panel per metric: metric against the NFE actually spent (log x; log y when every value is positive),
    one line per solver (dashed with open markers for tolerance-driven solvers), the data floor dashed grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result.by_solver()
    k = len(result.metrics)
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k + 2.2, 4.0), squeeze=False)
    cmap = plt.get_cmap("tab20")
    markers = "os^vD<>ph*Xd"
    for j, metric in enumerate(result.metrics):
        ax = axes[0, j]
        values: list[float] = []
        for i, (solver, cs) in enumerate(groups.items()):
            pts = sorted(
                (c.nfe, c.metrics[metric])
                for c in cs
                if c.ok and c.nfe is not None and math.isfinite(c.metrics.get(metric, float("nan")))
            )
            if not pts:
                continue
            adaptive = any(c.tol is not None for c in cs)
            xs, ys = zip(*pts)
            values += ys
            color = cmap((2 * i) % 20 + (2 * i // 20) % 2)  # the ten dark shades first, then the light ones
            ax.plot(
                xs,
                ys,
                ls="--" if adaptive else "-",
                marker=markers[i % len(markers)],
                ms=4,
                color=color,
                mfc="none" if adaptive else color,
                lw=1.2,
                label=solver + (" (tol)" if adaptive else ""),
            )
        floor, std = result.floor.get(metric, float("nan")), result.floor_std.get(metric, float("nan"))
        if math.isfinite(floor):
            values.append(floor)
        log_y = bool(values) and min(values) > 0
        if math.isfinite(floor):
            ax.axhline(floor, color="0.5", ls=":", lw=1.2, label="real data (mean, +- std band)")
            if math.isfinite(std) and std > 0:
                lo = max(floor - std, 0.1 * floor) if log_y else floor - std
                ax.axhspan(lo, floor + std, color="0.5", alpha=0.15, lw=0)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        elif values:  # values <= 0 (unbiased MMD^2): linear within the floor's spread, logarithmic beyond
            scale = std if math.isfinite(std) and std > 0 else 1e-3 * max(abs(v) for v in values)
            thresh = 10.0 ** math.ceil(math.log10(max(scale, 1e-12)))
            ax.set_yscale("symlog", linthresh=thresh, linscale=0.5)
            ax.set_ylim(bottom=-thresh)
        ax.set_xlabel("NFE spent (res.nfe)")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.25)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (4.2 * k + 2.2), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def base_protocol(
    *,
    n: int,
    seed: int,
    scorer: Scorer,
    device: torch.device | str,
    dtype: torch.dtype,
    batch_size: int | None = None,
    checkpoint: str | Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The protocol block of a benchmark's outputs: sample count, seeds, reference statistics, extractor hash,
    checkpoint hash, software and hardware."""
    import sdeflow

    proto: dict[str, Any] = {
        "n_samples": n,
        "batch_size": batch_size or n,
        "sampling_seed": seed,
        "same_x_T_for_every_cell": True,
        "reference": scorer.describe(),
        "data_floor": dict(scorer.floor),
        "data_floor_std": dict(getattr(scorer, "floor_std", {})),
        "nfe": "net calls counted by the Denoiser (res.nfe), per batch",
        "seconds": "wall time of sampling only (time.perf_counter, CUDA synchronised), scoring excluded",
        "excluded_by_default": EXCLUDED_BY_DEFAULT,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "sdeflow": sdeflow.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.device(device).type == "cuda":
        proto["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if checkpoint is not None:
        from .extractors import sha256_file

        proto["checkpoint"] = {"path": str(checkpoint), "sha256": sha256_file(checkpoint)}
    proto.update(extra)
    return proto


def write_outputs(
    result: SweepResult,
    out_dir: str | Path,
    protocol: dict[str, Any],
    *,
    title: str = "NFE versus quality",
    extra_markdown: str = "",
    plot_name: str = "nfe_vs_quality.png",
) -> dict[str, Path]:
    """Write ``results.json`` (protocol + every cell), ``table.md`` (protocol, the grids, every cell) and the plot.

    Returns the paths by kind (``json``, ``markdown``, ``plot``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "protocol": {**protocol, "nfes": list(result.nfes), "tolerances": list(result.tolerances)},
        "metrics": list(result.metrics),
        "floor": result.floor,
        "floor_std": result.floor_std,
        "cells": [asdict(c) for c in result.cells],
    }
    paths = {"json": out / "results.json", "markdown": out / "table.md", "plot": out / plot_name}
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
    plot_sweep(result, paths["plot"], title)
    md = [f"# {title}", ""]
    if extra_markdown:
        md += [extra_markdown, ""]
    for metric in result.metrics:
        md += [f"## {metric} by solver and NFE budget (lower is better)", "", markdown_grid(result, metric), ""]
    adaptive = markdown_adaptive(result)
    if adaptive:
        md += ["## Tolerance-driven solvers", "", adaptive, ""]
    md += [
        "## Every cell",
        "",
        markdown_cells(result),
        "",
        "## Protocol",
        "",
        "```json",
        json.dumps(_json_safe(payload["protocol"]), indent=2),
        "```",
        "",
    ]
    paths["markdown"].write_text("\n".join(md))
    return paths
