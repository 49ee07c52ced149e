r"""Sample-quality metrics: Frechet distance / FID, KID, MMD and sliced Wasserstein.

* **Frechet distance** (Dowson & Landau 1982; FID, Heusel et al. 2017) between Gaussians fitted to two feature sets,

  .. math:: d^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
            - 2\operatorname{tr}\big(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}\big)^{1/2},

  the squared 2-Wasserstein distance between the two Gaussians. The trace term is computed in float64 from two
  *symmetric* eigendecompositions (of :math:`\Sigma_1`, then of the PSD matrix :math:`\Sigma_1^{1/2}\Sigma_2
  \Sigma_1^{1/2}`), never from a general matrix square root of the non-symmetric :math:`\Sigma_1\Sigma_2`: it is
  exact for singular covariances (fewer samples than dimensions, dead ReLU units) and has no imaginary part to discard.
  Eigenvalues within rounding of 0 are set to 0; clearly negative ones mean the input is not a covariance and raise.
* **Statistics** are accumulated in streaming batches (Chan, Golub & LeVeque 1979 pairwise update of the mean and the
  centred scatter matrix, float64, on the data's device), so millions of samples never sit in memory together.
* **FID** = Frechet distance of the features of a pluggable :class:`FeatureExtractor`: the TF-compatible Inception-v3
  pool3 features (:mod:`sdeflow.evaluation.inception`, user-supplied weights) or the offline digits CNN
  (:mod:`sdeflow.evaluation.extractors`).
* **KID** (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel :math:`k(x,y) = (x^\top y/d + 1)^3`,
  averaged over random subsets.
* **MMD^2** with a Gaussian kernel (Gretton et al. 2012, unbiased U-statistic) and the **sliced Wasserstein**
  distance (Rabin et al. 2011; Bonneel et al. 2015) for low-dimensional data, where raw samples are the features.

Every metric runs on the device of its inputs (GPU when the data or the extractor live there) and returns a Python
float: the one host synchronisation happens at the very end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "FeatureExtractor",
    "GaussianStats",
    "StatsAccumulator",
    "gaussian_stats",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "fid",
    "KIDResult",
    "kid",
    "mmd2",
    "sliced_wasserstein",
]

# Work on blocks of about this many float64 entries (128 MiB) in the pairwise and sliced computations.
_BLOCK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------- feature extractors
@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps a batch of samples (N, *data_shape) to features (N, D).

    An ``nn.Module`` (put it in eval mode and on the device you want) or a plain function both qualify. The
    metrics call it under ``torch.inference_mode()``, one batch at a time, on the batch's device.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


Data = torch.Tensor | Iterable[torch.Tensor]


def _extractor_device(extractor: object) -> torch.device | None:
    if isinstance(extractor, torch.nn.Module):
        for p in extractor.parameters():
            return p.device
        for b in extractor.buffers():
            return b.device
    return None


def _check_batch_size(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _feature_batches(
    data: Data,
    extractor: FeatureExtractor | None,
    batch_size: int,
    device: torch.device | str | None,
) -> Iterable[torch.Tensor]:
    """Yield (B, D) feature batches: ``data`` is one tensor (split along dim 0) or an iterable of batches (a
    DataLoader's ``(x, label)`` tuples give their first item). Batches move to ``device``, which defaults to the
    extractor's parameter device, else each batch's own device."""
    _check_batch_size(batch_size)
    if device is None:
        device = _extractor_device(extractor)
    batches = torch.split(data, batch_size) if isinstance(data, torch.Tensor) else data
    extract = _flatten if extractor is None else extractor
    with torch.inference_mode():
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            if not isinstance(batch, torch.Tensor):
                raise ValueError(f"data must be a tensor or an iterable of tensors, got a batch of {type(batch)}")
            if batch.shape[0] == 0:
                continue
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            feats = extract(batch)
            if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"the feature extractor must return (N, D) = ({batch.shape[0]}, D), got {tuple(feats.shape)}"
                )
            yield feats


def extract_features(
    data: Data,
    extractor: FeatureExtractor | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Features (N, D) of all of ``data`` (see :func:`feature_stats` for the arguments); ``extractor=None`` flattens."""
    feats = list(_feature_batches(data, extractor, batch_size, device))
    if not feats:
        raise ValueError("data is empty")
    return torch.cat(feats)


# ---------------------------------------------------------------------------------------------- Gaussian statistics
@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature distribution, from ``n`` samples (None when given directly).

    ``save``/``load`` use pytorch-fid's ``.npz`` layout (keys ``mu`` and ``sigma``), so its reference statistics
    load unchanged (``np.load(..., allow_pickle=False)``: a statistics file never executes code).
    """

    mean: torch.Tensor
    cov: torch.Tensor
    n: int | None = None

    def __post_init__(self) -> None:
        mean, cov = torch.as_tensor(self.mean), torch.as_tensor(self.cov)
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"mean must have shape (D,) and cov (D, D); got {tuple(mean.shape)} and {tuple(cov.shape)}"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GaussianStats:
        return GaussianStats(self.mean.to(device, dtype), self.cov.to(device, dtype), self.n)

    def save(self, path: str | Path) -> None:
        mu, sigma = self.mean.double().cpu().numpy(), self.cov.double().cpu().numpy()
        with open(path, "wb") as f:  # a file object: numpy appends no ".npz" to the name
            if self.n is None:
                np.savez(f, mu=mu, sigma=sigma)
            else:
                np.savez(f, mu=mu, sigma=sigma, n=np.asarray(self.n))

    @classmethod
    def load(cls, path: str | Path) -> GaussianStats:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path} holds {sorted(f.files)}; a statistics file needs the keys 'mu' and 'sigma'")
            n = int(f["n"]) if "n" in f else None
            return cls(torch.from_numpy(f["mu"]), torch.from_numpy(f["sigma"]), n)


class StatsAccumulator:
    r"""Streaming mean and covariance in float64 (Chan, Golub & LeVeque 1979).

    Each batch contributes its own mean :math:`m_b` and centred scatter :math:`C_b = (X_b - m_b)^\top(X_b - m_b)`;
    two partial results merge as :math:`M_2 \leftarrow M_2 + C_b + \delta\delta^\top n_a n_b / n`,
    :math:`\mu \leftarrow \mu + \delta\,n_b/n` with :math:`\delta = m_b - \mu`. No raw second moment
    :math:`\sum x x^\top - n\mu\mu^\top` is ever formed, so features with a large mean and a small spread keep their
    precision. State lives on the first batch's device; ``update`` never synchronises with the host.
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> StatsAccumulator:
        """Add a batch of shape (B, D) (or (B, *shape), flattened)."""
        x = _flatten(x).to(torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return self
        if self._mean is not None and x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature dimension changed from {self._mean.shape[0]} to {x.shape[1]}")
        mb = x.mean(0)
        xc = x - mb
        cb = xc.mT @ xc
        if self._mean is None or self._m2 is None:
            self._mean, self._m2, self.n = mb, cb, nb
            return self
        n = self.n + nb
        delta = (mb - self._mean).to(self._mean.device)
        self._mean = self._mean + delta * (nb / n)
        self._m2 = self._m2 + cb.to(self._m2.device) + torch.outer(delta, delta) * (self.n * nb / n)
        self.n = n
        return self

    def compute(self) -> GaussianStats:
        """Mean and unbiased covariance :math:`M_2/(n-1)` (as ``numpy.cov`` and pytorch-fid)."""
        if self.n < 2 or self._mean is None or self._m2 is None:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return GaussianStats(self._mean, self._m2 / (self.n - 1), self.n)


def gaussian_stats(x: torch.Tensor, batch_size: int = 65536) -> GaussianStats:
    """Mean and covariance of samples x (N, *shape) -> dimension D = prod(shape), streamed in batches."""
    _check_batch_size(batch_size)
    acc = StatsAccumulator()
    for xb in torch.split(x, batch_size):
        acc.update(xb)
    return acc.compute()


def feature_stats(
    data: Data,
    extractor: FeatureExtractor | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> GaussianStats:
    """Gaussian statistics of the features of ``data``, streamed: only one batch of features exists at a time.

    Args:
        data: samples (N, *data_shape), or an iterable of such batches (a generator of sampler outputs, a
            DataLoader) when they do not fit in memory.
        extractor: a :class:`FeatureExtractor`; None uses the flattened samples themselves.
        batch_size: batch size when ``data`` is one tensor.
        device: where extraction and accumulation run; default: the extractor's parameter device, else the data's.
    """
    acc = StatsAccumulator()
    for feats in _feature_batches(data, extractor, batch_size, device):
        acc.update(feats)
    return acc.compute()


# ---------------------------------------------------------------------------------------------- Frechet distance
def _psd_tolerance(rtol: float | None, dim: int, *dtypes: torch.dtype) -> float:
    """Relative size of the negative eigenvalues accepted as rounding error.

    Rounding each entry of a PSD matrix S by a relative ``eps`` moves its eigenvalues by at most
    ``eps * ||S||_F <= eps * sqrt(D) * lambda_max`` (Weyl); a factor 10 covers the computation itself, and 1e-9 the
    accumulated float64 sums of long streams. Anything larger is not a covariance.
    """
    if rtol is not None:
        if not (rtol >= 0 and math.isfinite(rtol)):
            raise ValueError(f"rtol must be a non-negative finite number, got {rtol}")
        return rtol
    eps = max(torch.finfo(dt if dt.is_floating_point else torch.float64).eps for dt in dtypes)
    return max(1e-9, 10.0 * math.sqrt(dim) * eps)


def _zero_tolerance(dim: int, *dtypes: torch.dtype) -> float:
    """Relative size below which an eigenvalue is indistinguishable from 0: the Weyl bound of the inputs' rounding
    (4 sqrt(D) eps(dtype)) plus that of the float64 eigendecomposition (D eps64). Eigenvalues this small are set to
    exactly 0: the square root is not Lipschitz at 0 and would turn rounding noise of 1e-16 into 1e-8."""
    eps = max(torch.finfo(dt if dt.is_floating_point else torch.float64).eps for dt in dtypes)
    return 4.0 * math.sqrt(dim) * eps + dim * torch.finfo(torch.float64).eps


def _psd_eigh(
    s: torch.Tensor,
    name: str,
    rtol: float,
    zero_rtol: float,
    scale: torch.Tensor | None = None,
    vectors: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigenvalues (and eigenvectors when ``vectors``) of a symmetric PSD matrix, rounding-level eigenvalues set to 0.

    Relative to ``scale`` (default: the largest |eigenvalue|): eigenvalues in [-zero_rtol, zero_rtol] become 0, ones
    in [-rtol, -zero_rtol) are clipped to 0, and one below -rtol (or an asymmetric ``s``) raises a ValueError.
    """
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} must be finite")
    asym = (s - s.mT).abs().max()
    sym = (s + s.mT) / 2
    w, v = torch.linalg.eigh(sym) if vectors else (torch.linalg.eigvalsh(sym), None)
    size = w.abs().max() if scale is None else scale
    size = torch.clamp(size, min=torch.finfo(torch.float64).tiny)
    if float(asym) > max(rtol, zero_rtol) * float(size) * max(1, s.shape[0]) ** 0.5:
        raise ValueError(f"{name} must be symmetric; max |S - S^T| = {float(asym):.3g}")
    if float(w.min()) < -rtol * float(size):
        raise ValueError(
            f"{name} is not positive semi-definite: eigenvalue {float(w.min()):.6g} is below "
            f"-rtol * {float(size):.6g} with rtol = {rtol:.3g} (not a rounding error)"
        )
    w = torch.where(w <= zero_rtol * size, torch.zeros_like(w), w)
    return w, v


def _as_stats(p: GaussianStats | torch.Tensor, name: str) -> GaussianStats:
    if isinstance(p, GaussianStats):
        return p
    if isinstance(p, torch.Tensor):
        return gaussian_stats(p)
    raise ValueError(f"{name} must be GaussianStats or a (N, D) tensor of samples, got {type(p)}")


def _linalg_device(t: torch.Tensor) -> torch.device:
    # float64 eigendecompositions are unavailable on MPS; everywhere else the stats stay where they are
    return torch.device("cpu") if t.device.type == "mps" else t.device


def frechet_distance(
    p: GaussianStats | torch.Tensor,
    q: GaussianStats | torch.Tensor,
    *,
    rtol: float | None = None,
) -> float:
    r"""Frechet distance :math:`d^2` between two Gaussians (Dowson & Landau 1982), the quantity behind FID.

    .. math:: d^2 = \lVert\mu_p-\mu_q\rVert^2 + \operatorname{tr}\Sigma_p + \operatorname{tr}\Sigma_q
              - 2\sum_i \sqrt{\lambda_i\big(\Sigma_p^{1/2}\Sigma_q\Sigma_p^{1/2}\big)}

    in float64, with :math:`\Sigma_p^{1/2} = V\operatorname{diag}(\sqrt{w})V^\top` from ``eigh`` and the eigenvalues
    of the symmetric PSD middle matrix from a second ``eigh`` (exact for singular covariances; symmetric in p and q up
    to rounding). Both covariances are first projected onto the PSD cone: eigenvalues within rounding of 0
    (:math:`|\lambda| \le (4\sqrt{D}\,\epsilon_{in} + D\epsilon_{64})\lambda_{\max}`) become exactly 0 (a square root
    turns rounding noise of 1e-16 into 1e-8), negative ones down to :math:`-\text{rtol}\cdot\lambda_{\max}` are
    clipped, and anything more negative means the input is not a covariance: ValueError (the analogue of
    pytorch-fid's imaginary-part check). The middle matrix gets the same treatment relative to
    :math:`\lambda_{\max}(\Sigma_p)\lambda_{\max}(\Sigma_q)`.

    Args:
        p, q: :class:`GaussianStats`, or sample sets (N, *shape) whose mean and covariance are computed.
        rtol: relative tolerance for negative eigenvalues; default ``max(1e-9, 10 sqrt(D) eps(dtype))`` with the
            covariances' own dtype (float32 covariances get a looser bound than float64 ones).

    Returns:
        :math:`d^2` as a float (clamped at 0: it is non-negative, and cancellation may leave about -1e-15 tr Sigma).
    """
    p, q = _as_stats(p, "p"), _as_stats(q, "q")
    if p.dim != q.dim:
        raise ValueError(f"p and q must have the same dimension, got {p.dim} and {q.dim}")
    tol = _psd_tolerance(rtol, p.dim, p.cov.dtype, q.cov.dtype)
    zero_tol = _zero_tolerance(p.dim, p.cov.dtype, q.cov.dtype)
    dev = _linalg_device(p.mean)
    mu1, s1 = p.mean.to(dev, torch.float64), p.cov.to(dev, torch.float64)
    mu2, s2 = q.mean.to(dev, torch.float64), q.cov.to(dev, torch.float64)

    w1, v1 = _psd_eigh(s1, "p's covariance", tol, zero_tol)
    assert v1 is not None  # vectors=True
    w2, _ = _psd_eigh(s2, "q's covariance", tol, zero_tol, vectors=False)
    sqrt_s1 = (v1 * w1.sqrt()) @ v1.mT
    middle = sqrt_s1 @ s2 @ sqrt_s1
    # the middle matrix is PSD up to q's clipped negatives (<= tol * lam_max(q) * lam_max(p)) and product rounding
    scale = w1.max() * w2.max()
    lam, _ = _psd_eigh(middle, "sqrt(S_p) S_q sqrt(S_p)", 2 * tol, zero_tol, scale=scale, vectors=False)
    trace_sqrt = lam.sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + w1.sum() + w2.sum() - 2 * trace_sqrt
    return max(float(d2), 0.0)


def fid(
    x: Data | GaussianStats,
    y: Data | GaussianStats,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    rtol: float | None = None,
) -> float:
    """Frechet Inception Distance (Heusel et al. 2017) with a pluggable feature extractor.

    ``x`` and ``y`` are samples (a tensor or an iterable of batches, streamed through ``extractor``) or precomputed
    :class:`GaussianStats` of the same extractor's features (e.g. reference statistics saved with
    ``GaussianStats.save``). With :func:`sdeflow.evaluation.inception.load_fid_inception` and pytorch-fid's weights this is the
    standard FID; with :func:`sdeflow.evaluation.extractors.digits_extractor` it is the offline digits FD.
    """
    px = x if isinstance(x, GaussianStats) else feature_stats(x, extractor, batch_size=batch_size, device=device)
    py = y if isinstance(y, GaussianStats) else feature_stats(y, extractor, batch_size=batch_size, device=device)
    return frechet_distance(px, py, rtol=rtol)


# ---------------------------------------------------------------------------------------------- kernel two-sample
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, kernel: Kernel, offdiag: bool = False) -> torch.Tensor:
    """Sum of kernel(a_i, b_j) over all pairs (over i != j when ``offdiag``, for b = a), in row blocks of a."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, b.shape[0]))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i0 in range(0, a.shape[0], rows):
        block = kernel(a[i0 : i0 + rows], b)
        if offdiag:
            r = torch.arange(block.shape[0], device=a.device)
            block[r, r + i0] = 0.0
        total = total + block.sum()
    return total


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    r"""Unbiased U-statistic :math:`\frac{1}{m(m-1)}\sum_{i\ne j}k(x_i,x_j) + \frac{1}{n(n-1)}\sum_{i\ne j}k(y_i,y_j)
    - \frac{2}{mn}\sum_{i,j}k(x_i,y_j)` (Gretton et al. 2012, Lemma 6), a 0-dim float64 tensor."""
    m, n = x.shape[0], y.shape[0]
    kxx = _kernel_sum(x, x, kernel, offdiag=True) / (m * (m - 1))
    kyy = _kernel_sum(y, y, kernel, offdiag=True) / (n * (n - 1))
    kxy = _kernel_sum(x, y, kernel) / (m * n)
    return kxx + kyy - 2 * kxy


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.mT
    return d.clamp_(min=0)


def _two_samples(
    x: torch.Tensor, y: torch.Tensor, min_n: int = 2, names: tuple[str, str] = ("x", "y")
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sample sets flattened to (N, D) float64 on x's device; raises ValueError (naming the argument) for
    non-tensors, unequal dimensions, too few samples, or NaN / inf entries (a metric of them would be NaN)."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"{names[0]} and {names[1]} must be tensors of samples (N, *shape)")
    x, y = _flatten(x).to(torch.float64), _flatten(y).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.shape[0] < min_n or y.shape[0] < min_n:
        raise ValueError(
            f"{names[0]} and {names[1]} need at least {min_n} samples each, got {x.shape[0]} and {y.shape[0]}"
        )
    for name, z in zip(names, (x, y)):
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"{name} must be finite: it holds NaN or inf")
    return x, y.to(x.device)


def _median_bandwidth(x: torch.Tensor, y: torch.Tensor, max_points: int = 1000) -> torch.Tensor:
    """Median pairwise distance of the pooled samples (up to ``max_points`` evenly spaced rows of each)."""

    def spaced(z: torch.Tensor) -> torch.Tensor:
        if z.shape[0] <= max_points:
            return z
        return z[torch.linspace(0, z.shape[0] - 1, max_points, device=z.device).long()]

    z = torch.cat([spaced(x), spaced(y)])
    d = _sq_dists(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    return torch.quantile(d[iu[0], iu[1]], 0.5).sqrt()  # interpolated median, as numpy's


def mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    bandwidth: float | Sequence[float] | None = None,
) -> float:
    r"""Unbiased squared maximum mean discrepancy with a Gaussian kernel (Gretton et al. 2012).

    :math:`k(x,y) = \sum_h \exp(-\lVert x-y\rVert^2 / 2h^2)` over the bandwidths h; the U-statistic estimator has
    expectation exactly :math:`\mathrm{MMD}^2` (0 when the two distributions agree), so it can be slightly negative.
    O(N^2) work in float64, in memory-bounded blocks, on the inputs' device.

    Args:
        x: (m, *shape) samples; y: (n, *shape) samples, m, n >= 2.
        bandwidth: one h, several (a sum of kernels), or None for the median heuristic: the median pairwise distance
            of the pooled samples (at most 1000 evenly spaced rows of each; deterministic).

    Returns:
        the estimate of MMD^2 as a float.
    """
    x, y = _two_samples(x, y)
    if bandwidth is None:
        hs = _median_bandwidth(x, y).clamp(min=torch.finfo(torch.float64).tiny).reshape(1)
    else:
        hs_list = [float(bandwidth)] if isinstance(bandwidth, (int, float)) else [float(h) for h in bandwidth]
        if not hs_list or not all(h > 0 and math.isfinite(h) for h in hs_list):
            raise ValueError(
                f"bandwidth must be a positive number, a non-empty sequence of them or None, got {bandwidth}"
            )
        hs = torch.tensor(hs_list, dtype=torch.float64, device=x.device)
    inv = 1.0 / (2 * hs.square())

    def gaussian(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = _sq_dists(a, b)
        return torch.exp(-d[..., None] * inv).sum(-1)

    return float(_mmd2_unbiased(x, y, gaussian))


class KIDResult(NamedTuple):
    """KID estimate: the mean of the subset MMD^2 values and their standard deviation (ddof = 1)."""

    mean: float
    std: float


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator)}")


def _gen_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def kid(
    x: Data,
    y: Data,
    extractor: FeatureExtractor | None = None,
    *,
    subsets: int = 100,
    subset_size: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> KIDResult:
    r"""Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 of features under the cubic kernel
    :math:`k(a,b) = (a^\top b / D + 1)^3`, averaged over ``subsets`` random subsets of ``subset_size`` samples of each
    set (drawn without replacement from ``generator``).

    Args:
        x, y: samples (or iterables of batches) passed through ``extractor`` (None: the samples themselves).
        subsets: number of subsets (>= 1); subset_size: default min(1000, N_x, N_y); at least 2 and at most that.
        generator: draws the subsets; same generator state, same result.

    Returns:
        :class:`KIDResult` (mean, std over subsets; std is nan for a single subset).
    """
    _check_generator(generator)
    if not (isinstance(subsets, int) and subsets >= 1):
        raise ValueError(f"subsets must be a positive int, got {subsets!r}")
    fx = extract_features(x, extractor, batch_size=batch_size, device=device)
    fy = extract_features(y, extractor, batch_size=batch_size, device=device)
    fx, fy = _two_samples(fx, fy, names=("x", "y") if extractor is None else ("x's features", "y's features"))
    nx, ny, d = fx.shape[0], fy.shape[0], fx.shape[1]
    m = min(1000, nx, ny) if subset_size is None else subset_size
    if not (isinstance(m, int) and 2 <= m <= min(nx, ny)):
        raise ValueError(f"subset_size must be an int in [2, min(N_x, N_y)] = [2, {min(nx, ny)}], got {subset_size!r}")

    def cubic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.mT / d + 1.0) ** 3

    gdev = _gen_device(generator, fx.device)
    values = []
    for _ in range(subsets):
        ix = torch.randperm(nx, generator=generator, device=gdev)[:m].to(fx.device)
        iy = torch.randperm(ny, generator=generator, device=gdev)[:m].to(fx.device)
        values.append(_mmd2_unbiased(fx[ix], fy[iy], cubic))
    v = torch.stack(values).cpu()
    std = float(v.std()) if subsets > 1 else float("nan")
    return KIDResult(float(v.mean()), std)


# ---------------------------------------------------------------------------------------------- sliced Wasserstein
def _wasserstein_1d_pp(xs: torch.Tensor, ys: torch.Tensor, p: float) -> torch.Tensor:
    r"""Sum over rows of :math:`W_p^p` between the empirical measures of sorted rows xs (L, n) and ys (L, m).

    :math:`W_p^p = \int_0^1 |F^{-1}(u) - G^{-1}(u)|^p du` with both quantile functions piecewise constant: exact on
    the merged breakpoints {i/n} U {j/m}, each interval evaluated at its midpoint.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return (xs - ys).abs().pow(p).mean(1).sum()
    dev = xs.device

    def grid(k: int) -> torch.Tensor:
        return torch.arange(1, k + 1, device=dev, dtype=torch.float64) / k

    levels = torch.cat([grid(n), grid(m)]).sort().values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - widths / 2
    ix = (mid * n).floor().long().clamp_(0, n - 1)
    iy = (mid * m).floor().long().clamp_(0, m - 1)
    return ((xs[:, ix] - ys[:, iy]).abs().pow(p) * widths).sum()


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_projections: int = 256,
    p: float = 2.0,
    generator: torch.Generator | None = None,
) -> float:
    r"""Sliced p-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015) between two sample sets.

    :math:`SW_p(\mu,\nu) = \big(E_{\theta\sim U(S^{d-1})} W_p^p(\theta_\#\mu, \theta_\#\nu)\big)^{1/p}`, the expectation
    over ``n_projections`` random directions (normalised Gaussian vectors from ``generator``), each 1-D distance exact
    between the projected empirical measures (sorting; unequal sample sizes handled by merging the quantile grids).
    For 1-D data this is the exact empirical :math:`W_p`; for :math:`N(m_1, s_1^2 I)` vs :math:`N(m_2, s_2^2 I)` in d
    dimensions :math:`SW_2^2 = \lVert m_1-m_2\rVert^2/d + (s_1-s_2)^2`.

    Args:
        x: (n, *shape) and y: (m, *shape) samples. n_projections: >= 1. p: >= 1.
        generator: draws the directions (on its own device); same generator state, same result.

    Returns:
        :math:`SW_p` as a float.
    """
    _check_generator(generator)
    if not (isinstance(n_projections, int) and n_projections >= 1):
        raise ValueError(f"n_projections must be a positive int, got {n_projections!r}")
    if not (p >= 1 and math.isfinite(p)):
        raise ValueError(f"p must be a finite number >= 1, got {p}")
    x, y = _two_samples(x, y, min_n=1)
    d = x.shape[1]
    gdev = _gen_device(generator, x.device)
    theta = torch.randn(n_projections, d, generator=generator, dtype=torch.float64, device=gdev).to(x.device)
    theta = theta / theta.norm(dim=1, keepdim=True)
    chunk = max(1, _BLOCK_ELEMENTS // (x.shape[0] + y.shape[0]))
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i0 in range(0, n_projections, chunk):
        th = theta[i0 : i0 + chunk]
        xs = (th @ x.mT).sort(dim=1).values
        ys = (th @ y.mT).sort(dim=1).values
        total = total + _wasserstein_1d_pp(xs, ys, p)
    return float(total / n_projections) ** (1.0 / p)
