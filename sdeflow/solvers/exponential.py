r"""Exponential integrators in log-SNR time: the one core that DPM-Solver, DPM-Solver++ and UniPC share.

On any Gaussian path :math:`x_t = a_t x_0 + s_t\varepsilon` the probability-flow ODE is semilinear, and in the log-SNR
:math:`\lambda = \log(a/s)` its linear part integrates exactly (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, eq. 8).
From :math:`t_0` to :math:`t_1` with :math:`h = \lambda_1 - \lambda_0 > 0`,

.. math::

    x_{t_1} = c_x\, x_{t_0} + c_\text{out} \int_0^h e^{\kappa (h-\tau)} f(\lambda_0 + \tau)\,d\tau
              \;[+\ \sigma_\text{noise} z],

where, for the three forms used here,

=========  ====================  ========  ======================  ================  ===============================
form       f                     kappa     c_x                     c_out             noise std
=========  ====================  ========  ======================  ================  ===============================
"eps"      eps-hat (DPM-Solver)  +1        a_1/a_0                 -s_1              --
"x0"       x0-hat (DPM-Solver++) -1        s_1/s_0                 a_1               --
"x0_sde"   x0-hat (SDE variant)  -2        (s_1/s_0) e^{-h}        2 a_1             s_1 sqrt(1 - e^{-2h})
=========  ====================  ========  ======================  ================  ===============================

(the last is the reverse SDE in data prediction, Lu et al. 2022b, App. B / Gonzalez et al. 2023, whose Gaussian part
is also integrated exactly). Every solver of the family replaces f by the polynomial P that interpolates model outputs
:math:`f_m` at nodes :math:`\lambda_0 + r_m h` and integrates it exactly:

.. math::

    \int_0^h e^{\kappa (h-\tau)} P(\tau)\,d\tau = \sum_m w_m f_m, \qquad
    w_m = \sum_j c_{m,j}\,\mu_j, \qquad \mu_j = \int_0^h e^{\kappa(h-\tau)} (\tau/h)^j d\tau = j!\,h\,\varphi_{j+1}(\kappa h),

with :math:`L_m(r) = \sum_j c_{m,j} r^j` the Lagrange basis of the nodes and
:math:`\varphi_k(z) = \sum_{i\ge0} z^i/(i+k)!` (:func:`phi`). With n nodes this is exact for f of degree n - 1: local
error :math:`O(h^{n+1})`. The solvers differ only in where the nodes sit:

* singlestep DPM-Solver-k: intermediate points inside the step (``r`` in (0, 1));
* multistep DPM-Solver++(kM): earlier grid points (``r < 0``);
* UniPC: the predictor as multistep, the corrector adds the new point ``r = 1``.

The published 2-node formulas replace the exact :math:`\mu_1 = h\varphi_2(\kappa h)` by :math:`B(h)/2`: the
``rule`` of :func:`quadrature` names it. ``"bh2"``: :math:`B = h\varphi_1(\kappa h)` (UniPC's :math:`B_2(h) = e^h - 1`,
also DPM-Solver-2's and DPM-Solver++(2M)'s "midpoint" form, Lu et al. 2022 Alg. 1, 2022b Alg. 2); ``"bh1"``:
:math:`B = h` (UniPC's :math:`B_1(h) = h`). Both keep second order; with three or more nodes UniPC's linear system
:math:`R\,a = \Phi/B` is the exact moment match, so B cancels and the rule is irrelevant (Zhao et al. 2023, eq. 9).

Everything here is generic over python floats and float64 tensors (scalar or per-sample (B,)): a fixed grid computes
its coefficients in python floats (exact float64, no kernel launches), per-sample times compute the same formulas on
tensors. Nothing here draws randomness or loops over time.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from .._utils import append_dims
from ..denoiser import CONVERSIONS, Denoiser, Prediction
from .base import Stepper

__all__ = [
    "phi",
    "moments",
    "lagrange_basis",
    "quadrature",
    "RULES",
    "Form",
    "FORMS",
    "Point",
    "LogSNRView",
    "lincomb",
    "dynamic_threshold",
    "ExponentialStepper",
    "History",
    "multistep_orders",
]

Num = float | torch.Tensor
RULES = ("taylor", "bh1", "bh2")


# ------------------------------------------------------------------------------------------------ phi functions


def _exp(z: Num) -> Num:
    return torch.exp(z) if isinstance(z, torch.Tensor) else math.exp(z)


def _expm1(z: Num) -> Num:
    return torch.expm1(z) if isinstance(z, torch.Tensor) else math.expm1(z)


def _sqrt(z: Num) -> Num:
    return torch.sqrt(z) if isinstance(z, torch.Tensor) else math.sqrt(z)


_SERIES_TERMS = 18  # |z| < 1: the truncated tail is below 1/(k+19)! < 1e-17


def _phi_series(k: int, z: Num) -> Num:
    # phi_k(z) = (1/k!) (1 + z/(k+1) (1 + z/(k+2) (1 + ...)))  (Horner)
    acc: Num = 1.0
    for j in range(_SERIES_TERMS, 0, -1):
        acc = 1.0 + z * acc / (k + j)
    return acc / math.factorial(k)


def _phi_recursion(k: int, z: Num) -> Num:
    p = _expm1(z) / z
    for j in range(1, k):
        p = (p - 1.0 / math.factorial(j)) / z
    return p


def phi(k: int, z: Num) -> Num:
    r""":math:`\varphi_k(z) = \int_0^1 e^{(1-\theta)z}\theta^{k-1}/(k-1)!\,d\theta = \sum_{i\ge0} z^i/(i+k)!`.

    :math:`\varphi_0 = e^z`, :math:`\varphi_{k+1}(z) = (\varphi_k(z) - 1/k!)/z`. The recursion cancels for small
    :math:`|z|`, so :math:`|z| < 1` uses the Taylor series (relative error ~1e-16 for every k).

    Args:
        k: index >= 0.
        z: a python float or a float tensor (any shape).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return _exp(z)
    if isinstance(z, torch.Tensor):
        small = z.abs() < 1.0
        zs = torch.where(small, z, torch.zeros_like(z))
        zb = torch.where(small, torch.ones_like(z), z)
        return torch.where(small, _phi_series(k, zs), _phi_recursion(k, zb))
    return _phi_series(k, z) if abs(z) < 1.0 else _phi_recursion(k, z)


def moments(n: int, h: Num, kappa: float) -> list[Num]:
    r""":math:`\mu_j = \int_0^h e^{\kappa(h-\tau)}(\tau/h)^j\,d\tau = j!\,h\,\varphi_{j+1}(\kappa h)`, j = 0..n-1."""
    z = kappa * h
    return [math.factorial(j) * h * phi(j + 1, z) for j in range(n)]


def lagrange_basis(nodes: Sequence[Num]) -> list[list[Num]]:
    r"""Monomial coefficients of the Lagrange basis: ``c[m][j]`` with :math:`L_m(r) = \sum_j c_{m,j} r^j`,
    :math:`L_m(r_i) = \delta_{mi}`. Nodes must be distinct (floats or broadcastable tensors)."""
    n = len(nodes)
    basis = []
    for m in range(n):
        poly: list[Num] = [1.0]
        denom: Num = 1.0
        for j in range(n):
            if j == m:
                continue
            nxt: list[Num] = [0.0] * (len(poly) + 1)
            for i, c in enumerate(poly):  # poly * (r - r_j)
                nxt[i] = nxt[i] - nodes[j] * c
                nxt[i + 1] = nxt[i + 1] + c
            poly = nxt
            denom = denom * (nodes[m] - nodes[j])
        basis.append([c / denom for c in poly])
    return basis


def quadrature(nodes: Sequence[Num], h: Num, kappa: float, rule: str = "taylor") -> list[Num]:
    r"""Weights :math:`w_m` with :math:`\int_0^h e^{\kappa(h-\tau)}P(\tau)d\tau = \sum_m w_m f_m` for the polynomial
    P through :math:`(r_m h, f_m)`.

    Args:
        nodes: the :math:`r_m` (node 0 is usually the step's start, r = 0), floats or tensors.
        h: the step in log-SNR, float or tensor.
        kappa: the exponent of the form (see the module table).
        rule: ``"taylor"`` (exact moments) or ``"bh1"`` / ``"bh2"`` (two nodes: :math:`\mu_1 = B(h)/2`, the
            published 2-node formulas; ignored for other node counts).
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not supported; allowed values: {', '.join(map(repr, RULES))}")
    n = len(nodes)
    mu = moments(n, h, kappa)
    if n == 2 and rule != "taylor":
        mu[1] = 0.5 * (h if rule == "bh1" else mu[0])
    if n == 1:
        return [mu[0]]
    basis = lagrange_basis(nodes)
    return [sum((basis[m][j] * mu[j] for j in range(1, n)), basis[m][0] * mu[0]) for m in range(n)]


# ------------------------------------------------------------------------------------------------ the forms
@dataclass(frozen=True)
class Form:
    """One row of the module table: which prediction is integrated, and the exponent kappa."""

    name: str
    kappa: float
    target: str  # "eps" | "x0"
    stochastic: bool


FORMS: dict[str, Form] = {
    "eps": Form("eps", 1.0, "eps", False),
    "x0": Form("x0", -1.0, "x0", False),
    "x0_sde": Form("x0_sde", -2.0, "x0", True),
}


class Point(NamedTuple):
    """A time and its float64 semilinear coordinates: floats (fixed grids) or tensors (per-sample times)."""

    t: torch.Tensor  # float64, scalar or (B,): what the Denoiser receives
    lam: Num  # log-SNR
    la: Num  # log a(t)
    ls: Num  # log s(t)
    a: float | None = None  # a(t), s(t) (scalar points only)
    s: float | None = None


class LogSNRView:
    r"""The semilinear view of an SDE: :math:`(\lambda, \log a, \log s)` at times, and times at log-SNRs.

    Scalar CPU times are converted once to python floats and cached (a fixed grid then costs no tensor op per step);
    per-sample times (B,) and accelerator-resident times stay tensors (no host sync).
    """

    _MAX_CACHE = 65536

    def __init__(self, sde: Any) -> None:
        self.sde = sde
        self._points: dict[float, Point] = {}
        self._times: dict[float, torch.Tensor] = {}
        self.coefficients: dict[tuple, tuple] = {}  # the steppers' memo of update coefficients (keyed by form, rule)

    @classmethod
    def of(cls, sde: Any) -> LogSNRView:
        """The view of ``sde``, shared by every stepper on it (the caches depend on the SDE only)."""
        view = _VIEWS.get(sde)
        if view is None:
            view = cls(sde)
            _VIEWS[sde] = view
        return view

    @staticmethod
    def _scalar(t: torch.Tensor) -> bool:
        return t.ndim == 0 and t.device.type == "cpu"

    def point(self, t: torch.Tensor) -> Point:
        """The semilinear coordinates of a float64 time (scalar or (B,))."""
        if self._scalar(t):
            key = float(t)
            p = self._points.get(key)
            if p is None:
                self.prefill(t.reshape(1))
                p = self._points[key]
            return p
        la, ls = self.sde.log_alpha(t), self.sde.log_sigma(t)
        return Point(t, la - ls, la, ls)

    def prefill(self, ts: torch.Tensor) -> None:
        """Cache the points of a 1-D tensor of times in one vectorized pass (a grid, the stage times of a plan)."""
        if len(self._points) > self._MAX_CACHE:
            self._points.clear()
        ts = ts.detach().to(device="cpu", dtype=torch.float64).flatten()
        if all(t in self._points for t in ts.tolist()):
            return
        la, ls = self.sde.log_alpha(ts), self.sde.log_sigma(ts)
        for t, a, s, ea, es in zip(ts.unbind(0), la.tolist(), ls.tolist(), la.exp().tolist(), ls.exp().tolist()):
            self._points.setdefault(float(t), Point(t, a - s, a, s, ea, es))

    def at_log_snr(self, lam: Num, like: torch.Tensor) -> Point:
        """The point whose time has log-SNR ``lam`` (the time comes from ``sde.t_from_log_snr``; its log-SNR is
        recomputed from that time, so the integrator's h always matches the time the model sees)."""
        if not isinstance(lam, torch.Tensor):
            t = self._times.get(lam)
            if t is None:
                if len(self._times) > self._MAX_CACHE:
                    self._times.clear()
                t = self.sde.t_from_log_snr(torch.tensor(lam, dtype=torch.float64))
                self._times[lam] = t
            return self.point(t)
        return self.point(self.sde.t_from_log_snr(lam.to(torch.float64)))

    def has_log_snr(self, lam: float) -> bool:
        return lam in self._times

    def prefill_log_snr(self, lams: torch.Tensor) -> None:
        """Cache :meth:`at_log_snr` for a 1-D tensor of log-SNRs in one vectorized inverse."""
        lams = lams.detach().to(device="cpu", dtype=torch.float64).flatten()
        ts = self.sde.t_from_log_snr(lams)
        for lam, t in zip(lams.tolist(), ts.unbind(0)):
            self._times.setdefault(lam, t)
        self.prefill(ts)


_VIEWS: weakref.WeakKeyDictionary[Any, LogSNRView] = weakref.WeakKeyDictionary()


def base_coefficients(form: Form, p0: Point, p1: Point) -> tuple[Num, Num, Num, Num | None]:
    """(h, c_x, c_out, noise std) of the module table for a step p0 -> p1, in float64."""
    h = p1.lam - p0.lam
    if form is FORMS["eps"]:
        return h, _exp(p1.la - p0.la), -_exp(p1.ls), None
    if form is FORMS["x0"]:
        return h, _exp(p1.ls - p0.ls), _exp(p1.la), None
    std = _exp(p1.ls) * _sqrt(-_expm1(-2.0 * h))
    return h, _exp(p1.ls - p0.ls - h), 2.0 * _exp(p1.la), std


def lincomb(terms: Iterable[tuple[Num, torch.Tensor]]) -> torch.Tensor:
    """:math:`\\sum_i c_i v_i` with float64 coefficients (python floats or (B,) tensors broadcast over v's data axes),
    accumulated in v's dtype."""
    it = iter(terms)
    c, v = next(it)
    out = v * (c if not isinstance(c, torch.Tensor) else append_dims(c.to(device=v.device, dtype=v.dtype), v.ndim))
    for c, v in it:
        if isinstance(c, torch.Tensor):
            out = out.addcmul_(v, append_dims(c.to(device=v.device, dtype=v.dtype), v.ndim))
        else:
            out = out.add_(v, alpha=c)
    return out


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    r"""Dynamic thresholding, Saharia et al. 2022 (Imagen, Sec. 2.3): per sample, :math:`s = \max(q_{ratio}(|\hat
    x_0|), m)` and :math:`\hat x_0 \leftarrow \mathrm{clip}(\hat x_0, -s, s)\, m / s` (m = ``max_value``, the data
    bound; m = 1 is Imagen's rule). Samples already inside [-m, m] are unchanged."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat, ratio, dim=1).clamp(min=max_value).to(x0.dtype)
    s = append_dims(s, x0.ndim)
    return torch.maximum(torch.minimum(x0, s), -s) * (max_value / s)


# ------------------------------------------------------------------------------------------------ multistep pieces
LOWER_ORDER_FINAL_BELOW = 15


def multistep_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Per-step orders of a k-step method: warm-up ``min(order, i + 1)`` and, with ``lower_order_final`` on grids of
    fewer than 15 steps, ``min(., steps - i)`` on the last steps (the stabilization of Lu et al. 2022b's code for
    few-step sampling, applied below 15 steps as diffusers does; from 15 steps on the declared order holds)."""
    lower = lower_order_final and steps < LOWER_ORDER_FINAL_BELOW
    out = []
    for i in range(steps):
        k = min(order, i + 1)
        if lower:
            k = min(k, steps - i)
        out.append(k)
    return out


@dataclass
class History:
    """State of a multistep method: the step index, the per-step order plan, and the latest model outputs.

    ``nodes`` holds (Point, f) pairs, newest first. ``x_prev``/``p_prev``/``prev_order`` are UniPC's: the corrected
    state the last predictor started from, its point, and that predictor's order. ``points``: the grid's points,
    looked up once by :meth:`ExponentialStepper.grid_points` (step i goes from points[i] to points[i + 1]).
    """

    i: int
    plan: list[int] | None
    nodes: list[tuple[Point, torch.Tensor]]
    x_prev: torch.Tensor | None = None
    p_prev: Point | None = None
    prev_order: int = 0
    points: tuple[Point, ...] | None = None

    def step_points(self, view: LogSNRView, t0: torch.Tensor, t1: torch.Tensor) -> tuple[Point, Point]:
        """The points of this step: from the grid's when the times are the grid's scalars, else looked up."""
        if self.points is not None and t0.ndim == 0:
            return self.points[self.i], self.points[self.i + 1]
        return view.point(t0), view.point(t1)


class DeferredPrediction:
    """(x0, eps) = (p x + q out, r x + u out) with python-float coefficients, each computed on first read (and the
    identity conversion costs nothing: x0 of an x0-prediction model is its output)."""

    __slots__ = ("_coefs", "_eps", "_out", "_x", "_x0")

    def __init__(self, x: torch.Tensor, out: torch.Tensor, coefs: tuple[float, float, float, float]) -> None:
        self._x, self._out, self._coefs = x, out, coefs
        self._x0: torch.Tensor | None = None
        self._eps: torch.Tensor | None = None

    def _combine(self, cx: float, co: float) -> torch.Tensor:
        if cx == 0.0 and co == 1.0:
            return self._out
        if cx == 0.0:
            return self._out * co
        return torch.add(self._x * cx, self._out, alpha=co)

    @property
    def x0(self) -> torch.Tensor:
        if self._x0 is None:
            self._x0 = self._combine(self._coefs[0], self._coefs[1])
        return self._x0

    @property
    def eps(self) -> torch.Tensor:
        if self._eps is None:
            self._eps = self._combine(self._coefs[2], self._coefs[3])
        return self._eps


# ------------------------------------------------------------------------------------------------ base stepper
#: the dynamic-thresholding options every data-prediction solver shares (Saharia et al. 2022)
THRESHOLD_OPTIONS: dict[str, Any] = {"thresholding": False, "threshold_ratio": 0.995, "threshold_max": 1.0}


class ExponentialStepper(Stepper):
    """Shared machinery of the exponential-integrator solvers: option checks, the semilinear view, model evaluation
    in the chosen form (with optional dynamic thresholding of x0), and the node-quadrature update."""

    requires = frozenset({"semilinear"})
    default_grid = "logsnr"
    #: take the path's ``sde.default_grid`` instead of ``default_grid`` (the solvers measured by
    #: benchmarks/default_grids.py: dpm_solver, dpm_solver++, unipc, deis; docs/solvers.md, "Default grids")
    grid_from_path: ClassVar[bool] = False
    _orders: tuple[int, ...] = (1, 2, 3)

    def __init__(self, denoiser, **options: Any) -> None:
        super().__init__(denoiser, **options)
        if self.grid_from_path:
            self.default_grid = str(self.sde.default_grid)
        self.view = LogSNRView.of(self.sde)
        # the Denoiser's own predict() is raw() + the conversion table at a(t), s(t): with the point's cached a, s the
        # same table is applied without recomputing the schedule (wrappers override raw() only; a subclass that
        # overrides predict() or coefficients() is always called through predict())
        cls = type(denoiser)
        self._table_predict = (
            cls.predict is Denoiser.predict
            and cls.coefficients is Denoiser.coefficients
            and denoiser.prediction not in ("v", "flow")
        )  # the v row needs tensor a, s; the flow row the derivatives a'(t), s'(t)

    # ---------------------------------------------------------------- options
    def _check_choice(self, name: str, allowed: Sequence[Any]) -> None:
        v = self.opts[name]
        if isinstance(v, bool) and not all(isinstance(a, bool) for a in allowed):
            ok = False
        else:
            ok = v in allowed
        if not ok:
            raise ValueError(
                f"{name}={v!r} is not supported by solver {self.name!r}; allowed values: "
                f"{', '.join(map(repr, allowed))}"
            )

    def _check_bool(self, name: str) -> None:
        if not isinstance(self.opts[name], bool):
            raise ValueError(f"{name} must be True or False, got {self.opts[name]!r}")

    def _check_threshold(self) -> None:
        if "thresholding" not in self.opts:
            return
        self._check_bool("thresholding")
        ratio, m = self.opts["threshold_ratio"], self.opts["threshold_max"]
        if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
            raise ValueError(f"threshold_ratio must lie in (0, 1], got {ratio!r}")
        if not (isinstance(m, (int, float)) and 0.0 < m < float("inf")):
            raise ValueError(f"threshold_max must be a positive finite number, got {m!r}")
        if self.opts["thresholding"] and self.form.target != "x0":
            raise ValueError(
                f"thresholding=True needs the data-prediction form (solver {self.name!r} integrates eps "
                "here); use dpm_solver++ or unipc, or predict_x0=True"
            )

    @property
    def form(self) -> Form:
        """The integrated quantity: the data prediction when the ``predict_x0`` option is set, else the noise."""
        return FORMS["x0" if self.opts["predict_x0"] else "eps"]

    # ---------------------------------------------------------------- evaluation and update
    def evaluate(self, x: torch.Tensor, p: Point) -> tuple[torch.Tensor, Prediction]:
        """One net call: the integrated quantity f (eps or x0, thresholded if asked) and the prediction."""
        pred = self.predict(x, p)
        if self.form.target == "eps":
            return pred.eps, pred
        x0 = pred.x0
        if self.opts.get("thresholding", False):
            x0 = dynamic_threshold(x0, float(self.opts["threshold_ratio"]), float(self.opts["threshold_max"]))
            pred = Prediction(x0, pred.eps)
        return x0, pred

    def predict(self, x: torch.Tensor, p: Point) -> Prediction:
        """``den.predict(x, p.t)``: one counted net call converted through the Denoiser's table. On a grid point
        (python-float a, s) the two predictions are computed only when read (:class:`DeferredPrediction`): the
        integrated one is usually the net's own output (x0 form, x0 model), and the other one is rarely needed."""
        if not self._table_predict or p.a is None or p.s is None:
            return self.den.predict(x, p.t)
        out = self.den.raw(x, p.t)
        key = ("affine", self.den.prediction, p.a, p.s)  # memoized on the SDE's view: shared by every stepper on it
        coefs = self.view.coefficients.get(key)
        if coefs is None:
            one = torch.ones((), dtype=torch.float64)
            a, s = one * p.a, one * p.s
            unit_x, unit_out = (
                CONVERSIONS[self.den.prediction](0 * one, one, a, s),
                CONVERSIONS[self.den.prediction](one, 0 * one, a, s),
            )
            coefs = (float(unit_x.x0), float(unit_out.x0), float(unit_x.eps), float(unit_out.eps))
            if len(self.view.coefficients) > LogSNRView._MAX_CACHE:
                self.view.coefficients.clear()
            self.view.coefficients[key] = coefs
        return DeferredPrediction(x, out, coefs)  # type: ignore[return-value]  # duck-types Prediction's x0/eps

    def coefficients(self, p0: Point, p1: Point, nodes: Sequence[Point], rule: str) -> tuple[list[Num], Num | None]:
        """Float64 coefficients ``[c_x, c_out w_0, c_out w_1, ...]`` and the noise std of one update (memoized for
        scalar points: a fixed grid computes each step's coefficients once)."""
        key = None
        if not isinstance(p0.lam, torch.Tensor) and not isinstance(p1.lam, torch.Tensor):
            key = (self.form.name, rule, p0.lam, p1.lam, p0.la, p1.la) + tuple(q.lam for q in nodes)
            hit = self.view.coefficients.get(key)
            if hit is not None:
                return hit
        h, c_x, c_out, std = base_coefficients(self.form, p0, p1)
        if isinstance(h, float) and math.isinf(h):
            # a step from lambda = -inf (a(T) = 0): h -> inf, the single-node weight int_0^h e^{kappa(h-tau)} dtau
            # -> -1/kappa (data-prediction forms, kappa < 0); earlier nodes carry no information there
            out = ([c_x, c_out * (-1.0 / self.form.kappa)], std)
            if key is not None:
                self.view.coefficients[key] = out
            return out
        r = [0.0 * h] + [(q.lam - p0.lam) / h for q in nodes[1:]]
        w = quadrature(r, h, self.form.kappa, rule)
        out = ([c_x] + [c_out * wm for wm in w], std)
        if key is not None:
            if len(self.view.coefficients) > LogSNRView._MAX_CACHE:
                self.view.coefficients.clear()
            self.view.coefficients[key] = out
        return out

    def update(
        self,
        x: torch.Tensor,
        p0: Point,
        p1: Point,
        nodes: Sequence[tuple[Point, torch.Tensor]],
        rule: str = "taylor",
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One exponential-integrator update from p0 to p1 with the interpolation nodes ``(point, f)`` (the first
        node must be p0 itself). Returns (x1, mean): the stochastic form adds ``noise std * noise`` to the mean."""
        if not isinstance(p0.lam, torch.Tensor) and math.isinf(p0.lam):
            nodes = nodes[:1]  # the step from lambda = -inf: the one-node limit (coefficients)
        else:  # a node at lambda = -inf (the grid's start on a path with a(T) = 0) cannot be interpolated through
            nodes = [nodes[0], *(n for n in nodes[1:] if isinstance(n[0].lam, torch.Tensor) or math.isfinite(n[0].lam))]
        c, std = self.coefficients(p0, p1, [q for q, _ in nodes], rule)
        mean = lincomb(zip(c, [x] + [f for _, f in nodes]))
        if std is None:
            return mean, mean
        if noise is None:
            raise ValueError(f"solver {self.name!r} is stochastic: the driver must pass noise")
        return lincomb([(1.0, mean), (std, noise)]), mean

    #: whether the first step may start at lambda = -inf (a(T) = 0, e.g. the flow path at t = 1): the data-prediction
    #: forms have a finite limit there (x1 = (s1/s0) x + a1 x0_hat, DDIM from pure noise); the noise forms do not
    starts_at_zero_signal = True

    def grid_points(self, grid: torch.Tensor) -> tuple[Point, ...]:
        """The semilinear points of a grid's times, in order (after :meth:`check_grid` cached them)."""
        return tuple(self.view.point(t) for t in grid.detach().to(device="cpu", dtype=torch.float64).unbind(0))

    def check_grid(self, grid: torch.Tensor) -> None:
        """Every grid time needs a finite log-SNR (t_end = 0 is lambda = +inf on VP paths), except a start at
        lambda = -inf for data-prediction forms; caches the grid's points."""
        self.view.prefill(grid)
        lams = [self.view.point(t).lam for t in grid.detach().cpu().to(torch.float64).unbind(0)]
        if not math.isfinite(lams[-1]) or not all(math.isfinite(v) for v in lams[1:-1]):
            raise ValueError(
                f"solver {self.name!r} needs a finite log-SNR at every grid time; t_end = "
                f"{float(grid[-1]):.3g} has lambda = {lams[-1]}: use t_end > 0 (e.g. sde.eps)"
            )
        if not math.isfinite(lams[0]) and (lams[0] > 0 or self.form.kappa > 0 or not self.starts_at_zero_signal):
            how = "data prediction (predict_x0=True, dpm_solver++, unipc)" if self.form.kappa > 0 else "ddim"
            raise ValueError(
                f"solver {self.name!r} in this configuration cannot start at t = {float(grid[0]):.6g}, where the "
                f"log-SNR is {lams[0]} (a(T) = 0: zero terminal SNR or the flow path at t = 1); use {how}, or "
                "start below T (t_start)"
            )
