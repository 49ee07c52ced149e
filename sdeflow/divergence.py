r"""Divergence estimators for a vector field :math:`f: \mathbb R^d \to \mathbb R^d`, batched over samples.

The instantaneous change of variables (Chen et al. 2018, "Neural ODEs"; Song et al. 2021, Sec. 4.3) needs, at every
ODE evaluation, both :math:`f(x)` and :math:`\nabla\!\cdot f(x) = \mathrm{tr}\,J_f(x)` for each sample of a batch
(B, *shape) (``f`` must act on the samples independently: no batch coupling such as BatchNorm in train mode).
:func:`divergence` returns both from one forward call of ``f``:

* ``"exact"``: :math:`\sum_i e_i^\top J e_i` over the d basis vectors, by reverse mode (vector-Jacobian products
  :math:`e_i^\top J` through the graph of the one forward call, ``chunk`` basis vectors per backward pass, vectorized
  with ``is_grads_batched``) or forward mode (Jacobian-vector products :math:`J e_i` by ``torch.func.jvp`` under
  ``torch.func.vmap`` over ``chunk`` basis vectors), or ``"vjp"``: ``torch.func.vjp`` once (one forward call) and
  ``torch.func.vmap`` of its pullback over ``chunk`` basis cotangents. One basis vector serves all B samples at once,
  so the cost is d products of batch B, the same arithmetic as ``vmap(jacrev(f))``, which builds every per-sample
  Jacobian. The modes differ in how the d products are vectorized: ``"reverse"`` vmaps the autograd graph recorded
  by the forward call (``is_grads_batched``), and some backward formulas run slice by slice there (a U-Net's
  ``convolution_backward`` was called 2145 times per evaluation instead of vmap(jacrev)'s 99), which ``"vjp"``'s
  functorch graph vectorizes. ``mode="auto"`` with the default chunk times the candidates (reverse with chunks 1, 4,
  16, 64, vjp and forward with chunks 16 and 64, up to d) once per (device, dtype, shape) on the actual call, keeps
  the fastest in this module's cache and returns the value of the last candidate (every candidate computes the same
  trace): a one-off cost of a few evaluations per shape (``clear_autotune_cache()`` after switching nets). On CPU the
  torch.func modes are timed only when one evaluation takes 0.5 s or more (or torch._dynamo is loaded): their first
  use imports torch._dynamo, 2-3 s once per process.
* ``"hutchinson"``: :math:`\frac1n\sum_j \varepsilon_j^\top J\varepsilon_j` with n probes, :math:`E[\varepsilon
  \varepsilon^\top] = I` (Hutchinson 1990; Skilling 1989), all probes in ONE batched backward pass. The per-sample
  variance of one probe's estimate is estimated from the n probes (n >= 2) and reported with the standard error
  :math:`\sqrt{\hat v/n}`, so the number of probes for a target standard error :math:`\tau` is :math:`\hat v/\tau^2`.
  Rademacher probes have variance :math:`2(\lVert J_s\rVert_F^2 - \sum_i J_{ii}^2)`, Gaussian probes
  :math:`2\lVert J_s\rVert_F^2` (:math:`J_s` the symmetric part; Avron & Toledo 2011).
* ``"hutch++"``: Hutch++ (Meyer, Musco, Musco & Woodruff 2021, Alg. 1) per sample with
  :math:`A = J^\top` (:math:`\mathrm{tr}A = \mathrm{tr}J`): :math:`k` sketch products :math:`Y = AS`,
  :math:`Q = \mathrm{qr}(Y)`, then :math:`\mathrm{tr}(Q^\top AQ) + \frac1{m}\sum_j g_j^\top(I-QQ^\top)A(I-QQ^\top)g_j`
  with m residual probes: n = 2k + m products in two batched backward passes, unbiased, and with variance
  :math:`O(1/n^2)` instead of :math:`O(1/n)` when J is dominated by a few large singular values. The reported
  standard error is that of the residual term given Q (the low-rank part is exact given Q), which is what a user
  reading it needs: the spread of the estimate at this Q.
* ``control=c``: a control variate :math:`c\,x` with known divergence :math:`c\,d`: the probes estimate
  :math:`\mathrm{tr}(J - cI)` from the same products (:math:`w^\top J - c\,w^\top`, no extra pass) and :math:`c\,d`
  is added exactly; unbiased for any c independent of the probes. Gaussian probes then have variance
  :math:`2\lVert J_s - cI\rVert_F^2`, smallest at :math:`c = \mathrm{tr}J/d`. In an ODE solve that keeps one probe
  set, c must not come from estimates made with those probes (the previous evaluation's estimate would bias the
  result): use a deterministic c, an estimate from independent probes, or fresh probes per evaluation. (The
  velocity's own linear part f(t) is a poor choice where the score's Jacobian cancels it, as it does for well-fit
  models: see the benchmark; Rademacher probes are exact on the diagonal and gain nothing.)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._utils import check_choice

__all__ = [
    "divergence",
    "DivergenceResult",
    "exact_chunk",
    "hutchinson_probes",
    "clear_autotune_cache",
    "DIVERGENCE_METHODS",
    "EXACT_MODES",
    "PROBE_KINDS",
]

DIVERGENCE_METHODS = ("exact", "hutchinson", "hutch++")
EXACT_MODES = ("auto", "reverse", "forward", "vjp")
PROBE_KINDS = ("rademacher", "gaussian")
# basis vectors per vectorized pass: chunk * batch * d stays below this many elements by default. On CPU small chunks
# measured fastest (benchmarks/likelihood.py, batch 256: chunk 4 at d = 64, 1 at d = 256): vmap's batched backward
# pays only while the cotangents stay in cache; on accelerators vectorizing pays.
_CHUNK_ELEMENTS_CPU = 1 << 16
_CHUNK_ELEMENTS_ACCEL = 1 << 22
# (device type, dtype, shape) -> (mode, chunk), filled by mode="auto"
_AUTOTUNE: dict[tuple[str, torch.dtype, tuple[int, ...]], tuple[str, int]] = {}
_CHUNKS_REVERSE = (1, 4, 16, 64)
_CHUNKS_FUNC = (16, 64)
_FUNC_MIN_SECONDS = 0.5


@dataclass
class DivergenceResult:
    r"""Output of :func:`divergence`. Per-sample tensors have shape (B,).

    Attributes:
        value: the divergence :math:`\mathrm{tr}\,J_f(x)` (exact) or its unbiased estimate.
        f_x: :math:`f(x)`, shape (B, *shape), from the same forward call.
        std_error: standard error of ``value``: zeros for ``"exact"``; for the stochastic methods
            :math:`\sqrt{\hat v/n}` with :math:`\hat v` = ``probe_variance`` and n the probes it was estimated from
            (Hutch++: the residual probes, given Q). None when a single (residual) probe leaves no spread to measure.
        probe_variance: the unbiased per-sample variance :math:`\hat v` of ONE probe's estimate (None as above):
            ``probe_variance / target_se**2`` probes reach a target standard error.
        matvecs: Jacobian products per sample (d for exact, n_probes otherwise).
        method: ``"exact"``, ``"hutchinson"`` or ``"hutch++"``.
        mode: ``"reverse"``, ``"vjp"`` or ``"forward"`` (exact), ``"reverse"`` (stochastic).
        chunk: vectors per vectorized pass.
        per_probe: the stochastic methods' estimates one probe at a time, shape (m, B), whose mean is ``value``
            (Hutch++: the low-rank part plus each of the m residual probes' terms). A likelihood ODE that keeps one
            probe set per solve can integrate these per probe; the integrals are then i.i.d. over probes and their
            spread gives the exact standard error of the log-likelihood. None for ``"exact"``.
    """

    value: torch.Tensor
    f_x: torch.Tensor
    std_error: torch.Tensor | None
    probe_variance: torch.Tensor | None
    matvecs: int
    method: str
    mode: str
    chunk: int
    per_probe: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------- helpers
def exact_chunk(x: torch.Tensor, chunk: int | None = None) -> int:
    """Basis vectors per vectorized pass for x of shape (B, *shape): ``chunk`` clipped to [1, d], or by default the
    largest count keeping ``chunk * B * d`` under 2^16 elements on CPU and 2^22 on accelerators."""
    d = x[0].numel()
    if chunk is not None:
        return max(1, min(int(chunk), d))
    budget = _CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _CHUNK_ELEMENTS_ACCEL
    return max(1, min(d, budget // max(1, x.numel())))


def hutchinson_probes(
    kind: str,
    n: int,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n probes like x, shape (n, *x.shape), with :math:`E[\\varepsilon\\varepsilon^\\top] = I`: Rademacher (+-1)
    or standard Gaussian, drawn from ``generator`` (on its device) in x's dtype and moved to x's device."""
    check_choice("probe", kind, PROBE_KINDS)
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n_probes must be an integer >= 1, got {n!r}")
    gdev = generator.device if generator is not None else x.device
    shape = (n, *x.shape)
    if kind == "gaussian":
        z = torch.randn(shape, generator=generator, dtype=x.dtype, device=gdev)
    else:
        z = torch.randint(0, 2, shape, generator=generator, device=gdev).to(x.dtype) * 2 - 1
    return z.to(x.device)


def clear_autotune_cache() -> None:
    """Forget the choices made by ``mode="auto"`` (e.g. after changing the network at a fixed shape)."""
    _AUTOTUNE.clear()


def _call(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    out = f(z)
    if not isinstance(out, torch.Tensor) or out.shape != z.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"f must map x of shape {tuple(z.shape)} to a tensor of the same shape, got {got}")
    return out


def _vjp(v: torch.Tensor, z: torch.Tensor, cot: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """cot[j]^T dv/dz for a leading batch of n cotangents (n, *v.shape), one backward pass (vectorized if n > 1)."""
    n = cot.shape[0]
    (rows,) = torch.autograd.grad(
        v,
        z,
        cot if n > 1 else cot[0],
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=n > 1,
    )
    if rows is None:  # f does not depend on x
        return torch.zeros_like(cot)
    return rows if n > 1 else rows[None]


def _basis(x: torch.Tensor, i0: int, n: int) -> torch.Tensor:
    """Basis vectors e_{i0}..e_{i0+n-1}, each broadcast over the batch: shape (n, *x.shape)."""
    B, d = x.shape[0], x[0].numel()
    e = torch.zeros(n, d, dtype=x.dtype, device=x.device)
    e[torch.arange(n, device=x.device), torch.arange(i0, i0 + n, device=x.device)] = 1
    return e[:, None, :].expand(n, B, d).reshape(n, *x.shape)


def _diag_part(rows: torch.Tensor, i0: int, B: int, d: int) -> torch.Tensor:
    """sum_j (rows_j)_{i0 + j} per sample, rows of shape (n, B, *shape)."""
    n = rows.shape[0]
    r = rows.reshape(n, B, d)[:, :, i0 : i0 + n]
    return torch.diagonal(r, dim1=0, dim2=2).sum(dim=1)


def _input(x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    return x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------- exact
def _exact_reverse(f, x, chunk, create_graph, stop=None):
    B, d = x.shape[0], x[0].numel()
    dd = d if stop is None else min(d, stop)  # stop: the first `stop` basis vectors only (autotune's warm-up)
    with torch.enable_grad():
        z = _input(x, create_graph)
        v = _call(f, z)
        div = torch.zeros(B, dtype=v.dtype, device=v.device)
        for i0 in range(0, dd, chunk):
            n = min(dd, i0 + chunk) - i0
            rows = _vjp(v, z, _basis(v, i0, n), create_graph)
            div = div + _diag_part(rows, i0, B, d)
    return v, div


def _exact_forward(f, x, chunk, create_graph, stop=None):
    B, d = x.shape[0], x[0].numel()
    dd = d if stop is None else min(d, stop)
    z = x if create_graph else x.detach()
    v: torch.Tensor | None = None
    div = torch.zeros(B, dtype=x.dtype, device=x.device)

    def jvp(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, tangent = torch.func.jvp(f, (z,), (u,))[:2]
        return out, tangent

    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        for i0 in range(0, dd, chunk):
            n = min(dd, i0 + chunk) - i0
            tangents = _basis(x, i0, n)
            if n == 1:
                out, jv = jvp(tangents[0])
                out, jv = out[None], jv[None]
            else:
                out, jv = torch.func.vmap(jvp)(tangents)
            if v is None:
                v = out[0]
                if v.shape != x.shape:
                    raise ValueError(f"f must map x of shape {tuple(x.shape)} to the same shape, got {tuple(v.shape)}")
            div = div + _diag_part(jv, i0, B, d)
    assert v is not None
    return v, div


def _exact_vjp(f, x, chunk, create_graph, stop=None):
    """torch.func.vjp once, then its pullback vmapped over ``chunk`` basis cotangents at a time."""
    B, d = x.shape[0], x[0].numel()
    dd = d if stop is None else min(d, stop)
    z = x if create_graph else x.detach()
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        v, pullback = torch.func.vjp(f, z)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"f must map x of shape {tuple(x.shape)} to a tensor of the same shape, got {got}")
        div = torch.zeros(B, dtype=v.dtype, device=v.device)
        for i0 in range(0, dd, chunk):
            n = min(dd, i0 + chunk) - i0
            basis = _basis(v, i0, n)
            rows = pullback(basis[0])[0][None] if n == 1 else torch.func.vmap(pullback)(basis)[0]
            div = div + _diag_part(rows, i0, B, d)
    return v, div


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_EXACT = {"reverse": _exact_reverse, "forward": _exact_forward, "vjp": _exact_vjp}


def _candidates(x: torch.Tensor) -> list[tuple[str, int]]:
    """(mode, chunk) pairs ``mode="auto"`` times: reverse over a few chunk sizes (the default one included), vjp and
    forward over larger ones; chunks clipped to d and to the memory budget of :func:`exact_chunk` x 64."""
    d = x[0].numel()
    cap = max(1, 64 * exact_chunk(x))
    out: list[tuple[str, int]] = []
    for mode, chunks in (
        ("reverse", (exact_chunk(x), *_CHUNKS_REVERSE)),
        ("vjp", _CHUNKS_FUNC),
        ("forward", _CHUNKS_FUNC),
    ):
        for c in chunks:
            pair = (mode, max(1, min(c, d, cap)))
            if pair not in out:
                out.append(pair)
    return out


def _exact(f, x, mode, chunk, create_graph, chunk_given=True) -> tuple[torch.Tensor, torch.Tensor, str, int]:
    if mode != "auto":
        return (*_EXACT[mode](f, x, chunk, create_graph), mode, chunk)
    if create_graph:  # no timing with second-order graphs: reverse mode
        return (*_exact_reverse(f, x, chunk, create_graph), "reverse", chunk)
    key = (x.device.type, x.dtype, tuple(x.shape))
    choice = _AUTOTUNE.get(key)
    if chunk_given:  # the chunk is the user's: choose the mode only
        pairs = [(m, chunk) for m in ("reverse", "vjp", "forward")]
        if choice is not None and choice[1] == chunk:
            pairs = [choice]
    else:
        pairs = [choice] if choice is not None else _candidates(x)
    if len(pairs) == 1:
        m, c = pairs[0]
        return (*_EXACT[m](f, x, c, create_graph), m, c)
    # one-off timing on the actual call: a warm-up of each mode (one forward call and two products through the
    # vectorized path: first-call costs of torch.func and vmap out of the timing), then each candidate once. On CPU the torch.func modes are tried only when one
    # evaluation takes >= _FUNC_MIN_SECONDS or torch._dynamo is loaded already: their first use imports it (2-3 s once
    # per process), which only a large net amortizes, and they won only on conv nets (benchmarks/likelihood.py).
    seconds: dict[tuple[str, int], float] = {}
    result: tuple[torch.Tensor, torch.Tensor] | None = None
    warm: set[str] = set()
    skip_func = False
    for m, c in sorted(pairs, key=lambda p: p[0] != "reverse"):
        if m != "reverse" and skip_func:
            continue
        try:
            if m not in warm:
                _EXACT[m](f, x, 2, False, stop=2)  # one forward call and one vectorized pair of products
                warm.add(m)
            _sync(x.device)
            t0 = time.perf_counter()
            result = _EXACT[m](f, x, c, False)
            _sync(x.device)
            seconds[(m, c)] = time.perf_counter() - t0
        except (RuntimeError, NotImplementedError):  # e.g. an op without a forward-mode formula or batching rule
            seconds[(m, c)] = math.inf
        if m == "reverse" and x.device.type == "cpu" and "torch._dynamo" not in sys.modules:
            skip_func = seconds[(m, c)] < _FUNC_MIN_SECONDS
    best = min(seconds, key=lambda p: seconds[p])
    if result is None or not math.isfinite(seconds[best]):
        raise RuntimeError("no exact divergence mode could evaluate f (reverse, vjp and forward all failed)")
    _AUTOTUNE[key] = best
    return (*result, best[0], best[1])


# ---------------------------------------------------------------------------------------------------- stochastic
def _quadratic_forms(vectors: torch.Tensor, products: torch.Tensor, B: int) -> torch.Tensor:
    """<vectors_j, products_j> per probe and sample: shape (n, B)."""
    n = vectors.shape[0]
    return (vectors.reshape(n, B, -1) * products.reshape(n, B, -1)).sum(dim=2)


def _products(v, z, vectors, chunk, create_graph, shift) -> torch.Tensor:
    """(J - shift I)^T w for each vector w (n, B, *shape); ``shift`` None or broadcastable against one vector."""
    parts = [_vjp(v, z, vectors[i : i + chunk], create_graph) for i in range(0, vectors.shape[0], chunk)]
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return rows if shift is None else rows - shift * vectors


def _spread(est: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean over probes (dim 0), unbiased per-probe variance and the standard error of the mean (None if n = 1)."""
    n = est.shape[0]
    mean = est.mean(dim=0)
    if n < 2:
        return mean, None, None
    var = est.var(dim=0, unbiased=True)
    return mean, var, torch.sqrt(var / n)


def _hutchinson(f, x, probes, chunk, create_graph, shift):
    B = x.shape[0]
    with torch.enable_grad():
        z = _input(x, create_graph)
        v = _call(f, z)
        rows = _products(v, z, probes.to(v.dtype), chunk, create_graph, shift)
        est = _quadratic_forms(probes.to(v.dtype), rows, B)
    return (v, *_spread(est), est)


def _hutchpp(f, x, probes, chunk, create_graph, shift):
    B, d = x.shape[0], x[0].numel()
    n = probes.shape[0]
    k = min(n // 3, d)
    with torch.enable_grad():
        z = _input(x, create_graph)
        v = _call(f, z)
        p = probes.to(v.dtype)
        S, G = p[:k], p[k : n - k]  # k sketch vectors, n - 2k residual probes (k more products go to Q)
        Y = _products(v, z, S, chunk, create_graph, shift).reshape(k, B, d).permute(1, 2, 0)  # (B, d, k): A S, A = J^T
        Q = torch.linalg.qr(Y, mode="reduced").Q  # (B, d, k)
        Gf = G.reshape(G.shape[0], B, d).permute(1, 2, 0)  # (B, d, m)
        Gp = Gf - Q @ (Q.transpose(1, 2) @ Gf)  # (I - QQ^T) G
        vectors = torch.cat([Q, Gp], dim=2).permute(2, 0, 1)  # (k + m, B, d)
        rows = _products(v, z, vectors.reshape(-1, *x.shape), chunk, create_graph, shift)
        forms = _quadratic_forms(vectors, rows, B)  # (k + m, B)
        low_rank = forms[:k].sum(dim=0)
        resid, var, se = _spread(forms[k:])
    return v, low_rank + resid, var, se, low_rank + forms[k:]


# ---------------------------------------------------------------------------------------------------- entry point
def divergence(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    method: str = "exact",
    *,
    n_probes: int = 1,
    probe: str = "rademacher",
    probes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    mode: str = "auto",
    chunk: int | None = None,
    control: float | torch.Tensor | None = None,
    create_graph: bool = False,
) -> DivergenceResult:
    r"""f(x) and the per-sample divergence :math:`\nabla\!\cdot f(x) = \mathrm{tr}\,\partial f/\partial x`.

    Args:
        f: (B, *shape) -> (B, *shape), acting on each sample independently.
        x: (B, *shape) with B >= 1.
        method: ``"exact"``, ``"hutchinson"`` or ``"hutch++"`` (module docstring).
        n_probes: products per sample for the stochastic methods (>= 1; Hutch++: >= 3, split into n // 3 sketch
            vectors, as many for the projection and the rest as residual probes).
        probe: ``"rademacher"`` or ``"gaussian"`` probe distribution.
        probes: fixed probes of shape (n, *x.shape) instead of drawing ``n_probes`` from ``generator`` (a likelihood
            ODE keeps one set per solve).
        generator: source of the probes.
        mode: exact method only: ``"reverse"`` (vector-Jacobian products through the autograd graph),
            ``"vjp"`` (``torch.func.vjp`` and ``vmap``), ``"forward"`` (``torch.func.jvp``; both need a
            ``torch.func``-compatible f) or ``"auto"`` (a cached one-off timing per shape, module docstring).
        chunk: vectors per vectorized pass (memory ~ chunk x the activations of one batch); default
            :func:`exact_chunk` for the exact method, all probes at once for the stochastic ones.
        control: a number or a per-sample (B,) tensor c, independent of the probes: the stochastic methods estimate
            :math:`\mathrm{tr}(J - cI)` and add :math:`c\,d` exactly (module docstring; best near
            :math:`\mathrm{tr}J/d`). Ignored by ``"exact"``.
        create_graph: keep the outputs differentiable with respect to x and to what f closes over (second-order
            autograd, for training through a likelihood); otherwise both come back detached.

    Returns:
        :class:`DivergenceResult` (value, f_x, std_error, probe_variance, ...).
    """
    check_choice("method", method, DIVERGENCE_METHODS)
    check_choice("mode", mode, EXACT_MODES)
    check_choice("probe", probe, PROBE_KINDS)
    if not callable(f):
        raise ValueError(f"f must be callable f(x) -> tensor like x, got {type(f).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (batch, *shape) with batch >= 1 and data, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating-point dtype, got {x.dtype}")
    if chunk is not None and not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be None or an integer >= 1, got {chunk!r}")
    d = x[0].numel()

    if method == "exact":
        v, div, used, c = _exact(f, x, mode, exact_chunk(x, chunk), create_graph, chunk_given=chunk is not None)
        if not create_graph:
            v, div = v.detach(), div.detach()
        return DivergenceResult(div, v, torch.zeros_like(div), None, d, method, used, c)

    if probes is None:
        probes = hutchinson_probes(probe, n_probes, x, generator)
    elif (
        not (isinstance(probes, torch.Tensor) and probes.ndim == x.ndim + 1 and probes.shape[1:] == x.shape)
        or probes.shape[0] < 1
    ):
        got = tuple(probes.shape) if isinstance(probes, torch.Tensor) else type(probes).__name__
        raise ValueError(f"probes must have shape (n_probes, *{tuple(x.shape)}), got {got}")
    n = probes.shape[0]
    if method == "hutch++" and n < 3:
        raise ValueError(f"method='hutch++' needs n_probes >= 3 (sketch, projection, residual), got {n}")
    c = n if chunk is None else min(chunk, n)
    shift = None
    if control is not None:
        shift = torch.as_tensor(control, dtype=x.dtype, device=x.device)
        if shift.ndim == 1 and shift.shape[0] == x.shape[0]:
            shift = shift.reshape(1, x.shape[0], *([1] * (x.ndim - 1)))
        elif shift.ndim != 0:
            raise ValueError(f"control must be a number or a tensor of shape (batch,) = ({x.shape[0]},)")
    if method == "hutchinson":
        v, div, var, se, per_probe = _hutchinson(f, x, probes, c, create_graph, shift)
    else:
        v, div, var, se, per_probe = _hutchpp(f, x, probes, c, create_graph, shift)
    if shift is not None:
        div = div + d * shift.reshape(-1)
        per_probe = per_probe + d * shift.reshape(1, -1)
    if not create_graph:
        v, div, per_probe = v.detach(), div.detach(), per_probe.detach()
        var = var.detach() if var is not None else None
        se = se.detach() if se is not None else None
    return DivergenceResult(div, v, se, var, n, method, "reverse", c, per_probe)
