r"""A noise-aware classifier :math:`p_\phi(y\mid x_t, t)` for classifier guidance, its loss and its training loop.

* :class:`NoiseAwareClassifier`: the MLP score net's residual trunk with a linear head to K logits.
* :class:`ClassifierLoss`: cross-entropy on :math:`x_t = a(t)x_0 + s(t)\varepsilon` with the time sampling of the DSM
  objective (Dhariwal & Nichol 2021, Sec. 4), so that :class:`~sdeflow.training.Trainer` trains it.
* :func:`train_classifier`: the Trainer with that loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..sdes import GaussianSDE
from ..training.losses import DenoisingScoreMatching, DSMDraw
from .wrappers import as_labels

__all__ = ["NoiseAwareClassifier", "ClassifierLoss", "train_classifier"]


class NoiseAwareClassifier(nn.Module):
    r"""A time-conditioned classifier :math:`p_\phi(y\mid x_t, t)`: ``classifier(x, t) -> logits (B, num_classes)``.

    The residual trunk of :class:`~sdeflow.nets.MLPScoreNet` (its pre-norm blocks, the time embedding added in every
    block) with a linear head to ``num_classes`` logits, the MLP analogue of Dhariwal & Nichol's (2021)
    half-U-Net classifier. For images, flatten (``dim = C*H*W``); fine for 8x8 digits, a conv trunk for large images.

    Args:
        dim: values per sample.
        num_classes: number of classes K.
        hidden, depth, time_dim, embedding, dropout: as in :class:`~sdeflow.nets.MLPScoreNet`.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 128,
        embedding: str = "sinusoidal",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from ..nets.embeddings import TimeMLP
        from ..nets.mlp import ResidualBlock

        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth), ("time_dim", time_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        emb_dim = 2 * time_dim
        self.time = TimeMLP(time_dim, emb_dim, embedding)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.dim, self.num_classes = dim, num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"x must have shape (batch, *data_shape) with {self.dim} values per sample, got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        emb = torch.nn.functional.silu(self.time(t.expand(batch) if t.ndim == 0 else t))
        h = self.inp(x.reshape(batch, self.dim))
        for block in self.blocks:
            h = block(h, emb)
        return self.head(torch.nn.functional.silu(self.out_norm(h)))


class ClassifierLoss(DenoisingScoreMatching):
    r"""Cross-entropy of a noise-aware classifier on noisy data (Dhariwal & Nichol 2021, Sec. 4):

    .. math:: \mathcal L = \mathbb E_{t, x_0, y, \varepsilon}\big[-\log p_\phi(y\mid a(t)x_0 + s(t)\varepsilon,\ t)\big]

    A :class:`~sdeflow.training.losses.DenoisingScoreMatching` whose regression is replaced by the cross-entropy: t
    and the noise are drawn by the same :meth:`draw` (``"uniform"`` in [t_min, T], or ``"importance"``, uniform in
    log-SNR and reweighted by its ratio so that both estimate the same uniform-in-t objective), labels are never
    dropped (p_uncond = 0), so the library's :class:`~sdeflow.training.Trainer` trains a classifier exactly as it
    trains a denoiser.

    Args:
        sde: the Gaussian path.
        time_sampling, stratified, t_min, t_max: as for the DSM objective.
    """

    def __init__(
        self,
        sde: GaussianSDE,
        time_sampling: str = "uniform",
        stratified: bool = False,
        t_min: float | None = None,
        t_max: float | None = None,
    ) -> None:
        super().__init__(sde, time_sampling=time_sampling, stratified=stratified, t_min=t_min, t_max=t_max)

    def per_sample(
        self,
        net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
        draw: DSMDraw | None = None,
        **net_kwargs: Any,
    ) -> torch.Tensor:
        """Per-sample weighted cross-entropies (B,); ``draw`` fixes (t, noise, x_t) instead of drawing them."""
        if y is None:
            raise ValueError("y (the class labels, shape (batch,)) is required to train a classifier")
        y = as_labels(y, x0)
        if draw is None:
            draw = self.draw(x0, generator)
        logits = net(draw.x_t, draw.t.to(x0.dtype), **net_kwargs)
        ce = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
        return draw.ratio.to(ce.dtype) * ce

    def config(self) -> dict[str, Any]:
        """The constructor arguments as plain primitives (for checkpoints)."""
        c = super().config()
        return {k: c[k] for k in ("time_sampling", "stratified", "t_min", "t_max")}

    def __repr__(self) -> str:
        return f"ClassifierLoss({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


def train_classifier(
    classifier: nn.Module,
    sde: GaussianSDE,
    data: Any,
    steps: int,
    *,
    time_sampling: str = "uniform",
    t_min: float | None = None,
    **trainer_options: Any,
):
    """Train a noise-aware classifier with the library's :class:`~sdeflow.training.Trainer` and a
    :class:`ClassifierLoss` (AdamW, warm-up, clipping, EMA, checkpoints: all the trainer's options).

    Args:
        classifier: ``classifier(x, t) -> logits`` with a ``num_classes`` attribute (e.g. :class:`NoiseAwareClassifier`).
        sde: the Gaussian path of the diffusion model it will guide.
        data: a labelled :class:`~sdeflow.training.data.DataSource` (``TensorData(x, y)``, ``make_data("digits")``).
        steps: optimisation steps.
        time_sampling, t_min: of the loss. ``**trainer_options``: the Trainer's keywords (``progress`` defaults to False).

    Returns:
        the :class:`~sdeflow.training.Trainer` after ``fit(steps)``; ``trainer.ema`` is the classifier to guide with.
    """
    from ..training.trainer import Trainer

    trainer_options.setdefault("progress", False)
    trainer = Trainer(
        classifier,
        ClassifierLoss(sde, time_sampling=time_sampling, t_min=t_min),
        data,
        conditional=True,
        **trainer_options,
    )
    trainer.fit(steps)
    return trainer
