"""Classifier-free guidance with conditioning tensors (issue 14, item 5): it equals label CFG when the tensors are
one-hot labels, follows the samples an adaptive solver steps, and guidance rescale matches its definition."""

from __future__ import annotations

import pytest
import torch

import sdeflow as sf
from sdeflow.guidance import ClassifierFreeGuidance, ConditioningGuidance, guidance_rescale

F64 = torch.float64
MEANS = [[1.5, 0.0], [-1.5, 0.0]]


def _nets(sde):
    """An eps-net conditioned on a one-hot tensor `emb` (a zero row: unconditional), and the same net on labels."""
    gmms = [sf.GaussianMixture([m], [0.4]) for m in MEANS]
    both = sf.GaussianMixture(MEANS, [0.4, 0.4])

    def by_emb(x, t, emb):
        out = both.eps(x, t, sde).clone()
        for c, g in enumerate(gmms):
            m = emb[:, c] > 0.5
            if m.any():
                out[m] = g.eps(x[m], t[m], sde)
        return out

    def by_label(x, t, y):
        return by_emb(x, t, torch.nn.functional.one_hot(y.clamp(max=1), 2).to(x.dtype) * (y < 2)[:, None])

    return by_emb, by_label


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_equals_label_cfg(scale):
    sde = sf.VPSDE()
    by_emb, by_label = _nets(sde)
    y = torch.tensor([0, 1, 1, 0])
    emb = torch.nn.functional.one_hot(y, 2).to(F64)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.4, dtype=F64)
    ours = ConditioningGuidance(sf.Denoiser(by_emb, sde), {"emb": emb}, {"emb": torch.zeros(1, 2, dtype=F64)}, scale)
    ref = ClassifierFreeGuidance(sf.Denoiser(by_label, sde), y, scale, null_label=2)
    torch.testing.assert_close(ours.eps(x, t), ref.eps(x, t), rtol=1e-12, atol=1e-12)
    assert ours.nfe == 1  # both branches in one call


def test_rows_follow_an_adaptive_solver():
    sde = sf.VPSDE()
    by_emb, _ = _nets(sde)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    emb = torch.nn.functional.one_hot(y, 2).to(F64)
    den = ConditioningGuidance(sf.Denoiser(by_emb, sde), {"emb": emb}, {"emb": torch.zeros(1, 2, dtype=F64)}, 2.0)
    x_T = sde.prior_sample((6, 2), torch.Generator().manual_seed(1), dtype=F64)
    res = sf.sample(den, "dpm_solver", order=2, adaptive=True, x_T=x_T)
    assert torch.equal(res.x[:, 0] > 0, y == 0)


def test_guidance_rescale_matches_its_definition():
    g = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=F64) * 3
    c = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    full = guidance_rescale(g, c, 1.0)
    torch.testing.assert_close(full.flatten(1).std(1), c.flatten(1).std(1))
    torch.testing.assert_close(guidance_rescale(g, c, 0.0), g)
    torch.testing.assert_close(guidance_rescale(g, c, 0.7), 0.7 * full + 0.3 * g)


def test_bad_arguments_are_named():
    sde = sf.VPSDE()
    den = sf.Denoiser(_nets(sde)[0], sde)
    e = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="same"):
        ConditioningGuidance(den, {"emb": e}, {"other": e})
    with pytest.raises(ValueError, match="scale must be"):
        ConditioningGuidance(den, {"emb": e}, {"emb": e}, scale=float("nan"))
    with pytest.raises(ValueError, match="rescale must lie in"):
        ConditioningGuidance(den, {"emb": e}, {"emb": e}, rescale=2.0)
