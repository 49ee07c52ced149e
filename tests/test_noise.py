"""Noise sources: shapes, reproducibility, per-sample streams, and the Brownian path's consistency across grids."""

from __future__ import annotations

import math

import pytest
import torch

from sdeflow.noise import BrownianNoise, IIDNoise, PerSampleGenerator, TensorNoise, randn

T0 = torch.tensor(1.0, dtype=torch.float64)
T1 = torch.tensor(0.5, dtype=torch.float64)


def test_iid_shapes_dtype_and_reproducibility():
    like = torch.zeros(4, 3, 2, dtype=torch.float64)
    z = IIDNoise(torch.Generator().manual_seed(0))(0, T0, T1, like, draws=3)
    assert z.shape == (3, 4, 3, 2) and z.dtype == torch.float64
    assert torch.equal(z, IIDNoise(torch.Generator().manual_seed(0))(0, T0, T1, like, draws=3))
    assert not torch.equal(z, IIDNoise(torch.Generator().manual_seed(1))(0, T0, T1, like, draws=3))
    torch.manual_seed(3)
    a = IIDNoise(None)(0, T0, T1, like.float())
    torch.manual_seed(3)
    assert torch.equal(a, IIDNoise()(0, T0, T1, like.float())) and a.dtype == torch.float32


def test_per_sample_generator_streams_do_not_depend_on_the_batch():
    like3, like1 = torch.zeros(3, 5), torch.zeros(1, 5)
    big, one = IIDNoise(PerSampleGenerator([4, 8, 15])), IIDNoise(PerSampleGenerator([8]))
    for i in range(3):  # several steps: each sample's stream advances on its own
        zb, z1 = big(i, T0, T1, like3, draws=2), one(i, T0, T1, like1, draws=2)
        assert zb.shape == (2, 3, 5)
        assert torch.equal(zb[:, 1:2], z1)
    x = randn((3, 2), PerSampleGenerator([4, 8, 15]))
    assert torch.equal(x[1:2], randn((1, 2), PerSampleGenerator([8])))


def test_per_sample_generator_errors():
    with pytest.raises(ValueError, match="seeds must not be empty"):
        PerSampleGenerator([])
    with pytest.raises(ValueError, match="batch size 2 does not match the 3 per-sample seeds"):
        randn((2, 4), PerSampleGenerator([1, 2, 3]))


def test_brownian_coarse_increments_are_sums_of_fine_ones():
    """Draw 0 is (W(t0) - W(t1))/sqrt(t0 - t1): over a coarse grid it equals the sum of the fine increments."""
    like = torch.zeros(6, 2, dtype=torch.float64)
    bn = BrownianNoise(like.shape, seed=11, t_min=0.001, t_max=1.0)
    fine = torch.linspace(1.0, 0.001, 33, dtype=torch.float64)
    coarse = fine[::8]
    inc = lambda grid, k: bn(0, grid[k], grid[k + 1], like)[0] * math.sqrt(float(grid[k] - grid[k + 1]))
    for j in range(len(coarse) - 1):
        total = sum(inc(fine, k) for k in range(8 * j, 8 * j + 8))
        torch.testing.assert_close(inc(coarse, j), total, rtol=0, atol=1e-12)
    # the same seed is the same path whatever the query order; another seed another path
    again = BrownianNoise(like.shape, seed=11, t_min=0.001, t_max=1.0)
    torch.testing.assert_close(
        again(0, coarse[1], coarse[2], like), bn(0, coarse[1], coarse[2], like), rtol=0, atol=1e-12
    )
    other = BrownianNoise(like.shape, seed=12, t_min=0.001, t_max=1.0)
    assert not torch.allclose(other(0, coarse[1], coarse[2], like), bn(0, coarse[1], coarse[2], like))


def test_brownian_increments_are_standard_normal():
    like = torch.zeros(4000, 1, dtype=torch.float64)
    bn = BrownianNoise(like.shape, seed=1, t_min=0.0, t_max=1.0)
    z = torch.cat(
        [
            bn(i, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), like)[0]
            for i, (a, b) in enumerate([(1.0, 0.7), (0.7, 0.2), (0.2, 0.0)])
        ]
    )
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    # independent increments: disjoint intervals are uncorrelated
    assert abs(float((z[:4000] * z[4000:8000]).mean())) < 5 / math.sqrt(4000)


def test_brownian_extra_draws_and_errors():
    like = torch.zeros(3, 2, dtype=torch.float32)
    bn = BrownianNoise(like.shape, seed=0, generator=torch.Generator().manual_seed(0))
    z = bn(0, T0, T1, like, draws=3)
    assert z.shape == (3, 3, 2) and z.dtype == torch.float32
    with pytest.raises(ValueError, match="the Brownian path has shape"):
        bn(0, T0, T1, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="scalar step times"):
        bn(0, torch.ones(3, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64), like)
    with pytest.raises(ValueError, match="t_min must be < t_max"):
        BrownianNoise((2, 2), t_min=1.0, t_max=0.5)


def test_brownian_levy_area_option():
    bn = BrownianNoise((2, 3), seed=0, levy_area_approximation="space-time")
    dW, U = bn.bm(0.2, 0.6, return_U=True)
    assert dW.shape == U.shape == (2, 3)


def test_tensor_noise():
    like = torch.zeros(2, 3)
    full = torch.randn(4, 2, 2, 3)  # (steps, draws, *x.shape)
    tn = TensorNoise(full)
    assert torch.equal(tn(1, T0, T1, like, draws=2), full[1])
    assert torch.equal(tn(1, T0, T1, like, draws=1), full[1, :1])
    single = TensorNoise(torch.randn(4, 2, 3))  # (steps, *x.shape)
    assert single(2, T0, T1, like).shape == (1, 2, 3)
    with pytest.raises(ValueError, match="holds 4 steps, step 4 was asked for"):
        tn(4, T0, T1, like)
    with pytest.raises(ValueError, match="needs"):
        tn(0, T0, T1, like, draws=3)
    with pytest.raises(ValueError, match="needs"):
        tn(0, T0, T1, torch.zeros(3, 3))
