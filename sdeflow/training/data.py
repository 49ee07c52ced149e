r"""Training data: 2-D toys, Gaussian-mixture samples, scikit-learn's digits, tensors, .npy files, image folders.

Scaling conventions (what the nets see; samples come back in the same units):

* **2-D toys** are drawn fresh for every batch and scaled by constants fixed from their generating law so that each
  coordinate has mean ~0 and variance ~1 (the range suits the VP prior N(0, I); pick ``sigma_max`` of a VE SDE of a
  few units). Constants per toy are in :func:`toy_2d`'s docstring.
* **GaussianMixture** samples are used as they are (the mixture is the exact oracle, so no rescaling).
* **Images** (digits, uint8 arrays, image folders) are mapped from their integer range to [-1, 1]:
  digits ``x / 16 * 2 - 1`` (pixel values 0..16), 8-bit images ``x / 255 * 2 - 1``; layout (N, C, H, W).
  :func:`to_unit_range` maps back to [0, 1] for display.
* **Float tensors / float .npy arrays** are used as they are: standardise them yourself (unit variance suits VP).

Every source samples batches with a ``torch.Generator`` (toys: fresh draws; finite data: indices drawn with
replacement), so a run's data stream is a function of the generator state alone and resumes bit-exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..analytic import GaussianMixture

__all__ = [
    "TOYS",
    "toy_2d",
    "default_gmm",
    "DataSource",
    "SampledData",
    "TensorData",
    "load_digits",
    "load_npy",
    "load_image_folder",
    "make_data",
    "to_unit_range",
]

TOYS = ("8gaussians", "checkerboard", "moons", "swissroll", "2spirals", "rings")


def _u(n: int, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def _z(n: int, g: torch.Generator | None, d: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _polar(r: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)


def _eight_gaussians(n: int, g: torch.Generator | None) -> torch.Tensor:
    # centers on a circle of radius R, std 0.1: Var per coordinate = R^2 / 2 + 0.01 = 1
    k = torch.randint(8, (n,), generator=g).to(torch.float64)
    return _polar(torch.full((n,), math.sqrt(1.98), dtype=torch.float64), k * (2 * math.pi / 8)) + 0.1 * _z(n, g)


def _checkerboard(n: int, g: torch.Generator | None) -> torch.Tensor:
    # 8 of the 16 unit squares of [-2, 2]^2, alternating; each coordinate is U[-2, 2] (Var 4/3), scaled by sqrt(3)/2
    x1 = 4 * _u(n, g) - 2
    x2 = _u(n, g) - 2 * torch.randint(2, (n,), generator=g).to(torch.float64) + torch.remainder(torch.floor(x1), 2)
    return torch.stack([x1, x2], dim=1) * (math.sqrt(3) / 2)


def _moons(n: int, g: torch.Generator | None) -> torch.Tensor:
    # upper moon (cos th, sin th), lower moon (1 - cos th, 1/2 - sin th), th ~ U[0, pi], noise std 0.05.
    # Exact moments: mean (1/2, 1/4), Var x = 3/4, Var y = 9/16 - 1/pi (plus the noise variance).
    th = math.pi * _u(n, g)
    lower = torch.randint(2, (n,), generator=g).to(torch.float64)
    x = torch.where(lower > 0, 1 - torch.cos(th), torch.cos(th))
    y = torch.where(lower > 0, 0.5 - torch.sin(th), torch.sin(th))
    pts = torch.stack([x, y], dim=1) + 0.05 * _z(n, g)
    mean = torch.tensor([0.5, 0.25], dtype=torch.float64)
    std = torch.tensor([math.sqrt(0.75 + 0.0025), math.sqrt(9 / 16 - 1 / math.pi + 0.0025)], dtype=torch.float64)
    return (pts - mean) / std


def _swissroll(n: int, g: torch.Generator | None) -> torch.Tensor:
    # th ~ U[1.5 pi, 4.5 pi], r = th / (4.5 pi) in [1/3, 1]: Var per coordinate ~ E r^2 / 2 = 13/54; scale 2.
    # Exact mean of r (cos th, sin th): (int th cos th, int th sin th) / (3 pi * 4.5 pi) = (6 pi, 2) / (13.5 pi^2).
    th = 1.5 * math.pi * (1 + 2 * _u(n, g))
    mean = torch.tensor([6 * math.pi, 2.0], dtype=torch.float64) / (13.5 * math.pi**2)
    return 2.0 * (_polar(th / (4.5 * math.pi), th) - mean) + 0.05 * _z(n, g)


def _two_spirals(n: int, g: torch.Generator | None) -> torch.Tensor:
    # r = sqrt(u), th = 3 pi r, the second spiral is the first rotated by pi: Var per coordinate ~ E r^2 / 2 = 1/4
    r = torch.sqrt(_u(n, g))
    sign = 2 * torch.randint(2, (n,), generator=g).to(torch.float64) - 1
    return 2.0 * sign[:, None] * _polar(r, 3 * math.pi * r) + 0.05 * _z(n, g)


def _rings(n: int, g: torch.Generator | None) -> torch.Tensor:
    # 4 concentric circles of radius R k / 4, k = 1..4: Var per coordinate = R^2 (1+4+9+16) / 128 = 1
    k = torch.randint(1, 5, (n,), generator=g).to(torch.float64)
    radius = math.sqrt(128 / 30) * k / 4
    return _polar(radius, 2 * math.pi * _u(n, g)) + 0.03 * _z(n, g)


_TOY_FNS: dict[str, Callable[[int, torch.Generator | None], torch.Tensor]] = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "moons": _moons,
    "swissroll": _swissroll,
    "2spirals": _two_spirals,
    "rings": _rings,
}


def toy_2d(
    name: str,
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n samples (n, 2) of a 2-D toy distribution, each coordinate of mean ~0 and variance ~1.

    ``"8gaussians"`` (8 modes of std 0.1 on a circle of radius sqrt(1.98)), ``"checkerboard"`` (uniform on 8 of the
    16 squares of [-2, 2]^2, scaled by sqrt(3)/2), ``"moons"`` (two half circles, noise 0.05, standardised with the
    exact moments), ``"swissroll"`` (radius th/(4.5 pi), th in [1.5 pi, 4.5 pi], centred on its exact mean, scaled by 2, noise 0.05),
    ``"2spirals"`` (two interleaved spirals, scaled by 2, noise 0.05), ``"rings"`` (4 concentric circles, outer radius
    sqrt(128/30), noise 0.03). Drawn in float64 on CPU from ``generator`` (a CPU generator), then cast.
    """
    if name not in _TOY_FNS:
        raise ValueError(f"name={name!r} is not a toy; allowed values: {', '.join(map(repr, TOYS))}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _TOY_FNS[name](n, generator).to(dtype=dtype, device=device)


def default_gmm() -> GaussianMixture:
    """The 2-D Gaussian mixture behind ``--data gmm``: 3 unequal, anisotropic components (an exact oracle)."""
    means = torch.tensor([[-1.5, -0.5], [1.2, -1.0], [0.2, 1.4]], dtype=torch.float64)
    stds = torch.tensor([[0.35, 0.25], [0.3, 0.5], [0.45, 0.2]], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map images from the training range [-1, 1] to [0, 1] (clamped) for display or saving."""
    return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------- sources
class DataSource(Protocol):
    """What the trainer needs from data: per-sample shape, label count, generator-driven batches, a config."""

    data_shape: tuple[int, ...]
    num_classes: int | None

    def sample(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def config(self) -> dict[str, Any]: ...


class SampledData:
    """An infinite source: ``fn(n, generator) -> (n, *data_shape)`` draws fresh samples for every batch."""

    def __init__(
        self,
        fn: Callable[[int, torch.Generator | None], torch.Tensor],
        data_shape: tuple[int, ...],
        spec: dict[str, Any],
    ) -> None:
        self.fn, self.data_shape, self.spec = fn, tuple(data_shape), dict(spec)
        self.num_classes: int | None = None

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, None]:
        x = self.fn(batch, generator)
        return x.to(torch.float32), None

    def config(self) -> dict[str, Any]:
        return {**self.spec, "data_shape": list(self.data_shape), "num_classes": None}


class TensorData:
    """A finite data set (N, *data_shape) with optional integer labels (N,); batches drawn with replacement.

    ``num_classes`` defaults to ``max(y) + 1``. Sampling with replacement keeps the data stream a pure function of
    the generator (no epoch state), which makes resuming exact.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        num_classes: int | None = None,
        spec: dict[str, Any] | None = None,
    ) -> None:
        x = torch.as_tensor(x)
        if x.ndim < 2 or x.shape[0] < 1:
            raise ValueError(f"x must have shape (N, *data_shape) with N >= 1, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point (scale integer images first, see load_npy), got {x.dtype}")
        if y is not None:
            y = torch.as_tensor(y)
            if y.shape != (x.shape[0],) or y.is_floating_point():
                raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {tuple(y.shape)} {y.dtype}")
            y = y.long()
            if int(y.min()) < 0:
                raise ValueError("y must be non-negative class labels")
            if num_classes is None:
                num_classes = int(y.max()) + 1
            elif int(y.max()) >= num_classes:
                raise ValueError(f"labels reach {int(y.max())} but num_classes={num_classes}")
        self.x, self.y = x, y
        self.num_classes = num_classes if y is not None else None
        self.data_shape = tuple(x.shape[1:])
        self.spec = dict(spec or {"name": "tensor"})

    def __len__(self) -> int:
        return self.x.shape[0]

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(len(self), (batch,), generator=generator)
        return self.x[idx], (self.y[idx] if self.y is not None else None)

    def config(self) -> dict[str, Any]:
        return {**self.spec, "data_shape": list(self.data_shape), "num_classes": self.num_classes}


# ---------------------------------------------------------------------------------------------------- loaders
def _images_to_signed(x: np.ndarray, maximum: float) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / maximum * 2 - 1)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits (Alpaydin & Kaynak 1998): x (1797, 1, 8, 8) in [-1, 1], y (1797,).

    Ships inside scikit-learn (no download); install the ``digits`` extra: ``pip install sdeflow[digits]``.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'sdeflow[digits]'") from err
    bunch = _load()
    x = _images_to_signed(np.asarray(bunch.images, dtype=np.float64), 16.0).reshape(-1, 1, 8, 8)
    return x, torch.as_tensor(bunch.target, dtype=torch.long)


def load_npy(path: str | os.PathLike) -> torch.Tensor:
    """An array from a .npy file (loaded with allow_pickle=False). uint8 arrays are images: mapped to [-1, 1]."""
    arr = np.load(Path(path), allow_pickle=False)
    if arr.dtype == np.uint8:
        return _images_to_signed(arr, 255.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: expected a float or uint8 array, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_folder(
    path: str | os.PathLike, size: int | None = None, channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All images in a folder as (N, C, H, W) in [-1, 1]; sub-folders, when present, are the classes (sorted names).

    Args:
        size: resize every image to size x size (bicubic); without it all images must share one size.
        channels: 1 (grayscale) or 3 (RGB); defaults to 1 if the first image is grayscale, else 3.

    Needs Pillow (installed with matplotlib).
    """
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("loading an image folder needs Pillow: pip install pillow") from err
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"path={str(path)!r} is not a directory")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(i, d) for i, d in enumerate(subdirs)] if subdirs else [(None, root)]
    files: list[tuple[Path, int | None]] = []
    for label, folder in groups:
        files += [(f, label) for f in sorted(folder.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) found under {root}")
    arrays: list[np.ndarray] = []
    labels: list[int | None] = []
    for f, label in files:
        with Image.open(f) as src:
            if channels is None:
                channels = 1 if src.mode in ("L", "1", "I", "I;16", "F") else 3
            img = src.convert("L" if channels == 1 else "RGB")
            if size is not None:
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(f"{f}: size {arr.shape[1:]} differs from {arrays[0].shape[1:]}; pass size= to resize")
        arrays.append(arr)
        labels.append(label)
    x = _images_to_signed(np.stack(arrays), 255.0)
    y = torch.tensor(labels, dtype=torch.long) if subdirs else None
    return x, y


def make_data(spec: str, size: int | None = None) -> DataSource:
    """The data source for a CLI spec: a toy name, ``"gmm"``, ``"digits"``, a ``.npy`` file or an image folder."""
    if spec in _TOY_FNS:
        fn = _TOY_FNS[spec]
        return SampledData(lambda n, g: fn(n, g), (2,), {"name": spec})
    if spec == "gmm":
        gmm = default_gmm()
        return SampledData(lambda n, g: gmm.sample(n, generator=g), (gmm.d,), {"name": "gmm"})
    if spec == "digits":
        x, y = load_digits()
        return TensorData(x, y, 10, {"name": "digits", "scaling": "signed_unit"})
    p = Path(spec)
    if p.suffix == ".npy" and p.is_file():
        x = load_npy(p)
        scaling = "signed_unit" if np.load(p, mmap_mode="r").dtype == np.uint8 else "none"
        return TensorData(x, None, None, {"name": "npy", "path": str(p), "scaling": scaling})
    if p.is_dir():
        xf, yf = load_image_folder(p, size=size)
        return TensorData(xf, yf, None, {"name": "folder", "path": str(p), "size": size, "scaling": "signed_unit"})
    allowed = ", ".join(map(repr, (*TOYS, "gmm", "digits")))
    raise ValueError(f"data={spec!r} is neither a known data set ({allowed}) nor a .npy file nor a directory")
