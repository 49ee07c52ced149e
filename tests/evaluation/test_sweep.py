"""NFE-versus-quality benchmark (sdeflow.bench, `sdeflow bench`) and the demo's quick mode.

Oracles: the analytic GaussianMixture's exact denoiser (no model error, so the metric must fall towards the
real-vs-real floor as the NFE grows), a scorer's distance of a set to itself (0), the sampler called directly with
the protocol's seed (the sweep must reproduce it bit for bit), the closed-form NLL of the mixture, and the geometry
of the checkerboard (the exact entropy the demo prints).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import sdeflow as sf
from sdeflow import bench
from sdeflow.cli import main
from sdeflow.extractors import DigitsCNN, save_digits_extractor, sha256_file
from sdeflow.training import default_gmm, toy_2d

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def oracle():
    """Exact denoiser of the default 2-D mixture on the VP SDE, and a scorer against 400 fresh mixture draws."""
    gmm = default_gmm()
    den = gmm.denoiser(sf.VPSDE())
    g = torch.Generator().manual_seed(1)
    scorer = bench.LowDimScorer(gmm.sample(400, generator=g), [gmm.sample(400, generator=g) for _ in range(4)], seed=3)
    return den, scorer


def test_parse_solver():
    spec = bench.parse_solver("ddim:eta=1.0, foo=bar")
    assert spec.name == "ddim" and spec.kwargs == {"eta": 1.0, "foo": "bar"}
    assert spec.label == "ddim:eta=1.0,foo=bar"
    assert bench.parse_solver("euler") == bench.SolverSpec("euler")
    with pytest.raises(ValueError, match="allowed values"):
        bench.parse_solver("nope")
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_solver("ddim:eta")
    names = [s.name for s in bench.default_solvers()]
    assert names == [n for n in sf.solvers.available() if n != "parallel"]


def test_budget_driven_follows_declarations(oracle):
    den, _ = oracle
    from sdeflow.integrate import make_stepper

    assert bench.budget_driven(make_stepper(den, "euler"))
    assert bench.budget_driven(make_stepper(den, "heun"))  # 2 NFE per step: still budget-driven
    assert not bench.budget_driven(make_stepper(den, "rk45"))
    assert not bench.budget_driven(make_stepper(den, "adaptive_sde"))
    assert not bench.budget_driven(make_stepper(den, "dpm_solver", order=2, adaptive=True))


def test_scorer_distance_to_itself_is_zero_and_floor_positive(oracle):
    _, scorer = oracle
    own = scorer.score(scorer.reference)
    assert own["sw2"] == pytest.approx(0.0, abs=1e-12) and own["fd"] == pytest.approx(0.0, abs=1e-9)
    assert own["mmd2"] < 0  # the unbiased U-statistic of a set against itself: -mean of the diagonal terms
    assert set(scorer.floor) == set(scorer.floor_std) == {"sw2", "mmd2", "fd"}
    assert scorer.floor["sw2"] > 2 * scorer.floor_std["sw2"] > 0  # real-vs-real: positive, with a spread
    assert abs(scorer.floor["mmd2"]) < 4 * scorer.floor_std["mmd2"]  # unbiased: 0 within the spread
    shifted = scorer.score(scorer.reference + 1.0)
    assert shifted["fd"] == pytest.approx(2.0, rel=1e-9)  # |mu shift|^2 = 2, same covariance
    assert all(math.isnan(v) for v in scorer.score(torch.full((10, 2), float("nan"))).values())


def test_sweep_on_the_oracle(oracle, tmp_path):
    den, scorer = oracle
    res = bench.run_sweep(
        den,
        scorer,
        (2,),
        solvers=["euler", "heun", "pc", "ddim:bogus=1", "rk45"],
        nfes=[1, 2, 40],
        tolerances=[1e-1, 1e-3],
        n=400,
        seed=7,
        keep=50,
        progress=False,
    )
    cells = {(c.solver, c.budget, c.tol): c for c in res.cells}
    # pc (predictor + corrector) needs 2 NFE per step: budget 1 is skipped, not an error; a bad option is an error
    assert cells[("pc", 1, None)].status.startswith("skipped") and cells[("pc", 2, None)].ok
    assert (
        cells[("ddim:bogus=1", None, None)].status.startswith("error")
        and "bogus" in cells[("ddim:bogus=1", None, None)].status
    )
    for b in (1, 2, 40):
        assert cells[("euler", b, None)].nfe == b  # res.nfe as the Denoiser counted it
    assert cells[("heun", 40, None)].nfe == 39  # EDM Heun: its last step is an Euler step
    rk = [cells[("rk45", None, t)] for t in (1e-1, 1e-3)]
    assert all(c.ok for c in rk) and rk[1].nfe > rk[0].nfe  # tighter tolerance, more NFE, reported as spent
    # no model error: the metric falls towards the real-vs-real floor as the NFE grows
    sw = [cells[("euler", b, None)].metrics["sw2"] for b in (1, 2, 40)]
    assert sw[0] > sw[2] and sw[1] > sw[2]
    assert sw[2] < 2.5 * scorer.floor["sw2"]
    assert cells[("rk45", None, 1e-3)].metrics["sw2"] < 2.5 * scorer.floor["sw2"]
    # every cell starts from the same x_T: the sweep reproduces a direct call with the protocol's seed bit for bit
    direct = sf.sample(den, "euler", nfe=40, shape=(400, 2), generator=torch.Generator().manual_seed(7)).x
    assert torch.equal(res.samples[("euler", 40)], direct[:50])

    proto = bench.base_protocol(n=400, seed=7, scorer=scorer, device="cpu", dtype=torch.float64, extra_key=1)
    paths = bench.write_outputs(res, tmp_path, proto, title="oracle")
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert data["protocol"]["n_samples"] == 400 and data["protocol"]["sampling_seed"] == 7
    assert data["protocol"]["data_floor"]["sw2"] == pytest.approx(scorer.floor["sw2"])
    assert data["protocol"]["nfes"] == [1, 2, 40] and data["protocol"]["extra_key"] == 1
    assert len(data["cells"]) == len(res.cells)
    md = paths["markdown"].read_text()
    assert "| euler |" in md and "## Protocol" in md and '"sampling_seed": 7' in md and "| **best** |" in md
    assert "39" in bench.markdown_grid(res)  # heun's spent NFE differs from its budget: shown in brackets
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC


def test_sweep_argument_errors(oracle):
    den, scorer = oracle
    with pytest.raises(ValueError, match="nfes"):
        bench.run_sweep(den, scorer, (2,), solvers=["euler"], nfes=[0], n=10, progress=False)
    with pytest.raises(ValueError, match="tolerances"):
        bench.run_sweep(den, scorer, (2,), solvers=["euler"], nfes=[2], tolerances=[2.0], n=10, progress=False)
    with pytest.raises(ValueError, match="allowed values"):
        bench.run_sweep(den, scorer, (2,), solvers=["nope"], nfes=[2], n=10, progress=False)
    with pytest.raises(ValueError, match="extractor"):
        bench.make_scorer({"data": {"spec": "digits"}}, 10, extractor="lenet")


def test_make_scorer_digits_uses_the_verified_extractor(tmp_path):
    torch.manual_seed(0)
    net = DigitsCNN(width=4, feature_dim=8).eval().requires_grad_(False)  # untrained: the hash is what matters
    digest = save_digits_extractor(net, tmp_path / "digits_cnn_seed0.pt")
    scorer = bench.make_scorer({"data": {"spec": "digits"}}, 100, seed=0, cache_dir=tmp_path)
    assert scorer.metrics == ("fd_digits",)
    info = scorer.describe()
    assert info["extractor"]["sha256"] == digest and info["n_reference"] == 1797
    assert scorer.floor["fd_digits"] > 0 and scorer.floor_std["fd_digits"] > 0  # random disjoint halves
    from sdeflow.training import load_digits

    x = load_digits()[0]
    assert scorer.score(x)["fd_digits"] == pytest.approx(0.0, abs=1e-6)
    assert scorer.score(torch.rand(300, 1, 8, 8) * 2 - 1)["fd_digits"] > 10 * scorer.floor["fd_digits"]
    raw = bench.make_scorer({"data": {"spec": "digits"}}, 100, extractor="raw")
    assert raw.metrics == ("fd_raw",) and raw.score(x)["fd_raw"] == pytest.approx(0.0, abs=1e-6)


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
    from sdeflow import demo

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
    from sdeflow import demo
    from sdeflow.training import make_data

    gmm = default_gmm()
    out = demo.test_nll(gmm.denoiser(sf.VPSDE()), "gmm", 64, seed=5)
    x = make_data("gmm").sample(64, torch.Generator().manual_seed(5))[0].double()
    assert out["nll"] == pytest.approx(float(-gmm.log_prob(x).mean()), abs=0.02)
    assert out["n"] == 64 and out["nfe"] > 0 and "exact_entropy" not in out


def test_checkerboard_exact_entropy():
    """log 6: the checkerboard is uniform on 8 of the 16 squares of side sqrt(3)/2 tiling [-sqrt 3, sqrt 3]^2."""
    from sdeflow.demo import EXACT_ENTROPY

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


def test_ensure_trained_trains_resumes_and_reuses(tmp_path):
    from sdeflow.training import load_checkpoint

    argv = ["--data", "gmm", "--hidden", "8", "--depth", "1", "--batch-size", "16", "--save-every", "0"]
    assert bench.ensure_trained(tmp_path, argv, 3, progress=False).startswith("trained")
    assert bench.ensure_trained(tmp_path, argv, 5, progress=False).startswith("resumed")
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5
    assert bench.ensure_trained(tmp_path, argv, 4, progress=False).startswith("reused")
    with pytest.raises(ValueError, match="trained on"):
        bench.ensure_trained(tmp_path, ["--data", "moons"], 4, progress=False)
