r"""EDM preconditioning (Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Sec. 5, Table 1 and eq. 7) for every Gaussian path.

EDM writes the noisy data as :math:`\hat x = x_0 + \sigma n` and wraps a raw network :math:`F_\theta` into the
denoiser (eq. 7)

.. math:: D_\theta(\hat x; \sigma) = c_{skip}(\sigma)\,\hat x + c_{out}(\sigma)\,
          F_\theta\big(c_{in}(\sigma)\,\hat x;\ c_{noise}(\sigma)\big),

with, for data of per-coordinate standard deviation :math:`\sigma_{data}` (Table 1, "Ours"),

.. math:: c_{skip} = \frac{\sigma_{data}^2}{\sigma^2 + \sigma_{data}^2},\quad
          c_{out} = \frac{\sigma\,\sigma_{data}}{\sqrt{\sigma^2 + \sigma_{data}^2}},\quad
          c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_{data}^2}},\quad
          c_{noise} = \tfrac14 \ln\sigma .

These make the net's input and its training target unit-variance at every noise level (eq. 8 and App. B.6): the
target of :math:`F` is :math:`(x_0 - c_{skip}\hat x)/c_{out}`, and with the EDM loss weight
:math:`\lambda(\sigma) = 1/c_{out}^2` (:class:`sdeflow.training.losses.EDMLoss`) every noise level contributes a
unit-weighted regression of :math:`F`.

**Any Gaussian path.** A path :math:`x_t = a(t)x_0 + s(t)\varepsilon` is the EDM variable scaled by :math:`a`:
:math:`x_t = a\,\hat x` with :math:`\sigma = s/a` (``GaussianSDE.edm_sigma``; Karras et al. 2022, eq. 4 with
:math:`s(t)` there being our :math:`a`). So :class:`EDMPreconditioning` takes the path state and time ``(x, t)``,
computes :math:`\sigma = s(t)/a(t)`, feeds :math:`D_\theta` the EDM variable :math:`x/a`, and returns
:math:`D_\theta(x/a;\sigma)`, the **data prediction** :math:`\hat x_0`. The same wrapper therefore serves VE paths
(a = 1), VP, sub-VP and discrete schedules, and plugs into ``Denoiser(precond, sde, prediction="x0")`` (or
:func:`edm_denoiser`), through which every solver uses it.

**Why c_out matters for ODE samplers.** An eps-predicting net on a VP path turns an eps error :math:`\delta` into the
data-estimate error :math:`\delta\sigma` (sigma up to 152 on the default VP path), and the plain eps loss weights
that region by :math:`1/\sigma^2` in x0 space; the probability-flow ODE, :math:`d\hat x/d\ln\sigma = \hat x - D`,
carries the resulting error into the samples, while SDE samplers' noise washes it out. Measured on ``make bench``'s
digits U-Net (3000 steps, same net and budget; FD_digits, data floor 4.8): with eps prediction the x0 error at
sigma = 100 is 6.9 per pixel (the data mean scores 0.29) and every ODE solver ends near FD 80 (the SDE at 2.1); with
this preconditioning and the EDM loss the x0 error there is 0.34 and the ODE reaches FD 3.1 (dpm_solver++ 3.5 at
NFE 10, UniPC 3.3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ._utils import append_dims, check_choice, check_positive
from .denoiser import Denoiser
from .sdes import GaussianSDE

__all__ = ["EDMPreconditioning", "EDMCoefficients", "edm_coefficients", "edm_denoiser", "NOISE_INPUTS"]

#: what the inner net receives as its time argument: EDM's c_noise = ln(sigma)/4, or the path's own time t
NOISE_INPUTS = ("edm", "t")

#: the smallest sigma used inside c_noise: at t = 0 on a VP path sigma = 0 and ln(sigma) = -inf, while c_out = 0
#: makes D = x exactly; the clamp keeps the net's input finite there (no NaN from 0 * inf)
_SIGMA_FLOOR = 1e-20


class EDMCoefficients(NamedTuple):
    """The four EDM scalings at noise level sigma (Karras et al. 2022, Table 1), each shaped like sigma."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> EDMCoefficients:
    r"""c_skip, c_out, c_in, c_noise of EDM (Karras et al. 2022, Table 1) at noise level(s) ``sigma`` >= 0.

    :math:`c_{skip} = \sigma_d^2/(\sigma^2+\sigma_d^2)`, :math:`c_{out} = \sigma\sigma_d/\sqrt{\sigma^2+\sigma_d^2}`,
    :math:`c_{in} = 1/\sqrt{\sigma^2+\sigma_d^2}`, :math:`c_{noise} = \ln(\sigma)/4` (sigma clamped at 1e-20 inside
    the logarithm so that sigma = 0 gives a finite c_noise; there c_out = 0).
    """
    check_positive("sigma_data", sigma_data)
    sigma = torch.as_tensor(sigma)
    sd2 = sigma_data**2
    total = sigma * sigma + sd2
    rs = torch.rsqrt(total)
    return EDMCoefficients(
        c_skip=sd2 / total,
        c_out=sigma * sigma_data * rs,
        c_in=rs,
        c_noise=0.25 * torch.log(sigma.clamp_min(_SIGMA_FLOOR)),
    )


class EDMPreconditioning(nn.Module):
    r"""A raw net :math:`F` wrapped into EDM's denoiser :math:`D(\hat x;\sigma)` (module docstring), called on a
    path's state: ``forward(x, t) = D(x / a(t); s(t)/a(t))``, the data prediction :math:`\hat x_0`.

    Args:
        net: the raw network ``F(x, c, **kwargs) -> tensor like x`` (an :class:`~sdeflow.nets.MLPScoreNet`, a
            :class:`~sdeflow.nets.UNet` or any module with that signature); labels and other keyword arguments pass
            through.
        sde: the Gaussian path the model lives on (VP, sub-VP, VE, discrete, generic).
        sigma_data: the data's per-coordinate standard deviation (EDM uses 0.5 for images in [-1, 1]).
        noise_input: the net's time argument: ``"edm"`` gives :math:`c_{noise} = \ln(\sigma)/4`, ``"t"`` the path's
            own time t (for nets whose time embedding was tuned to t in [0, T]).

    Use it as ``Denoiser(EDMPreconditioning(net, sde), sde, prediction="x0")`` (:func:`edm_denoiser`), and train it
    with :class:`sdeflow.training.losses.EDMLoss` (or any loss built for ``prediction="x0"``).
    """

    def __init__(self, net: nn.Module, sde: GaussianSDE, sigma_data: float = 0.5, noise_input: str = "edm") -> None:
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be callable net(x, c_noise), got {type(net).__name__}")
        if not isinstance(sde, GaussianSDE):
            raise TypeError(f"sde must be a GaussianSDE, got {type(sde).__name__}")
        check_positive("sigma_data", sigma_data)
        check_choice("noise_input", noise_input, NOISE_INPUTS)
        self.net, self.sde, self.sigma_data, self.noise_input = net, sde, float(sigma_data), noise_input
        self.num_classes = getattr(net, "num_classes", None)

    def coefficients(self, sigma: torch.Tensor) -> EDMCoefficients:
        """The EDM scalings at noise level(s) sigma (:func:`edm_coefficients` with this wrapper's sigma_data)."""
        return edm_coefficients(sigma, self.sigma_data)

    def denoise(
        self, x_hat: torch.Tensor, sigma: torch.Tensor, net_time: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        r""":math:`D(\hat x;\sigma)` on the EDM variable :math:`\hat x = x_0 + \sigma n` (eq. 7).

        ``sigma`` is a scalar or (batch,); ``net_time`` overrides the net's time argument (default c_noise).
        """
        sigma = torch.as_tensor(sigma, device=x_hat.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x_hat.shape[0])
        c = self.coefficients(sigma.to(torch.promote_types(sigma.dtype, torch.float32)))
        c_skip, c_out, c_in = (append_dims(v.to(x_hat.dtype), x_hat.ndim) for v in (c.c_skip, c.c_out, c.c_in))
        time = c.c_noise.to(x_hat.dtype) if net_time is None else net_time
        f = self.net(c_in * x_hat, time, **kwargs)
        if not isinstance(f, torch.Tensor) or f.shape != x_hat.shape:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"net output must be a tensor of the input's shape {tuple(x_hat.shape)}, got {shape}")
        return c_skip * x_hat + c_out * f.to(x_hat.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        r"""The data prediction :math:`\hat x_0 = D(x/a(t);\ s(t)/a(t))` for the path state x at time t (scalar or
        (batch,))."""
        t = torch.as_tensor(t, device=x.device)
        tt = t.to(torch.promote_types(t.dtype, torch.float32))
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        log_a = self.sde.log_alpha(tt)
        sigma = torch.exp(-self.sde.log_snr(tt))  # s/a, computed as exp(-lambda): no 0/0 at either end
        x_hat = x / append_dims(torch.exp(log_a).to(x.dtype), x.ndim)
        net_time = tt.to(x.dtype) if self.noise_input == "t" else None
        return self.denoise(x_hat, sigma, net_time=net_time, **kwargs)

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}, noise_input={self.noise_input!r}, sde={self.sde!r}"


def edm_denoiser(net: nn.Module, sde: GaussianSDE, sigma_data: float = 0.5, noise_input: str = "edm") -> Denoiser:
    """``Denoiser(EDMPreconditioning(net, sde, sigma_data, noise_input), sde, prediction="x0")``: a raw net F as an
    EDM-preconditioned model that every solver can sample."""
    return Denoiser(EDMPreconditioning(net, sde, sigma_data, noise_input), sde, prediction="x0")
