r"""Offline feature extractors with verified weights: a digits CNN trained in seconds, and SHA-256 file checks.

FID needs a feature network. The standard one (Inception-v3, :mod:`sdeflow.evaluation.inception`) only fits natural images
and its weights must be supplied by the user; for scikit-learn's 8x8 digits, which ship with scikit-learn and need no
download, :func:`train_digits_extractor` trains a small CNN classifier deterministically in a few seconds on a CPU and
its penultimate layer gives the features ("FD_digits", the analogue of FID with a LeNet on MNIST). Weight files are
saved with their SHA-256 next to them and are verified (and loaded with ``weights_only=True``, so a weight file never
executes code) before use.

Digits are fed as images in [-1, 1] (pixel / 16 * 2 - 1, pixel in 0..16: the scaling of
:func:`sdeflow.training.data.load_digits`, so model samples are scored in the units they were trained in), of shape
(N, 64), (N, 8, 8) or (N, 1, 8, 8).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..training.data import load_digits

__all__ = [
    "sha256_file",
    "verify_sha256",
    "DigitsCNN",
    "train_digits_extractor",
    "save_digits_extractor",
    "load_digits_extractor",
    "digits_extractor",
]

_FORMAT = "sdeflow.digits_cnn"
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- hashes
def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> str:
    """Check a file against an expected hex SHA-256 (a prefix of at least 8 digits is accepted, as torch.hub's
    ``name-<sha256 prefix>.pth`` files carry). Returns the full hash; raises ValueError on a mismatch."""
    expected = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"sha256 must be 8 to 64 hex digits, got {expected!r}")
    actual = sha256_file(path)
    if not actual.startswith(expected):
        raise ValueError(
            f"{path} failed its SHA-256 check: expected {expected}, got {actual}; the file is corrupt or not the one "
            "these weights were saved as"
        )
    return actual


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    side = _sidecar(path)
    if not side.exists():
        return None
    text = side.read_text().split()
    return text[0] if text else ""


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------- the network
class DigitsCNN(nn.Module):
    """A small CNN classifier on 8x8 digits whose penultimate layer is a feature extractor.

    conv3x3(1->w) -> conv3x3(w->2w) -> maxpool -> conv3x3(2w->2w) -> maxpool -> linear(8w -> feature_dim) -> linear(10),
    ReLU after every layer but the last. ``forward(x)`` returns the (N, feature_dim) post-ReLU penultimate features
    (so it satisfies :class:`sdeflow.metrics.FeatureExtractor`); ``logits(x)`` the class scores.

    Attributes set when saved or loaded: ``sha256`` (the weight file's hash), ``accuracy`` (held-out accuracy).
    """

    def __init__(self, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()
        if not (isinstance(width, int) and width > 0):
            raise ValueError(f"width must be a positive int, got {width!r}")
        if not (isinstance(feature_dim, int) and feature_dim > 0):
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        self.width, self.feature_dim = width, feature_dim
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, 10)
        self.sha256: str | None = None
        self.accuracy: float | None = None

    def config(self) -> dict[str, int]:
        return {"width": self.width, "feature_dim": self.feature_dim}

    @staticmethod
    def _as_images(x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x[0].numel() != 64:
            raise ValueError(f"digits must have shape (N, 64), (N, 8, 8) or (N, 1, 8, 8), got {tuple(x.shape)}")
        return x.reshape(x.shape[0], 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._as_images(x).to(self.conv1.weight.dtype)
        h = F.relu(self.conv1(h))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self(x))


def train_digits_extractor(
    seed: int = 0,
    *,
    epochs: int = 12,
    width: int = 16,
    feature_dim: int = 64,
    batch_size: int = 64,
    lr: float = 3e-3,
    test_fraction: float = 0.2,
) -> DigitsCNN:
    """Train :class:`DigitsCNN` on scikit-learn's digits with Adam and cross-entropy; deterministic given ``seed``.

    The split (a seeded permutation, ``test_fraction`` held out), the initialisation and the batch order all come
    from ``seed``; the global RNG state is restored afterwards. Training runs on the CPU with one intra-op thread
    (restored afterwards): the layers are far too small to gain from threads (on a busy 2-core machine two threads
    were 20x slower), and a fixed reduction order makes the weights identical on machines with different core
    counts. About 2 seconds. The returned model is in eval mode, with ``requires_grad`` off and ``accuracy`` set to
    the held-out accuracy (about 0.99).
    """
    if not (0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    x, y = load_digits()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN(width=width, feature_dim=feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with _intra_op_threads(1):
        for _ in range(epochs):
            order = train[torch.randperm(train.shape[0], generator=gen)]
            for idx in torch.split(order, batch_size):
                loss = F.cross_entropy(model.logits(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval().requires_grad_(False)
        with torch.inference_mode():
            model.accuracy = float((model.logits(x[test]).argmax(1) == y[test]).double().mean())
    return model


@contextlib.contextmanager
def _intra_op_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------- save / load
def save_digits_extractor(model: DigitsCNN, path: str | Path) -> str:
    """Write the model atomically to ``path`` and its SHA-256 to ``path.sha256`` (``sha256sum`` format).

    Returns the hash, also stored in ``model.sha256``.
    """
    path = Path(path)
    payload = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "config": model.config(),
        "accuracy": model.accuracy,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    _atomic_save(payload, path)
    digest = sha256_file(path)
    _sidecar(path).write_text(f"{digest}  {path.name}\n")
    model.sha256 = digest
    return digest


def load_digits_extractor(
    path: str | Path,
    sha256: str | None = None,
    *,
    device: torch.device | str | None = None,
) -> DigitsCNN:
    """Load a digits extractor after verifying its SHA-256.

    The expected hash is ``sha256`` when given, else the one in ``path.sha256``; a file with neither is refused, as
    is one whose hash differs (corrupt or replaced). The payload is read with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    expected = sha256 if sha256 is not None else _read_sidecar(path)
    if expected is None:
        raise ValueError(f"no hash to verify {path} against: pass sha256= or keep {_sidecar(path).name} next to it")
    digest = verify_sha256(path, expected)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an sdeflow digits extractor (format {_FORMAT!r})")
    if payload.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path} has format version {payload.get('version')}; this sdeflow reads {_FORMAT_VERSION}")
    model = DigitsCNN(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.eval().requires_grad_(False)
    model.sha256, model.accuracy = digest, payload.get("accuracy")
    return model.to(device) if device is not None else model


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdeflow"


def digits_extractor(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
) -> DigitsCNN:
    """The default digits feature extractor: loaded (hash-verified) from ``cache_dir``, or trained and saved there.

    ``cache_dir`` defaults to ``$XDG_CACHE_HOME/sdeflow`` (``~/.cache/sdeflow``); the file is
    ``digits_cnn_seed{seed}.pt``. A file that fails verification raises rather than being silently replaced: delete
    it to retrain.
    """
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    path = cache / f"digits_cnn_seed{seed}.pt"
    if path.exists():
        return load_digits_extractor(path, device=device)
    cache.mkdir(parents=True, exist_ok=True)
    model = train_digits_extractor(seed)
    save_digits_extractor(model, path)
    return model.to(device) if device is not None else model
