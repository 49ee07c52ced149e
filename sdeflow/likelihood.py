r"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through
SDEs", Sec. 4.3 and App. D.2; the instantaneous change of variables of Chen et al. 2018, "Neural ODEs").

The probability-flow ODE :math:`\dot x = v(x, t) = f(t)x - \tfrac12 g(t)^2 \nabla\log p_t(x)` transports the marginals
:math:`p_t` exactly, and along one of its trajectories :math:`\tfrac{d}{dt}\log p_t(x_t) = -\nabla\!\cdot v(x_t, t)`.
Integrating the augmented state :math:`[x, \Delta]` with :math:`\dot\Delta = \nabla\!\cdot v` from :math:`t_\epsilon`
to :math:`T` gives

.. math:: \log p_{t_\epsilon}(x) = \log p_T(x_T) + \int_{t_\epsilon}^T \nabla\!\cdot v(x_t, t)\,dt
          \approx \log\pi(x_T) + \Delta(T),

where the prior :math:`\pi = N(0, s(T)^2 I)` stands in for the unknown :math:`p_T` (the *prior gap*, bounded in
:class:`LikelihoodResult`). The velocity is affine in the net's raw output, :math:`v = c_x x + c_o\,\mathrm{net}`, so
:math:`\nabla\cdot v = c_x d + c_o\nabla\cdot\mathrm{net}` and only the net is differentiated. The divergence is
either the exact Jacobian trace (``d`` products through one net call, vectorized in chunks; the mode and chunk
autotuned per shape by :func:`sdeflow.divergence.divergence`) or the Hutchinson / Skilling estimator
:math:`E_\varepsilon[\varepsilon^\top J\varepsilon]` with probes drawn once per solve. The derivation, the bits/dim
offset for dequantized images and the pitfalls are in ``docs/likelihood.md``.

**Integration variable.** ``variable="logsnr"`` integrates in :math:`u = -\lambda` (:math:`\lambda = \log(a/s)`)
instead of t, by the change of variables :math:`dt = du / (-\lambda'(t))`:
:math:`\tfrac{d}{du}[x, \Delta] = [v, \nabla\cdot v] / (-\lambda'(t(u)))`, the endpoints and the result unchanged
(the log-SNR is the variable of the exponential-integrator samplers, Lu et al. 2022). ``solver=`` with ``nfe=`` steps
the augmented state on a fixed grid uniform in the chosen variable (torchdiffeq's fixed-grid Runge-Kutta methods).

**Velocity.** :math:`v = f x - \tfrac12 g^2\,\mathrm{score}` through
:func:`sdeflow.solvers.base.probability_flow_velocity`, except for flow-prediction models and paths that reach
:math:`a(T) = 0` (flow matching), where the equal but finite form :math:`v = a'(t)\hat x_0 + s'(t)\hat\varepsilon`
is used (:math:`f(T) = -\infty` and :math:`g(T)^2 = \infty` there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._utils import append_dims, check_choice, check_positive
from .adams import adams_integrate
from .denoiser import Denoiser
from .divergence import DIVERGENCE_METHODS, EXACT_MODES, PROBE_KINDS, hutchinson_probes
from .divergence import divergence as estimate_divergence
from .sdes import DiscreteVPSDE, GaussianSDE
from .solvers.base import SolverError, prediction_affine, probability_flow_velocity
from .solvers.bridges import odeint

__all__ = [
    "log_likelihood",
    "LikelihoodResult",
    "UniformDequantization",
    "drift_and_divergence",
    "prior_gap_bound",
    "DIVERGENCES",
    "PROBES",
    "METHODS",
    "VARIABLES",
    "GRID_SOLVERS",
    "vp_time_from_log_snr",
    "log_snr_from_vp_time",
]

DIVERGENCES = DIVERGENCE_METHODS  # ("exact", "hutchinson", "hutch++")
PROBES = PROBE_KINDS
VARIABLES = ("auto", "t", "logsnr", "vp_time")
#: fixed-grid solvers of ``log_likelihood(solver=..., nfe=...)``: name -> (integrator, evaluations per step). The
#: Runge-Kutta ones are torchdiffeq's; ``abm3`` / ``abm4`` are sdeflow.adams' PEC Adams pairs (AB3/AM4, AB4/AM5: one
#: evaluation per step plus one at the start).
GRID_SOLVERS: dict[str, tuple[str, int]] = {
    "euler": ("euler", 1),
    "midpoint": ("midpoint", 2),
    "heun": ("heun2", 2),
    "heun3": ("heun3", 3),
    "rk4": ("rk4", 4),
    "abm3": ("adams", 1),
    "abm4": ("adams", 1),
}
#: sdeflow's own integrators (sdeflow.adams): no torchdiffeq adjoint
OWN_METHODS = ("adams",)
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "adams")
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
METHODS = ADAPTIVE_METHODS + FIXED_METHODS
_LN2 = math.log(2.0)
#: the linear VP SDE (Song et al. 2021) whose time is ``variable="vp_time"``: beta(tau) = 0.1 + 19.9 tau
_VP_B0, _VP_B1 = 0.1, 20.0


def vp_time_from_log_snr(lam: torch.Tensor) -> torch.Tensor:
    r""":math:`\tau(\lambda)`: the time at which the linear VP SDE (beta from 0.1 to 20) has log-SNR
    :math:`\lambda`, for any real :math:`\lambda` (tau > 1 beyond that SDE's end, 0 at :math:`+\infty`).

    :math:`\log a = -\tfrac12\mathrm{softplus}(-2\lambda)` and the positive root of
    :math:`\tfrac14(\beta_1-\beta_0)\tau^2 + \tfrac12\beta_0\tau + \log a = 0`, rationalized (no cancellation)."""
    la = -0.5 * torch.nn.functional.softplus(-2 * lam)
    return -2 * la / (0.5 * _VP_B0 + torch.sqrt(0.25 * _VP_B0**2 - (_VP_B1 - _VP_B0) * la))


def log_snr_from_vp_time(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The inverse of :func:`vp_time_from_log_snr` and its derivative: :math:`(\lambda(\tau), d\lambda/d\tau)`,
    :math:`\lambda = \log a - \tfrac12\log(1 - a^2)`, :math:`d\lambda/d\tau = f(\tau)/s(\tau)^2` with
    :math:`f = -\tfrac12\beta(\tau)` (a variance-preserving path)."""
    la = -0.25 * tau**2 * (_VP_B1 - _VP_B0) - 0.5 * tau * _VP_B0
    s2 = -torch.expm1(2 * la)
    return la - 0.5 * torch.log(s2), -0.5 * (_VP_B0 + tau * (_VP_B1 - _VP_B0)) / s2


@dataclass(frozen=True)
class UniformDequantization:
    r"""Uniform dequantization of integer data (Theis et al. 2016; Uria et al. 2013) into the model's range.

    Integer data :math:`k \in \{0, \dots, L-1\}^d` becomes :math:`x = \text{low} + \Delta\,(k + u)`,
    :math:`u \sim U[0, 1)^d`, :math:`\Delta = (\text{high} - \text{low})/L`, so cell k maps onto
    :math:`[\text{low} + \Delta k, \text{low} + \Delta(k+1))` and the cells tile :math:`[\text{low}, \text{high})`.
    For any model density p on x, Jensen's inequality gives the bound

    .. math:: -\log_2 P(k) \le -E_u[\log p(x)]/\ln 2 - d\log_2\Delta,

    so bits/dim :math:`= -\log p(x)/(d\ln 2) + \log_2(L/(\text{high}-\text{low}))`: +7 for 256 levels on [-1, 1)
    (the default, the score_sde convention :math:`x = (k+u)/128 - 1`), +8 on [0, 1). A model trained on
    ``k/127.5 - 1`` matches ``high = 1 + 2/255`` (cells of width 1/127.5, offset :math:`\log_2 127.5`).

    Args:
        levels: number of integer levels L (256 for 8-bit images).
        low, high: the model-space interval the levels tile.
    """

    levels: int = 256
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.levels, int) and self.levels >= 2):
            raise ValueError(f"levels must be an integer >= 2, got {self.levels!r}")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"low and high must be finite with low < high, got low={self.low}, high={self.high}")

    @property
    def width(self) -> float:
        """Cell width Delta = (high - low) / levels in model units."""
        return (self.high - self.low) / self.levels

    @property
    def offset_bits(self) -> float:
        """Bits per dimension added to -log2 p(x)/d: log2(levels / (high - low)) = -log2(Delta)."""
        return -math.log2(self.width)

    def check(self, k: torch.Tensor) -> None:
        """Raise a ValueError unless k holds integers in [0, levels - 1] (one host sync)."""
        kf = k.to(torch.float64) if not k.is_floating_point() else k
        ok = torch.isfinite(kf).all() & (kf == torch.round(kf)).all() & (kf >= 0).all() & (kf <= self.levels - 1).all()
        if not bool(ok):
            raise ValueError(
                f"x must hold integers in [0, {self.levels - 1}] when dequantize is given (levels={self.levels}); "
                f"got values in [{float(kf.min())}, {float(kf.max())}]"
            )

    def __call__(self, k: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
        """x = low + Delta (k + u), u ~ U[0, 1) drawn from ``generator``, in ``dtype`` on k's device."""
        u = _rand(k.shape, dtype, k.device, generator)
        return self.low + self.width * (k.to(dtype) + u)


@dataclass
class LikelihoodResult:
    r"""Output of :func:`log_likelihood`. Per-sample tensors have shape (batch,).

    Attributes:
        log_prob: :math:`\log\pi(x_T) + \Delta(T)`, the model's log-density of ``x`` at ``t_eps`` in nats per sample
            (model units; float64 unless the state dtype was set otherwise).
        bits_per_dim: :math:`-\text{log\_prob}/(d\ln 2)` plus ``dequantization_offset`` (bits).
        nfe: ODE right-hand-side evaluations of the forward solve, one net call each (the divergence reuses that
            call's graph; ``stats["net_calls"]`` is the Denoiser's own count).
        x_T: the end point of the flow at T, in x's dtype.
        prior_log_prob: :math:`\log\pi(x_T)`, the prior term.
        delta_log_prob: :math:`\int_{t_\epsilon}^T \nabla\cdot v\,dt`, the ODE term; swap the prior term for an exact
            :math:`\log p_T(x_T)` to isolate the solver error.
        prior_gap_bound: per-sample :math:`\mathrm{KL}(N(a_T x, s_T^2 I)\,\|\,\pi)` (nats). Its mean over data bounds
            the expected prior gap :math:`E[\log p_T(x_T) - \log\pi(x_T)] = \mathrm{KL}(p_T\|\pi) \ge 0` by
            which ``log_prob`` underestimates the flow's exact density. None when a custom ``prior`` was passed.
        dequantization_offset: bits/dim added for dequantized integer data (0 for continuous data).
        x: the point whose density was computed (the dequantized data in model units, or the input).
        t_eps: the start time of the flow.
        stats: ``evaluations`` (ODE right-hand-side calls), ``net_calls`` (counted by the Denoiser; more than the
            evaluations only when a forward-mode exact divergence or its one-off autotuning calls the net again),
            ``batches``, the solver settings.
        std_error: per-sample standard error of ``log_prob`` for the stochastic divergences with >= 2 (residual)
            probes: the ODE carries one :math:`\Delta` per probe, whose integrals are i.i.d. over the probes (drawn
            once per solve), so their spread over the m probes divided by :math:`\sqrt m` is the exact standard
            error of their mean (Hutch++: given the sketch). ``probe_variance`` = m x its square is the variance of
            one probe's log p: ``probe_variance / target**2`` probes reach a target standard error. None for the
            exact divergence and for one probe.
        probe_variance: see ``std_error``.
    """

    log_prob: torch.Tensor
    bits_per_dim: torch.Tensor
    nfe: int
    x_T: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    prior_gap_bound: torch.Tensor | None
    dequantization_offset: float
    x: torch.Tensor
    t_eps: float
    stats: dict[str, Any] = field(default_factory=dict)
    std_error: torch.Tensor | None = None
    probe_variance: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------- random helpers
def _rand(shape, dtype, device, generator) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, dtype=dtype, device=gdev).to(device)


# ---------------------------------------------------------------------------------------------------- divergence
def drift_and_divergence(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    divergence: str = "exact",
    probes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""v = fn(x) and the per-sample divergence :math:`\nabla\cdot v = \mathrm{tr}\,\partial v/\partial x`.

    A thin wrapper of :func:`sdeflow.divergence.divergence` (reverse mode): one forward call of ``fn``, then
    vector-Jacobian products through its graph, ``chunk_size`` at a time. ``"exact"`` sums the d diagonal entries;
    ``"hutchinson"`` / ``"hutch++"`` need ``probes`` of shape (n, *x.shape) (Hutchinson 1990; Meyer et al. 2021).

    Returns:
        (v, div) with shapes (B, *shape) and (B,); detached unless ``create_graph``.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    if divergence != "exact" and probes is None:
        raise ValueError(f"divergence={divergence!r} needs probes of shape (n_probes, *{tuple(x.shape)})")
    res = estimate_divergence(
        fn, x, divergence, probes=probes, mode="reverse", chunk=chunk_size, create_graph=create_graph
    )
    return res.f_x, res.value


def _needs_data_noise_form(den: Denoiser) -> bool:
    """Flow predictions, and paths whose f(T) is not finite (a(T) = 0), use v = a' x0_hat + s' eps_hat."""
    if den.prediction == "flow":
        return True
    T = torch.tensor(float(den.sde.T), dtype=torch.float64)
    return not bool(torch.isfinite(den.sde.f(T)))


class _AugmentedFlow:
    """Right-hand side of the augmented probability-flow ODE d[x, Delta]/du = [v, div v] dt/du for torchdiffeq.

    u is t (``variable="t"``), minus the log-SNR (``"logsnr"``) or the linear VP SDE's time of the log-SNR
    (``"vp_time"``). Delta is (B,) for the exact divergence and
    (B, m) for the stochastic ones (one integral per probe). Second-order graphs are built only when someone needs
    them: grad mode on and the state or a parameter requiring grad (direct backpropagation, or the adjoint's
    backward pass).
    """

    def __init__(
        self,
        den: Denoiser,
        model_dtype: torch.dtype,
        method: str,
        probes: torch.Tensor | None,
        mode: str,
        chunk: int | None,
        params_need_grad: bool,
        variable: str,
    ) -> None:
        self.den, self.sde, self.model_dtype = den, den.sde, model_dtype
        self.T = float(den.sde.T)
        self.method, self.probes, self.mode, self.chunk = method, probes, mode, chunk
        self.params_need_grad = params_need_grad
        self.variable = variable
        self.data_noise_form = _needs_data_noise_form(den)
        self.sketch = 0  # Hutch++: the first `sketch` probes are a fixed orthonormal basis Q (see fix_sketch)
        self.evaluations = 0

    def fix_sketch(self, x: torch.Tensor, u0: torch.Tensor) -> None:
        r"""Hutch++ with the projection fixed for the solve: from the n probes, k = min(n // 3, d) sketch vectors S
        and m = n - 2k residual probes G (Meyer et al. 2021, Alg. 1), :math:`Q = \mathrm{qr}(J^\top S)` once at the
        start point (one extra net call, not an ODE evaluation), then at every evaluation
        :math:`\mathrm{tr}(Q^\top JQ) + g_j^\top(I-QQ^\top)J(I-QQ^\top)g_j` from k + m products. Unbiased for
        any Q independent of G, and smooth in t: recomputing Q at every evaluation (sdeflow.divergence's
        ``"hutch++"``) makes the right-hand side jump wherever the sketch is nearly rank-deficient (a VE solve at
        d = 3 took 1178 evaluations instead of Hutchinson's 92)."""
        assert self.probes is not None
        B, d = x.shape[0], x[0].numel()
        n = self.probes.shape[0]
        k = min(n // 3, d)
        S, G = self.probes[:k], self.probes[k : n - k]
        t, _ = self.time(u0)
        with torch.enable_grad():
            z = x.detach().to(self.model_dtype).requires_grad_(True)
            v = self.velocity(z, t)
            (rows,) = torch.autograd.grad(v, z, S.to(v.dtype), is_grads_batched=True, allow_unused=True)
        if rows is None:  # the velocity does not depend on x
            rows = torch.zeros_like(S)
        Y = rows.detach().reshape(k, B, d).permute(1, 2, 0)  # (B, d, k)
        Q = torch.linalg.qr(Y, mode="reduced").Q
        Gf = G.reshape(G.shape[0], B, d).permute(1, 2, 0).to(Q.dtype)
        Gp = Gf - Q @ (Q.transpose(1, 2) @ Gf)
        self.probes = torch.cat([Q, Gp], dim=2).permute(2, 0, 1).reshape(-1, *x.shape).to(self.model_dtype)
        self.method, self.sketch = "hutchinson", k

    def time(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """t(u) and dt/du (None for u = t): dt/du = (dlambda/du) / lambda'(t)."""
        if self.variable == "t":
            # the solvers stop exactly at t_eps and T (step_t), but an initial-step probe may look past T
            return u.clamp(0.0, self.T), None
        dlam_du: torch.Tensor | float
        if self.variable == "logsnr":
            lam, dlam_du = -u.detach(), -1.0
        else:  # vp_time: lambda(tau) of the linear VP SDE
            lam, dlam_du = log_snr_from_vp_time(u.detach())
        t = self.sde.t_from_log_snr(lam).clamp(0.0, self.T)
        dlam = self.sde.f(t) - self.sde.d_sigma(t) / self.sde.sigma(t)  # lambda'(t) = a'/a - s'/s < 0
        return t, dlam_du / dlam

    def velocity(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.data_noise_form:
            pred = self.den.predict(z, t)
            da = append_dims(self.sde.d_alpha(t).to(device=z.device, dtype=z.dtype), z.ndim)
            ds = append_dims(self.sde.d_sigma(t).to(device=z.device, dtype=z.dtype), z.ndim)
            return da * pred.x0 + ds * pred.eps
        return probability_flow_velocity(self.den, z, t)[0]

    def affine(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        r"""(c_x, c_o) with :math:`v = c_x x + c_o\,\mathrm{out}` for the net's raw output (every prediction type is
        affine in (x, out): :func:`sdeflow.solvers.base.prediction_affine`), or None for Denoiser subclasses."""
        coeffs = prediction_affine(self.den, t)
        if coeffs is None:
            return None
        p, q, r, w = coeffs
        da, ds = self.sde.d_alpha(t), self.sde.d_sigma(t)
        cx, co = da * p + ds * r, da * q + ds * w  # v = a' x0_hat + s' eps_hat
        if not (bool(torch.isfinite(cx.detach())) and bool(torch.isfinite(co.detach()))):
            return None
        return cx, co  # tensors: t carries the solver's graph when gradients flow through the solve

    def __call__(self, u: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        y = state[0]
        create_graph = torch.is_grad_enabled() and (y.requires_grad or self.params_need_grad)
        x = y.to(self.model_dtype)
        t, dt_du = self.time(u.to(torch.float64))
        aff = self.affine(t)
        # div(c_x x + c_o net(x)) = c_x d + c_o div net(x): differentiate the net alone (no conversion ops in the d
        # backward passes; the stochastic estimators then see the linear part exactly, a control variate for free)
        field = (lambda z: self.den.raw(z, t)) if aff is not None else (lambda z: self.velocity(z, t))
        res = estimate_divergence(
            field, x, self.method, probes=self.probes, mode=self.mode, chunk=self.chunk, create_graph=create_graph
        )
        per = res.per_probe
        if per is not None and self.sketch:  # tr(Q^T J Q) + each residual probe's term
            per = per[: self.sketch].sum(dim=0, keepdim=True) + per[self.sketch :]
        div = res.value if per is None else per.transpose(0, 1)
        if aff is not None:
            cx, co = (c.to(device=y.device, dtype=y.dtype) for c in aff)
            d = x[0].numel()
            v = cx * y + co * res.f_x.to(y.dtype)
            div = cx * d + co * div.to(y.dtype)
        else:
            v, div = res.f_x.to(y.dtype), div.to(y.dtype)
        if dt_du is not None:
            w = dt_du.to(device=y.device, dtype=y.dtype)
            v, div = v * w, div * w
        self.evaluations += 1
        return v, div


# ---------------------------------------------------------------------------------------------------- checks
def _check_x(x: torch.Tensor, dequantize: UniformDequantization | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor of shape (batch, *data_shape), got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"x must have shape (batch, *data_shape) with batch >= 1 and data, got {tuple(x.shape)}")
    if dequantize is not None:
        dequantize.check(x)
        return
    if not x.is_floating_point():
        raise ValueError(
            f"x has integer dtype {x.dtype}: pass dequantize=UniformDequantization(levels, low, high) to map integer "
            "data into the model's range, or a floating-point x"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x must be finite; it holds {int((~torch.isfinite(x)).sum())} NaN or infinite values")


def _model_dtype(den: Denoiser, x: torch.Tensor) -> torch.dtype:
    if x.is_floating_point():
        return x.dtype
    if isinstance(den.net, torch.nn.Module):
        for p in den.net.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.get_default_dtype()


def _adjoint_params(den: Denoiser, extra: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    params: list[torch.Tensor] = []
    if isinstance(den.net, torch.nn.Module):
        params.extend(p for p in den.net.parameters() if p.requires_grad)
    if extra is not None:
        known = {id(p) for p in params}
        params.extend(p for p in extra if id(p) not in known)
    return tuple(params)


def _grid_min_nfe(solver: str) -> int:
    """The evaluations of one step of a fixed-grid solver (the Adams pairs: the start and one step)."""
    method, stages = GRID_SOLVERS[solver]
    return 2 if method == "adams" else stages


def _fixed_grid(solver: str, nfe: int, u_ends: tuple[float, float], variable: str) -> torch.Tensor:
    """The nodes of a fixed-grid solve: ``nfe // stages`` equal steps for the Runge-Kutta methods; ``nfe - 1`` steps
    for the Adams pairs, quadratic in t and vp_time (u0 + (u1 - u0)(i/n)^2: small first steps while the order ramps
    up from 1, where the integrand is not yet small) and uniform in the log-SNR (whose first steps lie in the data
    end's tail, where the integrand decays like sigma^2); measured in benchmarks/likelihood.py."""
    method, stages = GRID_SOLVERS[solver]
    if method != "adams":
        return torch.linspace(u_ends[0], u_ends[1], nfe // stages + 1, dtype=torch.float64)
    s = torch.linspace(0.0, 1.0, nfe, dtype=torch.float64)
    if variable != "logsnr":
        s = s * s
    return u_ends[0] + (u_ends[1] - u_ends[0]) * s


def prior_gap_bound(den_or_sde: Denoiser | GaussianSDE, x: torch.Tensor) -> torch.Tensor:
    r"""Per-sample :math:`\mathrm{KL}(N(a_T x, s_T^2 I)\,\|\,N(0, s_\pi^2 I))`, nats, shape (batch,).

    :math:`= \tfrac d2(r - 1 - \log r) + a_T^2\lVert x\rVert^2/(2 s_\pi^2)` with :math:`r = s_T^2/s_\pi^2`. By joint
    convexity of KL its mean over data x bounds :math:`\mathrm{KL}(p_T\|\pi)`, the expected amount by which the prior
    term underestimates :math:`\log p_T(x_T)`.
    """
    sde = den_or_sde.sde if isinstance(den_or_sde, Denoiser) else den_or_sde
    a = float(sde.alpha(sde.T))
    s = float(sde.sigma(sde.T))
    sp = sde.prior_std()
    d = x[0].numel()
    r = (s / sp) ** 2
    sq = x.reshape(x.shape[0], -1).to(torch.float64).pow(2).sum(dim=1)
    return 0.5 * d * (r - 1 - math.log(r)) + a * a * sq / (2 * sp * sp)


# ---------------------------------------------------------------------------------------------------- entry point
def log_likelihood(
    den: Denoiser,
    x: torch.Tensor,
    divergence: str = "exact",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eps: float | None = None,
    adjoint: bool = False,
    generator: torch.Generator | None = None,
    *,
    n_probes: int = 1,
    probe: str = "rademacher",
    chunk_size: int | None = None,
    exact_mode: str = "auto",
    method: str = "dopri5",
    options: dict[str, Any] | None = None,
    solver: str | None = None,
    nfe: int | None = None,
    variable: str = "auto",
    dequantize: UniformDequantization | None = None,
    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
    state_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    params: Sequence[torch.Tensor] | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> LikelihoodResult:
    r"""Exact log-likelihood by the probability-flow ODE (Song et al. 2021, Sec. 4.3; Chen et al. 2018).

    Integrates :math:`\tfrac{d}{dt}[x, \Delta] = [v(x, t), \nabla\cdot v(x, t)]`,
    :math:`v = f(t)x - \tfrac12 g(t)^2\,\mathrm{score}(x, t)`, from ``t_eps`` to T with torchdiffeq (default
    Dormand-Prince 5(4), adaptive on rtol/atol, one shared step sequence per batch), then
    :math:`\log p_{t_\epsilon}(x) = \log\pi(x_T) + \Delta(T)`. The ODE state is float64 (times, the controller and
    the log-density accumulator in float64; the net runs in x's dtype), on x's device, with no host sync inside an
    evaluation. Cost per evaluation: one net call plus d (exact) or n_probes (Hutchinson) backward passes through
    its graph, vectorized ``chunk_size`` at a time.

    Args:
        den: the model (a :class:`~sdeflow.Denoiser`); its net must act on samples independently (call
            ``net.eval()`` for BatchNorm / dropout) and be twice differentiable when gradients are wanted.
        x: (batch, *data_shape) data; integers in [0, levels-1] when ``dequantize`` is given.
        divergence: ``"exact"`` (Jacobian trace), ``"hutchinson"`` (``n_probes`` ``probe`` vectors per sample,
            ``"rademacher"`` or ``"gaussian"``, drawn once per solve from ``generator``) or ``"hutch++"``
            (Meyer et al. 2021; ``n_probes >= 3`` products: n // 3 sketch vectors, as many for the projection, the
            rest residual probes). The stochastic ones report ``std_error`` per sample (>= 2 residual probes).
            Computed by :func:`sdeflow.divergence.divergence`.
        rtol, atol: tolerances of the adaptive method (ignored by fixed-grid methods).
        t_eps: start time in [0, T); default ``den.sde.eps``. ``log_prob`` is the density of p at t_eps.
        adjoint: backpropagate with torchdiffeq's ``odeint_adjoint`` (memory independent of the number of steps)
            with respect to x and the parameters. Without it, gradients flow by direct backpropagation through the
            solver (memory grows with the steps); for evaluation wrap the call in ``torch.no_grad()``.
        params: tensors the net depends on that may need gradients, besides an ``nn.Module`` net's own parameters
            (e.g. those a plain-function net closes over).
        generator: source of the Hutchinson probes and the dequantization noise.
        method, options: the adaptive integrator (``METHODS``): a torchdiffeq method and its options (fixed-grid
            torchdiffeq methods need ``options={"step_size": h}``, in the units of ``variable``), or ``"adams"``,
            sdeflow's PEC Adams pair (:mod:`sdeflow.adams`: order 4/5, one evaluation per step; options ``order``,
            ``first_step``, ``max_num_steps``; no ``adjoint``), 1.5-2x fewer evaluations than dopri5 at equal error
            on VP-type paths, about equal on VE / EDM (docs/likelihood.md).
        solver, nfe: a fixed-grid solver (``GRID_SOLVERS``) taking exactly ``nfe`` evaluations: euler, midpoint,
            heun, heun3, rk4 (torchdiffeq's, ``nfe // stages`` equal steps in ``variable``) or abm3 / abm4
            (sdeflow.adams' pairs, ``nfe - 1`` steps, quadratic in t / vp_time, uniform in the log-SNR); overrides
            ``method``. Its error against the adaptive answer is in ``benchmarks/likelihood.py`` and
            ``docs/benchmarks.md``.
        variable: ``"t"``, ``"logsnr"`` (integrate in minus the log-SNR), ``"vp_time"`` (the linear VP SDE's time
            of the log-SNR, :func:`vp_time_from_log_snr`; both need a finite log-SNR at ``t_eps`` and T, so not for
            flow matching, whose :math:`\lambda(1) = -\infty`) or ``"auto"`` (default): vp_time for a
            :class:`~sdeflow.sdes.DiscreteVPSDE` (diffusers / DDPM schedules: f(t) jumps at each of the N knots,
            which an adaptive solver in t steps over with errors its estimator misses; in a function of the log-SNR
            a VP velocity :math:`s^2 x - s\hat\varepsilon` has no f at all), t otherwise.
        exact_mode: ``"auto"``, ``"reverse"``, ``"vjp"`` or ``"forward"`` products for the exact divergence (see
            :func:`sdeflow.divergence.divergence`; ``"auto"`` times them once per shape).
        dequantize: a :class:`UniformDequantization` for integer data; adds its offset to ``bits_per_dim``.
        prior: log-density for the end point (default ``den.sde.prior_log_prob``), e.g. an exact :math:`\log p_T`.
        state_dtype: dtype of the ODE state; default float64 (x's dtype on devices without float64).
        batch_size: solve at most this many samples at once (each chunk is its own adaptive solve).
        chunk_size: basis vectors per vectorized backward pass for the exact divergence (memory knob).
        progress: a tqdm bar over the batches.

    Returns:
        :class:`LikelihoodResult` (log_prob, bits_per_dim, nfe, x_T, prior terms, stats).
    """
    if not isinstance(den, Denoiser):
        raise ValueError(f"den must be a sdeflow.Denoiser, got {type(den).__name__}")
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("probe", probe, PROBES)
    check_choice("method", method, METHODS)
    check_choice("variable", variable, VARIABLES)
    check_choice("exact_mode", exact_mode, EXACT_MODES)
    if solver is not None:
        check_choice("solver", solver, tuple(GRID_SOLVERS))
        least = _grid_min_nfe(solver)
        if not (isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= least):
            raise ValueError(f"nfe must be an integer >= {least} (one step of solver={solver!r}), got {nfe!r}")
    elif nfe is not None:
        raise ValueError("nfe is the budget of a fixed-grid solver: pass solver= (one of GRID_SOLVERS) with it")
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    if divergence == "hutch++" and n_probes < 3:
        raise ValueError(f"divergence='hutch++' needs n_probes >= 3 (sketch, projection, residual), got {n_probes}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    if dequantize is not None and not isinstance(dequantize, UniformDequantization):
        raise ValueError(f"dequantize must be None or a UniformDequantization, got {type(dequantize).__name__}")
    options = dict(options or {})
    if solver is None and method in FIXED_METHODS and "step_size" not in options and "grid_constructor" not in options:
        raise ValueError(f'method={method!r} is a fixed-grid method: pass options={{"step_size": h}}')
    own = (solver is not None and GRID_SOLVERS[solver][0] == "adams") or (solver is None and method in OWN_METHODS)
    if own and adjoint:
        raise ValueError(
            f"adjoint=True needs a torchdiffeq integrator; {'solver=' + repr(solver) if solver else 'method=' + repr(method)}"
            " is sdeflow's own (gradients flow by direct backpropagation: pass adjoint=False)"
        )
    if solver is None and method in OWN_METHODS:
        bad = set(options) - {"order", "first_step", "max_num_steps"}
        if bad:
            raise ValueError(
                f"options for method={method!r} must be among 'order', 'first_step', 'max_num_steps', got {sorted(bad)}"
            )
    sde = den.sde
    t_eps = float(sde.eps if t_eps is None else t_eps)
    if not (0.0 <= t_eps < sde.T):
        raise ValueError(f"t_eps must lie in [0, T) = [0, {sde.T}), got {t_eps}")
    if float(sde.sigma(t_eps)) == 0.0:
        raise ValueError(f"t_eps={t_eps} has s(t_eps) = 0, where the score is singular; pass t_eps > 0")
    u_ends = (t_eps, float(sde.T))
    if variable == "auto":
        variable = "t"
        if isinstance(sde, DiscreteVPSDE) and math.isfinite(float(sde.log_snr(sde.T))):
            variable = "vp_time"
    if variable in ("logsnr", "vp_time"):
        lam_ends = (float(sde.log_snr(t_eps)), float(sde.log_snr(sde.T)))
        if not all(math.isfinite(v) for v in lam_ends):
            raise ValueError(
                f"variable={variable!r} needs a finite log-SNR at t_eps and T, got {lam_ends[0]} and {lam_ends[1]} "
                "(a(T) = 0 for flow matching): use variable='t'"
            )
        if variable == "logsnr":
            u_ends = (-lam_ends[0], -lam_ends[1])
        else:
            tau = vp_time_from_log_snr(torch.tensor(lam_ends, dtype=torch.float64))
            u_ends = (float(tau[0]), float(tau[1]))
    fixed_grid: torch.Tensor | None = None
    if solver is not None:
        assert nfe is not None
        method, stages = GRID_SOLVERS[solver]
        fixed_grid = _fixed_grid(solver, nfe, u_ends, variable)
        if method != "adams":
            grid_ = fixed_grid
            options = {"grid_constructor": lambda func, y0, t: grid_.to(t.device)}
    elif method in ADAPTIVE_METHODS and method not in OWN_METHODS and "step_t" not in options:
        # land exactly on both ends instead of stepping past T (or below t_eps in the adjoint pass) and interpolating
        options["step_t"] = torch.tensor(u_ends, dtype=torch.float64)
    _check_x(x, dequantize)

    model_dtype = _model_dtype(den, x)
    if state_dtype is None:
        state_dtype = torch.float64 if x.device.type != "mps" else model_dtype
    if dequantize is not None:
        x = dequantize(x, model_dtype, generator)
    d = x[0].numel()
    times = torch.tensor(u_ends, dtype=torch.float64, device=x.device)
    params = _adjoint_params(den, params)
    params_need_grad = any(p.requires_grad for p in params)

    chunks = list(torch.split(x, batch_size)) if batch_size is not None else [x]
    if progress:
        from tqdm.auto import tqdm

        chunks_iter = tqdm(chunks, desc="log-likelihood", unit="batch")
    else:
        chunks_iter = chunks
    nfe0, evaluations = den.nfe, 0
    x_T_parts, delta_parts = [], []
    n_div = 1  # integrals per sample: one per (residual) probe for the stochastic divergences
    if divergence == "hutchinson":
        n_div = n_probes
    elif divergence == "hutch++":
        n_div = n_probes - 2 * min(n_probes // 3, x[0].numel())
    for xb in chunks_iter:
        probes = None
        if divergence != "exact":
            probes = hutchinson_probes(probe, n_probes, xb.to(model_dtype), generator)
        flow = _AugmentedFlow(
            den, model_dtype, divergence, probes, exact_mode, chunk_size, params_need_grad, variable
        )  # fmt: skip
        if divergence == "hutch++":
            flow.fix_sketch(xb, times[0])
        dshape = (xb.shape[0],) if divergence == "exact" else (xb.shape[0], n_div)
        y0 = (xb.to(state_dtype), torch.zeros(dshape, dtype=state_dtype, device=xb.device))
        akw = {"adjoint_rtol": adjoint_rtol, "adjoint_atol": adjoint_atol, "adjoint_options": adjoint_options}
        try:
            if method == "adams":  # sdeflow.adams: PEC Adams, adaptive or on the fixed grid
                order = int(solver[3:]) if solver is not None else int(options.get("order", 4))
                y_end, _ = adams_integrate(
                    flow, y0, u_ends[0], u_ends[1], grid=fixed_grid, order=order, rtol=rtol, atol=atol,
                    first_step=options.get("first_step"), max_num_steps=int(options.get("max_num_steps", 10_000)),
                )  # fmt: skip
                ys = tuple(torch.stack([a, b]) for a, b in zip(y0, y_end, strict=True))
            else:  # the same torchdiffeq bridge as sampling (sdeflow.solvers.bridges.odeint)
                with warnings.catch_warnings():  # torchdiffeq's fixed-grid methods ignore the bridge's step counters
                    warnings.filterwarnings("ignore", message="Solver .* does not support callbacks")
                    ys, _, _ = odeint(
                        flow, y0, times, rtol, atol, method, adjoint=adjoint, adjoint_params=params, options=options,
                        adjoint_kwargs=akw,
                    )  # fmt: skip
        except SolverError as err:  # non-finite state, step-size underflow, max_num_steps
            raise SolverError(
                f"the probability-flow ODE solve failed ({err}); check the model output between t_eps={t_eps} and "
                f"T={sde.T} and the data scaling"
            ) from err
        x_T_parts.append(ys[0][-1])
        delta_parts.append(ys[1][-1])
        evaluations += flow.evaluations
        if progress:
            chunks_iter.set_postfix(nfe=den.nfe - nfe0)

    x_T = torch.cat(x_T_parts)
    delta_all = torch.cat(delta_parts)
    std_error = probe_variance = None
    if delta_all.ndim == 2:  # per-probe integrals (B, m): their mean, and its standard error when m >= 2
        delta = delta_all.mean(dim=1)
        if delta_all.shape[1] >= 2:
            probe_variance = delta_all.var(dim=1, unbiased=True)
            std_error = torch.sqrt(probe_variance / delta_all.shape[1])
    else:
        delta = delta_all
    prior_lp = (prior or sde.prior_log_prob)(x_T)
    if not isinstance(prior_lp, torch.Tensor) or prior_lp.shape != (x.shape[0],):
        raise ValueError(f"prior must return a tensor of shape (batch,) = ({x.shape[0]},)")
    log_prob = prior_lp.to(delta.dtype) + delta
    if not bool(torch.isfinite(log_prob).all()):
        raise ValueError(
            f"the likelihood is not finite for {int((~torch.isfinite(log_prob)).sum())} samples: check the model "
            f"output near t_eps={t_eps} (t_eps = 0 divides by s(0) = 0 for eps-prediction) and the data scaling"
        )
    offset = dequantize.offset_bits if dequantize is not None else 0.0
    bpd = -log_prob / (d * _LN2) + offset
    if dequantize is not None and bool((bpd < 0).any()):
        warnings.warn(
            "bits/dim below 0 (the entropy bound for discrete data): the model's density exceeds 1 per quantization "
            f"cell; check that the data scaling {dequantize} matches the model's training range",
            stacklevel=2,
        )
    return LikelihoodResult(
        log_prob=log_prob,
        bits_per_dim=bpd,
        nfe=evaluations,
        x_T=x_T.to(model_dtype),
        prior_log_prob=prior_lp,
        delta_log_prob=delta,
        prior_gap_bound=prior_gap_bound(sde, x).to(log_prob.device) if prior is None else None,
        dequantization_offset=offset,
        x=x,
        t_eps=t_eps,
        stats=dict(
            evaluations=evaluations,
            net_calls=den.nfe - nfe0,
            batches=len(chunks),
            method=method,
            solver=solver,
            variable=variable,
            rtol=rtol,
            atol=atol,
            divergence=divergence,
            n_probes=n_probes if divergence != "exact" else 0,
            state_dtype=str(state_dtype).replace("torch.", ""),
        ),
        std_error=std_error,
        probe_variance=probe_variance,
    )
