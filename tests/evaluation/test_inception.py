"""The FID Inception-v3 trunk with random weights: torchvision's parameter layout, shapes, the weight-file checks."""

from __future__ import annotations

import os

import pytest
import torch

from sdeflow.evaluation.extractors import sha256_file
from sdeflow.evaluation.inception import FIDInceptionV3, load_fid_inception
from sdeflow.evaluation.metrics import FeatureExtractor, feature_stats


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = FIDInceptionV3().eval()
    # random but non-trivial BN statistics, so that a wrong load would change the outputs
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    return m


def _conv_bn(cin: int, cout: int, kh: int, kw: int | None = None) -> int:
    return cin * cout * kh * (kh if kw is None else kw) + 2 * cout  # bias-free conv + BN affine


def test_parameter_layout_is_torchvision_inception_v3(model) -> None:
    """torchvision documents inception_v3 with 27,161,264 parameters (aux classifier and 1000-way fc included). The
    FID trunk has neither: subtract AuxLogits (1x1 768->128, 5x5 128->768, fc 768->1000) and fc (2048->1000)."""
    aux = _conv_bn(768, 128, 1) + _conv_bn(128, 768, 5) + 768 * 1000 + 1000
    fc = 2048 * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - aux - fc
    sd = model.state_dict()
    # a few names and shapes of pytorch-fid's weight file (torchvision naming, FID blocks)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["Mixed_7c.branch_pool.bn.running_var"].shape == (192,)
    assert model.Conv2d_1a_3x3.bn.eps == 1e-3


def test_forward_shapes(model) -> None:
    assert isinstance(model, FeatureExtractor)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.inference_mode():
        fmap = model.feature_map(x)  # resized to 299 x 299 inside
        feats = model(x)
    assert fmap.shape == (1, 2048, 8, 8)
    assert feats.shape == (1, 2048) and bool(torch.isfinite(feats).all())
    torch.testing.assert_close(feats, fmap.mean(dim=(2, 3)))
    # grayscale is repeated to RGB; input_range maps affinely: (0, 1) inputs x give the same as 2x - 1 in (-1, 1)
    with torch.inference_mode():
        model.resize = False  # 75 x 75 is the smallest input the trunk accepts
        y = torch.rand(2, 1, 75, 75, generator=g)
        f_gray = model(y)
        f_rgb = model(y.expand(-1, 3, -1, -1))
        model.input_range = (0.0, 1.0)
        f_unit = model(y)
        model.input_range = (-1.0, 1.0)
        f_sym = model(2 * y - 1)
        model.resize = True
    assert f_gray.shape == (2, 2048)
    torch.testing.assert_close(f_gray, f_rgb, rtol=0, atol=0)
    torch.testing.assert_close(f_unit, f_sym, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.zeros(1, 2, 75, 75))
    with pytest.raises(ValueError, match="input_range"):
        FIDInceptionV3(input_range=(1.0, 0.0))


def test_load_weight_file(model, tmp_path) -> None:
    """A pytorch-fid-style file (with its fc classifier) loads strictly, is hash-checked, gives the same features."""
    state = dict(model.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    plain = tmp_path / "inception.pth"
    torch.save(state, plain)
    digest = sha256_file(plain)
    hub = tmp_path / f"pt_inception-2015-12-05-{digest[:8]}.pth"
    os.link(plain, hub)

    loaded = load_fid_inception(hub)  # verified against the name's hash prefix
    assert loaded.sha256 == digest and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 75, 75, generator=torch.Generator().manual_seed(3)) * 2 - 1
    model.resize = loaded.resize = False
    try:
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        st = feature_stats(x, loaded, batch_size=1)
    finally:
        model.resize = True
    assert st.mean.shape == (2048,)

    assert load_fid_inception(plain).sha256 is None  # no hash in the name, none given: loads unverified
    with pytest.raises(ValueError, match="SHA-256"):
        load_fid_inception(plain, sha256="0" * 64)
    wrong = tmp_path / "pt_inception-2015-12-05-6726825d.pth"  # the real name, other bytes
    os.link(plain, wrong)
    with pytest.raises(ValueError, match="SHA-256"):
        load_fid_inception(wrong)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight"):
        load_fid_inception(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not found"):
        load_fid_inception(tmp_path / "absent.pth")
