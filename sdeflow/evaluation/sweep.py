r"""NFE-versus-quality benchmark: sweep solvers x NFE on one model, score every sample set against reference data.

The question a user brings is "which solver, and how many network evaluations (NFE)?". For a trained
:class:`~sdeflow.Denoiser` this module draws ``n`` samples with every solver at every NFE budget, scores them, and
records what each cell cost: the NFE the Denoiser actually counted (``res.nfe``, never the solver's own arithmetic)
and the wall time.

**Protocol** (fixed, written into every output):

* every cell starts from the *same* prior noise x_T: the sampling generator is re-seeded with ``seed`` for each
  (solver, NFE) pair (common random numbers, so differences between cells are solver differences, not noise);
  with several ``seeds`` each cell is drawn once per seed and reports the mean and standard deviation over them;
* a scorer with ``score_batches`` (:class:`StreamingScorer`) receives the samples batch by batch, so memory stays
  flat in ``n`` (the FID sweep of :mod:`sdeflow.evaluation.fid_sweep`);
* budget-driven solvers take each NFE budget (a budget smaller than one step is skipped); tolerance-driven ones
  (adaptive step size: ``rk45``, ``adaptive_sde``, ``dpm_solver`` with ``adaptive=True`` ...) run at each tolerance
  rtol = atol and are plotted at the NFE they spent, tightening stops once that exceeds ``nfe_cap``;
* ``parallel`` is left out of the default list: it reproduces its base solver's samples (quality = the base's) and
  its ``res.nfe`` counts batched Picard rounds; benchmark it for wall time (``benchmarks/parallel.py``) or name it
  explicitly;
* the reference set and the metric parameters are fixed before the sweep: for 2-D data, ``n`` fresh draws from the
  data law with the reference seed (the training stream never sees that seed); the sliced Wasserstein directions, the
  MMD bandwidths (from the median distance of the reference set) and the reference mean/covariance are computed once;
  for images, the reference statistics of a feature extractor whose SHA-256 is recorded;
* the **data floor**: the same metrics for real data in place of samples (fresh independent draws of n for toys,
  random disjoint halves for finite data sets), mean and standard deviation over 5 draws: what an exact sampler
  would score from sampling noise alone. Differences between cells smaller than that spread are noise.

Metrics (:mod:`sdeflow.evaluation.metrics`): low-dimensional data (D <= 16) gets the sliced 2-Wasserstein distance
``sw2``, the unbiased multi-scale Gaussian-kernel ``mmd2`` and the Frechet distance ``fd`` of the raw coordinates;
images get the Frechet distance of features: ``fd_digits`` (the digits CNN), ``fid`` (Inception-v3, user-supplied
weights) or ``fd_raw``. Tables, plots and output files: :mod:`sdeflow.evaluation.report`.
"""

from __future__ import annotations

import ast
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import sample  # the public sdeflow.sample (sdeflow/__init__ never imports this package)
from ..denoiser import Denoiser
from ..solvers import available
from ..solvers.base import Solver, SolverError
from .metrics import GaussianStats, feature_stats, frechet_distance, gaussian_stats, mmd2, sliced_wasserstein

__all__ = [
    "DEFAULT_NFES",
    "DEFAULT_TOLERANCES",
    "EXCLUDED_BY_DEFAULT",
    "FLOOR_DRAWS",
    "MMD_SCALES",
    "LOW_DIM",
    "SolverSpec",
    "parse_solver",
    "default_solvers",
    "Scorer",
    "StreamingScorer",
    "LowDimScorer",
    "FeatureScorer",
    "make_scorer",
    "Cell",
    "SweepResult",
    "run_sweep",
    "budget_driven",
    "model_device_dtype",
]

DEFAULT_NFES: tuple[int, ...] = (5, 10, 20, 50, 100, 200, 500, 1000)
DEFAULT_TOLERANCES: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
#: solvers the default list leaves out, with the reason (written into the protocol)
EXCLUDED_BY_DEFAULT: dict[str, str] = {
    "parallel": "parallel-in-time Picard sampling reproduces its base solver's samples; its res.nfe counts batched "
    "rounds, so it is a wall-time benchmark (benchmarks/parallel.py), not an NFE-quality one",
}
#: the MMD kernel sums Gaussian kernels of bandwidths h, h/2, ..., h/2^(MMD_SCALES-1), h the median distance: the
#: median alone is blind to structure finer than the data's spread (a checkerboard and a uniform square agree)
MMD_SCALES = 4
#: independent real-vs-real draws behind the data floor's mean and standard deviation
FLOOR_DRAWS = 5
#: data up to this many dimensions is scored on its raw coordinates (sliced Wasserstein, MMD, Frechet)
LOW_DIM = 16


def _make_stepper(den: Denoiser, solver: str, **options: Any) -> Solver:
    from ..sampling import make_stepper

    return make_stepper(den, solver, **options)


# ---------------------------------------------------------------------------------------------- solver specs
@dataclass(frozen=True)
class SolverSpec:
    """A solver name and its options, written ``name`` or ``name:key=value,key=value`` (e.g. ``ddim:eta=1.0``,
    ``dpm_solver:order=3``, ``dpm_solver:adaptive=True``). ``label`` is that text, the row name in every output."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


def parse_solver(text: str) -> SolverSpec:
    """Parse ``name`` or ``name:key=value,...`` (values are Python literals; anything else stays a string).

    Raises ValueError for an unknown solver name (listing the allowed ones) or a malformed option.
    """
    name, _, rest = text.strip().partition(":")
    allowed = available()
    if name not in allowed:
        raise ValueError(f"solver={name!r} is not a solver; allowed values: {', '.join(allowed)}")
    options = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"solver options must be key=value, got {item!r} in {text!r}")
        try:
            parsed: Any = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = value.strip()
        options.append((key.strip(), parsed))
    return SolverSpec(name, tuple(options))


def default_solvers() -> list[SolverSpec]:
    """Every registered solver (``sdeflow.solvers.available()``, read at call time) but :data:`EXCLUDED_BY_DEFAULT`."""
    return [SolverSpec(name) for name in available() if name not in EXCLUDED_BY_DEFAULT]


def budget_driven(stepper: Solver) -> bool:
    """Whether a stepper's cost follows the NFE budget (a fixed grid of ``nfe // nfe_per_step`` steps), as opposed
    to an adaptive solver whose cost follows its tolerances. Decided from the solver's own declarations: its
    ``tolerances`` and whether ``num_steps`` grows with the budget."""
    if stepper.tolerances is not None:
        return False
    try:
        return stepper.num_steps(1000) > stepper.num_steps(100)
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- scorers
class Scorer(Protocol):
    """Scores a sample set against fixed reference data. ``metrics`` names the entries of :meth:`score` (the first
    is the primary one, plotted first and used for the summary grid); ``floor`` and ``floor_std`` hold the mean and
    standard deviation of the data-vs-data values over several independent real sets (empty when not computed)."""

    metrics: tuple[str, ...]
    floor: dict[str, float]
    floor_std: dict[str, float]

    def score(self, x: torch.Tensor) -> dict[str, float]: ...

    def describe(self) -> dict[str, Any]: ...


class StreamingScorer(Scorer, Protocol):
    """A :class:`Scorer` that also scores a sample set given batch by batch (``score_batches``), so that a sweep
    never holds more than one batch of samples (the FID sweep at 50k samples: :class:`sdeflow.evaluation.fid_sweep.
    FIDScorer`). :func:`run_sweep` uses ``score_batches`` whenever a scorer has it."""

    def score_batches(self, batches: Iterable[torch.Tensor]) -> dict[str, float]: ...


def _nan_scores(metrics: Iterable[str]) -> dict[str, float]:
    return {m: float("nan") for m in metrics}


def _mean_std(scores: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric mean and standard deviation (ddof = 1; nan for one draw) of a list of score dicts."""
    if not scores:
        return {}, {}
    table = torch.tensor([[s[k] for k in scores[0]] for s in scores], dtype=torch.float64)
    std = table.std(0) if len(scores) > 1 else torch.full((table.shape[1],), float("nan"), dtype=torch.float64)
    return dict(zip(scores[0], table.mean(0).tolist())), dict(zip(scores[0], std.tolist()))


class LowDimScorer:
    r"""Sliced 2-Wasserstein, unbiased MMD^2 and the Frechet distance of raw coordinates, against one reference set.

    Every parameter that could vary between cells is fixed here, once: the ``n_projections`` directions of the
    sliced distance (drawn from ``seed``, identical for every call), the MMD bandwidths (h, h/2, h/4, h/8 with h the
    median pairwise distance of the reference set: a sum of kernels, so that structure finer than the data's spread
    counts) and the reference mean and covariance.

    Args:
        reference: (N, *shape) reference samples.
        holdouts: independent real sample sets; the floor is the mean (and std) of their scores.
        n_projections: directions for ``sw2``. seed: seeds those directions.
    """

    metrics: tuple[str, ...] = ("sw2", "mmd2", "fd")

    def __init__(
        self,
        reference: torch.Tensor,
        holdouts: Sequence[torch.Tensor] = (),
        *,
        n_projections: int = 256,
        seed: int = 0,
    ) -> None:
        if reference.ndim < 2 or reference.shape[0] < 2:
            raise ValueError(f"reference must have shape (N >= 2, *shape), got {tuple(reference.shape)}")
        self.reference = reference.reshape(reference.shape[0], -1).to(torch.float64)
        self.n_projections, self.seed = n_projections, seed
        self.stats = gaussian_stats(self.reference)
        ref = self.reference
        sub = ref[torch.linspace(0, ref.shape[0] - 1, min(ref.shape[0], 1000)).long()]
        d = torch.cdist(sub, sub)
        iu = torch.triu_indices(sub.shape[0], sub.shape[0], offset=1)
        median = float(torch.quantile(d[iu[0], iu[1]], 0.5))
        self.bandwidths = tuple(median / 2**k for k in range(MMD_SCALES))
        if isinstance(holdouts, torch.Tensor):
            holdouts = [holdouts]
        self.floor, self.floor_std = _mean_std([self.score(h) for h in holdouts])

    def score(self, x: torch.Tensor) -> dict[str, float]:
        x = x.reshape(x.shape[0], -1).to(device=self.reference.device, dtype=torch.float64)
        if not bool(torch.isfinite(x).all()):
            return _nan_scores(self.metrics)
        gen = torch.Generator().manual_seed(self.seed)
        return {
            "sw2": sliced_wasserstein(x, self.reference, n_projections=self.n_projections, generator=gen),
            "mmd2": mmd2(x, self.reference, bandwidth=self.bandwidths),
            "fd": frechet_distance(x, self.stats),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "low-dimensional: raw coordinates",
            "metrics": {
                "sw2": f"sliced 2-Wasserstein, {self.n_projections} directions drawn from seed {self.seed}",
                "mmd2": "unbiased MMD^2, sum of Gaussian kernels with bandwidths h/2^k, k = 0.."
                f"{MMD_SCALES - 1}, h = {self.bandwidths[0]:.6g} the median distance of the reference set: "
                f"{[round(b, 6) for b in self.bandwidths]}",
                "fd": "Frechet distance of Gaussians fitted to the raw coordinates",
            },
            "n_reference": int(self.reference.shape[0]),
        }


class FeatureScorer:
    """Frechet distance of extractor features (FID-style) against reference statistics computed once.

    Args:
        extractor: a :class:`~sdeflow.metrics.FeatureExtractor` (its ``sha256`` attribute, when set, is recorded),
            or None for the flattened samples themselves.
        reference: (N, *shape) real data, or precomputed :class:`~sdeflow.metrics.GaussianStats`.
        holdouts: pairs (a, b) of disjoint real sets; the floor is the mean (and std) of FD(a, b) over the pairs.
        name: the metric's name (``fd_digits``, ``fid``, ``fd_raw``).
        batch_size, device: passed to :func:`~sdeflow.metrics.feature_stats`.
    """

    def __init__(
        self,
        extractor: Any,
        reference: torch.Tensor | GaussianStats,
        holdouts: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        *,
        name: str = "fd",
        batch_size: int = 500,
        device: torch.device | str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.extractor = extractor
        self.metrics: tuple[str, ...] = (name,)
        self.batch_size, self.device = batch_size, device
        self.info = dict(info or {})
        if isinstance(reference, GaussianStats):
            self.stats, self.n_reference = reference, reference.n
        else:
            self.stats, self.n_reference = self._stats(reference), int(reference.shape[0])
        if any(not (isinstance(p, (tuple, list)) and len(p) == 2) for p in holdouts):
            raise ValueError("holdouts must be a sequence of (a, b) pairs of real sample sets")
        pairs = [{name: frechet_distance(self._stats(a), self._stats(b))} for a, b in holdouts]
        self.floor, self.floor_std = _mean_std(pairs)

    def _stats(self, x: torch.Tensor) -> GaussianStats:
        return feature_stats(x, self.extractor, batch_size=self.batch_size, device=self.device)

    def score(self, x: torch.Tensor) -> dict[str, float]:
        if not bool(torch.isfinite(x).all()):
            return _nan_scores(self.metrics)
        return {self.metrics[0]: frechet_distance(self._stats(x), self.stats)}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "features",
            "metrics": {self.metrics[0]: "Frechet distance of Gaussians fitted to the extractor's features"},
            "extractor": {"sha256": getattr(self.extractor, "sha256", None), **self.info},
            "n_reference": self.n_reference,
        }


def make_scorer(
    config: dict[str, Any],
    n: int,
    *,
    seed: int = 12345,
    floor_draws: int = FLOOR_DRAWS,
    extractor: str = "auto",
    inception_weights: str | None = None,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
) -> LowDimScorer | FeatureScorer:
    """The scorer for a training run's data (``config["data"]["spec"]``, as written by ``sdeflow train``).

    * data drawn fresh from a law (2-D toys, ``gmm``): reference = ``n`` draws from a generator seeded by ``seed``;
      floor over ``floor_draws`` further independent sets of ``n`` draws from the same generator;
    * a finite data set: reference = all of it (for low-dimensional data: ``n`` points in a seeded random order);
      floor over ``floor_draws`` random splits into two disjoint halves (at most ``n`` points each);
    * low-dimensional data (D <= 16): :class:`LowDimScorer`; images: :class:`FeatureScorer` with ``extractor``:
      ``"auto"`` (digits CNN for ``digits``, Inception when ``inception_weights`` is given, else raw pixels),
      ``"digits"``, ``"inception"`` or ``"raw"``.
    """
    from ..training.data import SampledData, TensorData, make_data

    extractors = ("auto", "digits", "inception", "raw")
    if extractor not in extractors:
        raise ValueError(
            f"extractor={extractor!r} is not supported; allowed values: {', '.join(map(repr, extractors))}"
        )
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    if not (isinstance(floor_draws, int) and floor_draws >= 0):
        raise ValueError(f"floor_draws must be an int >= 0, got {floor_draws!r}")
    data_cfg = config.get("data", {})
    spec = data_cfg.get("spec")
    if spec is None:
        raise ValueError("the run config has no data spec (config['data']['spec']); cannot build reference data")
    data = make_data(spec, size=data_cfg.get("size"))
    dim = math.prod(data.data_shape)
    if dim <= LOW_DIM and extractor not in ("auto", "raw"):
        raise ValueError(f"extractor={extractor!r} is for images; {dim}-dimensional data is scored on its coordinates")
    gen = torch.Generator().manual_seed(seed)
    if isinstance(data, SampledData):
        reference = data.sample(n, gen)[0]
        if dim <= LOW_DIM:
            return LowDimScorer(reference, [data.sample(n, gen)[0] for _ in range(floor_draws)], seed=seed)
        pairs = [(data.sample(n, gen)[0], data.sample(n, gen)[0]) for _ in range(floor_draws)]
    else:
        if not isinstance(data, TensorData):
            raise ValueError(f"data={spec!r} is neither drawn from a law nor a finite data set")
        x = data.x
        half = x.shape[0] // 2
        perms = [torch.randperm(x.shape[0], generator=gen) for _ in range(max(floor_draws, 1))]
        pairs = [(x[p[:half][:n]], x[p[half : 2 * half][:n]]) for p in perms[:floor_draws]]
        reference = x
        if dim <= LOW_DIM:
            scorer = LowDimScorer(x[perms[0][:n]], seed=seed)
            scorer.floor, scorer.floor_std = _mean_std([LowDimScorer(a, seed=seed).score(b) for a, b in pairs])
            return scorer
    kind = extractor
    if kind == "auto":
        kind = "digits" if spec == "digits" else ("inception" if inception_weights else "raw")
    if kind == "digits":
        from .extractors import digits_extractor

        digits_net = digits_extractor(cache_dir, device=device)
        return FeatureScorer(
            digits_net,
            reference,
            pairs,
            name="fd_digits",
            device=device,
            info={"name": "digits CNN (sdeflow.evaluation.extractors)", "accuracy": digits_net.accuracy},
        )
    if kind == "inception":
        if not inception_weights:
            raise ValueError("extractor='inception' needs inception_weights (pytorch-fid's weight file)")
        from .inception import load_fid_inception

        inception_net = load_fid_inception(inception_weights, device=device)
        return FeatureScorer(
            inception_net,
            reference,
            pairs,
            name="fid",
            batch_size=100,
            device=device,
            info={"name": "FID Inception-v3 pool3", "weights": str(inception_weights)},
        )
    return FeatureScorer(None, reference, pairs, name="fd_raw", device=device, info={"name": "raw pixels"})


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass
class Cell:
    """One (solver, budget) point: ``budget`` is the requested NFE (budget-driven solvers) and ``tol`` the rtol =
    atol (tolerance-driven ones); ``nfe`` the net calls the Denoiser counted per batch (averaged over batches);
    ``seconds`` the wall time of sampling alone; ``status`` "ok", "skipped: ...", "error: ..." or "nonfinite"."""

    solver: str
    budget: int | None
    tol: float | None
    nfe: float | None = None
    seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class SweepResult:
    """The cells of a sweep (in run order), the scorer's metric names and floor, and kept samples
    ``samples[(solver label, budget or tol)]`` (the first ``keep`` of each cell from the first seed, on the CPU).
    With several ``seeds`` a cell's ``metrics[m]`` is the mean over the seeds and ``metrics[m + "_std"]`` their
    standard deviation (ddof = 1); the per-seed values are in ``Cell.stats`` as ``"m@seed=s"``."""

    cells: list[Cell]
    metrics: tuple[str, ...]
    floor: dict[str, float]
    nfes: tuple[int, ...]
    tolerances: tuple[float, ...]
    samples: dict[tuple[str, float], torch.Tensor] = field(default_factory=dict)
    floor_std: dict[str, float] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)

    def by_solver(self) -> dict[str, list[Cell]]:
        out: dict[str, list[Cell]] = {}
        for c in self.cells:
            out.setdefault(c.solver, []).append(c)
        return out


def _scalar_stats(stats: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in stats.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device_dtype(den: Denoiser) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the net's first parameter; (cpu, float32) for a plain function or a net without any."""
    net = den.net
    param = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def _sample_batches(
    den: Denoiser,
    spec: SolverSpec,
    shape: tuple[int, ...],
    n: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    budget: int | None,
    tol: float | None,
    tally: dict[str, Any],
) -> Iterator[torch.Tensor]:
    """Yield the n samples of one cell batch by batch (on the sampling device), adding to ``tally`` the net calls
    (``calls``), batches, sampling seconds (the consumer's work between batches is not timed) and the scalar stats
    of the last batch."""
    gen = torch.Generator(device).manual_seed(seed)
    opts = spec.kwargs
    if tol is not None:
        opts.update(rtol=tol, atol=tol)
    for lo in range(0, n, batch_size):
        b = min(batch_size, n - lo)
        _sync(device)
        start = time.perf_counter()
        res = sample(
            den,
            solver=spec.name,
            nfe=budget if budget is not None else 1,
            shape=(b, *shape),
            generator=gen,
            dtype=dtype,
            device=device,
            **opts,
        )
        _sync(device)
        tally["seconds"] = tally.get("seconds", 0.0) + time.perf_counter() - start
        tally["calls"] = tally.get("calls", 0) + res.nfe
        tally["batches"] = tally.get("batches", 0) + 1
        tally["stats"] = _scalar_stats(res.stats)
        yield res.x.detach()


def _score_cell(
    scorer: Scorer,
    batches: Iterator[torch.Tensor],
    keep: int,
) -> tuple[dict[str, float], bool, torch.Tensor | None]:
    """Score one sample set: (metrics, every sample finite, the first ``keep`` samples on the CPU or None).

    A scorer with ``score_batches`` (a :class:`StreamingScorer`) sees the batches one at a time, so no more than one
    batch of samples exists at once; any other scorer gets them concatenated on the CPU."""
    finite = True
    kept: list[torch.Tensor] = []
    n_kept = 0

    def watch(stream: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        nonlocal finite, n_kept
        for x in stream:
            finite = finite and bool(torch.isfinite(x).all())
            if n_kept < keep:
                kept.append(x[: keep - n_kept].cpu().clone())
                n_kept += kept[-1].shape[0]
            yield x

    score_batches = getattr(scorer, "score_batches", None)
    if callable(score_batches):
        metrics = dict(score_batches(watch(batches)))
    else:
        x = torch.cat([b.cpu() for b in watch(batches)])
        metrics = scorer.score(x)
    if not finite:
        metrics = _nan_scores(scorer.metrics)
    return metrics, finite, (torch.cat(kept) if kept else None)


def run_sweep(
    den: Denoiser,
    scorer: Scorer,
    data_shape: Sequence[int],
    *,
    solvers: Sequence[SolverSpec | str] | None = None,
    nfes: Sequence[int] = DEFAULT_NFES,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    nfe_cap: float | None = None,
    n: int = 2000,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    keep: int = 0,
    progress: bool = True,
) -> SweepResult:
    """Sample with every solver at every budget (or tolerance) and score each sample set.

    Args:
        den: the model. scorer: see :func:`make_scorer`. data_shape: the per-sample shape.
        solvers: :class:`SolverSpec` or ``"name:key=value"`` strings; default :func:`default_solvers` (every solver
            registered when called, but ``parallel``).
        nfes: the NFE budgets of budget-driven solvers. tolerances: rtol = atol values of tolerance-driven solvers,
            loosest first; tightening stops once a cell spends more than ``nfe_cap`` (default 2 * max(nfes)).
        n: samples per cell; seed: the sampling seed, the same for every cell (same x_T everywhere).
        seeds: several sampling seeds instead of ``seed`` (e.g. ``(0, 1, 2)``, FID's usual three): every cell is
            drawn once per seed and reports the mean and the standard deviation over the seeds (``m + "_std"``).
        batch_size: samples per solver call (default n). device, dtype: default the net's parameters'.
        keep: keep the first ``keep`` samples of every cell in ``SweepResult.samples`` (for plots).
        progress: a tqdm bar over the cells (on stderr).

    Returns:
        :class:`SweepResult`. A solver that cannot run on this model (an impossible pairing) or fails at some budget
        gets cells with an "error: ..." status rather than stopping the sweep.
    """
    nfes = tuple(sorted({int(v) for v in nfes}))
    if not nfes or nfes[0] < 1:
        raise ValueError(f"nfes must be positive integers, got {nfes}")
    tolerances = tuple(sorted({float(v) for v in tolerances}, reverse=True))
    if any(not (0 < v < 1) for v in tolerances):
        raise ValueError(f"tolerances must lie in (0, 1), got {tolerances}")
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    seeds = (int(seed),) if seeds is None else tuple(int(v) for v in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one, got {seeds}")
    batch_size = n if batch_size is None else batch_size
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cap = 2.0 * max(nfes) if nfe_cap is None else float(nfe_cap)
    specs = [
        parse_solver(s) if isinstance(s, str) else s for s in (solvers if solvers is not None else default_solvers())
    ]
    net_device, net_dtype = model_device_dtype(den)
    device = torch.device(device) if device is not None else net_device
    dtype = dtype if dtype is not None else net_dtype
    shape = tuple(int(s) for s in data_shape)

    plan: list[tuple[SolverSpec, int | None, float | None]] = []
    kinds: dict[str, str | Exception] = {}
    for spec in specs:
        try:
            stepper = _make_stepper(den, spec.name, **spec.kwargs)
        except (ValueError, TypeError) as err:
            kinds[spec.label] = err
            plan.append((spec, None, None))
            continue
        if budget_driven(stepper):
            kinds[spec.label] = "budget"
            plan += [(spec, b, None) for b in nfes]
        elif "rtol" in stepper.opts:
            kinds[spec.label] = "tolerance"
            plan += [(spec, None, t) for t in tolerances]
        else:
            kinds[spec.label] = ValueError("neither budget- nor tolerance-driven")
            plan.append((spec, None, None))

    # one tiny solve first, so that one-time costs (lazy initialisation, allocator warm-up) land on no cell
    sample(
        den,
        solver="euler",
        nfe=2,
        shape=(2, *shape),
        generator=torch.Generator(device).manual_seed(0),
        dtype=dtype,
        device=device,
    )

    from tqdm.auto import tqdm

    cells: list[Cell] = []
    samples: dict[tuple[str, float], torch.Tensor] = {}
    over_cap: set[str] = set()
    bar = tqdm(plan, desc="bench", disable=not progress, leave=False)
    for spec, budget, tol in bar:
        label = spec.label
        kind = kinds[label]
        bar.set_description(f"{label} " + (f"nfe {budget}" if budget is not None else f"tol {tol:g}" if tol else ""))
        if isinstance(kind, Exception):
            cells.append(Cell(label, None, None, status=f"error: {kind}"))
            continue
        if tol is not None and label in over_cap:
            cells.append(Cell(label, None, tol, status=f"skipped: a looser tolerance already spent > {cap:g} NFE"))
            continue
        per_seed: list[dict[str, float]] = []
        finite, nfe, seconds, stats = True, 0.0, 0.0, {}
        try:
            for k, sd in enumerate(seeds):
                tally: dict[str, Any] = {}
                batches = _sample_batches(den, spec, shape, n, batch_size, sd, device, dtype, budget, tol, tally)
                metrics, ok, kept = _score_cell(scorer, batches, keep if k == 0 else 0)
                finite = finite and ok
                per_seed.append(metrics)
                nfe += tally["calls"] / tally["batches"] / len(seeds)
                seconds += tally["seconds"] / len(seeds)
                stats = tally["stats"]
                if kept is not None:
                    samples[(label, budget if budget is not None else tol)] = kept
        except ValueError as err:
            status = f"skipped: {err}" if "too small" in str(err) else f"error: {err}"
            cells.append(Cell(label, budget, tol, status=status))
            continue
        except SolverError as err:
            cells.append(Cell(label, budget, tol, status=f"error: {err}"))
            continue
        mean, std = _mean_std(per_seed)
        metrics = dict(mean)
        if len(seeds) > 1:
            metrics.update({f"{m}_std": v for m, v in std.items()})
            for sd, values in zip(seeds, per_seed):
                stats.update({f"{m}@seed={sd}": v for m, v in values.items()})
        status = "ok" if finite else "nonfinite"
        cells.append(Cell(label, budget, tol, nfe, seconds, metrics, status, stats))
        if tol is not None and nfe > cap:
            over_cap.add(label)
        primary = scorer.metrics[0]
        bar.set_postfix({primary: f"{metrics[primary]:.3g}", "nfe": f"{nfe:g}"})
    bar.close()
    return SweepResult(
        cells,
        tuple(scorer.metrics),
        dict(scorer.floor),
        nfes,
        tolerances,
        samples,
        dict(getattr(scorer, "floor_std", {})),
        seeds,
    )
