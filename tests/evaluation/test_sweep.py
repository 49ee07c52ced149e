"""NFE-versus-quality sweep (sdeflow.evaluation.sweep) and its outputs (sdeflow.evaluation.report).

Oracles: the analytic GaussianMixture's exact denoiser (no model error, so the metric must fall towards the
real-vs-real floor as the NFE grows), a scorer's distance of a set to itself (0), the sampler called directly with
the protocol's seed (the sweep must reproduce it bit for bit), and a digits set scored against itself (0).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import sdeflow as sf
from sdeflow.evaluation import report, sweep
from sdeflow.evaluation.extractors import DigitsCNN, save_digits_extractor
from sdeflow.training import default_gmm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def oracle():
    """Exact denoiser of the default 2-D mixture on the VP SDE, and a scorer against 400 fresh mixture draws."""
    gmm = default_gmm()
    den = gmm.denoiser(sf.VPSDE())
    g = torch.Generator().manual_seed(1)
    scorer = sweep.LowDimScorer(gmm.sample(400, generator=g), [gmm.sample(400, generator=g) for _ in range(4)], seed=3)
    return den, scorer


def test_parse_solver():
    spec = sweep.parse_solver("ddim:eta=1.0, foo=bar")
    assert spec.name == "ddim" and spec.kwargs == {"eta": 1.0, "foo": "bar"}
    assert spec.label == "ddim:eta=1.0,foo=bar"
    assert sweep.parse_solver("euler") == sweep.SolverSpec("euler")
    with pytest.raises(ValueError, match="allowed values"):
        sweep.parse_solver("nope")
    with pytest.raises(ValueError, match="key=value"):
        sweep.parse_solver("ddim:eta")
    names = [s.name for s in sweep.default_solvers()]
    assert names == [n for n in sf.solvers.available() if n != "parallel"]


def test_budget_driven_follows_declarations(oracle):
    den, _ = oracle
    from sdeflow.sampling import make_stepper

    assert sweep.budget_driven(make_stepper(den, "euler"))
    assert sweep.budget_driven(make_stepper(den, "heun"))  # 2 NFE per step: still budget-driven
    assert not sweep.budget_driven(make_stepper(den, "rk45"))
    assert not sweep.budget_driven(make_stepper(den, "adaptive_sde"))
    assert not sweep.budget_driven(make_stepper(den, "dpm_solver", order=2, adaptive=True))


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
    res = sweep.run_sweep(
        den,
        scorer,
        (2,),
        solvers=["euler", "heun", "pc", "pc:n_corrector=2", "ddim:bogus=1", "rk45"],
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
    # EDM Heun on a grid ending at sigma(eps) > 0: full Heun steps only (2 NFE each), so budget 1 buys no step
    assert cells[("heun", 40, None)].nfe == 40 and cells[("heun", 1, None)].status.startswith("skipped")
    assert cells[("pc:n_corrector=2", 40, None)].nfe == 39  # 13 steps x (1 + 2): one call unspent
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

    proto = report.base_protocol(n=400, seed=7, scorer=scorer, device="cpu", dtype=torch.float64, extra_key=1)
    paths = report.write_outputs(res, tmp_path, proto, title="oracle")
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert data["protocol"]["n_samples"] == 400 and data["protocol"]["sampling_seed"] == 7
    assert data["protocol"]["data_floor"]["sw2"] == pytest.approx(scorer.floor["sw2"])
    assert data["protocol"]["nfes"] == [1, 2, 40] and data["protocol"]["extra_key"] == 1
    assert len(data["cells"]) == len(res.cells)
    md = paths["markdown"].read_text()
    assert "| euler |" in md and "## Protocol" in md and '"sampling_seed": 7' in md and "| **best** |" in md
    assert "(39)" in report.markdown_grid(res)  # pc's spent NFE differs from its budget: shown in brackets
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC


def test_sweep_argument_errors(oracle):
    den, scorer = oracle
    with pytest.raises(ValueError, match="nfes"):
        sweep.run_sweep(den, scorer, (2,), solvers=["euler"], nfes=[0], n=10, progress=False)
    with pytest.raises(ValueError, match="tolerances"):
        sweep.run_sweep(den, scorer, (2,), solvers=["euler"], nfes=[2], tolerances=[2.0], n=10, progress=False)
    with pytest.raises(ValueError, match="allowed values"):
        sweep.run_sweep(den, scorer, (2,), solvers=["nope"], nfes=[2], n=10, progress=False)
    with pytest.raises(ValueError, match="extractor"):
        sweep.make_scorer({"data": {"spec": "digits"}}, 10, extractor="lenet")


def test_make_scorer_digits_uses_the_verified_extractor(tmp_path):
    torch.manual_seed(0)
    net = DigitsCNN(width=4, feature_dim=8).eval().requires_grad_(False)  # untrained: the hash is what matters
    digest = save_digits_extractor(net, tmp_path / "digits_cnn_seed0.pt")
    scorer = sweep.make_scorer({"data": {"spec": "digits"}}, 100, seed=0, cache_dir=tmp_path)
    assert scorer.metrics == ("fd_digits",)
    info = scorer.describe()
    assert info["extractor"]["sha256"] == digest and info["n_reference"] == 1797
    assert scorer.floor["fd_digits"] > 0 and scorer.floor_std["fd_digits"] > 0  # random disjoint halves
    from sdeflow.training import load_digits

    x = load_digits()[0]
    assert scorer.score(x)["fd_digits"] == pytest.approx(0.0, abs=1e-6)
    assert scorer.score(torch.rand(300, 1, 8, 8) * 2 - 1)["fd_digits"] > 10 * scorer.floor["fd_digits"]
    raw = sweep.make_scorer({"data": {"spec": "digits"}}, 100, extractor="raw")
    assert raw.metrics == ("fd_raw",) and raw.score(x)["fd_raw"] == pytest.approx(0.0, abs=1e-6)
