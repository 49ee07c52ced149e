"""Closed-form posterior moments of a diagonal Gaussian mixture, written out independently of sdeflow.analytic
(the loss-floor oracle shared by the DSM, EDM-loss and flow-matching training tests; tests/ is on sys.path through
conftest.py)."""

from __future__ import annotations

import math

import torch

import sdeflow as sf


def posterior_x0_var(gmm: sf.GaussianMixture, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Var(x0 | x_t = x) per coordinate (B, d) of a diagonal mixture, written out here (not sdeflow.analytic):
    component k gives x0 | x_t, k ~ N(mu_k + a sig_k^2 (x - a mu_k)/v_k, sig_k^2 s^2 / v_k), v_k = a^2 sig_k^2 + s^2,
    mixed with the responsibilities."""
    mu, sig2, w = gmm.means, gmm.stds**2, gmm.weights
    a, s = a[:, None, None], s[:, None, None]
    v = a**2 * sig2[None] + s**2
    diff = x[:, None, :] - a * mu[None]
    logr = torch.log(w)[None] - 0.5 * (diff**2 / v + torch.log(2 * math.pi * v)).sum(-1)
    r = torch.softmax(logr, dim=1)[..., None]
    m = mu[None] + a * sig2[None] * diff / v
    c = sig2[None] * s**2 / v
    mean = (r * m).sum(1)
    return (r * (c + m**2)).sum(1) - mean**2
