r"""An image U-Net score network (DDPM, Ho et al. 2020; Dhariwal & Nichol 2021, "ADM").

Structure, for ``channel_mult = (m_0, ..., m_{L-1})``: a 3x3 input conv, then at each level ``num_res_blocks`` residual
blocks with ``channels * m_i`` features (GroupNorm -> SiLU -> conv, plus the time/class embedding through a linear map
added after the first conv, then GroupNorm -> SiLU -> dropout -> zero-initialised conv, with a 1x1 skip when the width
changes), multi-head self-attention after each block of the levels listed in ``attention_levels``, and a strided 3x3
conv between levels. The middle is ResBlock-Attention-ResBlock. The decoder mirrors the encoder with one extra block
per level, each concatenating the matching encoder activation (skip connection), and nearest-neighbour upsampling
followed by a 3x3 conv. The output conv is zero-initialised.

Resolutions. Level i works at resolution H / 2^i. Inputs whose height or width is not a multiple of 2^(L-1) are
zero-padded on the bottom/right up to the next multiple and the output is cropped back, so any size works (28x28 with
three levels runs at 28, 14, 7; with four levels it is padded to 32). ``attention_levels`` names levels, not pixel
sizes, so one configuration serves every image size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import append_dims
from .embeddings import ClassEmbedding, TimeMLP, embed_conditions

__all__ = ["UNet", "group_count"]


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest number of GroupNorm groups <= max_groups that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(c), c)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with GroupNorm and an additive embedding (Ho et al. 2020)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + append_dims(self.emb(emb), h.ndim)
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (Vaswani et al. 2017), residual, zero-init output."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention width {channels}")
        self.heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (b, heads, hw, c/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Sequence(nn.Module):
    """A ResBlock optionally followed by attention, both fed the embedding."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, emb)
        return x


class _Down(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """Image U-Net ``net(x, t, y=None) -> tensor like x`` for x of shape (B, C, H, W), any H and W.

    Args:
        in_channels: image channels C.
        channels: base width; level i has ``channels * channel_mult[i]`` features.
        channel_mult: width multipliers, one per resolution level.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_levels: levels (0 = full resolution) with self-attention after each block.
        num_heads: attention heads.
        dropout: dropout inside residual blocks.
        num_classes: None for an unconditional net; else labels 0..num_classes-1 and the null class ``num_classes``.
        embedding: ``"sinusoidal"`` or ``"fourier"`` time code.
        out_channels: output channels (defaults to ``in_channels``; the Denoiser needs output shaped like x).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        embedding: str = "sinusoidal",
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        channel_mult, attention_levels = tuple(int(m) for m in channel_mult), tuple(int(a) for a in attention_levels)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
        for name, value in (("in_channels", in_channels), ("channels", channels), ("num_heads", num_heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        levels = len(channel_mult)
        if any(a < 0 or a >= levels for a in attention_levels):
            raise ValueError(
                f"attention_levels must lie in 0..{levels - 1} (one per channel_mult entry), got {attention_levels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.out_channels = out_channels or in_channels
        self.factor = 2 ** (levels - 1)
        emb_dim = 4 * channels
        self.time = TimeMLP(channels, emb_dim, embedding)
        self.label = ClassEmbedding(num_classes, emb_dim) if num_classes is not None else None

        def block(cin: int, cout: int, level: int) -> _Sequence:
            layers: list[nn.Module] = [ResBlock(cin, cout, emb_dim, dropout)]
            if level in attention_levels:
                layers.append(SelfAttention(cout, num_heads))
            return _Sequence(*layers)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, channels * mult, i))
                ch = channels * mult
                skips.append(ch)
            if i < levels - 1:
                self.down.append(_Down(ch))
                skips.append(ch)
        self.mid = _Sequence(
            ResBlock(ch, ch, emb_dim, dropout), SelfAttention(ch, num_heads), ResBlock(ch, ch, emb_dim, dropout)
        )
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for j in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), channels * mult, i))
                ch = channels * mult
                if i > 0 and j == num_res_blocks:
                    self.up.append(_Up(ch))
        self.norm_out = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        batch, _, height, width = x.shape
        emb = embed_conditions(self.time, self.label, t, y, batch, self.num_classes, x.device)
        emb = F.silu(emb)
        ph = math.ceil(height / self.factor) * self.factor - height
        pw = math.ceil(width / self.factor) * self.factor - width
        h = F.pad(x, (0, pw, 0, ph)) if ph or pw else x
        h = self.conv_in(h)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for layer in self.up:
            if isinstance(layer, _Up):
                h = layer(h, emb)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[..., :height, :width]
