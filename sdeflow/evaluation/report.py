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

__all__ = [
    "METRIC_NAMES",
    "SOLVER_FAMILIES",
    "metric_label",
    "solver_styles",
    "robust_top",
    "markdown_grid",
    "markdown_adaptive",
    "markdown_cells",
    "plot_sweep",
    "plot_sample_grid",
    "require_extras",
    "load_result",
    "base_protocol",
    "write_outputs",
]


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
    solver per column; a cell whose spent NFE differs from the budget shows it in brackets, one with a spread over
    several seeds shows it as ``mean ± std``."""
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
                spread = c.metrics.get(f"{metric}_std")
                if spread is not None and math.isfinite(spread):
                    text += f" ± {_fmt(spread, 2)}"
                if c.nfe is not None and abs(c.nfe - b) > 1e-9:
                    text += f" ({c.nfe:g})"
                cells.append(text)
                if math.isfinite(v) and (b not in best or v < best[b][0]):
                    best[b] = (v, solver)
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    lines.append("| **best** | " + " | ".join(best[b][1] if b in best else "-" for b in result.nfes) + " |")
    if len(result.seeds) > 1:
        lines.append(f"\nMean ± standard deviation over the sampling seeds {list(result.seeds)}.")
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


#: full names of the metrics (axis labels, table headings)
METRIC_NAMES: dict[str, str] = {
    "sw2": "sliced 2-Wasserstein distance",
    "mmd2": "MMD² (multi-scale Gaussian kernel)",
    "fd": "Fréchet distance (raw coordinates)",
    "fd_digits": "Fréchet distance (digits-CNN features)",
    "fid": "FID (Inception-v3 features)",
    "fd_raw": "Fréchet distance (raw pixels)",
}

#: solver families: (family, colormap); members of a family share a hue and differ in shade and marker
SOLVER_FAMILIES: dict[str, tuple[str, str]] = {
    "ddim": ("ODE, first order", "Blues"),
    "euler": ("ODE, first order", "Blues"),
    "dpm_solver": ("ODE, exponential integrators", "Greens"),
    "dpm_solver++": ("ODE, exponential integrators", "Greens"),
    "unipc": ("ODE, exponential integrators", "Greens"),
    "deis": ("ODE, exponential integrators", "Greens"),
    "ipndm": ("ODE, linear multistep", "Purples"),
    "lms": ("ODE, linear multistep", "Purples"),
    "heun": ("ODE, Runge-Kutta", "Oranges"),
    "rk45": ("ODE, Runge-Kutta", "Oranges"),
    "ddpm": ("SDE", "Reds"),
    "euler_maruyama": ("SDE", "Reds"),
    "pc": ("SDE", "Reds"),
    "adaptive_sde": ("SDE", "Reds"),
    "torchsde": ("SDE", "Reds"),
    "dpmpp_sde": ("SDE, exponential integrators", "RdPu"),
    "dpmpp_2s_ancestral": ("SDE, exponential integrators", "RdPu"),
    "er_sde": ("SDE, exponential integrators", "RdPu"),
    "sa_solver": ("SDE, exponential integrators", "RdPu"),
    "parallel": ("parallel in time", "Greys"),
}
_MARKERS = "osD^vP*Xph<>"


def metric_label(metric: str) -> str:
    """The full name of a metric with the reading direction, e.g. ``"FID (Inception-v3 features)\n(lower is
    better)"``; an unknown key (``*_std`` included) is used as it is."""
    return f"{METRIC_NAMES.get(metric, metric)}\n(lower is better)"


def solver_styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """A distinct (colour, marker) per solver label, grouped by :data:`SOLVER_FAMILIES`: one hue per family (shades
    from dark to mid for its members), one marker per member; unknown solvers are the family "other" (cividis).
    Returns ``{label: {"color", "marker", "family"}}``."""
    import matplotlib

    members: dict[str, list[str]] = {}
    for label in labels:
        family = SOLVER_FAMILIES.get(label.split(":")[0], ("other", "cividis"))[0]
        members.setdefault(family, []).append(label)
    cmaps = {fam: cm for fam, cm in SOLVER_FAMILIES.values()}
    out: dict[str, dict[str, Any]] = {}
    for family, group in members.items():
        cmap = matplotlib.colormaps[cmaps.get(family, "cividis")]
        k = len(group)
        for i, label in enumerate(group):
            shade = 0.95 - 0.45 * (i / max(k - 1, 1)) if k > 1 else 0.8  # dark to mid: light shades are unreadable
            out[label] = {"color": cmap(shade), "marker": _MARKERS[i % len(_MARKERS)], "family": family}
    return out


def robust_top(values: list[float], log: bool, quantile: float = 0.9, factor: float = 1.5) -> float | None:
    """The top of a y range that one outlier cannot stretch: None (no clipping) unless the largest value lies beyond
    ``q + factor * (q - min)`` with q the ``quantile`` of the values (in log10 units for a log axis); the top is
    then q + (q - min) (at least a quarter decade above q on a log axis, a quarter of |q| on a linear one)."""
    v = sorted(math.log10(x) if log else x for x in values if math.isfinite(x) and (x > 0 or not log))
    if len(v) < 4:
        return None
    pos = quantile * (len(v) - 1)
    lo_i = int(math.floor(pos))
    q = v[lo_i] + (v[min(lo_i + 1, len(v) - 1)] - v[lo_i]) * (pos - lo_i)
    span = q - v[0]
    if v[-1] <= q + factor * span + (1e-12 if log else 0.0):
        return None
    top = q + max(span, 0.25 if log else 0.25 * abs(q))
    if v[-1] <= top:
        return None
    return 10.0**top if log else top


def _family_legend(
    handles: list[Any], labels: list[str], styles: dict[str, dict[str, Any]]
) -> tuple[list[Any], list[str]]:
    """Legend entries grouped by solver family, each group under its family's name (a handle-less header)."""
    from matplotlib.lines import Line2D

    entries: dict[str, list[tuple[Any, str]]] = {}
    rest: list[tuple[Any, str]] = []
    for h, lab in zip(handles, labels):
        st = styles.get(lab.removesuffix(" (tolerance)"))
        if st is None:
            rest.append((h, lab))
        else:
            entries.setdefault(st["family"], []).append((h, lab))
    out_h: list[Any] = []
    out_l: list[str] = []
    order = list(dict.fromkeys(fam for fam, _ in SOLVER_FAMILIES.values()))
    for family, group in sorted(entries.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        out_h.append(Line2D([], [], ls="none"))
        out_l.append(family)
        for h, lab in group:
            out_h.append(h)
            out_l.append(lab)
    if rest:
        out_h.append(Line2D([], [], ls="none"))
        out_l.append("")
    for h, lab in rest:
        out_h.append(h)
        out_l.append(lab)
    return out_h, out_l


def plot_sweep(result: SweepResult, path: str | Path, title: str = "") -> None:
    """One panel per metric: the metric (full name, lower is better) against the network evaluations spent (log x;
    log y when every value is positive), one line per solver with a colour and marker of its family
    (:func:`solver_styles`; tolerance-driven solvers dashed with open markers), the seed spread as error bars when
    the cells have one (``metric_std``), the data floor as a grey band (mean +- std). The y range ignores outliers
    (:func:`robust_top`): values above it are drawn as triangles on the top edge with their value beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups = result.by_solver()
    styles = solver_styles(list(groups))
    k = len(result.metrics)
    families = {st["family"] for st in styles.values()}
    height = max(4.4, 0.165 * (len(groups) + len(families) + 3) + 0.6)  # the legend fits in one column
    fig, axes = plt.subplots(1, k, figsize=(4.8 * k, height), squeeze=False)
    clipped_any = False
    for j, metric in enumerate(result.metrics):
        ax = axes[0, j]
        lines: list[tuple[str, list[float], list[float], list[float], bool]] = []
        values: list[float] = []
        for solver, cs in groups.items():
            pts = sorted(
                (c.nfe, c.metrics[metric], c.metrics.get(f"{metric}_std", float("nan")))
                for c in cs
                if c.ok and c.nfe is not None and math.isfinite(c.metrics.get(metric, float("nan")))
            )
            if not pts:
                continue
            xs, ys, es = (list(t) for t in zip(*pts))
            values += ys
            lines.append((solver, xs, ys, es, any(c.tol is not None for c in cs)))
        floor, std = result.floor.get(metric, float("nan")), result.floor_std.get(metric, float("nan"))
        band = [floor - std, floor + std] if math.isfinite(floor) and math.isfinite(std) else []
        log_y = bool(values) and min(values + ([floor] if math.isfinite(floor) else [])) > 0
        top = robust_top(values, log_y)
        any_clipped = False
        clipped: list[float] = []  # log10 x of the clipped points: labels of nearby ones are stacked, not overprinted
        for solver, xs, ys, es, adaptive in lines:
            st = styles[solver]
            shown = [min(y, top) if top is not None else y for y in ys]
            ax.plot(
                xs,
                shown,
                ls="--" if adaptive else "-",
                marker=st["marker"],
                ms=5,
                color=st["color"],
                mfc="white" if adaptive else st["color"],
                lw=1.4,
                label=solver + (" (tolerance)" if adaptive else ""),
            )
            if any(math.isfinite(e) and e > 0 for e in es):
                # no bar on a clipped point (it would describe a value the axis does not show)
                up = [e if math.isfinite(e) and (top is None or y <= top) else 0.0 for e, y in zip(es, ys)]
                # on a log axis a bar reaching 0 or below would run off the panel: show at most a decade down
                down = [min(e, 0.9 * y) if log_y else e for e, y in zip(up, shown)]
                ax.errorbar(xs, shown, yerr=[down, up], fmt="none", ecolor=st["color"], elinewidth=1.0, capsize=2.5)
            if top is not None:
                for x, y in zip(xs, ys):
                    if y > top:
                        k = sum(abs(math.log10(x) - c) < 0.2 for c in clipped)
                        clipped.append(math.log10(x))
                        ax.plot([x], [top], marker="^", ms=8, color=st["color"], mec="k", mew=0.6, clip_on=False)
                        ax.annotate(
                            f"{y:.2g}",
                            (x, top),
                            xytext=(7, -8 - 9 * k),
                            textcoords="offset points",
                            ha="left",
                            va="center",
                            fontsize=7,
                            color=st["color"],
                            annotation_clip=False,
                        )
                        any_clipped = True
        if math.isfinite(floor):
            ax.axhline(floor, color="0.35", ls=":", lw=1.4, label="real data (data floor)")
            if band and std > 0:
                lo = max(band[0], 0.2 * floor) if log_y else band[0]
                ax.axhspan(lo, band[1], color="0.5", alpha=0.18, lw=0, label="real data: mean ± std")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        elif values:  # values <= 0 (unbiased MMD^2): linear within the floor's spread, logarithmic beyond
            scale = std if math.isfinite(std) and std > 0 else 1e-3 * max(abs(v) for v in values)
            thresh = 10.0 ** math.ceil(math.log10(max(scale, 1e-12)))
            ax.set_yscale("symlog", linthresh=thresh, linscale=0.5)
            ax.set_ylim(bottom=-thresh)
        if top is not None:
            ax.set_ylim(top=top)
        clipped_any = clipped_any or any_clipped
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations (NFE)", fontsize=10)
        ax.set_ylabel(metric_label(metric), fontsize=10)
        ax.tick_params(labelsize=9)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles, labels = _family_legend(handles, labels, styles)
    if clipped_any:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="none", marker="^", ms=8, color="w", mec="k", mew=0.6))
        labels.append("beyond the y axis (value beside)")
    leg = fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    for text in leg.get_texts():
        if text.get_text() in {st["family"] for st in styles.values()}:
            text.set_fontweight("bold")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits outside, to the right of the panels
    plt.close(fig)


def _sample_key(c: Cell) -> tuple[str, float]:
    """The key of a cell's kept samples in ``SweepResult.samples``: (solver label, budget or tolerance)."""
    return (c.solver, float(c.budget) if c.budget is not None else float(c.tol if c.tol is not None else "nan"))


def _tile(x: torch.Tensor) -> Any:
    """Images (B, C, H, W) in [-1, 1] as one (h, w[, 3]) array in [0, 1], tiled in a near-square grid."""
    import numpy as np

    x = ((x.float() + 1) / 2).clamp(0, 1)
    b, c, h, w = x.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for i in range(b):
        r, q = divmod(i, cols)
        canvas[:, r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = x[i]
    arr = canvas.numpy()
    return arr[0] if c == 1 else np.transpose(arr, (1, 2, 0))


def plot_sample_grid(
    result: SweepResult,
    path: str | Path,
    *,
    reference: torch.Tensor | None = None,
    title: str = "",
) -> bool:
    """The kept samples (``run_sweep(keep=...)``): one row per solver, one column per NFE budget (tolerance-driven
    solvers: one per tolerance, the NFE spent in the title), each panel titled with its NFE and primary metric.
    2-D samples are scatter plots on one fixed square (from ``reference`` when given, else the median over cells of
    each cell's 99th percentile of |x|, so that a diverged cell cannot shrink the others; points beyond it are drawn
    on the edge); images are tiled. A first row shows ``reference`` when given.
    Returns False (and writes nothing) when no samples were kept."""
    if not result.samples:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = result.metrics[0]
    groups = result.by_solver()
    rows: list[tuple[str, list[Cell]]] = []
    for solver, cs in groups.items():
        kept = [c for c in cs if _sample_key(c) in result.samples]
        if kept:
            rows.append((solver, kept))
    budgets = list(result.nfes)
    ncols = max([len(budgets)] + [len(cs) for s, cs in rows if all(c.tol is not None for c in cs)])
    first = next(iter(result.samples.values()))
    is_2d = first.ndim == 2 and first.shape[1] == 2
    lim = 1.0
    if is_2d:  # one square for all panels: the real data's extent, else the median cell's (bad cells cannot widen it)
        if reference is not None:
            lim = 1.08 * float(reference.float().abs().max())
        else:
            per_cell = [float(torch.quantile(x.float().abs().flatten(), 0.99)) for x in result.samples.values()]
            lim = 1.15 * float(torch.tensor(per_cell).median())
    nrows = len(rows) + (reference is not None)
    size = 1.55
    width = max(5.0, size * ncols + 1.4)
    text = ""
    if title:
        import textwrap

        text = textwrap.fill(title, width=int(8 * width))  # ~8 characters of 12-point text per inch
    title_h = 0.2 + 0.2 * (text.count("\n") + 1) if text else 0.1
    height = size * nrows + 0.4 + title_h
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_linewidth(0.5)

    def draw(ax: Any, x: torch.Tensor) -> None:
        if is_2d:
            pts = x.float().clamp(-lim, lim).numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=1.0, c="C0", linewidths=0)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
        elif x.ndim == 4:
            img = _tile(x[:16])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.plot(x.float().reshape(x.shape[0], -1).T.numpy(), lw=0.5)

    r0 = 0
    if reference is not None:
        draw(axes[0, 0], reference[:2000] if is_2d else reference[:16])
        axes[0, 0].set_ylabel("real data", rotation=0, ha="right", va="center", fontsize=10)
        for ax in axes[0, 1:]:
            ax.axis("off")
        r0 = 1
    for i, (solver, cs) in enumerate(rows, start=r0):
        by_col: dict[int, Cell] = {}
        for c in cs:
            if c.budget is not None and c.budget in budgets:
                by_col[budgets.index(c.budget)] = c
            elif c.tol is not None:
                by_col[len(by_col)] = c
        for j in range(ncols):
            ax = axes[i, j]
            cell = by_col.get(j)
            if cell is None:
                ax.axis("off")
                continue
            c = cell
            draw(ax, result.samples[_sample_key(c)])
            value = c.metrics.get(primary, float("nan"))
            if c.tol is not None:
                head = f"tol {c.tol:g}, NFE {_fmt(c.nfe, 4)}"
            elif c.nfe is not None and c.budget is not None and abs(c.nfe - c.budget) > 1e-9:
                head = f"NFE {c.budget} ({_fmt(c.nfe, 4)} spent)"
            else:
                head = f"NFE {c.budget}"
            ax.set_title(f"{head}\n{primary} = {value:.3g}", fontsize=8.5, pad=3)
        axes[i, 0].set_ylabel(solver, rotation=0, ha="right", va="center", fontsize=10)
    if text:
        fig.suptitle(text, fontsize=12, y=1 - 0.1 / height, va="top")
    fig.tight_layout(pad=0.4, h_pad=0.6, w_pad=0.3, rect=(0, 0, 1, 1 - title_h / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def require_extras(command: str, modules: dict[str, str]) -> None:
    """Raise ImportError, one line naming what to install, unless every module is importable; call it first in a
    command, before any computation. ``modules`` maps an import name to the sdeflow extra that installs it, e.g.
    ``require_extras("sdeflow bench", {"matplotlib": "plot"})``."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = ",".join(sorted({modules[m] for m in missing}))
        raise ImportError(
            f"{command} needs {' and '.join(missing)}: pip install 'sdeflow[{extras}]' (make setup installs it)"
        )


def load_result(path: str | Path) -> SweepResult:
    """A :class:`SweepResult` (without samples) from the ``results.json`` that :func:`write_outputs` wrote, e.g. to
    redraw its plot: ``plot_sweep(load_result("runs/bench/digits/results.json"), "digits.png")``."""
    payload = json.loads(Path(path).read_text())
    nan = float("nan")

    def num(v: Any) -> float:
        return nan if v is None else float(v)

    cells = []
    for c in payload["cells"]:
        c = dict(c)
        c["metrics"] = {k: num(v) for k, v in (c.get("metrics") or {}).items()}
        c["stats"] = {k: v for k, v in (c.get("stats") or {}).items() if v is not None}
        cells.append(Cell(**c))
    proto = payload.get("protocol", {})
    seeds = proto.get("sampling_seeds") or [proto.get("sampling_seed", 0)]
    return SweepResult(
        cells,
        tuple(payload["metrics"]),
        {k: num(v) for k, v in (payload.get("floor") or {}).items() if v is not None},
        tuple(proto.get("nfes", ())),
        tuple(proto.get("tolerances", ())),
        {},
        {k: num(v) for k, v in (payload.get("floor_std") or {}).items() if v is not None},
        tuple(int(s) for s in seeds),
    )


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

    When the sweep kept samples, also the sample grid (:func:`plot_sample_grid`) as ``<plot stem>_samples.png``.
    Returns the paths by kind (``json``, ``markdown``, ``plot``, and ``grid`` when written).
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
    grid = out / (Path(plot_name).stem + "_samples.png")
    if plot_sample_grid(result, grid, title=f"{title}: samples (rows: solver, columns: NFE)"):
        paths["grid"] = grid
    md = [f"# {title}", ""]
    if extra_markdown:
        md += [extra_markdown, ""]
    for metric in result.metrics:
        name = METRIC_NAMES.get(metric, metric)
        md += [
            f"## {name} (`{metric}`) by solver and NFE budget, lower is better",
            "",
            markdown_grid(result, metric),
            "",
        ]
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
