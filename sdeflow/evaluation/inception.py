r"""Inception-v3 pool3 features as used by FID (Szegedy et al. 2016; Heusel et al. 2017), in plain torch.

The FID network is the 2015-12-05 TensorFlow Inception graph, which differs from torchvision's Inception-v3 in
three places: the average pools inside the mixed blocks ignore zero padding (``count_include_pad=False``), the last
block (Mixed_7c) pools its fourth branch with a max instead of an average, and the classifier has 1008 classes.
This module builds that network with torchvision's parameter names, so pytorch-fid's converted weights
(``pt_inception-2015-12-05-6726825d.pth``) load into it unchanged; nothing is downloaded: the user supplies the
file. Features equal pytorch-fid's (``dims=2048``) only with those weights, and the pipeline is theirs:

1. images (N, 3, H, W) in ``input_range`` (default [-1, 1], sdeflow's convention; use (0, 1) for pytorch-fid's);
   one channel is repeated to three;
2. bilinear resize to 299 x 299 (``align_corners=False``), affine map to [-1, 1] (the two commute);
3. the convolutional trunk up to Mixed_7c (N, 2048, 8, 8) and a global average pool -> (N, 2048).

Each mixed block is described by a table of branches; a branch is an optional pool followed by a chain of
conv-BN-ReLU units, optionally forking into two convolutions whose outputs are concatenated (the E blocks).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .extractors import verify_sha256

__all__ = ["FIDInceptionV3", "load_fid_inception", "PYTORCH_FID_WEIGHTS"]

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
"""File name of pytorch-fid's converted weights; its suffix is a SHA-256 prefix that is checked on load."""

Pair = int | tuple[int, int]


class _ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as TF) -> ReLU; parameters named ``conv`` and ``bn``."""

    def __init__(self, cin: int, cout: int, kernel: Pair, stride: Pair = 1, padding: Pair = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _Branch(NamedTuple):
    pool: str | None  # None | "avg" (3x3, stride 1, padding ignored) | "max1" (3x3, stride 1) | "max2" (3x3, stride 2)
    chain: tuple[str, ...]  # conv units applied in order
    fork: tuple[str, str] | None = None  # two conv units applied to the chain's output, concatenated


def _pool(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    if kind is None:
        return x
    if kind == "avg":
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max1":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.max_pool2d(x, 3, stride=2)


class _Mixed(nn.Module):
    """An Inception mixed block: parallel branches concatenated along channels."""

    def __init__(self, convs: dict[str, tuple], branches: Sequence[_Branch]) -> None:
        super().__init__()
        for name, spec in convs.items():
            self.add_module(name, _ConvBN(*spec))
        self.branches = tuple(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for br in self.branches:
            h = _pool(x, br.pool)
            for name in br.chain:
                h = self.get_submodule(name)(h)
            if br.fork is not None:
                h = torch.cat([self.get_submodule(br.fork[0])(h), self.get_submodule(br.fork[1])(h)], 1)
            outs.append(h)
        return torch.cat(outs, 1)


# (in, out, kernel, stride, padding) of each unit; 1x7 / 7x1 factorised convolutions keep the spatial size
def _block_a(cin: int, pool_features: int) -> _Mixed:
    convs = {
        "branch1x1": (cin, 64, 1),
        "branch5x5_1": (cin, 48, 1),
        "branch5x5_2": (48, 64, 5, 1, 2),
        "branch3x3dbl_1": (cin, 64, 1),
        "branch3x3dbl_2": (64, 96, 3, 1, 1),
        "branch3x3dbl_3": (96, 96, 3, 1, 1),
        "branch_pool": (cin, pool_features, 1),
    }
    return _Mixed(convs, [
        _Branch(None, ("branch1x1",)),
        _Branch(None, ("branch5x5_1", "branch5x5_2")),
        _Branch(None, ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")),
        _Branch("avg", ("branch_pool",)),
    ])  # fmt: skip


def _block_b(cin: int) -> _Mixed:
    convs = {
        "branch3x3": (cin, 384, 3, 2),
        "branch3x3dbl_1": (cin, 64, 1),
        "branch3x3dbl_2": (64, 96, 3, 1, 1),
        "branch3x3dbl_3": (96, 96, 3, 2),
    }
    return _Mixed(convs, [
        _Branch(None, ("branch3x3",)),
        _Branch(None, ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")),
        _Branch("max2", ()),
    ])  # fmt: skip


def _block_c(cin: int, c7: int) -> _Mixed:
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    convs = {
        "branch1x1": (cin, 192, 1),
        "branch7x7_1": (cin, c7, 1),
        "branch7x7_2": (c7, c7, *row),
        "branch7x7_3": (c7, 192, *col),
        "branch7x7dbl_1": (cin, c7, 1),
        "branch7x7dbl_2": (c7, c7, *col),
        "branch7x7dbl_3": (c7, c7, *row),
        "branch7x7dbl_4": (c7, c7, *col),
        "branch7x7dbl_5": (c7, 192, *row),
        "branch_pool": (cin, 192, 1),
    }
    dbl = tuple(f"branch7x7dbl_{i}" for i in range(1, 6))
    return _Mixed(convs, [
        _Branch(None, ("branch1x1",)),
        _Branch(None, ("branch7x7_1", "branch7x7_2", "branch7x7_3")),
        _Branch(None, dbl),
        _Branch("avg", ("branch_pool",)),
    ])  # fmt: skip


def _block_d(cin: int) -> _Mixed:
    convs = {
        "branch3x3_1": (cin, 192, 1),
        "branch3x3_2": (192, 320, 3, 2),
        "branch7x7x3_1": (cin, 192, 1),
        "branch7x7x3_2": (192, 192, (1, 7), 1, (0, 3)),
        "branch7x7x3_3": (192, 192, (7, 1), 1, (3, 0)),
        "branch7x7x3_4": (192, 192, 3, 2),
    }
    return _Mixed(convs, [
        _Branch(None, ("branch3x3_1", "branch3x3_2")),
        _Branch(None, ("branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4")),
        _Branch("max2", ()),
    ])  # fmt: skip


def _block_e(cin: int, pool: str) -> _Mixed:
    row, col = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
    convs = {
        "branch1x1": (cin, 320, 1),
        "branch3x3_1": (cin, 384, 1),
        "branch3x3_2a": (384, 384, *row),
        "branch3x3_2b": (384, 384, *col),
        "branch3x3dbl_1": (cin, 448, 1),
        "branch3x3dbl_2": (448, 384, 3, 1, 1),
        "branch3x3dbl_3a": (384, 384, *row),
        "branch3x3dbl_3b": (384, 384, *col),
        "branch_pool": (cin, 192, 1),
    }
    return _Mixed(convs, [
        _Branch(None, ("branch1x1",)),
        _Branch(None, ("branch3x3_1",), ("branch3x3_2a", "branch3x3_2b")),
        _Branch(None, ("branch3x3dbl_1", "branch3x3dbl_2"), ("branch3x3dbl_3a", "branch3x3dbl_3b")),
        _Branch(pool, ("branch_pool",)),
    ])  # fmt: skip


class FIDInceptionV3(nn.Module):
    """The TF-compatible Inception-v3 trunk of FID, returning the 2048-d pool3 features (see the module docstring).

    Args:
        input_range: (low, high) of the input pixel values, mapped affinely to the network's [-1, 1].
        resize: bilinearly resize inputs to 299 x 299 first (pytorch-fid does).

    The module holds no classifier; :func:`load_fid_inception` ignores the weight file's ``fc.*`` entries.
    """

    feature_dim = 2048

    def __init__(self, input_range: tuple[float, float] = (-1.0, 1.0), resize: bool = True) -> None:
        super().__init__()
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise ValueError(f"input_range must be (low, high) with high > low, got {input_range}")
        self.input_range, self.resize = (lo, hi), resize
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _block_a(192, 32)
        self.Mixed_5c = _block_a(256, 64)
        self.Mixed_5d = _block_a(288, 64)
        self.Mixed_6a = _block_b(288)
        self.Mixed_6b = _block_c(768, 128)
        self.Mixed_6c = _block_c(768, 160)
        self.Mixed_6d = _block_c(768, 160)
        self.Mixed_6e = _block_c(768, 192)
        self.Mixed_7a = _block_d(768)
        self.Mixed_7b = _block_e(1280, "avg")
        self.Mixed_7c = _block_e(2048, "max1")
        self.sha256: str | None = None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The Mixed_7c output (N, 2048, 8, 8) for 299 x 299 inputs."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.to(self.Conv2d_1a_3x3.conv.weight.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        lo, hi = self.input_range
        if (lo, hi) != (-1.0, 1.0):
            x = (x - lo) * (2.0 / (hi - lo)) - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = self.get_submodule(f"Mixed_{name}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """pool3 features (N, 2048) of images (N, 3 or 1, H, W) in ``input_range``."""
        return self.feature_map(x).mean(dim=(2, 3))


_IGNORED_KEYS = re.compile(r"^(fc|AuxLogits)\.")
_HUB_HASH = re.compile(r"-([0-9a-f]{8,64})\.pth?$")


def load_fid_inception(
    path: str | Path,
    sha256: str | None = None,
    *,
    input_range: tuple[float, float] = (-1.0, 1.0),
    device: torch.device | str | None = None,
) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` from a user-supplied weight file (pytorch-fid's ``pt_inception-2015-12-05-
    6726825d.pth``, or any state dict with torchvision's Inception-v3 parameter names); nothing is downloaded.

    The file is verified against ``sha256`` (a full hash or a prefix of >= 8 hex digits) when given, else against the
    hash prefix in a torch.hub-style name ``name-<hex>.pth`` when it has one; it is read with
    ``torch.load(weights_only=True)`` (no code runs) and loaded strictly, apart from the classifier (``fc.*``,
    ``AuxLogits.*``), which pool3 features do not use. The model is returned in eval mode without gradients.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Inception weights not found at {path}; download {PYTORCH_FID_WEIGHTS} yourself")
    expected = sha256
    if expected is None:
        m = _HUB_HASH.search(path.name)
        expected = m.group(1) if m else None
    digest = verify_sha256(path, expected) if expected is not None else None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    state = {k: v for k, v in state.items() if not _IGNORED_KEYS.match(k)}
    model = FIDInceptionV3(input_range=input_range)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not an Inception-v3 state dict with torchvision's names: {e}") from e
    model.eval().requires_grad_(False)
    model.sha256 = digest
    return model.to(device) if device is not None else model
