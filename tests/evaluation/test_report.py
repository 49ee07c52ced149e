"""Plots and tables of a sweep (sdeflow.evaluation.report): styles, the outlier-robust y range, the sample grid, the
one-line dependency check. Oracles: hand-computed quantiles and hand-built sweep results."""

from __future__ import annotations

import math

import pytest
import torch

import sdeflow as sf
from sdeflow.evaluation import report
from sdeflow.evaluation.sweep import Cell, SweepResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_robust_top_clips_only_outliers():
    assert report.robust_top([1.0, 2.0, 3.0, 4.0, 5.0], log=False) is None  # nothing far out
    assert report.robust_top([1.0, 2.0, 3.0], log=False) is None  # too few values to judge
    # linear: sorted [1, 1, 2, 2, 3, 3, 4, 4, 5, 1000]; the 0.9 quantile at position 8.1 is 5 + 0.1 (1000 - 5)
    # = 104.5 > 5, so take the case where the outlier stands clear of the quantile: 20 values
    vals = [float(v) for v in range(1, 20)] + [1e6]
    q = 18.0 + 0.1 * 1.0  # position 0.9 * 19 = 17.1 -> between 18 and 19
    assert report.robust_top(vals, log=False) == pytest.approx(q + (q - 1.0))
    # log: decades 0 ... 2 and one at 6; top = q + (q - min) in log10 units
    vals = [10.0 ** (k / 10) for k in range(21)] + [1e6]
    pos = 0.9 * 21
    lv = sorted(math.log10(v) for v in vals)
    q = lv[18] + (lv[19] - lv[18]) * (pos - 18)
    assert report.robust_top(vals, log=True) == pytest.approx(10 ** (q + q))
    assert (
        report.robust_top([float(v) for v in range(1, 12)] + [float("nan"), 1e9], log=True) is not None
    )  # nan ignored


def test_every_solver_gets_a_distinct_colour_and_marker():
    labels = sf.solvers.available() + ["ddim:eta=1.0", "my_solver"]
    styles = report.solver_styles(labels)
    pairs = {(tuple(round(c, 6) for c in st["color"]), st["marker"]) for st in styles.values()}
    assert len(pairs) == len(labels)
    assert styles["my_solver"]["family"] == "other"
    assert styles["ddim:eta=1.0"]["family"] == styles["ddim"]["family"] == "ODE, first order"
    assert all("lower is better" in report.metric_label(m) for m in ("fid", "sw2", "unknown"))
    assert report.metric_label("fid").startswith("FID")


def test_require_extras_is_one_line():
    report.require_extras("sdeflow x", {"math": "none"})
    with pytest.raises(ImportError) as err:
        report.require_extras("sdeflow x", {"surely_not_a_module_xyz": "plot"})
    text = str(err.value)
    assert "\n" not in text and "sdeflow[plot]" in text and text.startswith("sdeflow x needs")


def _result(with_samples: bool) -> SweepResult:
    cells = []
    for solver, vals in (("ddim", [1e6, 30.0, 12.0]), ("ddpm", [80.0, 25.0, 10.0]), ("heun", [70.0, 20.0, 9.0])):
        for b, v in zip((5, 10, 20), vals):
            cells.append(Cell(solver, b, None, nfe=float(b), seconds=0.1, metrics={"fid": v, "fid_std": 0.1 * v}))
    cells.append(Cell("rk45", None, 1e-2, nfe=37.0, seconds=0.1, metrics={"fid": 9.5, "fid_std": 0.5}))
    cells.append(Cell("euler", 5, None, status="error: boom"))
    samples = {}
    if with_samples:
        g = torch.Generator().manual_seed(0)
        samples = {(c.solver, c.budget or c.tol): torch.rand(4, 3, 8, 8, generator=g) * 2 - 1 for c in cells if c.ok}
    return SweepResult(cells, ("fid",), {"fid": 5.0}, (5, 10, 20), (1e-2,), samples, {"fid": 1.0}, (0, 1, 2))


def test_plots_and_tables(tmp_path):
    res = _result(with_samples=True)
    md = report.markdown_grid(res)
    assert "1e+06 ± 1e+05" in md and "seeds [0, 1, 2]" in md
    report.plot_sweep(res, tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert report.plot_sample_grid(res, tmp_path / "g.png", title="samples")
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC
    assert not report.plot_sample_grid(_result(with_samples=False), tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_bench_without_matplotlib_says_so_first(monkeypatch, tmp_path, capsys):
    """No matplotlib: `sdeflow bench` stops with one line naming the extra before reading its checkpoint."""
    import sys

    from sdeflow.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--ckpt", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matplotlib" in err and "sdeflow[plot]" in err


def test_load_result_round_trip(tmp_path):
    res = _result(with_samples=False)
    paths = report.write_outputs(res, tmp_path, {"sampling_seeds": [0, 1, 2]}, title="t", plot_name="p.png")
    back = report.load_result(paths["json"])
    assert back.metrics == res.metrics and back.nfes == res.nfes and back.tolerances == res.tolerances
    assert back.seeds == (0, 1, 2) and back.floor == res.floor and back.floor_std == res.floor_std
    assert [(c.solver, c.budget, c.tol, c.status, c.metrics) for c in back.cells] == [
        (c.solver, c.budget, c.tol, c.status, c.metrics) for c in res.cells
    ]
    assert report.markdown_grid(back) == report.markdown_grid(res)
