r"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through
SDEs", Sec. 4.3 and App. D.2; the instantaneous change of variables of Chen et al. 2018, "Neural ODEs").

The probability-flow ODE :math:`\dot x = v(x, t) = f(t)x - \tfrac12 g(t)^2 \nabla\log p_t(x)` transports the marginals
:math:`p_t` exactly, and along one of its trajectories :math:`\tfrac{d}{dt}\log p_t(x_t) = -\nabla\!\cdot v(x_t, t)`.
Integrating the augmented state :math:`[x, \Delta]` with :math:`\dot\Delta = \nabla\!\cdot v` from :math:`t_\epsilon`
to :math:`T` gives

.. math:: \log p_{t_\epsilon}(x) = \log p_T(x_T) + \int_{t_\epsilon}^T \nabla\!\cdot v(x_t, t)\,dt
          \approx \log\pi(x_T) + \Delta(T),

where the prior :math:`\pi = N(0, s(T)^2 I)` stands in for the unknown :math:`p_T` (the *prior gap*, bounded in
:class:`LikelihoodResult`). The divergence is either the exact Jacobian trace (``d`` vector-Jacobian products through
one net call's graph, vectorized in chunks with ``is_grads_batched``) or the Hutchinson / Skilling estimator
:math:`E_\varepsilon[\varepsilon^\top J\varepsilon]` with probes drawn once per solve. The derivation, the bits/dim
offset for dequantized images and the pitfalls are in ``docs/likelihood.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._utils import check_choice, check_positive
from .denoiser import Denoiser
from .sdes import GaussianSDE
from .solvers.base import SolverError, probability_flow_velocity
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
]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
METHODS = ADAPTIVE_METHODS + FIXED_METHODS
# basis vectors per vectorized backward pass: chunk * batch * dim stays below this many elements by default (on CPU,
# vmap's batched backward beats a loop only while the cotangents stay in cache)
_EXACT_CHUNK_ELEMENTS = 1 << 22
_EXACT_CHUNK_ELEMENTS_CPU = 1 << 12
_LN2 = math.log(2.0)


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
        nfe: net calls counted by the Denoiser during the forward solve (one per ODE evaluation: the divergence
            reuses that call's graph).
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
        stats: ``evaluations`` (ODE right-hand-side calls), ``batches``, the solver settings.
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


# ---------------------------------------------------------------------------------------------------- random helpers
def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def _rand(shape, dtype, device, generator) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, dtype=dtype, device=_gen_device(generator, device)).to(device)


def _probes(kind: str, shape, dtype, device, generator) -> torch.Tensor:
    """Hutchinson probes with E[e e^T] = I: Rademacher (+-1) or standard Gaussian."""
    gdev = _gen_device(generator, device)
    if kind == "gaussian":
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=gdev)
    else:
        z = torch.randint(0, 2, tuple(shape), generator=generator, device=gdev).to(dtype) * 2 - 1
    return z.to(device)


# ---------------------------------------------------------------------------------------------------- divergence
def _default_chunk(x: torch.Tensor) -> int:
    budget = _EXACT_CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _EXACT_CHUNK_ELEMENTS
    d = x[0].numel()
    return max(1, min(d, budget // x.numel()))


def _cotangents(
    x: torch.Tensor, divergence: str, probes: torch.Tensor | None, chunk_size: int | None
) -> list[tuple[torch.Tensor, int | None]]:
    """The vectors e of the products e^T J, in chunks (c, *x.shape), each with the index of its first basis vector
    (exact) or None (Hutchinson probes). Built once per solve."""
    check_choice("divergence", divergence, DIVERGENCES)
    if divergence == "hutchinson":
        if probes is None or probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape or probes.shape[0] < 1:
            raise ValueError(f"divergence='hutchinson' needs probes of shape (n_probes, *{tuple(x.shape)})")
        return [(probes, None)]
    B, d = x.shape[0], x[0].numel()
    c = _default_chunk(x) if chunk_size is None else max(1, min(chunk_size, d))
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return [
        (eye[i0 : min(d, i0 + c), None, :].expand(min(d, i0 + c) - i0, B, d).reshape(-1, *x.shape), i0)
        for i0 in range(0, d, c)
    ]


def _vjp(v: torch.Tensor, z: torch.Tensor, cotangents: torch.Tensor, batched: bool, create_graph: bool) -> torch.Tensor:
    """cotangent^T dv/dz for one cotangent like v, or a leading batch of them (``batched``, vectorized by vmap)."""
    (rows,) = torch.autograd.grad(
        v, z, cotangents, retain_graph=True, create_graph=create_graph, allow_unused=True, is_grads_batched=batched
    )
    return torch.zeros_like(cotangents) if rows is None else rows


def _drift_and_trace(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    cotangents: list[tuple[torch.Tensor, int | None]],
    create_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, d = x.shape[0], x[0].numel()
    with torch.enable_grad():
        z = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        v = fn(z)
        div = torch.zeros(B, dtype=x.dtype, device=x.device)
        for vectors, start in cotangents:
            n = vectors.shape[0]
            if n == 1:
                rows = _vjp(v, z, vectors[0], False, create_graph)[None]
            else:
                rows = _vjp(v, z, vectors, True, create_graph)
            rows = rows.reshape(n, B, d)
            if start is None:  # Hutchinson: mean over probes of e^T J e
                div = div + (rows * vectors.reshape(n, B, d)).sum(dim=2).mean(dim=0)
            else:  # exact: the diagonal entries (e_i^T J)_i of this chunk
                div = div + torch.diagonal(rows[:, :, start : start + n], dim1=0, dim2=2).sum(dim=1)
    if not create_graph:
        v, div = v.detach(), div.detach()
    return v, div


def drift_and_divergence(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    divergence: str = "exact",
    probes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""v = fn(x) and the per-sample divergence :math:`\nabla\cdot v = \mathrm{tr}\,\partial v/\partial x`.

    One forward call of ``fn``, then vector-Jacobian products :math:`e^\top J` through its graph (vectorized over
    ``chunk_size`` vectors at a time with ``is_grads_batched``; no host sync):

    * ``"exact"``: :math:`\sum_i (e_i^\top J)_i` over the d basis vectors (d backward passes; by default
      ``chunk_size * batch * d`` stays near 2^12 elements on CPU, where a plain loop is as fast as vmap, and 2^22 on
      accelerators, where vectorizing pays);
    * ``"hutchinson"``: :math:`\frac1n\sum_j \varepsilon_j^\top J\varepsilon_j` for ``probes`` of shape
      (n, *x.shape), unbiased when :math:`E[\varepsilon\varepsilon^\top] = I` (Hutchinson 1990; Skilling 1989).

    Both assume ``fn`` acts on each sample independently (no batch coupling such as BatchNorm in train mode).

    Args:
        fn: (B, *shape) -> (B, *shape).
        x: (B, *shape).
        create_graph: keep (v, div) differentiable with respect to x and to whatever ``fn`` closes over (second-order
            autograd, for backpropagation through the solve); otherwise both come back detached.
    Returns:
        (v, div) with shapes (B, *shape) and (B,).
    """
    return _drift_and_trace(fn, x, _cotangents(x, divergence, probes, chunk_size), create_graph)


class _AugmentedFlow:
    """Right-hand side of the augmented probability-flow ODE d[x, Delta]/dt = [v, div v] for torchdiffeq.

    Second-order graphs are built only when someone needs them: grad mode on and the state or a parameter requiring
    grad (direct backpropagation, or the backward pass of the adjoint method).
    """

    def __init__(
        self,
        den: Denoiser,
        model_dtype: torch.dtype,
        cotangents: list[tuple[torch.Tensor, int | None]],
        params_need_grad: bool,
    ) -> None:
        self.den, self.sde, self.model_dtype = den, den.sde, model_dtype
        self.T = float(den.sde.T)
        self.cotangents = cotangents
        self.params_need_grad = params_need_grad
        self.evaluations = 0

    def __call__(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        y = state[0]
        create_graph = torch.is_grad_enabled() and (y.requires_grad or self.params_need_grad)
        x = y.to(self.model_dtype)
        # the solvers stop exactly at t_eps and T (step_t), but the initial-step probe may look past T
        t = t.clamp(0.0, self.T)

        def velocity(z: torch.Tensor) -> torch.Tensor:
            return probability_flow_velocity(self.den, z, t)[0]

        v, div = _drift_and_trace(velocity, x, self.cotangents, create_graph)
        self.evaluations += 1
        return v.to(y.dtype), div.to(y.dtype)


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
    method: str = "dopri5",
    options: dict[str, Any] | None = None,
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
        divergence: ``"exact"`` (Jacobian trace) or ``"hutchinson"`` (``n_probes`` ``probe`` vectors per sample,
            ``"rademacher"`` or ``"gaussian"``, drawn once per solve from ``generator``).
        rtol, atol: tolerances of the adaptive method (ignored by fixed-grid methods).
        t_eps: start time in [0, T); default ``den.sde.eps``. ``log_prob`` is the density of p at t_eps.
        adjoint: backpropagate with torchdiffeq's ``odeint_adjoint`` (memory independent of the number of steps)
            with respect to x and the parameters. Without it, gradients flow by direct backpropagation through the
            solver (memory grows with the steps); for evaluation wrap the call in ``torch.no_grad()``.
        params: tensors the net depends on that may need gradients, besides an ``nn.Module`` net's own parameters
            (e.g. those a plain-function net closes over).
        generator: source of the Hutchinson probes and the dequantization noise.
        method, options: torchdiffeq method (``METHODS``) and its options; fixed-grid methods need
            ``options={"step_size": h}``. This is the hook for other integrators.
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
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    if dequantize is not None and not isinstance(dequantize, UniformDequantization):
        raise ValueError(f"dequantize must be None or a UniformDequantization, got {type(dequantize).__name__}")
    options = dict(options or {})
    if method in FIXED_METHODS and "step_size" not in options and "grid_constructor" not in options:
        raise ValueError(f'method={method!r} is a fixed-grid method: pass options={{"step_size": h}}')
    sde = den.sde
    t_eps = float(sde.eps if t_eps is None else t_eps)
    if not (0.0 <= t_eps < sde.T):
        raise ValueError(f"t_eps must lie in [0, T) = [0, {sde.T}), got {t_eps}")
    if float(sde.sigma(t_eps)) == 0.0:
        raise ValueError(f"t_eps={t_eps} has s(t_eps) = 0, where the score is singular; pass t_eps > 0")
    if method in ADAPTIVE_METHODS and "step_t" not in options:
        # land exactly on both ends instead of stepping past T (or below t_eps in the adjoint pass) and interpolating
        options["step_t"] = torch.tensor([t_eps, sde.T], dtype=torch.float64)
    _check_x(x, dequantize)

    model_dtype = _model_dtype(den, x)
    if state_dtype is None:
        state_dtype = torch.float64 if x.device.type != "mps" else model_dtype
    if dequantize is not None:
        x = dequantize(x, model_dtype, generator)
    d = x[0].numel()
    times = torch.tensor([t_eps, sde.T], dtype=torch.float64, device=x.device)
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
    for xb in chunks_iter:
        probes = None
        if divergence == "hutchinson":
            probes = _probes(probe, (n_probes, *xb.shape), model_dtype, xb.device, generator)
        cotangents = _cotangents(xb.to(model_dtype), divergence, probes, chunk_size)
        flow = _AugmentedFlow(den, model_dtype, cotangents, params_need_grad)
        y0 = (xb.to(state_dtype), torch.zeros(xb.shape[0], dtype=state_dtype, device=xb.device))
        akw = {"adjoint_rtol": adjoint_rtol, "adjoint_atol": adjoint_atol, "adjoint_options": adjoint_options}
        try:  # the same torchdiffeq bridge as sampling (sdeflow.solvers.bridges.odeint)
            ys, _, _ = odeint(
                flow, y0, times, rtol, atol, method, adjoint=adjoint, adjoint_params=params, options=options,
                adjoint_kwargs=akw,
            )  # fmt: skip
        except SolverError as err:  # torchdiffeq's checks: non-finite state, step-size underflow, max_num_steps
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
    delta = torch.cat(delta_parts)
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
        nfe=den.nfe - nfe0,
        x_T=x_T.to(model_dtype),
        prior_log_prob=prior_lp,
        delta_log_prob=delta,
        prior_gap_bound=prior_gap_bound(sde, x).to(log_prob.device) if prior is None else None,
        dequantization_offset=offset,
        x=x,
        t_eps=t_eps,
        stats=dict(
            evaluations=evaluations,
            batches=len(chunks),
            method=method,
            rtol=rtol,
            atol=atol,
            divergence=divergence,
            n_probes=n_probes if divergence == "hutchinson" else 0,
            state_dtype=str(state_dtype).replace("torch.", ""),
        ),
    )
