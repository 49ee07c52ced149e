"""`sdeflow bench` end to end, the demo's quick mode (`python -m sdeflow.cli.demo`, `sdeflow demo`) and its NLL.

Oracles: the checkpoint's own hash, the closed-form NLL of the analytic mixture, and the geometry of the
checkerboard (the exact entropy the demo prints).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdeflow as sf
from sdeflow.cli import main
from sdeflow.evaluation.extractors import sha256_file
from sdeflow.training import default_gmm, toy_2d

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_cli_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--data", "gmm", "--hidden", "16", "--depth", "1", "--batch-size", "32", "--no-progress"]
    assert main(["train", *tiny, "--steps", "5", "--out", str(run)]) == 0
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--ckpt",
        str(run / "ckpt.pt"),
        "--solvers",
        "euler",
        "dpm_solver++",
        "--nfe",
        "2",
        "4",
        "--n",
        "64",
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| euler |" in printed and "| dpm_solver++ |" in printed
    data = json.loads((out / "results.json").read_text())
    proto = data["protocol"]
    assert proto["checkpoint"]["sha256"] == sha256_file(run / "ckpt.pt")
    assert proto["n_samples"] == 64 and proto["reference_seed"] == 12345 and proto["data"] == "gmm"
    assert proto["reference"]["n_reference"] == 64 and set(proto["data_floor"]) == {"sw2", "mmd2", "fd"}
    assert set(proto["data_floor_std"]) == {"sw2", "mmd2", "fd"}
    assert [(c["solver"], c["budget"], c["nfe"], c["status"]) for c in data["cells"]] == [
        ("euler", 2, 2, "ok"),
        ("euler", 4, 4, "ok"),
        ("dpm_solver++", 2, 2, "ok"),
        ("dpm_solver++", 4, 4, "ok"),
    ]
    assert all(math.isfinite(c["metrics"]["sw2"]) and c["seconds"] > 0 for c in data["cells"])
    assert (out / "table.md").read_text().startswith("# NFE versus quality")
    assert (out / "nfe_vs_quality.png").read_bytes()[:8] == PNG_MAGIC
    # bad input: exit status 2 naming the problem
    assert main(["bench", "--ckpt", str(run / "ckpt.pt"), "--solvers", "nope", "--out", str(out), "--no-progress"]) == 2
    assert "allowed values" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    from sdeflow.cli import demo

    out = tmp_path / "demo"
    assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trained" in printed and "Test NLL" in printed and "| euler |" in printed
    for name in ("table.md", "results.json", "nfe_vs_quality.png", "samples.png", "ckpt.pt"):
        assert (out / name).exists(), name
    assert (out / "samples.png").read_bytes()[:8] == PNG_MAGIC
    proto = json.loads((out / "results.json").read_text())["protocol"]
    assert proto["test_nll"]["n"] == demo.QUICK["nll_points"] and math.isfinite(proto["test_nll"]["nll"])
    assert proto["test_nll"]["exact_entropy"] == pytest.approx(math.log(6))
    assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 0  # the checkpoint is reused
    assert "reused" in capsys.readouterr().out
    assert demo.main(["--quick", "--out", str(out), "--data", "moons", "--no-progress"]) == 2  # another data set
    assert "trained on" in capsys.readouterr().err


def test_demo_nll_matches_the_closed_form():
    """With the mixture's exact denoiser the demo's test NLL is the mixture's own NLL of the same held-out points
    (up to the t_eps smoothing and the prior gap, both far below the tolerance)."""
    from sdeflow.cli import demo
    from sdeflow.training import make_data

    gmm = default_gmm()
    out = demo.test_nll(gmm.denoiser(sf.VPSDE()), "gmm", 64, seed=5)
    x = make_data("gmm").sample(64, torch.Generator().manual_seed(5))[0].double()
    assert out["nll"] == pytest.approx(float(-gmm.log_prob(x).mean()), abs=0.02)
    assert out["n"] == 64 and out["nfe"] > 0 and "exact_entropy" not in out


def test_checkerboard_exact_entropy():
    """log 6: the checkerboard is uniform on 8 of the 16 squares of side sqrt(3)/2 tiling [-sqrt 3, sqrt 3]^2."""
    from sdeflow.cli.demo import EXACT_ENTROPY

    x = toy_2d("checkerboard", 200_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    side = math.sqrt(3) / 2
    assert float(x.abs().max()) <= 2 * side + 1e-12
    cells = torch.floor(x / side).long() + 2  # square indices 0..3 per axis
    counts = torch.zeros(4, 4)
    counts.index_put_((cells[:, 0], cells[:, 1]), torch.ones(len(x)), accumulate=True)
    occupied = counts > 0
    assert int(occupied.sum()) == 8
    assert torch.allclose(counts[occupied] / len(x), torch.full((8,), 1 / 8), atol=0.005)
    assert EXACT_ENTROPY["checkerboard"] == pytest.approx(math.log(8 * side**2))


def test_demo_is_a_subcommand(capsys):
    """`sdeflow demo` takes the options of `python -m sdeflow.cli.demo` (one configure for both)."""
    from sdeflow.cli import demo

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0 and "--quick" in capsys.readouterr().out
    assert demo.build_parser().parse_args(["--quick"]).quick


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_demo_runs_as_a_module():
    proc = subprocess.run(
        [sys.executable, "-m", "sdeflow.cli.demo", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(sf.__file__).parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "python -m sdeflow.cli.demo" in proc.stdout
