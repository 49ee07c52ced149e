"""Metrics against independent oracles: closed-form Frechet distances, scipy's sqrtm and W1, naive MMD/KID sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from sdeflow.evaluation.metrics import (
    GaussianStats,
    StatsAccumulator,
    extract_features,
    feature_stats,
    fid,
    frechet_distance,
    gaussian_stats,
    kid,
    mmd2,
    sliced_wasserstein,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _stats(mu: np.ndarray, cov: np.ndarray) -> GaussianStats:
    return GaussianStats(torch.from_numpy(mu), torch.from_numpy(cov))


# ---------------------------------------------------------------------------------------------- Frechet distance
@pytest.mark.parametrize("rotate", [False, True], ids=["diagonal", "commuting"])
def test_frechet_commuting_closed_form(rotate: bool) -> None:
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: d^2 = |dmu|^2 + sum (sqrt a - sqrt b)^2."""
    rng, d = _rng(0), 24
    a, b = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
    q = _random_orthogonal(d, rng) if rotate else np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(_stats(mu1, (q * a) @ q.T), _stats(mu2, (q * b) @ q.T))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_non_commuting_vs_scipy_sqrtm() -> None:
    rng, d = _rng(1), 32
    A, B = rng.standard_normal((d, 2 * d)), rng.standard_normal((d, 2 * d))
    s1, s2 = A @ A.T / d, B @ B.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sq = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(sq)).max() < 1e-8  # the oracle itself is sound here
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(sq))
    got = frechet_distance(_stats(mu1, s1), _stats(mu2, s2))
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("r1,r2", [(5, 40), (3, 7), (64, 64)])
def test_frechet_singular_vs_nuclear_norm(r1: int, r2: int) -> None:
    """S_i = L_i L_i^T of rank r_i in d = 64: tr sqrt(S1^1/2 S2 S1^1/2) = ||L1^T L2||_* (same nonzero spectrum as
    S2 S1), an oracle from one SVD that needs no matrix square root and is exact for singular matrices."""
    rng, d = _rng(2), 64
    L1, L2 = rng.standard_normal((d, r1)), rng.standard_normal((d, r2)) * 0.3
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    nuclear = np.linalg.svd(L1.T @ L2, compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(L1**2) + np.sum(L2**2) - 2 * nuclear
    got = frechet_distance(_stats(mu1, L1 @ L1.T), _stats(mu2, L2 @ L2.T))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9 * np.sum(L1**2))


def test_frechet_symmetric_and_zero_on_itself() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(300, 16, generator=g, dtype=torch.float64) * 2 + 1
    px, py = gaussian_stats(x), gaussian_stats(y)
    d_xy, d_yx = frechet_distance(px, py), frechet_distance(py, px)
    assert d_xy > 1.0
    assert d_xy == pytest.approx(d_yx, rel=1e-12)
    tr = float(torch.trace(px.cov))
    assert frechet_distance(px, px) <= 1e-12 * tr
    assert frechet_distance(x, x) <= 1e-12 * tr  # sample sets are accepted directly
    # rank-deficient statistics (fewer samples than dimensions) of a set to itself
    few = x[:8]
    assert frechet_distance(few, few) <= 1e-12 * tr


def test_frechet_float32_statistics() -> None:
    """float32 covariances (a looser rounding tolerance) give the float64 answer to float32 accuracy."""
    rng, d = _rng(3), 48
    A, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = A @ A.T / d, B @ B.T / d
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ref = frechet_distance(_stats(mu1, s1), _stats(mu2, s2))
    p32 = GaussianStats(torch.tensor(mu1, dtype=torch.float32), torch.tensor(s1, dtype=torch.float32))
    q32 = GaussianStats(torch.tensor(mu2, dtype=torch.float32), torch.tensor(s2, dtype=torch.float32))
    assert frechet_distance(p32, q32) == pytest.approx(ref, rel=1e-4)


def test_frechet_rejects_invalid_covariances() -> None:
    d = 6
    good = GaussianStats(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    indefinite = torch.eye(d, dtype=torch.float64)
    indefinite[0, 0] = -1e-3
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(GaussianStats(torch.zeros(d), indefinite), good)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(good, GaussianStats(torch.zeros(d), indefinite))
    # a rounding-level negative eigenvalue is clipped, not an error: the distance equals the clipped matrix's
    tiny = torch.eye(d, dtype=torch.float64)
    tiny[0, 0] = -1e-14
    clipped = torch.eye(d, dtype=torch.float64)
    clipped[0, 0] = 0.0
    assert frechet_distance(GaussianStats(torch.zeros(d), tiny), good) == pytest.approx(
        frechet_distance(GaussianStats(torch.zeros(d), clipped), good), rel=1e-12
    )
    asym = torch.eye(d, dtype=torch.float64)
    asym[0, 1] = 0.5
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(GaussianStats(torch.zeros(d), asym), good)
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(good, GaussianStats(torch.zeros(d + 1), torch.eye(d + 1)))
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        GaussianStats(torch.zeros(d), torch.eye(d + 1))
    with pytest.raises(ValueError, match="rtol"):
        frechet_distance(good, good, rtol=-1.0)


# ---------------------------------------------------------------------------------------------- streaming statistics
def test_streaming_stats_match_numpy_two_pass() -> None:
    """Uneven batches (including single rows) of data with a mean 1e4 times its spread: the Chan et al. merge keeps
    full precision where a raw sum of squares would lose about 8 of float64's 16 digits."""
    rng = _rng(4)
    x = 1e4 + rng.standard_normal((1001, 7)) @ rng.standard_normal((7, 7))
    acc = StatsAccumulator()
    start = 0
    for size in [1, 2, 500, 1, 300, 197]:
        acc.update(torch.from_numpy(x[start : start + size]))
        start += size
    assert start == x.shape[0]
    st = acc.compute()
    assert st.n == x.shape[0]
    np.testing.assert_allclose(st.mean.numpy(), x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(st.cov.numpy(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_feature_stats_streams_batches_through_an_extractor() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(257, 3, 4, generator=g)  # float32 samples, data shape (3, 4)
    W = torch.randn(12, 5, generator=g)

    def extractor(batch: torch.Tensor) -> torch.Tensor:
        return batch.reshape(batch.shape[0], -1) @ W

    feats = extractor(x).double().numpy()
    for data in (x, iter(torch.split(x, 50)), [(b, None) for b in torch.split(x, 64)]):
        st = feature_stats(data, extractor, batch_size=32)
        np.testing.assert_allclose(st.mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(st.cov.numpy(), np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-5)
    assert extract_features(x, extractor, batch_size=100).shape == (257, 5)
    # fid(x, x) is zero and accepts precomputed statistics on either side
    st = feature_stats(x, extractor)
    assert fid(x, st, extractor) <= 1e-10 * float(torch.trace(st.cov))
    with pytest.raises(ValueError, match="batch_size"):
        feature_stats(x, extractor, batch_size=0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        feature_stats(x, lambda b: b.sum())


def test_stats_save_load_roundtrip(tmp_path) -> None:
    g = torch.Generator().manual_seed(6)
    st = gaussian_stats(torch.randn(40, 5, generator=g, dtype=torch.float64))
    st.save(tmp_path / "ref.npz")
    back = GaussianStats.load(tmp_path / "ref.npz")
    assert back.n == 40
    torch.testing.assert_close(back.mean, st.mean, rtol=0, atol=0)
    torch.testing.assert_close(back.cov, st.cov, rtol=0, atol=0)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        GaussianStats.load(tmp_path / "bad.npz")


def test_frechet_of_samples_converges_to_closed_form() -> None:
    """Sample estimates from N(0, diag(a)) and N(m, diag(b)) approach the closed form (finite-sample bias O(d/N))."""
    g = torch.Generator().manual_seed(7)
    d, n = 4, 200_000
    a = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    m = torch.tensor([1.0, -1.0, 0.0, 0.5], dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * a.sqrt()
    y = m + torch.randn(n, d, generator=g, dtype=torch.float64) * b.sqrt()
    expected = float(m.square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.02)


# ---------------------------------------------------------------------------------------------- MMD and KID
def _naive_mmd2(x: np.ndarray, y: np.ndarray, k) -> float:
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()


def _gauss_kernel(h: float):
    return lambda a, b: np.exp(-scipy.spatial.distance.cdist(a, b, "sqeuclidean") / (2 * h * h))


def test_mmd2_matches_naive_u_statistic() -> None:
    import scipy.spatial

    rng = _rng(8)
    x, y = rng.standard_normal((90, 3)), rng.standard_normal((70, 3)) + 0.3
    for h in (0.5, 2.0):
        assert mmd2(torch.from_numpy(x), torch.from_numpy(y), bandwidth=h) == pytest.approx(
            _naive_mmd2(x, y, _gauss_kernel(h)), rel=1e-10
        )
    both = _naive_mmd2(x, y, _gauss_kernel(0.5)) + _naive_mmd2(x, y, _gauss_kernel(2.0))
    assert mmd2(torch.from_numpy(x), torch.from_numpy(y), bandwidth=[0.5, 2.0]) == pytest.approx(both, rel=1e-10)
    # the median heuristic with all points (N < 1000) equals the oracle at that bandwidth
    z = np.concatenate([x, y])
    h = math.sqrt(np.median(scipy.spatial.distance.pdist(z, "sqeuclidean")))
    expected = _naive_mmd2(x, y, _gauss_kernel(h))
    assert mmd2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2(torch.from_numpy(x), torch.from_numpy(y), bandwidth=-1.0)
    with pytest.raises(ValueError, match="same dimension"):
        mmd2(torch.from_numpy(x), torch.from_numpy(y[:, :2]))


def test_mmd2_unbiased_under_null_and_positive_when_shifted() -> None:
    """Over R independent draws from one distribution the mean estimate is 0 within 4 standard errors, while the
    biased V-statistic (the diagonal kept) sits many standard errors above 0: the test can tell the two apart."""
    g = torch.Generator().manual_seed(9)
    R, n, h = 60, 100, 1.0
    u, v = [], []
    for _ in range(R):
        x = torch.randn(n, 2, generator=g, dtype=torch.float64)
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
        u.append(mmd2(x, y, bandwidth=h))
        k = lambda a, b: torch.exp(-torch.cdist(a, b).square() / (2 * h * h))
        v.append(float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))
    u, v = np.array(u), np.array(v)
    se = u.std(ddof=1) / math.sqrt(R)
    assert abs(u.mean()) < 4 * se
    assert v.mean() > 10 * se
    shifted = mmd2(x, torch.randn(n, 2, generator=g, dtype=torch.float64) + 1.0, bandwidth=h)
    assert shifted > 20 * u.std(ddof=1)


def test_kid_matches_naive_and_behaves() -> None:
    rng = _rng(10)
    d = 8
    x, y = rng.standard_normal((60, d)), rng.standard_normal((60, d)) + 0.5
    cubic = lambda a, b: (a @ b.T / d + 1.0) ** 3
    res = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=60)  # the full sets, any order
    assert res.mean == pytest.approx(_naive_mmd2(x, y, cubic), rel=1e-10)
    assert math.isnan(res.std)

    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(2000, d, generator=g), torch.randn(2000, d, generator=g)
    same = kid(a, b, subsets=50, subset_size=200, generator=torch.Generator().manual_seed(0))
    shifted = kid(a, b + 0.5, subsets=50, subset_size=200, generator=torch.Generator().manual_seed(0))
    assert abs(same.mean) < 4 * same.std / math.sqrt(50) + 1e-12
    assert shifted.mean > 20 * same.std
    again = kid(a, b, subsets=50, subset_size=200, generator=torch.Generator().manual_seed(0))
    assert again == same  # the generator fixes the subsets
    with pytest.raises(ValueError, match="subset_size"):
        kid(a, b, subset_size=5000)
    with pytest.raises(ValueError, match="subsets"):
        kid(a, b, subsets=0)


# ---------------------------------------------------------------------------------------------- sliced Wasserstein
def test_sliced_wasserstein_1d_gaussians_closed_form() -> None:
    """In 1-D, SW_2 is the empirical W_2, which approaches sqrt((m1 - m2)^2 + (s1 - s2)^2)."""
    g = torch.Generator().manual_seed(12)
    n, (m1, s1), (m2, s2) = 50_000, (0.0, 1.0), (1.0, 2.0)
    x = m1 + s1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = m2 + s2 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    got = sliced_wasserstein(x, y, n_projections=4, generator=g)
    assert got == pytest.approx(math.sqrt((m1 - m2) ** 2 + (s1 - s2) ** 2), rel=0.02)


def test_sliced_wasserstein_isotropic_gaussians_closed_form() -> None:
    """N(m1, s1^2 I) vs N(m2, s2^2 I) in d dims: every projection is a 1-D Gaussian pair, so
    SW_2^2 = E_theta[(theta . dm)^2] + (s1 - s2)^2 = |dm|^2 / d + (s1 - s2)^2."""
    g = torch.Generator().manual_seed(13)
    n, d = 4000, 3
    dm = torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = dm + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    got = sliced_wasserstein(x, y, n_projections=2000, generator=g)
    expected = math.sqrt(float(dm.square().sum()) / d + 0.25)
    assert got == pytest.approx(expected, rel=0.04)  # about 3.5 sigma of the projection Monte Carlo error
    assert sliced_wasserstein(x, x, generator=g) == 0.0


def test_sliced_wasserstein_unequal_sizes_vs_scipy_w1() -> None:
    """1-D, p = 1, sample sizes 37 and 50: the merged-quantile formula is exact; scipy's W1 is the oracle."""
    rng = _rng(14)
    x, y = rng.standard_normal(37), rng.exponential(size=50)
    got = sliced_wasserstein(torch.from_numpy(x[:, None]), torch.from_numpy(y[:, None]), n_projections=1, p=1.0)
    assert got == pytest.approx(scipy.stats.wasserstein_distance(x, y), rel=1e-12)
    # and for p = 2 against an explicit quantile-function integral on a fine grid
    u = (np.arange(200_000) + 0.5) / 200_000
    w2 = math.sqrt(np.mean((np.quantile(x, u, method="inverted_cdf") - np.quantile(y, u, method="inverted_cdf")) ** 2))
    got2 = sliced_wasserstein(torch.from_numpy(x[:, None]), torch.from_numpy(y[:, None]), n_projections=1)
    assert got2 == pytest.approx(w2, rel=1e-4)


def test_sliced_wasserstein_reproducible_and_validated() -> None:
    g = torch.Generator().manual_seed(15)
    x, y = torch.randn(300, 5, generator=g), torch.randn(200, 5, generator=g) + 0.2
    a = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(1))
    b = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(1))
    assert a == b > 0
    assert sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(1)) == pytest.approx(
        sliced_wasserstein(y, x, generator=torch.Generator().manual_seed(1)), rel=1e-12
    )
    for bad in ({"n_projections": 0}, {"p": 0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sliced_wasserstein(x, y, **bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize("metric", ["mmd2", "sliced_wasserstein", "kid", "frechet_distance"])
def test_metrics_reject_non_finite_samples(metric: str, which: str, bad: float) -> None:
    """A NaN or inf sample raises a ValueError naming the argument (never a NaN or inf score)."""
    g = torch.Generator().manual_seed(17)
    data = {"x": torch.randn(20, 3, generator=g, dtype=torch.float64), "y": torch.randn(30, 3, generator=g)}
    data[which][4, 1] = bad
    call = {
        "mmd2": lambda: mmd2(data["x"], data["y"]),
        "sliced_wasserstein": lambda: sliced_wasserstein(data["x"], data["y"]),
        "kid": lambda: kid(data["x"], data["y"], subsets=2, subset_size=10),
        # frechet_distance names the covariance fitted to p (= x) or q (= y)
        "frechet_distance": lambda: frechet_distance(data["x"], data["y"]),
    }[metric]
    name = {"x": "p", "y": "q"}[which] if metric == "frechet_distance" else which
    with pytest.raises(ValueError, match=rf"{name}\b.*finite|{name}'s covariance must be finite"):
        call()


def test_kid_with_extractor_names_the_features() -> None:
    g = torch.Generator().manual_seed(18)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    blow_up = lambda z: torch.where(z > 0, z, torch.full_like(z, float("nan")))  # an extractor that emits NaN
    with pytest.raises(ValueError, match="x's features must be finite"):
        kid(x, y, blow_up, subsets=2, subset_size=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(16)
    x, y = torch.randn(3000, 12, generator=g), torch.randn(2500, 12, generator=g) * 1.5 + 0.3
    xc, yc = x.cuda(), y.cuda()
    assert frechet_distance(xc, yc) == pytest.approx(frechet_distance(x, y), rel=1e-9)
    st = feature_stats(iter(torch.split(xc, 700)))
    assert st.mean.device.type == "cuda"
    assert frechet_distance(st, gaussian_stats(x)) == pytest.approx(0.0, abs=1e-9)
    assert mmd2(xc, yc, bandwidth=2.0) == pytest.approx(mmd2(x, y, bandwidth=2.0), rel=1e-9)
    gen = lambda: torch.Generator().manual_seed(0)
    assert sliced_wasserstein(xc, yc, generator=gen()) == pytest.approx(sliced_wasserstein(x, y, generator=gen()))
    assert kid(xc, yc, subsets=5, generator=gen()).mean == pytest.approx(kid(x, y, subsets=5, generator=gen()).mean)
