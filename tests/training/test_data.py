"""Data sources: toy moments and reproducibility, digits scaling, .npy and image-folder loading, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdeflow.training import TOYS, SampledData, TensorData, load_digits, load_image_folder, load_npy, make_data, toy_2d
from sdeflow.training.data import default_gmm, to_unit_range


@pytest.mark.parametrize("name", TOYS)
def test_toys_are_standardised_and_reproducible(name):
    n = 40000
    x = toy_2d(name, n, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (n, 2) and torch.isfinite(x).all()
    # mean 0 (4 standard errors) and per-coordinate std within 10% of 1, as documented
    assert (x.mean(0).abs() < 4 / math.sqrt(n) * x.std(0)).all(), x.mean(0)
    assert ((x.std(0) - 1).abs() < 0.1).all(), x.std(0)
    again = toy_2d(name, n, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(x, again)
    assert not torch.equal(x, toy_2d(name, n, torch.Generator().manual_seed(1), dtype=torch.float64))
    assert toy_2d(name, 3).dtype == torch.float32


def test_toy_geometry():
    g = torch.Generator().manual_seed(0)
    cb = toy_2d("checkerboard", 20000, g, torch.float64) / (math.sqrt(3) / 2)  # back to [-2, 2]^2
    cells = torch.floor(cb).long() + 2  # cell indices 0..3
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()  # only the "black" squares
    rings = toy_2d("rings", 20000, g, torch.float64)
    r = rings.norm(dim=1) / math.sqrt(128 / 30) * 4  # 1, 2, 3 or 4 up to the noise
    assert (torch.abs(r - torch.round(r)) < 0.5).all() and set(torch.round(r).long().tolist()) == {1, 2, 3, 4}
    eight = toy_2d("8gaussians", 20000, g, torch.float64)
    k = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    centers = math.sqrt(1.98) * torch.stack([torch.cos(k), torch.sin(k)], dim=1)
    nearest = torch.cdist(eight, centers).min(dim=1)
    assert nearest.values.max() < 0.6  # std 0.1 around the 8 centers: 6 sigma
    assert torch.bincount(nearest.indices, minlength=8).min() > 2000  # every mode populated (2500 expected)
    with pytest.raises(ValueError, match="checkerboard"):
        toy_2d("checkers", 10)


def test_digits_are_scaled_to_signed_unit_range():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    levels = torch.unique(torch.round((x + 1) * 8))
    assert torch.equal(levels, torch.arange(17, dtype=torch.float32))  # pixel k in 0..16 -> k/8 - 1
    assert sorted(set(y.tolist())) == list(range(10))
    src = make_data("digits")
    assert src.num_classes == 10 and src.data_shape == (1, 8, 8)
    torch.testing.assert_close(to_unit_range(x), (x + 1) / 2)


def test_npy_loading(tmp_path):
    img = np.arange(2 * 3 * 4 * 4, dtype=np.int64).reshape(2, 3, 4, 4).astype(np.uint8)
    np.save(tmp_path / "img.npy", img)
    x = load_npy(tmp_path / "img.npy")
    torch.testing.assert_close(x, torch.from_numpy(img.astype(np.float32) / 255 * 2 - 1))
    flt = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float64)
    np.save(tmp_path / "flt.npy", flt)
    torch.testing.assert_close(load_npy(tmp_path / "flt.npy"), torch.from_numpy(flt.astype(np.float32)))
    src = make_data(str(tmp_path / "flt.npy"))
    assert src.data_shape == (2,) and src.num_classes is None and src.config()["scaling"] == "none"
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # never unpickled
        load_npy(tmp_path / "obj.npy")
    np.save(tmp_path / "int.npy", np.arange(4, dtype=np.int32))
    with pytest.raises(ValueError, match="dtype"):
        load_npy(tmp_path / "int.npy")


def test_image_folder_with_classes(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    arrays = {}
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
            arrays[(cls, i)] = arr
    x, y = load_image_folder(tmp_path)
    assert x.shape == (6, 3, 6, 6) and y.tolist() == [0, 0, 0, 1, 1, 1]
    expect = torch.from_numpy(arrays[("dogs", 1)].transpose(2, 0, 1).astype(np.float32) / 255 * 2 - 1)
    torch.testing.assert_close(x[4], expect)
    small, _ = load_image_folder(tmp_path, size=4, channels=1)
    assert small.shape == (6, 1, 4, 4) and small.min() >= -1 and small.max() <= 1
    src = make_data(str(tmp_path))
    assert src.num_classes == 2 and src.data_shape == (3, 6, 6)
    Image.fromarray(rng.integers(0, 256, size=(5, 5), dtype=np.uint8)).save(tmp_path / "dogs" / "odd.png")
    with pytest.raises(ValueError, match="size"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "empty").mkdir()
        load_image_folder(tmp_path / "empty")


def test_sources_sample_with_a_generator():
    x = torch.randn(50, 3)
    y = torch.arange(50) % 5
    src = TensorData(x, y)
    assert src.num_classes == 5
    xb, yb = src.sample(20, torch.Generator().manual_seed(0))
    xb2, yb2 = src.sample(20, torch.Generator().manual_seed(0))
    assert torch.equal(xb, xb2) and torch.equal(yb, yb2)
    idx = [int(torch.nonzero((x == row).all(1))[0]) for row in xb]
    assert torch.equal(yb, y[idx])  # labels stay paired with their samples
    gmm = default_gmm()
    toy = SampledData(lambda n, g: gmm.sample(n, generator=g), (2,), {"name": "gmm"})
    a, none = toy.sample(8, torch.Generator().manual_seed(3))
    assert none is None and a.dtype == torch.float32 and a.shape == (8, 2)
    with pytest.raises(ValueError, match="floating"):
        TensorData(torch.arange(10).reshape(5, 2))
    with pytest.raises(ValueError, match="num_classes"):
        TensorData(x, y, num_classes=3)
    with pytest.raises(ValueError, match="neither"):
        make_data("no-such-thing")
