r"""Time and class embeddings shared by the score networks.

* :class:`SinusoidalEmbedding` -- the Transformer position code of Vaswani et al. (2017) applied to time, as in DDPM
  (Ho et al. 2020): :math:`[\sin(\omega_k c t), \cos(\omega_k c t)]_{k<D/2}` with geometric frequencies
  :math:`\omega_k = P^{-k/(D/2)}`, :math:`P` = ``max_period`` and :math:`c` = ``scale`` (1000 maps continuous
  :math:`t\in[0,1]` onto DDPM's integer range).
* :class:`FourierEmbedding` -- Gaussian random Fourier features (Tancik et al. 2020), the time code of the NCSN++
  models (Song et al. 2021): :math:`[\sin(2\pi W t), \cos(2\pi W t)]`, :math:`W\sim N(0, \text{scale}^2)` fixed.
* :class:`TimeMLP` -- either code followed by Linear-SiLU-Linear, the embedding added inside every residual block.
* :class:`ClassEmbedding` -- a learned table with ``num_classes + 1`` rows; row ``num_classes`` is the *null* class,
  the unconditional branch of classifier-free guidance (Ho & Salimans 2021).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._utils import check_choice, check_positive

__all__ = ["SinusoidalEmbedding", "FourierEmbedding", "TimeMLP", "ClassEmbedding", "EMBEDDINGS", "prepare_labels"]

EMBEDDINGS = ("sinusoidal", "fourier")


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal time code (Vaswani et al. 2017; DDPM, Ho et al. 2020). Input (B,), output (B, dim)."""

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even integer >= 2, got {dim}")
        check_positive("scale", scale)
        check_positive("max_period", max_period)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", (scale * freqs).to(torch.float32), persistent=False)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs: torch.Tensor = self.freqs  # type: ignore[assignment]  # a registered buffer (nn.Module types it as Tensor | Module)
        arg = t.reshape(-1, 1) * freqs.to(t.dtype)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class FourierEmbedding(nn.Module):
    """Gaussian random Fourier features (Tancik et al. 2020; NCSN++, Song et al. 2021). Input (B,), output (B, dim).

    The frequencies W ~ N(0, scale^2) are drawn once from ``generator`` (or a fixed seed) and stored as a buffer, so a
    checkpoint restores them exactly.
    """

    def __init__(self, dim: int, scale: float = 16.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even integer >= 2, got {dim}")
        check_positive("scale", scale)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        w = torch.randn(dim // 2, generator=generator, dtype=torch.float64) * scale
        self.register_buffer("W", (2 * math.pi * w).to(torch.float32))
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        W: torch.Tensor = self.W  # type: ignore[assignment]  # a registered buffer (nn.Module types it as Tensor | Module)
        arg = t.reshape(-1, 1) * W.to(t.dtype)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class TimeMLP(nn.Module):
    """Time code (``"sinusoidal"`` or ``"fourier"``) -> Linear -> SiLU -> Linear: (B,) -> (B, out_dim)."""

    def __init__(self, code_dim: int, out_dim: int, embedding: str = "sinusoidal", fourier_scale: float = 16.0) -> None:
        super().__init__()
        check_choice("embedding", embedding, EMBEDDINGS)
        if embedding == "sinusoidal":
            self.code: nn.Module = SinusoidalEmbedding(code_dim)
        else:
            self.code = FourierEmbedding(code_dim, scale=fourier_scale)
        self.mlp = nn.Sequential(nn.Linear(code_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        first: nn.Linear = self.mlp[0]  # type: ignore[assignment]  # Sequential indexing is typed as Module
        dtype = first.weight.dtype
        return self.mlp(self.code(t.to(dtype)))


class ClassEmbedding(nn.Module):
    """Learned class table with a null row: labels in {0..num_classes-1}, ``num_classes`` = unconditional."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)


def prepare_labels(
    y: torch.Tensor | int | None, batch: int, num_classes: int | None, device: torch.device
) -> torch.Tensor | None:
    """Validate labels for a net: None -> the null class (or None for an unconditional net); int -> broadcast.

    Raises ValueError when labels are given to an unconditional net or have the wrong shape. Range checks run on CPU
    tensors only (no host sync on accelerators).
    """
    if num_classes is None:
        if y is not None:
            raise ValueError("y was given but the net is unconditional (num_classes=None)")
        return None
    if y is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    y = torch.as_tensor(y, device=device)
    if y.is_floating_point():
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    y = y.long()
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"y must be an int or have shape (batch,) = ({batch},), got {tuple(y.shape)}")
    if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(
            f"y must lie in [0, {num_classes}] ({num_classes} = null class), got [{int(y.min())}, {int(y.max())}]"
        )
    return y


def embed_conditions(
    time: nn.Module,
    label: nn.Module | None,
    t: torch.Tensor | float,
    y: torch.Tensor | int | None,
    batch: int,
    num_classes: int | None,
    device: torch.device,
) -> torch.Tensor:
    """The conditioning vector every block of a score net receives: time(t) (+ label(y) for class-conditional nets).

    ``t`` is a scalar or (batch,); labels are validated by :func:`prepare_labels`. Returns (batch, emb_dim), before the
    net's own activation.
    """
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    emb = time(t)
    labels = prepare_labels(y, batch, num_classes, device)
    if label is not None:
        emb = emb + label(labels)
    return emb
