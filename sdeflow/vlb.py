r"""Variational bounds on the negative log-likelihood: the discrete DDPM bound and the continuous-time VDM bound.

**Discrete (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 5).** For a
:class:`~sdeflow.sdes.DiscreteVPSDE` with betas :math:`\beta_1..\beta_N` (sdeflow's step n = 0..N-1 is DDPM's
t = n + 1, at time (n+1)/N), :math:`\bar\alpha_t = \prod_{i\le t}(1-\beta_i)`,

.. math:: -\log p_\theta(x_0) \le \underbrace{\mathrm{KL}(q(x_N|x_0)\,\|\,N(0, I))}_{L_N}
          + \sum_{t=2}^{N} \underbrace{E_q\,\mathrm{KL}(q(x_{t-1}|x_t, x_0)\,\|\,p_\theta(x_{t-1}|x_t))}_{L_{t-1}}
          \underbrace{- E_q \log p_\theta(x_0|x_1)}_{L_0},

with the posterior :math:`q(x_{t-1}|x_t,x_0) = N(c_1 x_0 + c_2 x_t, \tilde\beta_t I)`,
:math:`c_1 = \sqrt{\bar\alpha_{t-1}}\beta_t/(1-\bar\alpha_t)`, :math:`c_2 = \sqrt{1-\beta_t}(1-\bar\alpha_{t-1})/
(1-\bar\alpha_t)`, :math:`\tilde\beta_t = \beta_t(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)`; the model
:math:`p_\theta(x_{t-1}|x_t) = N(c_1\hat x_0(x_t) + c_2 x_t, \sigma_t^2 I)` with :math:`\sigma_t^2` fixed to
:math:`\tilde\beta_t` (``"fixed_small"``), :math:`\beta_t` (``"fixed_large"``) or learned (:func:`learned_log_variance`),
and :math:`L_0` the discretized Gaussian decoder of Ho et al. Sec. 3.3 for data in [-1, 1] with 256 levels
(:func:`discretized_gaussian_log_likelihood`). As in their code (and improved DDPM's), the first step's variance is
:math:`\tilde\beta_2` for both fixed choices (:math:`\tilde\beta_1 = 0`). :func:`ddpm_vlb` sums all N terms (one net
call per step) or estimates it by Monte Carlo, :math:`L_N + L_0 + E_{t\sim p}[L_{t-1}/p(t)]` over t in 2..N
(uniform, or importance sampling by the closed-form weight of each term), with its standard error.

**Continuous (Kingma et al. 2021, "Variational Diffusion Models", eq. 17; Song et al. 2021, "Maximum Likelihood
Training of Score-Based Diffusion Models").** For any Gaussian path :math:`z_t = a_t x + s_t\varepsilon` with
log-SNR :math:`\lambda = \log(a/s)` decreasing from :math:`\lambda_\epsilon = \lambda(t_\epsilon)` to
:math:`\lambda_T`, the infinitely deep hierarchical model bounds

.. math:: -\log p_\theta(x) \le \mathrm{KL}(q(z_T|x)\,\|\,N(0, s_\pi^2 I))
          + \tfrac12 E_{t,\varepsilon}\big[-\mathrm{SNR}'(t)\,\lVert x - \hat x_0(z_t, t)\rVert^2\big]
          + E_q[-\log p(x|z_{t_\epsilon})],

and with :math:`\mathrm{SNR} = e^{2\lambda}`, :math:`x - \hat x_0 = e^{-\lambda}(\hat\varepsilon - \varepsilon)` the
middle (diffusion) term is :math:`\int_{\lambda_T}^{\lambda_\epsilon} E_\varepsilon\lVert\varepsilon -
\hat\varepsilon(z_{t(\lambda)}, t(\lambda))\rVert^2 d\lambda`, estimated with :math:`\lambda` uniform (VDM's
choice, low variance) or t uniform with the weight :math:`-\lambda'(t)`. The decoder is
:math:`p(x|z_\epsilon) = N(z_\epsilon/a_\epsilon, (s_\epsilon/a_\epsilon)^2 I)` for continuous data (its term is
:math:`\tfrac d2\log(2\pi e) - d\lambda_\epsilon`, exact), or the discretized version of it for 8-bit data (a bound on
the probability of the integer data, Monte Carlo).

**Learned variances** (Nichol & Dhariwal 2021, "Improved DDPM", eq. 15; ADM): a net with 2C output channels for C
data channels returns the prediction in the first C and :math:`v \in [-1, 1]` in the last C;
:math:`\log\sigma_t^2 = \tfrac{v+1}2\log\beta_t + \tfrac{1-v}2\log\tilde\beta_t` (their code's
``model_var_values`` mapping; v = 1 is ``fixed_large``, v = -1 ``fixed_small``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ._utils import append_dims, as_time, batch_time, check_choice, log1mexp
from .denoiser import Denoiser, Prediction, convert
from .sdes import DiscreteVPSDE, GaussianSDE

__all__ = [
    "VLBResult",
    "ddpm_vlb",
    "continuous_vlb",
    "ddpm_coefficients",
    "ddpm_step_terms",
    "learned_log_variance",
    "interpolate_log_variance",
    "predict_with_variance",
    "discretized_gaussian_log_likelihood",
    "gaussian_kl",
    "VARIANCES",
    "DECODERS",
    "T_SAMPLING",
    "DDPM_T_SAMPLING",
]

VARIANCES = ("fixed_small", "fixed_large", "learned")
DECODERS = ("gaussian", "discretized")
T_SAMPLING = ("logsnr", "t")
DDPM_T_SAMPLING = ("importance", "uniform")
_LN2 = math.log(2.0)
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class VLBResult:
    r"""Output of :func:`ddpm_vlb` and :func:`continuous_vlb`. Per-sample tensors have shape (batch,), float64.

    Attributes:
        nats: the bound on :math:`-\log p(x)` per sample, in nats (an unbiased estimate of it for Monte Carlo).
        bits_per_dim: ``nats / (d ln 2)``.
        std_error: per-sample standard error of ``bits_per_dim`` from the Monte-Carlo draws over t (needs >= 2
            draws; None otherwise, and for the exact DDPM sum, whose terms are one draw each).
        mean_bits_per_dim: the batch mean of ``bits_per_dim``.
        mean_std_error: standard error of ``mean_bits_per_dim`` as an estimate of the data-set mean, from the spread
            over the batch (includes the Monte-Carlo noise; NaN-free: 0 for a batch of one).
        terms: per-sample parts in nats: ``prior``, ``reconstruction`` (:math:`L_0`, decoder), ``diffusion`` (the
            rest); the exact DDPM sum adds ``steps`` of shape (batch, N), :math:`L_0 .. L_{N-1}`.
        nfe: net calls.
        stats: settings (variance, decoder, n_t, t range...).
    """

    nats: torch.Tensor
    bits_per_dim: torch.Tensor
    std_error: torch.Tensor | None
    mean_bits_per_dim: float
    mean_std_error: float
    terms: dict[str, torch.Tensor]
    nfe: int
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- building blocks
def gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    r"""Elementwise :math:`\mathrm{KL}(N(m_1, e^{l_1})\,\|\,N(m_2, e^{l_2})) = \tfrac12(l_2 - l_1 + e^{l_1 - l_2} +
    (m_1 - m_2)^2 e^{-l_2} - 1)` (broadcasting)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    mean: torch.Tensor,
    log_scale: torch.Tensor,
    levels: int = 256,
    low: float = -1.0,
    high: float = 1.0,
) -> torch.Tensor:
    r"""Elementwise log-probability of the bin of x under :math:`N(\text{mean}, e^{2\,\text{log\_scale}})`
    (Ho et al. 2020, eq. 13): the levels sit at :math:`\text{low} + k\Delta`, :math:`\Delta = (\text{high} -
    \text{low})/(\text{levels} - 1)` (k/127.5 - 1 for 8-bit data on [-1, 1]); the bin of x is :math:`[x - \Delta/2,
    x + \Delta/2]`, open to :math:`-\infty` at the lowest level and to :math:`+\infty` at the highest.

    Computed with ``log_ndtr`` on the side of the mean where the CDF difference does not cancel, and the midpoint
    rule :math:`\varphi(m)\,(u - l)` where the bin is narrow against the scale, so it stays finite and accurate in the
    tails (improved DDPM's code clamps the probability at 1e-12 instead).
    """
    half = 0.5 * (high - low) / (levels - 1)
    inv = torch.exp(-log_scale)
    upper = (x - mean + half) * inv
    lower = (x - mean - half) * inv
    flip = lower > 0  # both ends right of the mean: use the upper tail, P = Phi(-lower) - Phi(-upper)
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    la, lb = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    gap = la - lb
    wide = gap > 1e-6
    log_mid = torch.where(
        wide,
        la + log1mexp(torch.clamp(lb - la, max=-1e-6)),
        -0.5 * ((hi + lo) / 2) ** 2 - 0.5 * _LOG_2PI + torch.log(hi - lo),
    )
    first = x < low + half
    last = x > high - half
    return torch.where(first, torch.special.log_ndtr(upper), torch.where(last, torch.special.log_ndtr(-lower), log_mid))


def ddpm_coefficients(sde: DiscreteVPSDE) -> dict[str, torch.Tensor]:
    r"""Float64 tables over sdeflow's steps n = 0..N-1 (DDPM's t = n + 1): ``betas``, ``alphas_cumprod``
    (:math:`\bar\alpha_t`), ``alphas_cumprod_prev`` (:math:`\bar\alpha_{t-1}`, 1 at n = 0), ``posterior_variance``
    (:math:`\tilde\beta_t`, 0 at n = 0), ``posterior_log_variance_clipped`` (:math:`\log\tilde\beta_t` with n = 0
    taking :math:`\tilde\beta_2`), ``log_betas``, ``fixed_large_log_variance`` (:math:`\log\beta_t`, n = 0 taking
    :math:`\tilde\beta_2`), ``posterior_mean_coef1`` / ``coef2`` (:math:`c_1, c_2`). Names follow Ho et al.'s code."""
    if not isinstance(sde, DiscreteVPSDE):
        raise ValueError(f"the DDPM bound needs a DiscreteVPSDE, got {type(sde).__name__}")
    if sde.N < 2:
        raise ValueError(f"the DDPM bound needs N >= 2 steps, got N = {sde.N}")
    betas = sde.betas.to(torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    log_post = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": log_post,
        "log_betas": torch.log(betas),
        "fixed_large_log_variance": torch.log(torch.cat([post_var[1:2], betas[1:]])),
        "posterior_mean_coef1": betas * torch.sqrt(abar_prev) / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * torch.sqrt(1 - betas) / (1 - abar),
    }


def interpolate_log_variance(
    v: torch.Tensor, log_beta: torch.Tensor | float, log_beta_tilde: torch.Tensor | float
) -> torch.Tensor:
    r""":math:`\tfrac{v+1}2\log\beta + \tfrac{1-v}2\log\tilde\beta` (Nichol & Dhariwal 2021, eq. 15, their code's
    [-1, 1] parametrization), for any step: on a DDPM step :math:`\beta_t, \tilde\beta_t`; on a sampler step
    :math:`t_0 \to t_1` of a respaced grid, the forward transition variance :math:`s_0^2 - (a_0 s_1/a_1)^2` and the
    posterior variance (what ADM's respacing computes). ``log_beta`` and ``log_beta_tilde`` broadcast against v."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def learned_log_variance(v: torch.Tensor, sde: DiscreteVPSDE, n: torch.Tensor) -> torch.Tensor:
    r"""The per-step log variance of :math:`p_\theta(x_{t-1}|x_t)` from a net's variance channels
    (Nichol & Dhariwal 2021, eq. 15, in their code's parametrization):
    :math:`\log\sigma^2 = \tfrac{v+1}2\log\beta_t + \tfrac{1-v}2\log\tilde\beta_t` (clipped :math:`\tilde\beta`).

    Args:
        v: the variance channels, shape (B, C, ...), nominally in [-1, 1] (not clamped, as in their code).
        sde: the model's :class:`~sdeflow.sdes.DiscreteVPSDE`.
        n: step indices 0..N-1, shape (B,) or scalar (long).
    Returns:
        log variance, shape of v, v's dtype.
    """
    c = ddpm_coefficients(sde)
    n = torch.as_tensor(n, device=v.device).long()
    min_log = append_dims(c["posterior_log_variance_clipped"].to(v.device)[n], v.ndim).to(v.dtype)
    max_log = append_dims(c["log_betas"].to(v.device)[n], v.ndim).to(v.dtype)
    return interpolate_log_variance(v, max_log, min_log)


def _unwrap(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def predict_with_variance(den: Denoiser, x: torch.Tensor, t: torch.Tensor | float) -> tuple[Prediction, torch.Tensor]:
    r"""(x0_hat, eps_hat) and the variance channels v from ONE counted call of a 2C-channel net.

    The net's output (B, 2C, ...) for x of shape (B, C, ...) is split along dim 1: the first C channels are the
    ``den.prediction`` target, the last C are v (see :func:`learned_log_variance`).
    """
    t = as_time(t, x)
    out = _unwrap(den.net(x, den.net_time(batch_time(t, x))))
    den.nfe += 1
    C = x.shape[1]
    if not (
        isinstance(out, torch.Tensor) and out.ndim == x.ndim and out.shape[1] == 2 * C and out.shape[2:] == x.shape[2:]
    ):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"variance='learned' needs a net returning 2C channels (B, {2 * C}, ...) for x of shape {tuple(x.shape)}, "
            f"got {got}"
        )
    mean_out, v = out[:, :C], out[:, C:]
    a, s = den.coefficients(x, t)
    kw: dict[str, torch.Tensor] = {}
    if den.prediction == "flow":
        da, ds = den.derivatives(x, t)
        kw = {"da": da, "ds": ds}
    x0 = convert(mean_out, x, a, s, den.prediction, "x0", **kw)
    eps = convert(mean_out, x, a, s, den.prediction, "eps", **kw)
    return Prediction(x0, eps), v


def _flat_sum(z: torch.Tensor) -> torch.Tensor:
    return z.reshape(z.shape[0], -1).sum(dim=1)


def _normal(shape, dtype, device, generator) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=gdev).to(device)


def ddpm_step_terms(
    den: Denoiser,
    x0: torch.Tensor,
    n: torch.Tensor,
    noise: torch.Tensor,
    variance: str = "fixed_small",
    clip_x0: bool = False,
    levels: int = 256,
) -> torch.Tensor:
    r"""One draw of :math:`L_{t-1}` (DDPM t = n + 1) per sample, in nats: the KL term for n >= 1, the decoder term
    :math:`-\log p_\theta(x_0|x_1)` for n = 0, at :math:`x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,`
    ``noise``. One net call at the per-sample times (n + 1)/N.

    Args:
        den: the model, on a :class:`~sdeflow.sdes.DiscreteVPSDE`.
        x0: data in [-1, 1], shape (B, C, ...).
        n: step indices (B,), long, in 0..N-1.
        noise: standard normal like x0.
        variance: ``"fixed_small"``, ``"fixed_large"`` or ``"learned"`` (a 2C-channel net, :func:`predict_with_variance`).
        clip_x0: clamp :math:`\hat x_0` to [-1, 1] (ADM's ``clip_denoised``).
    """
    sde = _discrete(den)
    c = ddpm_coefficients(sde)
    dev, dt = x0.device, x0.dtype
    n = n.to(dev).long()
    t = (n.to(torch.float64) + 1) / sde.N
    a = append_dims(c["alphas_cumprod"].to(dev)[n].sqrt(), x0.ndim).to(dt)
    s = append_dims((1 - c["alphas_cumprod"].to(dev)[n]).sqrt(), x0.ndim).to(dt)
    xt = a * x0 + s * noise
    if variance == "learned":
        pred, v = predict_with_variance(den, xt, t.to(dev))
        logvar = learned_log_variance(v, sde, n)
    else:
        pred = den.predict(xt, t.to(dev))
        table = c["posterior_log_variance_clipped" if variance == "fixed_small" else "fixed_large_log_variance"]
        logvar = append_dims(table.to(dev)[n], x0.ndim).to(dt).expand_as(x0)
    x0_hat = pred.x0.clamp(-1.0, 1.0) if clip_x0 else pred.x0
    c1 = append_dims(c["posterior_mean_coef1"].to(dev)[n], x0.ndim).to(dt)
    c2 = append_dims(c["posterior_mean_coef2"].to(dev)[n], x0.ndim).to(dt)
    model_mean = c1 * x0_hat + c2 * xt
    true_mean = c1 * x0 + c2 * xt
    true_logvar = append_dims(c["posterior_log_variance_clipped"].to(dev)[n], x0.ndim).to(dt)
    kl = _flat_sum(gaussian_kl(true_mean, true_logvar, model_mean, logvar))
    nll0 = -_flat_sum(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * logvar, levels=levels))
    return torch.where(n == 0, nll0.to(torch.float64), kl.to(torch.float64))


def _summary(
    nats: torch.Tensor, se_nats: torch.Tensor | None, d: int, terms: dict[str, torch.Tensor], nfe: int, stats: dict
) -> VLBResult:
    if not bool(torch.isfinite(nats).all()):
        bad = int((~torch.isfinite(nats)).sum())
        raise ValueError(
            f"the bound is not finite for {bad} samples: check the model output (eps-prediction divides by a(t) = 0 "
            "on a zero-terminal-SNR schedule) and the data range"
        )
    bpd = nats / (d * _LN2)
    B = nats.shape[0]
    mean_se = float(bpd.std() / math.sqrt(B)) if B > 1 else 0.0
    return VLBResult(
        nats=nats,
        bits_per_dim=bpd,
        std_error=None if se_nats is None else se_nats / (d * _LN2),
        mean_bits_per_dim=float(bpd.mean()),
        mean_std_error=mean_se,
        terms=terms,
        nfe=nfe,
        stats=stats,
    )


def _discrete(den: Denoiser) -> DiscreteVPSDE:
    if not isinstance(den.sde, DiscreteVPSDE):
        raise ValueError(f"the DDPM bound needs a model on a DiscreteVPSDE, got {type(den.sde).__name__}")
    return den.sde


def _check_data(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (batch, *data_shape), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (scaled into the model's range), got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite")


def _check_n_t(n_t: int | None, allow_none: bool) -> None:
    if n_t is None and allow_none:
        return
    if not (isinstance(n_t, int) and n_t >= 1):
        raise ValueError(f"n_t must be {'None (exact sum) or ' if allow_none else ''}an integer >= 1, got {n_t!r}")


# ---------------------------------------------------------------------------------------------------- discrete
def ddpm_vlb(
    den: Denoiser,
    x: torch.Tensor,
    *,
    n_t: int | None = None,
    variance: str = "fixed_small",
    clip_x0: bool = False,
    levels: int = 256,
    t_sampling: str = "importance",
    generator: torch.Generator | None = None,
) -> VLBResult:
    r"""The DDPM variational bound (Ho et al. 2020, eq. 5) in bits/dim for data in [-1, 1] (module docstring).

    Args:
        den: the model; ``den.sde`` must be a :class:`~sdeflow.sdes.DiscreteVPSDE` (N >= 2).
        x: (B, C, ...) data in [-1, 1] (k/127.5 - 1 for 8-bit images; the decoder's bins are 2/255 wide).
        n_t: None for the exact sum over all N steps (N net calls of batch B, one noise draw per term), or the number
            of Monte-Carlo draws per sample (n_t net calls of batch 2B): each draw is :math:`L_0 + L_{t-1}/p(t)` for
            one t in 2..N drawn with probability p(t) (the decoder term, a large share of the bound, is in every
            draw rather than with probability 1/N); the standard error is the spread of the draws over
            :math:`\sqrt{n_t}`.
        t_sampling: p(t) for the Monte Carlo: ``"uniform"`` on 2..N, or ``"importance"`` (default):
            :math:`p(t) \propto w_t = c_1^2(1-\bar\alpha_t)/(\bar\alpha_t\,\tilde\beta_t)`, the weight that turns
            :math:`\lVert\varepsilon - \hat\varepsilon\rVert^2` into the KL's mean term (Ho et al. eq. 12), so each
            draw is about :math:`\sum_t w_t\,\lVert\varepsilon - \hat\varepsilon\rVert^2`: unbiased either way, with
            far less variance where the terms at small t dominate.
        variance: ``"fixed_small"`` (:math:`\tilde\beta_t`), ``"fixed_large"`` (:math:`\beta_t`) or ``"learned"``
            (a 2C-channel net; Nichol & Dhariwal 2021).
        clip_x0: clamp :math:`\hat x_0` to [-1, 1] (ADM's ``clip_denoised``).
        generator: source of the noise and the sampled steps.

    The prior term uses N(0, I), as Ho et al. (sdeflow's :meth:`~sdeflow.sdes.GaussianSDE.prior_log_prob` uses
    N(0, s(T)^2 I); the two differ by :math:`\bar\alpha_N` terms, 4e-5 for the linear schedule).
    """
    if not isinstance(den, Denoiser):
        raise ValueError(f"den must be a sdeflow.Denoiser, got {type(den).__name__}")
    check_choice("variance", variance, VARIANCES)
    check_choice("t_sampling", t_sampling, DDPM_T_SAMPLING)
    _check_n_t(n_t, allow_none=True)
    if not (isinstance(levels, int) and levels >= 2):
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    sde = _discrete(den)
    c = ddpm_coefficients(sde)  # raises unless N >= 2
    _check_data(x)
    if bool((x.abs() > 1.0 + 1e-6).any()):
        raise ValueError(
            f"x must lie in [-1, 1] for the discretized decoder (k/127.5 - 1 for 8-bit data), got values in "
            f"[{float(x.min())}, {float(x.max())}]"
        )
    dev = x.device
    N, B, d = sde.N, x.shape[0], x[0].numel()
    abar_N = float(c["alphas_cumprod"][-1])
    sq = _flat_sum(x.to(torch.float64) ** 2)
    # L_N = KL(N(sqrt(ab) x, 1 - ab) || N(0, 1)), summed over the d dimensions
    prior = 0.5 * (-d - d * math.log1p(-abar_N) + d * (1 - abar_N) + abar_N * sq)
    nfe0 = den.nfe
    terms: dict[str, torch.Tensor] = {"prior": prior}
    if n_t is None:
        steps = torch.empty(B, N, dtype=torch.float64, device=dev)
        for step in range(N):
            noise = _normal(x.shape, x.dtype, dev, generator)
            idx = torch.full((B,), step, device=dev)
            steps[:, step] = ddpm_step_terms(den, x, idx, noise, variance, clip_x0, levels)
        terms.update(reconstruction=steps[:, 0], diffusion=steps[:, 1:].sum(1), steps=steps)
        nats, se = prior + steps.sum(1), None
    else:
        # each draw: L_0 (which alone is a large share of the bound) plus L_{t-1} / p(t) for one t in 2..N, both
        # from ONE net call on the batch stacked twice
        recon_draws = torch.empty(n_t, B, dtype=torch.float64, device=dev)
        diff_draws = torch.empty(n_t, B, dtype=torch.float64, device=dev)
        gdev = generator.device if generator is not None else dev
        x2 = torch.cat([x, x])
        if t_sampling == "uniform":
            p = torch.full((N - 1,), 1.0 / (N - 1), dtype=torch.float64)
        else:
            ab = c["alphas_cumprod"][1:]
            w = c["posterior_mean_coef1"][1:] ** 2 * (1 - ab) / ab / c["posterior_variance"][1:]
            p = w / w.sum()
        for j in range(n_t):
            k = torch.multinomial(p.to(gdev), B, replacement=True, generator=generator).to(dev)
            n = k + 1
            idx = torch.cat([torch.zeros_like(n), n])
            noise = _normal(x2.shape, x.dtype, dev, generator)
            both = ddpm_step_terms(den, x2, idx, noise, variance, clip_x0, levels)
            recon_draws[j], diff_draws[j] = both[:B], both[B:] / p.to(dev)[k]
        draws = recon_draws + diff_draws
        terms.update(reconstruction=recon_draws.mean(0), diffusion=diff_draws.mean(0))
        nats = prior + draws.mean(0)
        se = draws.std(0) / math.sqrt(n_t) if n_t >= 2 else None
    stats = dict(bound="ddpm", variance=variance, n_t=n_t, N=N, clip_x0=clip_x0, levels=levels, t_sampling=t_sampling)
    return _summary(nats, se, d, terms, den.nfe - nfe0, stats)


# ---------------------------------------------------------------------------------------------------- continuous
def continuous_vlb(
    den: Denoiser,
    x: torch.Tensor,
    *,
    n_t: int = 1,
    t_eps: float | None = None,
    decoder: str = "gaussian",
    t_sampling: str = "logsnr",
    levels: int = 256,
    generator: torch.Generator | None = None,
) -> VLBResult:
    r"""The continuous-time bound of Kingma et al. (2021, VDM eq. 17) for any Gaussian path (module docstring).

    :math:`\mathrm{KL}(N(a_T x, s_T^2 I)\,\|\,N(0, s_\pi^2 I)) + (\lambda_\epsilon - \lambda_T)\,
    E_{\lambda,\varepsilon}\lVert\varepsilon - \hat\varepsilon\rVert^2 + E[-\log p(x|z_{t_\epsilon})]`,
    :math:`s_\pi` = ``den.sde.prior_std()``, Monte Carlo over (t, eps) with ``n_t`` draws per sample.

    Args:
        den: the model (any prediction type; one net call per draw).
        x: (B, *data_shape) data in model units (for ``decoder="discretized"``: on the grid of ``levels`` values
            in [-1, 1], k/127.5 - 1 for 8-bit data; the bound is then on the probability of the integer data).
        n_t: draws of t per sample (>= 2 for a per-sample standard error).
        t_eps: the smallest time, default ``den.sde.eps``; the decoder reads :math:`z_{t_\epsilon}`.
        decoder: ``"gaussian"`` (:math:`N(z/a, (s/a)^2 I)`, exact term) or ``"discretized"`` (its bins).
        t_sampling: ``"logsnr"`` (lambda uniform on :math:`[\lambda_T, \lambda_\epsilon]`, VDM) or ``"t"`` (t uniform
            with weight :math:`-\lambda'(t)(T - t_\epsilon)`; needs finite :math:`\lambda'`).
        generator: source of the draws.
    """
    if not isinstance(den, Denoiser):
        raise ValueError(f"den must be a sdeflow.Denoiser, got {type(den).__name__}")
    check_choice("decoder", decoder, DECODERS)
    check_choice("t_sampling", t_sampling, T_SAMPLING)
    _check_n_t(n_t, allow_none=False)
    _check_data(x)
    sde: GaussianSDE = den.sde
    t_eps = float(sde.eps if t_eps is None else t_eps)
    if not 0.0 < t_eps < sde.T:
        raise ValueError(f"t_eps must lie in (0, T) = (0, {sde.T}), got {t_eps}")
    lam_eps = float(sde.log_snr(t_eps))
    lam_T = float(sde.log_snr(sde.T))
    if not (math.isfinite(lam_eps) and math.isfinite(lam_T) and lam_eps > lam_T):
        raise ValueError(
            f"the bound needs a finite log-SNR decreasing from t_eps to T, got {lam_eps} -> {lam_T} (a zero-terminal-"
            "SNR path has lambda(T) = -inf: the diffusion term's range is infinite)"
        )
    if decoder == "discretized" and bool((x.abs() > 1.0 + 1e-6).any()):
        raise ValueError("x must lie in [-1, 1] for decoder='discretized'")
    dev, B, d = x.device, x.shape[0], x[0].numel()
    x64 = x.to(torch.float64)
    sq = _flat_sum(x64**2)
    # prior: KL(N(a_T x, s_T^2) || N(0, s_pi^2)) per sample; a_T = 0 (zero terminal SNR) gives the variance part only
    a_T, s_T, s_pi = float(sde.alpha(sde.T)), float(sde.sigma(sde.T)), sde.prior_std()
    r = (s_T / s_pi) ** 2
    prior = 0.5 * d * (r - 1 - math.log(r)) + a_T * a_T * sq / (2 * s_pi * s_pi)
    a_e, s_e = float(sde.alpha(t_eps)), float(sde.sigma(t_eps))
    gdev = generator.device if generator is not None else dev
    nfe0 = den.nfe
    diff_draws = torch.empty(n_t, B, dtype=torch.float64, device=dev)
    recon_draws = torch.empty(n_t, B, dtype=torch.float64, device=dev)
    for j in range(n_t):
        u = torch.rand(B, generator=generator, dtype=torch.float64, device=gdev).to(dev)
        if t_sampling == "logsnr":
            lam = lam_T + u * (lam_eps - lam_T)
            t = sde.t_from_log_snr(lam).clamp(t_eps, sde.T)
            weight = torch.full_like(u, lam_eps - lam_T)
        else:
            t = t_eps + u * (sde.T - t_eps)
            dlam = sde.d_alpha(t) / sde.alpha(t) - sde.d_sigma(t) / sde.sigma(t)
            weight = -dlam * (sde.T - t_eps)
        eps = _normal(x.shape, x.dtype, dev, generator)
        a = append_dims(sde.alpha(t).to(dtype=x.dtype), x.ndim)
        s = append_dims(sde.sigma(t).to(dtype=x.dtype), x.ndim)
        eps_hat = den.eps(a * x + s * eps, t)
        diff_draws[j] = weight * _flat_sum((eps - eps_hat).to(torch.float64) ** 2)
        if decoder == "discretized":
            z = a_e * x + s_e * _normal(x.shape, x.dtype, dev, generator)
            log_scale = torch.full_like(x, math.log(s_e / a_e))
            recon_draws[j] = -_flat_sum(
                discretized_gaussian_log_likelihood(x, z / a_e, log_scale, levels=levels).to(torch.float64)
            )
    if decoder == "gaussian":
        recon = torch.full((B,), 0.5 * d * (_LOG_2PI + 1) - d * lam_eps, dtype=torch.float64, device=dev)
        per_draw = diff_draws
    else:
        recon = recon_draws.mean(0)
        per_draw = diff_draws + recon_draws
    diffusion = diff_draws.mean(0)
    nats = prior + recon + diffusion
    se = per_draw.std(0) / math.sqrt(n_t) if n_t >= 2 else None
    terms = {"prior": prior, "reconstruction": recon, "diffusion": diffusion}
    stats = dict(
        bound="continuous", n_t=n_t, t_eps=t_eps, decoder=decoder, t_sampling=t_sampling, lam_eps=lam_eps, lam_T=lam_T
    )
    return _summary(nats, se, d, terms, den.nfe - nfe0, stats)
