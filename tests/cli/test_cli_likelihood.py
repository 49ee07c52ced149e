"""`sdeflow likelihood` with the issue-19 options: --variable, --solver/--nfe (a fixed grid), --method adams and the
per-sample standard errors of Hutchinson's estimator, checked against the library call they stand for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_checkpoint import write_mlp_checkpoint

import sdeflow as sf
from sdeflow.cli import main
from sdeflow.training import load_denoiser

F64 = torch.float64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_likelihood")
    write_mlp_checkpoint(root / "ckpt.pt", dim=3, init_std=0.1)  # a non-trivial field
    data = np.random.default_rng(0).standard_normal((6, 3))
    np.save(root / "x.npy", data)
    return root, torch.from_numpy(data)


def _cli(root, capsys, *extra: str) -> tuple[dict, str]:
    out = root / "ll.json"
    argv = ["likelihood", "--ckpt", str(root / "ckpt.pt"), "--data", str(root / "x.npy"), "--device", "cpu"]
    argv += ["--dtype", "float64", "--batch-size", "4", "--out", str(out), "--force", "--no-progress", *extra]
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_fixed_grid_solver_and_variable(run, capsys) -> None:
    """--solver abm4 --nfe 9 --variable logsnr: exactly 9 evaluations per batch, the library's values."""
    root, x = run
    report, text = _cli(root, capsys, "--solver", "abm4", "--nfe", "9", "--variable", "logsnr")
    assert report["solver"] == "abm4" and report["nfe_budget"] == 9 and report["variable"] == "logsnr"
    assert report["nfe"] == 9 * 2 and report["method"] is None  # 6 samples in batches of 4: two solves
    assert "solver=abm4, nfe=9" in text and "variable=logsnr" in text
    den = load_denoiser(root / "ckpt.pt", device="cpu", dtype=F64)
    with torch.no_grad():
        ref = torch.cat(
            [sf.log_likelihood(den, xb, solver="abm4", nfe=9, variable="logsnr").log_prob for xb in x.split(4)]
        )
    np.testing.assert_allclose(report["per_sample"]["log_prob"], ref.numpy(), rtol=1e-10)
    assert report["probe_std_error_mean"] is None and "std_error" not in report["per_sample"]


def test_hutchinson_standard_errors_in_the_report(run, capsys) -> None:
    """--divergence hutchinson --n-probes 4 --method adams: per-sample std_error and probe_variance equal the library's
    (probes seeded by --seed + the batch's first index), and the summary's probe error of the mean log p is
    sqrt(sum se^2) / n."""
    root, x = run
    report, text = _cli(
        root,
        capsys,
        "--divergence",
        "hutchinson",
        "--n-probes",
        "4",
        "--method",
        "adams",
        "--rtol",
        "1e-3",
        "--atol",
        "1e-3",
    )
    assert report["method"] == "adams" and report["n_probes"] == 4 and "probe std. error" in text
    den = load_denoiser(root / "ckpt.pt", device="cpu", dtype=F64)
    parts = []
    for i0 in (0, 4):
        with torch.no_grad():
            parts.append(
                sf.log_likelihood(
                    den,
                    x[i0 : i0 + 4],
                    "hutchinson",
                    1e-3,
                    1e-3,
                    n_probes=4,
                    method="adams",
                    generator=torch.Generator().manual_seed(i0),
                )  # fmt: skip
            )
    se = torch.cat([p.std_error for p in parts])
    np.testing.assert_allclose(report["per_sample"]["std_error"], se.numpy(), rtol=1e-10)
    np.testing.assert_allclose(
        report["per_sample"]["probe_variance"], torch.cat([p.probe_variance for p in parts]).numpy(), rtol=1e-10
    )
    np.testing.assert_allclose(report["per_sample"]["log_prob"], torch.cat([p.log_prob for p in parts]).numpy())
    assert bool((se > 0).all())
    assert report["probe_std_error_mean"] == pytest.approx(float(se.mean()))
    assert report["probe_std_error_of_mean_log_prob"] == pytest.approx(float(se.pow(2).sum().sqrt() / 6))
