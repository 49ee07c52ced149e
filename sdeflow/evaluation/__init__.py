"""Evaluation: sample-quality metrics, feature extractors and the NFE-versus-quality sweep.

* :mod:`.metrics`: Frechet distance / FID, KID, MMD^2, sliced Wasserstein, streaming Gaussian statistics.
* :mod:`.extractors`: the hash-verified offline digits CNN and SHA-256 helpers; :mod:`.inception`: the TF-compatible
  FID Inception-v3 (user-supplied weights).
* :mod:`.sweep`: every solver x every NFE budget (or tolerance) on one model, scored against fixed reference data.
* :mod:`.report`: markdown tables, the metric-versus-NFE plot and the output files of a sweep.

Only the metrics are imported here; the extractors, the Inception net, the sweep and its report load on first use
(``from sdeflow.evaluation import sweep``).
"""

from .metrics import (
    FeatureExtractor,
    GaussianStats,
    KIDResult,
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
