r"""FID of a trained model against a real image set, solver x NFE, under the standard protocol (Heusel et al. 2017).

FID is the Frechet distance between Gaussians fitted to Inception-v3 pool3 features (2048-d) of generated and real
images,

.. math:: \mathrm{FID} = \lVert\mu_g-\mu_r\rVert^2 + \operatorname{tr}\big(\Sigma_g+\Sigma_r
          - 2(\Sigma_g\Sigma_r)^{1/2}\big),

and the protocol that makes numbers comparable across papers (Heusel et al. 2017; Karras et al. 2022, EDM,
``fid.py``) is followed here:

* **features**: the TF-Inception of :mod:`sdeflow.evaluation.inception` with pytorch-fid's weight file (the user
  supplies it; nothing is downloaded); the file's SHA-256 is recorded;
* **quantisation**: generated images in [-1, 1] are rounded to 8 bits as an image file would store them,
  ``uint8 = clip(floor(127.5 x + 128), 0, 255)`` (EDM's ``generate.py``), and both real and generated 8-bit images
  enter the network as ``u / 255`` mapped to [-1, 1] (pytorch-fid's ``[0, 1]`` input, ``2 u/255 - 1``);
* **sample count**: ``n`` = 50,000 generated images per cell by default (FID is biased upward at small n, roughly
  like 1/n: compare only numbers with the same n);
* **reference statistics** from the whole real set (the training set, e.g. CIFAR-10's 50k), computed once and
  cached under a key that hashes the image files, the weight file and this protocol's version;
* **seeds**: every cell is drawn with three sampling seeds (0, 1, 2) and reports the mean and the standard deviation
  (ddof 1) over them;
* **streaming**: real and generated images pass through the network one batch at a time into a float64 running
  mean / scatter accumulator (:class:`~sdeflow.evaluation.metrics.StatsAccumulator`, Chan et al. 1979), so memory
  stays flat in n: one batch of images plus two D x D float64 matrices;
* **data floor**: FID between two disjoint random halves of the real set (three splits: mean +- std), accumulated in
  the same pass as the reference statistics. It is measured at n/2 per side, so it *overstates* what an exact sampler
  would score at n versus the full set; it says where "no better than real data" begins.

Models: an sdeflow checkpoint (:func:`~sdeflow.training.load_run`) or a diffusers model folder
(:func:`load_diffusers_model`, through :func:`sdeflow.integrations.from_diffusers`). The command is
``sdeflow bench --fid --images DIR_OR_NPZ --inception-weights FILE --ckpt CKPT`` (or ``make bench-gpu``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..denoiser import Denoiser
from .extractors import sha256_file
from .metrics import FeatureExtractor, GaussianStats, StatsAccumulator, frechet_distance

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_N",
    "DEFAULT_SEEDS",
    "FLOOR_SPLITS",
    "IMAGE_SUFFIXES",
    "ImageSet",
    "open_images",
    "to_uint8",
    "ReferenceStats",
    "reference_stats",
    "FIDScorer",
    "load_diffusers_model",
]

#: bump when anything that changes the reference statistics changes (the cache key includes it)
PROTOCOL_VERSION = 1
DEFAULT_N = 50_000
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
#: random half / half splits of the real set behind the data floor
FLOOR_SPLITS = 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------- images
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to 8-bit values as an image file stores them: ``clip(floor(127.5 x + 128), 0, 255)``
    (EDM's ``generate.py``), returned as float (0 ... 255 integers) on x's device. NaN maps to 0."""
    u = torch.nan_to_num(x.to(torch.float32), nan=-1.0) * 127.5 + 128.0
    return u.clamp(0.0, 255.0).floor()


class ImageSet:
    """A real image set read in batches of uint8 (B, C, H, W) tensors: a folder of image files (searched
    recursively, sorted paths; needs Pillow), a ``.npy`` file (memory-mapped) or a ``.npz`` file (its only array, or
    the one named ``x`` / ``images`` / ``arr_0``). Arrays must be uint8, laid out (N, H, W, C) or (N, C, H, W) with
    C in {1, 3}. Use :func:`open_images`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._array: np.ndarray | None = None
        self._files: list[Path] = []
        if self.path.is_dir():
            self._files = sorted(f for f in self.path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not self._files:
                raise ValueError(f"images={str(path)!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in that folder")
            try:
                from PIL import Image
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("reading an image folder needs Pillow: pip install 'sdeflow[fid]'") from err
            with Image.open(self._files[0]) as img:
                c = 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3
                self.shape: tuple[int, int, int] = (c, img.height, img.width)
            self.count = len(self._files)
        elif self.path.is_file() and self.path.suffix in (".npy", ".npz"):
            arr = self._load_array()
            if arr.dtype != np.uint8 or arr.ndim != 4:
                raise ValueError(
                    f"images={str(path)!r}: expected a uint8 array (N, H, W, C) or (N, C, H, W), got dtype "
                    f"{arr.dtype} and shape {arr.shape}; convert with (x * 255).round().astype(np.uint8)"
                )
            if arr.shape[3] in (1, 3) and arr.shape[1] not in (1, 3):
                arr = arr.transpose(0, 3, 1, 2)  # NHWC -> NCHW, still a view (memory-mapped for .npy)
            if arr.shape[1] not in (1, 3):
                raise ValueError(f"images={str(path)!r}: expected 1 or 3 channels, got shape {arr.shape}")
            self._array = arr
            self.shape = (int(arr.shape[1]), int(arr.shape[2]), int(arr.shape[3]))
            self.count = int(arr.shape[0])
        else:
            raise ValueError(f"images={str(path)!r} is neither a folder of images nor a .npy / .npz file")
        if self.count < 4:
            raise ValueError(f"images={str(path)!r}: FID needs at least 4 real images, found {self.count}")

    def _load_array(self) -> np.ndarray:
        if self.path.suffix == ".npy":
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        with np.load(self.path, allow_pickle=False) as f:
            keys = list(f.files)
            key = keys[0] if len(keys) == 1 else next((k for k in ("x", "images", "arr_0") if k in keys), None)
            if key is None:
                raise ValueError(f"images={str(self.path)!r} holds {keys}; name the image array x, images or arr_0")
            return f[key]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 (B, C, H, W) batches in file / array order; only one batch is in memory at a time."""
        for lo in range(0, self.count, batch_size):
            hi = min(lo + batch_size, self.count)
            if self._array is not None:
                yield torch.from_numpy(np.array(self._array[lo:hi], copy=True))  # a writable copy of the mmap slice
            else:
                yield torch.from_numpy(np.stack([self._read(f) for f in self._files[lo:hi]]))

    def _read(self, f: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(f) as img:
            arr = np.asarray(img.convert("L" if self.shape[0] == 1 else "RGB"), dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arr.shape != self.shape:
            raise ValueError(f"{f}: shape {arr.shape} differs from the first image's {self.shape}; resize the set")
        return arr

    def content_hash(self) -> str:
        """SHA-256 over the set's content: the file's bytes (.npy / .npz), or every image file's relative path and
        SHA-256 (a folder)."""
        if not self._files:
            return sha256_file(self.path)
        h = hashlib.sha256()
        for f in self._files:
            h.update(f"{f.relative_to(self.path).as_posix()}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()


def open_images(path: str | Path) -> ImageSet:
    """The real image set at ``path`` (a folder of images, a .npy or a .npz file of uint8 images)."""
    return ImageSet(path)


# ---------------------------------------------------------------------------------------------- features
def _extractor_hash(extractor: FeatureExtractor) -> str:
    digest = getattr(extractor, "sha256", None)
    if digest:
        return str(digest)
    if isinstance(extractor, torch.nn.Module):  # no weight file (random weights in tests): hash the state itself
        h = hashlib.sha256()
        for name, t in sorted(extractor.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    raise ValueError("the extractor has no sha256 and no state dict; cannot key the reference statistics cache")


def _extractor_device(extractor: FeatureExtractor) -> torch.device:
    if isinstance(extractor, torch.nn.Module):
        p = next(iter(extractor.parameters()), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


@torch.inference_mode()
def _features(extractor: FeatureExtractor, u8: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """pool3 features of 8-bit-valued images (any dtype), ``batch_size`` at a time, mapped to [-1, 1] first."""
    device = _extractor_device(extractor)
    for chunk in torch.split(u8, batch_size):
        x = chunk.to(device=device, dtype=torch.float32, non_blocking=True) * (2.0 / 255.0) - 1.0
        yield extractor(x)


class ReferenceStats:
    """Reference statistics of a real image set: ``stats`` (mean, covariance, n), the data floor's ``floor`` and
    ``floor_std`` (FID between random halves, see the module docstring), ``key`` (the cache key), ``path`` (the
    cache file, or None) and ``cached`` (whether it was read from the cache)."""

    def __init__(
        self, stats: GaussianStats, floor: float, floor_std: float, key: str, path: Path | None, cached: bool
    ) -> None:
        self.stats, self.floor, self.floor_std = stats, floor, floor_std
        self.key, self.path, self.cached = key, path, cached


def reference_stats(
    images: ImageSet | str | Path,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 250,
    cache_dir: str | Path | None = None,
    floor_splits: int = FLOOR_SPLITS,
    seed: int = 12345,
    progress: bool = False,
) -> ReferenceStats:
    """Inception statistics of a real image set, streamed, with the data floor; cached when ``cache_dir`` is given.

    The cache file ``cache_dir/fid_ref_<key[:16]>.npz`` is pytorch-fid's statistics layout (``mu``, ``sigma``, plus
    ``n``), usable by pytorch-fid itself; ``.json`` beside it holds the key and the floor. The key is the SHA-256 of
    (protocol version, the image set's content hash, the extractor's weight hash, floor splits, seed): any change to
    the images or the weights misses the cache.

    Args:
        images: the real set (:func:`open_images`). extractor: the FID Inception (or any image feature extractor).
        batch_size: images per forward pass. floor_splits: random half / half splits for the floor (0: none).
        seed: seeds the splits. progress: a tqdm bar over the batches.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(floor_splits, int) and floor_splits >= 0):
        raise ValueError(f"floor_splits must be an int >= 0, got {floor_splits!r}")
    imgs = images if isinstance(images, ImageSet) else open_images(images)
    parts = [f"v{PROTOCOL_VERSION}", imgs.content_hash(), _extractor_hash(extractor), str(floor_splits), str(seed)]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()
    cache: Path | None = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"fid_ref_{key[:16]}.npz"
        meta_path = cache.with_suffix(".json")
        if cache.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                nan = float("nan")
                floor = meta.get("floor")
                floor_std = meta.get("floor_std")
                return ReferenceStats(
                    GaussianStats.load(cache),
                    nan if floor is None else float(floor),
                    nan if floor_std is None else float(floor_std),
                    key,
                    cache,
                    True,
                )
    gen = torch.Generator().manual_seed(seed)
    # image i goes to half A of split k when masks[k, i]: exactly floor(count / 2) per half, drawn by permutation
    masks = torch.zeros(floor_splits, imgs.count, dtype=torch.bool)
    for k in range(floor_splits):
        masks[k, torch.randperm(imgs.count, generator=gen)[: imgs.count // 2]] = True
    full = StatsAccumulator()
    halves = [(StatsAccumulator(), StatsAccumulator()) for _ in range(floor_splits)]
    from tqdm.auto import tqdm

    lo = 0
    bar = tqdm(total=imgs.count, desc="reference features", disable=not progress, leave=False)
    for batch in imgs.batches(batch_size):
        feats = torch.cat(list(_features(extractor, batch, batch_size)))
        full.update(feats)
        for k, (a, b) in enumerate(halves):
            m = masks[k, lo : lo + batch.shape[0]].to(feats.device)
            a.update(feats[m])
            b.update(feats[~m])
        lo += batch.shape[0]
        bar.update(batch.shape[0])
    bar.close()
    stats = full.compute()
    values = [frechet_distance(a.compute(), b.compute()) for a, b in halves if a.n >= 2 and b.n >= 2]
    floor = float(np.mean(values)) if values else float("nan")
    floor_std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        stats.save(tmp)
        tmp.replace(cache)
        meta = {
            "key": key,
            "images": str(imgs.path),
            "count": imgs.count,
            "shape": list(imgs.shape),
            "extractor_sha256": parts[2],
            "protocol_version": PROTOCOL_VERSION,
            "floor": floor if math.isfinite(floor) else None,
            "floor_std": floor_std if math.isfinite(floor_std) else None,
            "floor_values": values,
        }
        cache.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return ReferenceStats(stats, floor, floor_std, key, cache, False)


class FIDScorer:
    """FID of generated images (in [-1, 1], quantised by :func:`to_uint8`) against :class:`ReferenceStats`; a
    :class:`~sdeflow.evaluation.sweep.StreamingScorer`: :meth:`score_batches` folds each batch of samples into a
    float64 accumulator and drops it.

    Args:
        extractor: the FID Inception (:func:`~sdeflow.evaluation.inception.load_fid_inception`), on its device.
        reference: the real set's statistics and floor (:func:`reference_stats`).
        batch_size: images per forward pass of the extractor. info: recorded in :meth:`describe`.
    """

    metrics: tuple[str, ...] = ("fid",)

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference: ReferenceStats,
        *,
        batch_size: int = 250,
        info: dict[str, Any] | None = None,
    ) -> None:
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.extractor, self.reference, self.batch_size = extractor, reference, batch_size
        self.info = dict(info or {})
        self.floor = {"fid": reference.floor} if math.isfinite(reference.floor) else {}
        self.floor_std = {"fid": reference.floor_std} if math.isfinite(reference.floor_std) else {}

    def score_batches(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        acc = StatsAccumulator()
        for x in batches:
            if not bool(torch.isfinite(x).all()):
                return {"fid": float("nan")}
            for f in _features(self.extractor, to_uint8(x), self.batch_size):
                acc.update(f)
        return {"fid": frechet_distance(acc.compute(), self.reference.stats)}

    def score(self, x: torch.Tensor) -> dict[str, float]:
        return self.score_batches([x])

    def describe(self) -> dict[str, Any]:
        ref = self.reference
        return {
            "kind": "FID: Inception-v3 pool3 features of 8-bit images",
            "metrics": {
                "fid": "Frechet distance of Gaussians fitted to Inception pool3 features (Heusel et al. 2017); "
                "samples quantised to uint8 = clip(floor(127.5 x + 128), 0, 255), fed as 2 u / 255 - 1"
            },
            "extractor": {"sha256": _extractor_hash(self.extractor), **self.info},
            "n_reference": ref.stats.n,
            "reference_cache": {"key": ref.key, "path": str(ref.path) if ref.path else None, "hit": ref.cached},
            "data_floor": "FID between two disjoint random halves of the real set (n/2 each), "
            f"{FLOOR_SPLITS} splits: mean +- std; overstates an exact sampler's FID at the full n",
            "protocol_version": PROTOCOL_VERSION,
        }


# ---------------------------------------------------------------------------------------------- models
def load_diffusers_model(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prediction: str | None = None,
) -> tuple[Denoiser, tuple[int, int, int]]:
    """A :class:`~sdeflow.Denoiser` and the sample shape (C, H, W) from a diffusers folder, through
    :func:`sdeflow.integrations.from_diffusers`.

    ``path`` is a pipeline folder (``unet/`` or ``transformer/`` beside ``scheduler/scheduler_config.json``) or a
    model folder (``config.json`` naming its ``_class_name``) with ``scheduler_config.json`` inside or in
    ``../scheduler/``. Unconditional image models only (``UNet2DModel`` and alike). Needs diffusers.
    """
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("--diffusers needs diffusers: pip install 'sdeflow[bench]'") from err
    from ..integrations import from_diffusers

    root = Path(path)
    model_dir = next((root / s for s in ("unet", "transformer") if (root / s / "config.json").is_file()), root)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"diffusers={str(path)!r}: no config.json in it nor in its unet/ or transformer/ folder")
    sched = next(
        (
            p
            for p in (
                root / "scheduler" / "scheduler_config.json",
                model_dir / "scheduler_config.json",
                model_dir.parent / "scheduler" / "scheduler_config.json",
            )
            if p.is_file()
        ),
        None,
    )
    if sched is None:
        raise ValueError(f"diffusers={str(path)!r}: no scheduler/scheduler_config.json (the training schedule)")
    class_name = json.loads((model_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"diffusers={str(path)!r}: diffusers has no model class {class_name!r}")
    model = cls.from_pretrained(model_dir)
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (int(cfg.in_channels), int(size), int(size))
    den = from_diffusers(model, json.loads(sched.read_text()), prediction=prediction)
    return den, shape
