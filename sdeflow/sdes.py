r"""Gaussian diffusion processes as objects.

Every SDE here is a *Gaussian probability path*

.. math:: x_t = a(t)\, x_0 + s(t)\, \varepsilon, \qquad \varepsilon \sim N(0, I),

and everything a sampler needs follows from :math:`a` and :math:`s` (Song et al. 2021, "Score-Based Generative
Modeling through SDEs"; Kingma et al. 2021, "Variational Diffusion Models"):

* drift coefficient  :math:`f(t) = \mathrm{d}\log a / \mathrm{d}t`, forward SDE :math:`dx = f(t) x\,dt + g(t)\,dW`;
* diffusion          :math:`g(t)^2 = \mathrm{d}s^2/\mathrm{d}t - 2 f(t) s(t)^2`;
* log-SNR            :math:`\lambda(t) = \log a(t) - \log s(t)` (strictly decreasing);
* reverse SDE        :math:`dx = [f x - g^2 \nabla\log p_t(x)]\,dt + g\,d\bar W`;
* probability flow   :math:`dx/dt = f x - \tfrac12 g^2 \nabla\log p_t(x)`.

Subclasses give :math:`\log a`, :math:`\log s`, :math:`f` and (optionally in closed form) :math:`g^2` and the inverse of
the log-SNR; the base class derives the rest once. All schedule arithmetic runs in the dtype of ``t`` (pass float64
times for accuracy; python numbers become float64) and is cast to the state's dtype only where it meets ``x``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from ._utils import TimeLike, append_dims, as_time, check_choice, check_positive, check_time, log1mexp

__all__ = ["GaussianSDE", "VPSDE", "SubVPSDE", "VESDE", "DiscreteVPSDE", "GaussianPath", "FlowMatchingPath", "EDMPath"]


def _real(name: str, value: object) -> float:
    """``value`` as a float: a real number (not a bool) or a one-element real tensor, else TypeError naming it."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}, {value.dtype}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _real_scalar(name: str, value: object) -> float:
    """A time-like python value as a float (a real number, a numpy scalar or one-element array), else TypeError."""
    if isinstance(value, (bool, str, bytes, complex)) or value is None:
        raise TypeError(f"{name} must be a real number or tensor, got {type(value).__name__} {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]  # anything with __float__ (numpy scalars and 0-d arrays)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number or tensor, got {type(value).__name__} {value!r}") from err


def _finite_real(name: str, value: object) -> float:
    v = _real(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def _positive(name: str, value: object) -> float:
    v = _real(name, value)
    check_positive(name, v)
    return v


_MAX_SCALE = 1e100  # the largest beta / sigma accepted: their squares and products stay far inside float64


_MIN_EPS = 1e-100  # the smallest eps accepted: below, s(eps)^2 ~ eps underflows to 0 in float64


def _check_eps_T(eps: float, T: float) -> None:
    if not eps >= _MIN_EPS:
        raise ValueError(f"eps must be >= {_MIN_EPS:g}, got {eps}")
    if not eps < T:
        raise ValueError(f"eps must be < T = {T}, got eps={eps}")


def _check_tensor(name: str, x: object) -> torch.Tensor:
    """x must be a real floating-point tensor (an integer x would silently truncate the schedule's coefficients)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_batch_time(t: torch.Tensor, x: torch.Tensor, name: str = "x") -> None:
    if t.ndim != 0 and (x.ndim == 0 or t.shape != (x.shape[0],)):
        raise ValueError(
            f"t must be a scalar or have shape (batch,) = ({x.shape[0] if x.ndim else 'none'},) for {name} of shape "
            f"{tuple(x.shape)}, got {tuple(t.shape)}"
        )


def _sigmoid(x: float) -> float:
    """1/(1 + e^-x) without overflow for any finite x."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) with no threshold (torch's softplus switches to x at x > 20, a 2e-9 error)."""
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))


class GaussianSDE:
    r"""Base class: a diffusion defined by its Gaussian marginals :math:`x_t = a(t) x_0 + s(t)\varepsilon`.

    Subclasses implement :meth:`_log_alpha`, :meth:`_log_sigma`, :meth:`_f` (= d log a/dt) and either
    :meth:`_dsigma2` (= d s^2/dt) or a closed-form :meth:`_g2`. A closed-form :meth:`_t_from_log_snr` is optional; the
    default is a safeguarded bisection in float64.

    Attributes:
        T: final time (noise end). Samplers integrate from ``T`` down to ``t_end``.
        eps: default smallest time for sampling and likelihoods (1e-3 VP/sub-VP, 1e-5 VE, 1/N discrete).
        default_grid: the grid sdeflow's exponential integrators (``dpm_solver``, ``dpm_solver++``, ``unipc``,
            ``deis``) take on this path when none is given: ``"quadratic"`` (uniform in sqrt t) on the VP, sub-VP, discrete
            DDPM and flow-matching paths, ``"logsnr"`` elsewhere (VE, EDM, a user's ``GaussianPath``), where t is
            not a diffusion time. Chosen by measurement (docs/solvers.md, "Default grids").
    """

    T: float = 1.0
    eps: float = 1e-3
    default_grid: str = "logsnr"

    # ------------------------------------------------------------------ subclass hooks (tensor in, tensor out)
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dsigma2(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        s2 = torch.exp(2 * self._log_sigma(t))
        return self._dsigma2(t) - 2 * self._f(t) * s2

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return self._bisect_log_snr(lam)

    # ------------------------------------------------------------------ public, checked
    def _t(self, t: TimeLike, name: str = "t") -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            if t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must be a real tensor or number, got dtype {t.dtype}")
        else:
            t = _real_scalar(name, t)
        t = as_time(t)
        check_time(t, self.T, name)
        if t.device.type == "cpu" and t.numel():  # checked above: only check_time's few-ulp slack is clamped away
            t = t.clamp(0.0, self.T)
        return t

    def log_alpha(self, t: TimeLike) -> torch.Tensor:
        """log a(t)."""
        return self._log_alpha(self._t(t))

    def log_sigma(self, t: TimeLike) -> torch.Tensor:
        """log s(t)."""
        return self._log_sigma(self._t(t))

    def alpha(self, t: TimeLike) -> torch.Tensor:
        """a(t), the signal scale of the marginal."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """s(t), the noise scale of the marginal."""
        return torch.exp(self.log_sigma(t))

    def log_snr(self, t: TimeLike) -> torch.Tensor:
        r""":math:`\lambda(t) = \log a(t) - \log s(t)`, strictly decreasing in t."""
        t = self._t(t)
        return self._log_alpha(t) - self._log_sigma(t)

    def t_from_log_snr(self, lam: TimeLike) -> torch.Tensor:
        r"""The inverse of :meth:`log_snr`: the t in [0, T] with :math:`\lambda(t) = \mathrm{lam}`."""
        if isinstance(lam, torch.Tensor):
            if lam.is_complex() or lam.dtype == torch.bool:
                raise TypeError(f"lam must be a real tensor or number, got dtype {lam.dtype}")
        else:
            lam = _real_scalar("lam", lam)
        lam = as_time(lam)
        if lam.device.type == "cpu" and bool(torch.isnan(lam).any()):  # +-inf are the ends of the path, NaN is not
            raise ValueError(f"lam must not be NaN, got {lam}")
        lam_T = self._log_snr_at_T()
        if lam_T > -math.inf:  # below lambda(T) the answer is T: clamp first, the closed forms may overflow there
            lam = lam.clamp(min=lam_T)
        return self._t_from_log_snr(lam).clamp(0.0, self.T)

    def _log_snr_at_T(self) -> float:
        """lambda(T) in float64, cached per T."""
        cached = self.__dict__.get("_lam_T_cache")
        if cached is None or cached[0] != self.T:
            T = torch.tensor(self.T, dtype=torch.float64)
            cached = (self.T, float(self._log_alpha(T) - self._log_sigma(T)))
            self.__dict__["_lam_T_cache"] = cached
        return cached[1]

    def edm_sigma(self, t: TimeLike) -> torch.Tensor:
        r"""The EDM noise level :math:`\sigma(t) = s(t)/a(t) = e^{-\lambda(t)}` (Karras et al. 2022)."""
        return torch.exp(-self.log_snr(t))

    def t_from_edm_sigma(self, sigma: TimeLike) -> torch.Tensor:
        """Inverse of :meth:`edm_sigma`."""
        return self.t_from_log_snr(-torch.log(as_time(sigma)))

    def f(self, t: TimeLike) -> torch.Tensor:
        """Drift coefficient f(t) = d log a / dt (the forward drift is f(t) x)."""
        return self._f(self._t(t))

    def g2(self, t: TimeLike) -> torch.Tensor:
        """Squared diffusion g(t)^2 = d s^2/dt - 2 f s^2."""
        return self._g2(self._t(t))

    def diffusion(self, t: TimeLike) -> torch.Tensor:
        """g(t): the forward SDE is dx = f(t) x dt + g(t) dW."""
        return torch.sqrt(self.g2(t))

    def d_alpha(self, t: TimeLike) -> torch.Tensor:
        r""":math:`a'(t) = f(t)\,a(t)` (paths with a closed form override :meth:`_d_alpha`)."""
        return self._d_alpha(self._t(t))

    def d_sigma(self, t: TimeLike) -> torch.Tensor:
        r""":math:`s'(t) = (g^2 + 2 f s^2) / (2 s)`, from :math:`g^2 = \mathrm{d}s^2/\mathrm{d}t - 2 f s^2`."""
        return self._d_sigma(self._t(t))

    def _d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._f(t) * torch.exp(self._log_alpha(t))

    def _d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        s = torch.exp(self._log_sigma(t))
        return (self._g2(t) + 2 * self._f(t) * s * s) / (2 * s)

    def drift(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Forward drift f(t) x, for x of shape (batch, *data_shape) and t scalar or (batch,)."""
        return self._coef(self.f(t), x) * x

    def marginal(self, x0: torch.Tensor, t: TimeLike, noise: torch.Tensor) -> torch.Tensor:
        """Sample of x_t given x_0: a(t) x0 + s(t) noise."""
        _check_tensor("x0", x0)
        _check_tensor("noise", noise)
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        t = self._t(t)
        _check_batch_time(t, x0, "x0")
        return (
            self._coef(torch.exp(self._log_alpha(t)), x0) * x0 + self._coef(torch.exp(self._log_sigma(t)), x0) * noise
        )

    def reverse_drift(self, x: torch.Tensor, t: TimeLike, score: torch.Tensor) -> torch.Tensor:
        r"""Drift of the reverse-time SDE (Anderson 1982): :math:`f x - g^2 \nabla\log p_t`, to be integrated from T to 0."""
        t = self._drift_args(x, t, score)
        return self._coef(self._f(t), x) * x - self._coef(self._g2(t), x) * score

    def probability_flow_drift(self, x: torch.Tensor, t: TimeLike, score: torch.Tensor) -> torch.Tensor:
        r"""Velocity of the probability-flow ODE (Song et al. 2021, eq. 13): :math:`f x - \tfrac12 g^2 \nabla\log p_t`."""
        t = self._drift_args(x, t, score)
        return self._coef(self._f(t), x) * x - 0.5 * self._coef(self._g2(t), x) * score

    def _drift_args(self, x: torch.Tensor, t: TimeLike, score: torch.Tensor) -> torch.Tensor:
        """Shapes and dtypes only (no data-dependent check: a NaN score reaches the solvers' own NaN guard)."""
        _check_tensor("x", x)
        _check_tensor("score", score)
        if score.shape != x.shape:
            raise ValueError(f"score must have the shape of x {tuple(x.shape)}, got {tuple(score.shape)}")
        tt = self._t(t)
        _check_batch_time(tt, x)
        return tt

    def prior_std(self) -> float:
        """s(T): the prior is N(0, s(T)^2 I)."""
        return float(self.sigma(self.T))

    def prior_sample(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw x_T ~ N(0, s(T)^2 I) of the given shape (batch, *data_shape)."""
        dims = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
        if (
            not isinstance(dims, (tuple, list, torch.Size))
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in dims)
            or any(n < 0 for n in dims)
        ):
            raise ValueError(f"shape must be a tuple of non-negative ints (batch, *data_shape), got {shape!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        shape = tuple(dims)
        if device is None and generator is not None:
            device = generator.device
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return self.prior_std() * z

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, s(T)^2 I), summed over all but the batch dimension: shape (batch,)."""
        _check_tensor("x", x)
        if x.ndim < 1:
            raise ValueError("x must have a batch dimension")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite (it holds NaN or inf)")
        s = self.prior_std()
        d = math.prod(x.shape[1:])
        sq = x.reshape(x.shape[0], d).pow(2).sum(dim=1)
        return -0.5 * sq / s**2 - 0.5 * d * math.log(2 * math.pi * s**2)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _coef(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return append_dims(c.to(device=x.device, dtype=x.dtype), x.ndim)

    def _bisect_log_snr(self, lam: torch.Tensor, iters: int = 100) -> torch.Tensor:
        """Safeguarded inverse of the decreasing log-SNR by vectorized bisection on [0, T] in float64."""
        lam64 = lam.to(torch.float64)
        lo = torch.zeros_like(lam64)
        hi = torch.full_like(lam64, self.T)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            val = self._log_alpha(mid) - self._log_sigma(mid)
            go_right = val > lam64  # lambda decreasing: the root lies to the right
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T}, eps={self.eps})"


class _VPBase(GaussianSDE):
    r"""Variance-preserving paths: :math:`s^2 = 1 - a^2`, hence :math:`g^2 = \beta(t) = -2 f(t)`."""

    default_grid = "quadratic"

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * log1mexp(2 * self._log_alpha(t))

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        return -2 * self._f(t)

    @staticmethod
    def _log_alpha_from_log_snr(lam: torch.Tensor) -> torch.Tensor:
        # a^2 / (1 - a^2) = exp(2 lam)  =>  log a = -softplus(-2 lam) / 2
        return -0.5 * _softplus(-2 * lam)

    def beta(self, t: TimeLike) -> torch.Tensor:
        r""":math:`\beta(t) = g(t)^2`."""
        return self.g2(t)

    def _d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        la = self._log_alpha(t)  # a = 0 (zero terminal SNR) has a' = 0 there, not f * a = -inf * 0
        return torch.where(la > -math.inf, self._f(t) * torch.exp(la), torch.zeros_like(la))

    def _d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        # s^2 = 1 - a^2  =>  s' = -a a' / s = -f a^2 / s
        la = self._log_alpha(t)
        ds = -self._f(t) * torch.exp(2 * la - self._log_sigma(t))
        return torch.where(la > -math.inf, ds, torch.zeros_like(la))


class VPSDE(_VPBase):
    r"""Variance-preserving SDE :math:`dx = -\tfrac12\beta(t) x\,dt + \sqrt{\beta(t)}\,dW` (Song et al. 2021).

    Schedules:

    * ``"linear"``: :math:`\beta(t) = \beta_0 + t(\beta_1-\beta_0)`, :math:`\log a = -\tfrac14 t^2(\beta_1-\beta_0) -
      \tfrac12 t\beta_0` (the continuous DDPM, Ho et al. 2020 / Song et al. 2021). Closed-form log-SNR inverse.
    * ``"cosine"``: :math:`a(t) = \cos(\tfrac{\pi}{2}\tfrac{t+s}{1+s}) / \cos(\tfrac{\pi}{2}\tfrac{s}{1+s})`,
      s = 0.008 (Nichol & Dhariwal 2021). :math:`\beta` blows up at t = 1, so, as in DPM-Solver's continuous cosine
      schedule (Lu et al. 2022, ``NoiseScheduleVP``), the process stops at ``T = 0.9946`` (a(T) = 0.0084, beta(T) = 371)
      instead of clipping beta. Closed-form inverse.
    * ``"sigmoid"``: :math:`\bar a(t) = a^2 = \delta + (1-\delta)\,\frac{v_e - \mathrm{sig}(u(t))}{v_e - v_s}`,
      :math:`u = (\text{start} + t(\text{end}-\text{start}))/\tau`, :math:`v_{s,e} = \mathrm{sig}(\text{start/end}/\tau)`
      (the sigmoid schedule of Jabri et al. 2022, "Scalable Adaptive Computation for Iterative Generation", with
      start = -3, end = 3, tau = 1). Their schedule is clipped at a floor; here the floor ``delta = alpha_bar_min``
      (default 4.1e-5, the linear VP's a(1)^2) is mixed in affinely so the path stays smooth. Closed-form inverse.

    ``beta_min``/``beta_max`` are used by the linear schedule only.
    """

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        schedule: str = "linear",
        *,
        T: float | None = None,
        cosine_s: float = 0.008,
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
        alpha_bar_min: float = 4.1e-5,
        eps: float = 1e-3,
    ) -> None:
        if not isinstance(schedule, str):
            raise TypeError(f"schedule must be a string ('linear', 'cosine' or 'sigmoid'), got {schedule!r}")
        check_choice("schedule", schedule, ["linear", "cosine", "sigmoid"])
        self.schedule = schedule
        beta_min, beta_max = _real("beta_min", beta_min), _real("beta_max", beta_max)
        eps = _real("eps", eps)
        if T is not None:
            T = _real("T", T)
        if schedule == "linear":
            for name, b in (("beta_min", beta_min), ("beta_max", beta_max)):
                if not 0 < b <= _MAX_SCALE:  # beyond, (beta_max - beta_min) log a overflows float64
                    raise ValueError(f"{name} must lie in (0, {_MAX_SCALE:g}], got {b}")
            if not (beta_min > 0 and beta_max > 0):
                raise ValueError(
                    f"beta_min and beta_max must be positive, got beta_min={beta_min}, beta_max={beta_max}"
                )
            if not beta_min < beta_max:
                raise ValueError(f"beta_min must be < beta_max, got beta_min={beta_min} >= beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        if schedule == "cosine":
            cosine_s = _positive("cosine_s", cosine_s)
            if cosine_s > 100:  # (t + s)/(1 + s) rounds to 1 for huge s: a and s lose every digit
                raise ValueError(f"cosine_s must lie in (0, 100], got {cosine_s}")
            self.cosine_s = float(cosine_s)
            self._cos_log_c0 = math.log(math.cos(math.pi / 2 * cosine_s / (1 + cosine_s)))
            default_T = 0.9946
        elif schedule == "sigmoid":
            sigmoid_start = _finite_real("sigmoid_start", sigmoid_start)
            sigmoid_end = _finite_real("sigmoid_end", sigmoid_end)
            sigmoid_tau = _positive("sigmoid_tau", sigmoid_tau)
            alpha_bar_min = _real("alpha_bar_min", alpha_bar_min)
            if not sigmoid_start < sigmoid_end:
                raise ValueError(f"sigmoid_start must be < sigmoid_end, got {sigmoid_start} >= {sigmoid_end}")
            check_positive("sigmoid_tau", sigmoid_tau)
            if not 1e-12 <= alpha_bar_min < 1:  # a smaller floor is lost when 1 - gamma rounds above 1 at t = T
                raise ValueError(f"alpha_bar_min must lie in [1e-12, 1), got {alpha_bar_min}")
            self.sig_start, self.sig_end, self.sig_tau = float(sigmoid_start), float(sigmoid_end), float(sigmoid_tau)
            u0, u1 = sigmoid_start / sigmoid_tau, sigmoid_end / sigmoid_tau
            if not (u0 >= -500.0 and u1 <= 500.0):
                raise ValueError(
                    "sigmoid_start / sigmoid_tau and sigmoid_end / sigmoid_tau must lie in [-500, 500], got "
                    f"{u0} and {u1}"
                )
            self.sig_vs, self.sig_ve = _sigmoid(u0), _sigmoid(u1)
            if not self.sig_ve - self.sig_vs > 1e-12:
                raise ValueError(
                    f"sigmoid_start={sigmoid_start} and sigmoid_end={sigmoid_end} (tau={sigmoid_tau}) give a flat "
                    "schedule: the sigmoid saturates at both ends; move them towards 0 or raise sigmoid_tau"
                )
            self.delta = float(alpha_bar_min)
            default_T = 1.0
        else:
            default_T = 1.0
        self.T = float(default_T if T is None else T)
        if not 0 < self.T <= (0.9946 if schedule == "cosine" and T is None else 1.0) + 1e-12:
            raise ValueError(f"T must lie in (0, 1] (cosine: < 1), got {self.T}")
        if schedule == "cosine" and self.T >= 1.0:
            raise ValueError(f"T must be < 1 for the cosine schedule (beta(1) is infinite), got {self.T}")
        check_positive("eps", eps)
        _check_eps_T(eps, self.T)
        self.eps = float(eps)

    # linear -------------------------------------------------------------------------------------------------
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            b0, b1 = self.beta_min, self.beta_max
            return -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
        if self.schedule == "cosine":
            s = self.cosine_s
            return torch.log(torch.cos(math.pi / 2 * (t + s) / (1 + s))) - self._cos_log_c0
        omg, gam = self._sig_gammas(t)
        # abar = 1 - (1 - delta)(1 - gamma) = delta + (1 - delta) gamma: from whichever side is accurate
        d = self.delta
        return 0.5 * torch.where(omg < 0.5, torch.log1p(-(1 - d) * omg), torch.log(d + (1 - d) * gam))

    def _sig_gammas(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - gamma, gamma), each to full relative accuracy: 1 - gamma = (sig(u) - v_s)/(v_e - v_s) and
        gamma = (v_e - sig(u))/(v_e - v_s) with u = u0 + d0 = u1 - d1, d0 = t k, d1 = (1 - t) k, k = (end - start)/tau,
        sig(u) - sig(u0) = -expm1(-d0) sig(u) sig(-u0) and sig(u1) - sig(u) = -expm1(-d1) sig(-u) sig(u1): d0 and d1
        are formed directly (u0 + d0 rounds a tiny d0 away; 1 - gamma rounds a small gamma away near T)."""
        k = (self.sig_end - self.sig_start) / self.sig_tau
        u0, u1 = self.sig_start / self.sig_tau, self.sig_end / self.sig_tau
        d0, d1 = t * k, (1 - t) * k
        u = u0 + d0
        span = self.sig_ve - self.sig_vs
        omg = -torch.expm1(-d0) * torch.sigmoid(u) * (_sigmoid(-u0) / span)
        gam = -torch.expm1(-d1) * torch.sigmoid(-u) * (_sigmoid(u1) / span)
        return omg, gam

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "sigmoid":
            return 0.5 * (math.log1p(-self.delta) + torch.log(self._sig_gammas(t)[0]))
        if self.schedule == "cosine":
            # 1 - a^2 = (cos^2 th0 - cos^2 th)/cos^2 th0 = sin(th - th0) sin(th + th0)/cos^2 th0: no cancellation, and
            # exactly 0 at t = 0 (log a can round to +1e-17 there, which would make log(1 - a^2) NaN)
            c = math.pi / (2 * (1 + self.cosine_s))
            return (
                0.5 * (torch.log(torch.sin(c * t)) + torch.log(torch.sin(c * (t + 2 * self.cosine_s))))
                - self._cos_log_c0
            )
        return super()._log_sigma(t)

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))
        if self.schedule == "cosine":
            s = self.cosine_s
            return -math.pi / (2 * (1 + s)) * torch.tan(math.pi / 2 * (t + s) / (1 + s))
        u = (self.sig_start + t * (self.sig_end - self.sig_start)) / self.sig_tau
        sg = torch.sigmoid(u)
        dabar = -(1 - self.delta) * sg * (1 - sg) * (self.sig_end - self.sig_start) / self.sig_tau
        dabar = dabar / (self.sig_ve - self.sig_vs)
        return 0.5 * dabar / torch.exp(2 * self._log_alpha(t))

    def _t_from_log_alpha(self, la: torch.Tensor) -> torch.Tensor:
        # linear schedule: positive root of (b1-b0)/4 t^2 + b0/2 t + log a = 0, rationalized (no cancellation)
        b0, b1 = self.beta_min, self.beta_max
        t = -2 * la / (0.5 * b0 + torch.sqrt(0.25 * b0**2 - (b1 - b0) * la))
        return torch.where(torch.isneginf(la), math.inf, t)  # log a = -inf: beyond every finite time

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return self._t_from_log_alpha(self._log_alpha_from_log_snr(lam))
        if self.schedule == "cosine":
            s = self.cosine_s
            a = torch.exp(self._log_alpha_from_log_snr(lam))
            s2 = torch.sigmoid(-2 * lam)  # 1 - a^2
            c0 = math.exp(self._cos_log_c0)
            sin0_sq = 1 - c0**2
            # theta = arccos(c0 a) written as atan2(sin, cos) with sin^2 = sin0^2 + c0^2 (1 - a^2): no cancellation
            theta = torch.atan2(torch.sqrt(sin0_sq + c0**2 * s2), c0 * a)
            return theta * 2 * (1 + s) / math.pi - s
        # sigmoid: 1 - gamma = (1 - abar)/(1 - delta), sig(u) = v_s + (1 - gamma)(v_e - v_s)
        one_minus_gamma = (torch.sigmoid(-2 * lam) / (1 - self.delta)).clamp(0.0, 1.0)
        span = self.sig_ve - self.sig_vs
        su = self.sig_vs + one_minus_gamma * span
        # 1 - sig(u) = sig(-end/tau) + gamma (v_e - v_s): no cancellation when v_e rounds to 1
        u = torch.log(su) - torch.log(_sigmoid(-self.sig_end / self.sig_tau) + (1 - one_minus_gamma) * span)
        return (u * self.sig_tau - self.sig_start) / (self.sig_end - self.sig_start)

    def __repr__(self) -> str:
        if self.schedule == "linear":
            return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, schedule='linear')"
        return f"VPSDE(schedule={self.schedule!r}, T={self.T})"


class SubVPSDE(GaussianSDE):
    r"""Sub-VP SDE (Song et al. 2021, eq. 29): :math:`dx = -\tfrac12\beta x\,dt + \sqrt{\beta(1-e^{-2\int\beta})}\,dW`.

    Same a(t) as the linear VP; :math:`s(t) = 1 - a(t)^2` (the *standard deviation*, so the variance is bounded by the
    VP one); :math:`g^2 = \beta(t)(1 - a^4)`. Log-SNR inverse in closed form:
    :math:`\log a = -\operatorname{asinh}(e^{-\lambda}/2)` from :math:`a/(1-a^2) = e^\lambda`.
    """

    default_grid = "quadratic"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, *, eps: float = 1e-3) -> None:
        self._vp = VPSDE(beta_min, beta_max, "linear", eps=eps)
        self.beta_min, self.beta_max = self._vp.beta_min, self._vp.beta_max
        self.T, self.eps = 1.0, self._vp.eps

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._vp._log_alpha(t)

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return log1mexp(2 * self._log_alpha(t))

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return self._vp._f(t)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        return -2 * self._f(t) * -torch.expm1(4 * self._log_alpha(t))

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        # asinh(e^y / 2) = y + log((1 + sqrt(1 + 4 e^{-2y})) / 2) for y = -lam > 0: no overflow of e^y
        y = -lam
        big = y + torch.log1p(torch.sqrt(1 + 4 * torch.exp(-2 * y.clamp(min=0)))) - math.log(2.0)
        small = torch.asinh(0.5 * torch.exp(y.clamp(max=0)))
        return self._vp._t_from_log_alpha(-torch.where(y > 0, big, small))

    def __repr__(self) -> str:
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VESDE(GaussianSDE):
    r"""Variance-exploding SDE (Song et al. 2021; NCSN, Song & Ermon 2019).

    :math:`a = 1`, :math:`s(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t`, :math:`f = 0`,
    :math:`g^2 = \mathrm{d}s^2/\mathrm{d}t = 2 s^2 \log(\sigma_{max}/\sigma_{min})`; default ``eps = 1e-5`` as in the
    score_sde reference code. Prior N(0, sigma_max^2 I).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, *, eps: float = 1e-5) -> None:
        sigma_min, sigma_max = _positive("sigma_min", sigma_min), _positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min} >= sigma_max={sigma_max}")
        if sigma_max > _MAX_SCALE:  # g^2 = 2 log(ratio) s^2 and the prior's s^2 must stay finite
            raise ValueError(f"sigma_max must be <= {_MAX_SCALE:g}, got {sigma_max}")
        eps = _positive("eps", eps)
        _check_eps_T(eps, 1.0)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(sigma_max) - math.log(sigma_min)  # the ratio itself can overflow
        self.T, self.eps = 1.0, float(eps)

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return math.log(self.sigma_min) + t * self._log_ratio

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * self._log_ratio * torch.exp(2 * self._log_sigma(t))

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return (-lam - math.log(self.sigma_min)) / self._log_ratio

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


def _check_n(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


class DiscreteVPSDE(_VPBase):
    r"""A DDPM schedule of N steps as a continuous VP path, in the DPM-Solver convention (Lu et al. 2022, App. D).

    Step n = 0..N-1 sits at :math:`t_n = (n+1)/N` with :math:`\log a(t_n) = \tfrac12\sum_{i\le n}\log(1-\beta_i)`, and
    t = 0 is the clean data (log a = 0). Between grid points log a is linear in t, so f = d log a/dt is piecewise
    constant and :math:`g^2 = -2f`; the VP relation :math:`s^2 = 1 - a^2` holds everywhere and the moment equations hold
    exactly inside every segment. ``eps = 1/N`` (the first DDPM step), ``T = 1``. A net trained on integer steps is
    called with ``t*N - 1`` through ``Denoiser(..., time_input="index")``.
    """

    def __init__(self, betas: torch.Tensor | list[float]) -> None:
        if isinstance(betas, (str, bytes)) or betas is None:
            raise TypeError(f"betas must be a 1-D sequence or tensor of numbers in (0, 1), got {betas!r}")
        if isinstance(betas, torch.Tensor) and (betas.is_complex() or betas.dtype == torch.bool):
            raise TypeError(f"betas must be a real tensor, got dtype {betas.dtype}")
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"betas must be a 1-D sequence or tensor of numbers in (0, 1) ({err})") from err
        if betas.ndim > 1:
            raise ValueError(f"betas must be 1-D, got shape {tuple(betas.shape)}")
        betas = betas.flatten()
        if betas.numel() < 1:
            raise ValueError("betas must hold at least one value")
        lo = _MIN_EPS  # smaller betas vanish from the cumulative log(1 - beta) and leave s(t) = 0
        if not (bool(((betas[:-1] >= lo) & (betas[:-1] < 1)).all()) and lo <= float(betas[-1]) <= 1):
            raise ValueError(
                f"betas must lie in [{lo:g}, 1) (the last one in [{lo:g}, 1]: 1 is a zero-terminal-SNR schedule), "
                f"got values in [{float(betas.min())}, {float(betas.max())}]"
            )
        #: the last beta is 1: a(T) = 0, log-SNR(T) = -inf (Lin et al. 2024, "Common Diffusion Noise Schedules and
        #: Sample Steps are Flawed"); on the last segment a = 0, f = -inf, g^2 = inf, never NaN
        self.zero_terminal_snr = float(betas[-1]) == 1.0
        self.betas = betas
        self.N = int(betas.numel())
        la = 0.5 * torch.cumsum(torch.log1p(-betas), 0)
        self._la = torch.cat([torch.zeros(1, dtype=torch.float64), la])  # at t = 0, 1/N, ..., 1
        flat = torch.nonzero(~(self._la[1:] < self._la[:-1]))
        if flat.numel():  # a beta lost to rounding against the cumulative sum: log a flat, the inverse 0/0
            n = int(flat[0])
            raise ValueError(
                f"betas[{n}] = {float(betas[n])} is too small against the steps before it: log a(t) does not decrease "
                "over that step in float64 (the log-SNR must be strictly decreasing)"
            )
        self._la_cache: dict[torch.device, torch.Tensor] = {}
        self.T, self.eps = 1.0, 1.0 / self.N

    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVPSDE:
        """DDPM's linear betas (Ho et al. 2020): beta_i = linspace(beta_start, beta_end, n)."""
        _check_n(n)
        for name, b in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not 0 < _real(name, b) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {b}")
        try:
            return cls(torch.linspace(float(beta_start), float(beta_end), n, dtype=torch.float64))
        except ValueError as err:
            raise ValueError(f"beta_start={beta_start}, beta_end={beta_end} give unusable betas: {err}") from err

    @classmethod
    def cosine(cls, n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteVPSDE:
        """Improved-DDPM cosine betas (Nichol & Dhariwal 2021, eq. 17), beta clipped at ``max_beta`` = 0.999."""
        _check_n(n)
        s = _positive("s", s)
        if not _MIN_EPS <= _real("max_beta", max_beta) <= 1:
            raise ValueError(f"max_beta must lie in [{_MIN_EPS:g}, 1], got {max_beta}")
        i = torch.arange(n + 1, dtype=torch.float64)
        abar = torch.cos((i / n + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        try:
            return cls(betas)
        except ValueError as err:
            raise ValueError(f"s={s}, max_beta={max_beta} give unusable betas: {err}") from err

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """\bar alpha_n = a(t_n)^2 for n = 0..N-1 (float64)."""
        return torch.exp(2 * self._la[1:])

    def _table(self, device: torch.device) -> torch.Tensor:
        tab = self._la_cache.get(device)
        if tab is None:
            tab = self._la.to(device)
            self._la_cache[device] = tab
        return tab

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tab = self._table(t.device).to(t.dtype)
        pos = t * self.N
        idx = torch.clamp(torch.floor(pos), 0, self.N - 1).long()
        lo, hi = tab[idx], tab[idx + 1]
        return pos - idx.to(t.dtype), lo, hi

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        w, lo, hi = self._segment(t)
        if self.zero_terminal_snr:  # hi = -inf on the last segment: 0 * inf at its left end
            return torch.where(w > 0, lo + w * (hi - lo), lo)
        return lo + w * (hi - lo)

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        _, lo, hi = self._segment(t)
        return (hi - lo) * self.N

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        target = self._log_alpha_from_log_snr(lam)
        tab = self._table(lam.device).to(lam.dtype)
        # tab decreases; -tab increases: find the segment [idx, idx+1] holding the target
        idx = torch.searchsorted(-tab, (-target).contiguous(), right=True) - 1
        idx = idx.clamp(0, self.N - 1)
        lo, hi = tab[idx], tab[idx + 1]
        w = (target - lo) / (hi - lo)
        if self.zero_terminal_snr:  # last segment: only lambda = -inf is reached (at its interior, taken as T)
            w = torch.where(hi > -math.inf, w, (target == -math.inf).to(w.dtype))
        return (idx.to(lam.dtype) + w) / self.N

    def __repr__(self) -> str:
        return f"DiscreteVPSDE(N={self.N})"


class GaussianPath(GaussianSDE):
    r"""A generic Gaussian path from user functions :math:`\log a(t)` and :math:`\log s(t)` (tensor -> tensor).

    Derivatives come from forward-mode autodiff (``torch.func.jvp``); the log-SNR inverse is the safeguarded
    bisection. The path must have a strictly decreasing log-SNR on [0, T] and a non-negative g^2.
    Example (a "rectified-flow" path): ``GaussianPath(lambda t: torch.log1p(-t), lambda t: torch.log(t), eps=1e-3,
    T=0.999)``.
    """

    def __init__(
        self,
        log_alpha: Callable[[torch.Tensor], torch.Tensor],
        log_sigma: Callable[[torch.Tensor], torch.Tensor],
        *,
        T: float = 1.0,
        eps: float = 1e-3,
    ) -> None:
        T, eps = _positive("T", T), _positive("eps", eps)
        _check_eps_T(eps, T)
        for name, fn in (("log_alpha", log_alpha), ("log_sigma", log_sigma)):
            if not callable(fn):
                raise TypeError(f"{name} must be a callable tensor -> tensor, got {type(fn).__name__}")
        self._la_fn, self._ls_fn = log_alpha, log_sigma
        self.T, self.eps = float(T), float(eps)
        self._check_path()

    def _check_path(self, n: int = 33) -> None:
        """Probe the user's functions on [eps, T] (float64): tensors of t's shape, finite, a strictly decreasing
        log-SNR and g^2 >= 0; otherwise ValueError naming log_alpha / log_sigma."""
        t = torch.linspace(self.eps, self.T, n, dtype=torch.float64)
        vals = {}
        for name, fn in (("log_alpha", self._la_fn), ("log_sigma", self._ls_fn)):
            try:
                v = fn(t)
            except Exception as err:
                raise ValueError(f"{name} failed on a float64 tensor of times in [eps, T]: {err!r}") from err
            if not isinstance(v, torch.Tensor) or v.shape != t.shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name}(t) must return a tensor of t's shape {tuple(t.shape)}, got {got}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}(t) must be finite on [eps, T] = [{self.eps}, {self.T}]")
            vals[name] = v
        lam = vals["log_alpha"] - vals["log_sigma"]
        if not bool((lam[1:] < lam[:-1]).all()):
            raise ValueError(
                "log_alpha(t) - log_sigma(t) (the log-SNR) must be strictly decreasing on [eps, T] = "
                f"[{self.eps}, {self.T}]"
            )
        g2 = self._g2(t[:-1])
        if not bool(torch.isfinite(g2).all()) or bool((g2 < 0).any()):
            raise ValueError("log_alpha and log_sigma must give a finite g(t)^2 >= 0 on [eps, T)")

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._la_fn(t)

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._ls_fn(t)

    @staticmethod
    def _deriv(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(fn, (t,), (torch.ones_like(t),))[1]

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return self._deriv(self._la_fn, t)

    def _dsigma2(self, t: torch.Tensor) -> torch.Tensor:
        # d s^2/dt = 2 s^2 d(log s)/dt is 0 * inf at s(0) = 0: take the limit from the right (t >= 1e-12 T)
        t = t.clamp(min=1e-12 * self.T)
        return 2 * torch.exp(2 * self._ls_fn(t)) * self._deriv(self._ls_fn, t)


class FlowMatchingPath(GaussianSDE):
    r"""The flow-matching / rectified-flow path :math:`a = 1 - \sigma`, :math:`s = \sigma` (Lipman et al. 2023,
    "Flow Matching for Generative Modeling"; Liu et al. 2023, "Flow Straight and Fast"; the lecture notes' "Flow
    Matching" section), optionally with Stable Diffusion 3's time shift (Esser et al. 2024, eq. 23):

    .. math:: \sigma(t) = \frac{k\,t}{1 + (k - 1)\,t}, \qquad k = \text{shift},

    so shift = 1 is the straight path :math:`x_t = (1-t) x_0 + t\varepsilon` and a uniform grid in t is diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=k)`` schedule. It reaches ``T = 1`` exactly: :math:`a(1) = 0`,
    :math:`\lambda(1) = -\infty`, :math:`f(1) = -\infty`, :math:`g(1)^2 = \infty` (never NaN); the velocity
    :math:`u = a'x_0 + s'\varepsilon` (``Denoiser(prediction="flow")``) stays finite there. Closed forms:
    :math:`f = -\tfrac{1}{1-t} - \tfrac{k-1}{1+(k-1)t}`, :math:`s' = -a' = \sigma'(t) = k/(1+(k-1)t)^2`,
    :math:`g^2 = 2 s s' - 2 f s^2`, log-SNR inverse :math:`\sigma = \mathrm{sigmoid}(-\lambda)`,
    :math:`t = \sigma / (k - (k-1)\sigma)`.
    """

    default_grid = "quadratic"

    def __init__(self, shift: float = 1.0, *, eps: float = 1e-3) -> None:
        shift, eps = _positive("shift", shift), _positive("eps", eps)
        _check_eps_T(eps, 1.0)
        self.shift = float(shift)
        self.T, self.eps = 1.0, float(eps)

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        r"""The noise level :math:`\sigma(t) = k t / (1 + (k-1) t)` (= s(t))."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def unshifted(self, sigma: torch.Tensor) -> torch.Tensor:
        r"""The inverse of :meth:`shifted`: :math:`t = \sigma / (k - (k - 1)\sigma)`."""
        return sigma / (self.shift - (self.shift - 1) * sigma)

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-t) - torch.log1p((self.shift - 1) * t)

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return math.log(self.shift) + torch.log(t) - torch.log1p((self.shift - 1) * t)

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return -1 / (1 - t) - (self.shift - 1) / (1 + (self.shift - 1) * t)

    def _dshift(self, t: torch.Tensor) -> torch.Tensor:
        return self.shift / (1 + (self.shift - 1) * t) ** 2

    def _d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -self._dshift(t)

    def _d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._dshift(t)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        s = self.shifted(t)
        return 2 * s * self._dshift(t) - 2 * self._f(t) * s * s

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return self.unshifted(torch.sigmoid(-lam))

    def __repr__(self) -> str:
        return f"FlowMatchingPath(shift={self.shift})"


class EDMPath(GaussianSDE):
    r"""EDM's path, Karras et al. 2022 (Table 1, "Ours"): :math:`a = 1`, :math:`s(t) = \sigma(t) = t`, so sdeflow's
    time *is* the noise level: ``T = sigma_max``, ``eps = sigma_min``, and ``t_end = 0`` is EDM's final sigma = 0.
    :math:`f = 0`, :math:`g^2 = 2t`, :math:`\lambda = -\log t`; the probability-flow ODE is EDM's eq. 4,
    :math:`dx/d\sigma = (x - D(x;\sigma))/\sigma`. Used by :func:`sdeflow.integrations.from_edm`.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        sigma_min, sigma_max = _positive("sigma_min", sigma_min), _positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min} >= sigma_max={sigma_max}")
        if sigma_max > _MAX_SCALE:  # the prior's variance sigma_max^2 must stay finite
            raise ValueError(f"sigma_max must be <= {_MAX_SCALE:g}, got {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.T, self.eps = self.sigma_max, self.sigma_min

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(t)

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * t

    def _d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-lam)

    def __repr__(self) -> str:
        return f"EDMPath(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"
