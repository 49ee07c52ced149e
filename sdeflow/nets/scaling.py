r"""Input scaling: feed the net unit-variance inputs on every Gaussian path (the c_in of EDM, Karras et al. 2022).

With :math:`x_t = a x_0 + s\varepsilon` and data of per-coordinate scale :math:`\sigma_d`,
:math:`\mathrm{Var}(x_t) \approx a^2\sigma_d^2 + s^2`, which is 1 on VP paths but reaches :math:`\sigma_{max}^2` on VE
paths. :class:`InputScaling` calls the inner net on :math:`c_{in}(t)\,x` with
:math:`c_{in} = 1/\sqrt{a(t)^2\sigma_d^2 + s(t)^2}`; the output (whatever the prediction type) is not rescaled, so
the wrapped module is still a plain ``net(x, t, **kwargs)`` for :class:`~sdeflow.denoiser.Denoiser`.

Input scaling alone leaves the output unscaled. For an eps-predicting net on a VP path the data estimate is
:math:`\hat x_0 = (x - s\hat\varepsilon)/a`, so an eps error :math:`\delta` becomes an x0 error :math:`\delta\,s/a =
\delta\sigma` (up to 152 on the default VP path), and the eps loss weights that region by :math:`1/\sigma^2` in x0
space. The probability-flow ODE carries that error to the samples (Karras et al. 2022, Sec. 5). The full EDM
preconditioning, with c_skip and c_out as well, is :class:`sdeflow.preconditioning.EDMPreconditioning`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._utils import append_dims, check_positive
from ..sdes import GaussianSDE

__all__ = ["InputScaling"]


class InputScaling(nn.Module):
    """``net(c_in(t) x, t)`` with c_in = 1/sqrt(a^2 sigma_data^2 + s^2) (EDM's c_in, Karras et al. 2022).

    ``t`` is the continuous time the Denoiser passes with ``time_input="t"``.
    """

    def __init__(self, net: nn.Module, sde: GaussianSDE, sigma_data: float = 1.0) -> None:
        super().__init__()
        check_positive("sigma_data", sigma_data)
        self.net, self.sde, self.sigma_data = net, sde, float(sigma_data)
        self.num_classes = getattr(net, "num_classes", None)

    def c_in(self, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(torch.promote_types(t.dtype, torch.float32))
        a, s = self.sde.alpha(tt), self.sde.sigma(tt)
        return torch.rsqrt(a * a * self.sigma_data**2 + s * s)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        c = append_dims(self.c_in(t).to(x.dtype), x.ndim)
        return self.net(c * x, t, **kwargs)
