"""Score networks: shapes (8x8, 28x28, 32x32, conditional or not), embeddings, label handling, dtypes, scaling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sdeflow as sf
from sdeflow.nets import FourierEmbedding, InputScaling, MLPScoreNet, SinusoidalEmbedding, UNet
from sdeflow.nets.unet import group_count


def _unzero(net: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw the zero-initialised layers so that every path of the net carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_unet_shapes_and_dependence(channels, size, conditional):
    torch.manual_seed(0)
    net = UNet(
        channels,
        channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        num_classes=10 if conditional else None,
    )
    x = torch.randn(3, channels, size, size)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([0, 7, 10]) if conditional else None
    out = net(x, t, y=y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised head: an untrained eps-net predicts 0
    _unzero(net)
    with torch.no_grad():
        out = net(x, t, y=y)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, net(x, t.flip(0), y=y))  # depends on t
        if conditional:
            other = net(x, t, y=torch.tensor([1, 2, 3]))
            assert not torch.allclose(out[:2], other[:2])  # depends on y
            torch.testing.assert_close(net(x, t), net(x, t, y=10))  # y=None is the null class
    # every parameter takes part in the output
    net(x, t, y=y).square().sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, dead


def test_unet_odd_size_padding_and_levels():
    torch.manual_seed(0)
    net = _unzero(
        UNet(1, channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention_levels=(2, 3), num_heads=1)
    )
    for size in (5, 28, 13):
        x = torch.randn(2, 1, size, size + 3)
        assert net(x, torch.rand(2)).shape == x.shape
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(1, channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="shape"):
        UNet(1, channels=8, channel_mult=(1,), attention_levels=(), num_heads=1)(torch.randn(2, 3, 8, 8), torch.rand(2))


def test_unet_batch_independence():
    """Each sample's output depends on that sample alone (GroupNorm, not BatchNorm)."""
    torch.manual_seed(0)
    net = _unzero(UNet(1, channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=1))
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t)[:2], net(x[:2], t[:2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8), (3, 4)])
def test_mlp_any_data_shape_and_labels(shape):
    torch.manual_seed(0)
    d = math.prod(shape)
    net = _unzero(MLPScoreNet(d, hidden=16, depth=2, time_dim=8, num_classes=3))
    x = torch.randn(5, *shape)
    t = torch.rand(5)
    out = net(x, t, y=torch.tensor([0, 1, 2, 3, 0]))
    assert out.shape == x.shape
    torch.testing.assert_close(net(x, t), net(x, t, y=3))
    torch.testing.assert_close(net(x, 0.3), net(x, torch.full((5,), 0.3)))  # scalar t broadcasts
    with pytest.raises(ValueError, match="y must lie"):
        net(x, t, y=torch.tensor([0, 1, 2, 4, 0]))
    with pytest.raises(ValueError, match="y must"):
        net(x, t, y=torch.zeros(5))
    with pytest.raises(ValueError, match="unconditional"):
        MLPScoreNet(d, hidden=8, depth=1)(x, t, y=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="values per sample"):
        net(torch.randn(5, d + 1), t)


def test_nets_run_in_float64_and_as_denoiser():
    torch.manual_seed(0)
    sde = sf.VPSDE()
    for net, x in [
        (MLPScoreNet(2, hidden=16, depth=1), torch.randn(4, 2, dtype=torch.float64)),
        (
            UNet(1, channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=1),
            torch.randn(2, 1, 8, 8, dtype=torch.float64),
        ),
    ]:
        net = _unzero(net).double()
        den = sf.Denoiser(net, sde, "eps")
        out = den.x0(x, 0.5)
        assert out.dtype == torch.float64 and out.shape == x.shape and den.nfe == 1


def test_sinusoidal_and_fourier_embeddings():
    emb = SinusoidalEmbedding(8, scale=1000.0, max_period=10000.0)
    t = torch.tensor([0.0, 0.25])
    out = emb(t)
    freqs = 1000.0 * torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    expect = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(out, expect)
    f1, f2 = FourierEmbedding(16, scale=4.0), FourierEmbedding(16, scale=4.0)
    torch.testing.assert_close(f1(t), f2(t))  # fixed default seed: reproducible
    assert "W" in f1.state_dict()  # frequencies travel with checkpoints
    torch.testing.assert_close(f1(t).square().reshape(2, 2, 8).sum(1), torch.ones(2, 8))  # sin^2 + cos^2
    with pytest.raises(ValueError, match="dim"):
        SinusoidalEmbedding(7)


def test_group_count():
    assert group_count(64) == 32 and group_count(48) == 24 and group_count(3) == 3 and group_count(97) == 1


def test_input_scaling_gives_unit_variance_inputs():
    """c_in = 1/sqrt(a^2 sigma_d^2 + s^2): on VE at t = 1 (s = 50) x_t ~ N(0, sigma_d^2 + 2500) reaches the net with
    unit variance."""
    seen = {}

    class Probe(nn.Module):
        num_classes = None

        def forward(self, x, t):
            seen["x"] = x
            return x

    sde = sf.VESDE(0.01, 50.0)
    wrapped = InputScaling(Probe(), sde, sigma_data=0.5)
    x0 = 0.5 * torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (1e-5, 0.3, 1.0):
        tt = torch.full((len(x0),), t, dtype=torch.float64)
        x_t = sde.marginal(
            x0, tt, torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        )
        wrapped(x_t, tt)
        expect = 1 / math.sqrt(0.25 + float(sde.sigma(t)) ** 2)
        torch.testing.assert_close(seen["x"], expect * x_t)
        assert abs(float(seen["x"].std()) - 1) < 0.02
