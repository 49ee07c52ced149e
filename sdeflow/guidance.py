r"""Conditioning and guidance as Denoiser wrappers; probability-flow ODE inversion; spherical interpolation.

Every wrapper here *is* a :class:`~sdeflow.Denoiser` (steppers call ``den.predict(x, t)`` and nothing else), so every
solver accepts it unchanged. A wrapper overrides only :meth:`~sdeflow.Denoiser.raw`, the one net call, and inherits
the conversion table; its ``nfe`` is the wrapped Denoiser's counter, so ``res.nfe`` keeps counting real net calls.

* :class:`ConditionalDenoiser` binds class labels: ``net(x, t, y=labels)``.
* :class:`ClassifierFreeGuidance` (Ho & Salimans 2021):
  :math:`\tilde\varepsilon = \varepsilon(x, \varnothing) + w\,(\varepsilon(x, y) - \varepsilon(x, \varnothing))`,
  both branches in ONE batched net call, optionally only on a t-interval (Kynkäänniemi et al. 2024).
* :class:`ClassifierGuidance` (Dhariwal & Nichol 2021):
  :math:`\tilde\varepsilon = \varepsilon - w\,s(t)\,\nabla_x\log p_\phi(y\mid x_t, t)`, i.e. the score
  :math:`\nabla\log p_t(x) + w\,\nabla_x\log p_\phi(y\mid x)`; at w = 1 with the exact classifier this is the exact
  class-conditional score :math:`\nabla\log p_t(x\mid y)` (Bayes).
* :class:`NoiseAwareClassifier` and :class:`ClassifierLoss`: a classifier :math:`p_\phi(y\mid x_t, t)` trained by
  cross-entropy on :math:`x_t = a(t)x_0 + s(t)\varepsilon`, with the time sampling of the DSM objective.
* :func:`encode` / :func:`decode`: integrate the probability-flow ODE from data to noise and back with any
  deterministic stepper (DDIM inversion, Song, Meng & Ermon 2021 Sec. 4.3 / Dhariwal & Nichol 2021 App. F, is the
  ``"ddim"`` case); :func:`slerp` and :func:`interpolate` between latents.
* :func:`gmm_class_logits` and :func:`gmm_conditional_net`: the exact classifier and the exact class-conditional net
  of a :class:`~sdeflow.GaussianMixture` whose components are the classes (the tests' oracles).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._utils import TimeLike, append_dims, as_time, batch_time, check_choice
from .analytic import GaussianMixture
from .denoiser import PREDICTIONS, Denoiser, convert
from .grids import time_grid
from .sdes import GaussianSDE
from .training.losses import DenoisingScoreMatching

__all__ = [
    "DenoiserWrapper",
    "ConditionalDenoiser",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "NoiseAwareClassifier",
    "ClassifierLoss",
    "train_classifier",
    "classifier_log_prob_grad",
    "encode",
    "decode",
    "slerp",
    "interpolate",
    "gmm_class_logits",
    "gmm_conditional_net",
]

Labels = torch.Tensor | int


# ---------------------------------------------------------------------------------------------------- label helpers
def _null_label(den: Denoiser, null_label: int | None) -> int:
    if null_label is not None:
        return int(null_label)
    k = getattr(den.net, "num_classes", None)
    if k is None:
        raise ValueError(
            "null_label is required: the net has no num_classes attribute (sdeflow nets use null class = num_classes)"
        )
    return int(k)


def _labels(y: Labels, x: torch.Tensor, name: str = "y") -> torch.Tensor:
    """Labels as a long tensor of shape (batch,) on x's device: an int broadcasts, a (batch,) tensor passes."""
    if isinstance(y, int) and not isinstance(y, bool):
        return torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)  # a fill, no host-to-device copy
    y = torch.as_tensor(y, device=x.device)
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    y = y.long()
    if y.ndim == 0:
        return y.expand(x.shape[0])
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"{name} must be an int or have shape (batch,) = ({x.shape[0]},), got {tuple(y.shape)}; per-sample labels "
            "need a solver that steps the whole batch (per-sample adaptive solvers step subsets: use an int label)"
        )
    return y


# ---------------------------------------------------------------------------------------------------- wrappers
class DenoiserWrapper(Denoiser):
    """Base of the wrappers: a :class:`~sdeflow.Denoiser` built on another one (``base``).

    It shares ``base``'s net, SDE and time input, and its ``nfe`` *is* ``base.nfe`` (reading, resetting), so the
    counter always counts real net calls, a batched call once. Subclasses override :meth:`raw` only; ``prediction``
    names the type that their :meth:`raw` returns (``base.prediction`` unless given).
    """

    def __init__(self, base: Denoiser, prediction: str | None = None) -> None:
        if not isinstance(base, Denoiser):
            raise TypeError(f"base must be a sdeflow.Denoiser, got {type(base).__name__}")
        prediction = base.prediction if prediction is None else prediction
        check_choice("prediction", prediction, PREDICTIONS)
        self.base, self.net, self.sde, self.time_input = base, base.net, base.sde, base.time_input
        self.prediction = prediction

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return self.base.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.base.nfe = value

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r})"


class ConditionalDenoiser(DenoiserWrapper):
    """A class-conditional Denoiser with its labels bound: every net call is ``net(x, t, y=labels)``.

    Args:
        base: a Denoiser whose net takes a label keyword (sdeflow's ``MLPScoreNet`` / ``UNet`` with ``num_classes``).
        y: an int (every sample) or a (batch,) long tensor of labels; the null class gives the unconditional model.
        label_key: the net's keyword for labels (``"y"`` for sdeflow nets, ``"class_labels"`` for diffusers).

    A ``y=...`` keyword passed to a call overrides the bound labels. One net call per prediction.
    """

    def __init__(self, base: Denoiser, y: Labels, label_key: str = "y") -> None:
        super().__init__(base)
        self.y, self.label_key = y, label_key

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        y = _labels(kwargs.pop(self.label_key, self.y), x)
        return self.base.raw(x, t, **{self.label_key: y}, **kwargs)


class ClassifierFreeGuidance(DenoiserWrapper):
    r"""Classifier-free guidance, Ho & Salimans 2021 (eq. 6), as a Denoiser wrapper.

    .. math:: \tilde o(x, t) = o(x, t, \varnothing) + w(t)\,\big(o(x, t, y) - o(x, t, \varnothing)\big)

    where o is the net's raw output (eps, x0, v or score). Every conversion of the Denoiser table is *affine in the net
    output* at fixed (x, t), with coefficients that do not depend on the output (e.g. eps = (x - a x0)/s), and the
    two weights 1 - w and w sum to one, so combining raw outputs is the same as combining eps (or x0, v, score):
    :math:`\tilde\varepsilon = \varepsilon_\varnothing + w(\varepsilon_y - \varepsilon_\varnothing)`. In score form
    :math:`\nabla\log p_t(x) + w\,\nabla\log p_t(y\mid x)` for a perfect model: w = 1 is the conditional model, w = 0
    the unconditional one, w > 1 sharpens towards the class.

    Both branches run in ONE net call on the batch ``[x, x]`` with labels ``[y, null]``, so ``nfe`` grows by one per
    prediction (the net sees twice the batch).

    Args:
        base: a Denoiser of a class-conditional net (labels 0..K-1 and a null label for "unconditional").
        y: an int or a (batch,) long tensor of labels.
        scale: the guidance weight w (a float, or a (batch,) tensor of per-sample weights).
        null_label: the unconditional label; defaults to ``base.net.num_classes`` (sdeflow's nets).
        interval: ``(t_lo, t_hi)``: apply w only for t_lo <= t <= t_hi and use the conditional model (w = 1)
            elsewhere (limited-interval guidance, Kynkäänniemi et al. 2024). For CPU times entirely outside the
            interval the unconditional branch is skipped (one unbatched call; no host sync is needed to decide).
        label_key: the net's keyword for labels.
    """

    def __init__(
        self,
        base: Denoiser,
        y: Labels,
        scale: float | torch.Tensor = 1.0,
        null_label: int | None = None,
        interval: tuple[float, float] | None = None,
        label_key: str = "y",
    ) -> None:
        super().__init__(base)
        if not isinstance(scale, torch.Tensor) and not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")
        if interval is not None:
            lo, hi = (float(v) for v in interval)
            if not (0.0 <= lo < hi):
                raise ValueError(f"interval must be (t_lo, t_hi) with 0 <= t_lo < t_hi, got {interval}")
            interval = (lo, hi)
        self.y, self.scale, self.interval, self.label_key = y, scale, interval, label_key
        self.null_label = _null_label(base, null_label)

    def weight(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """w(t) in x's dtype, broadcast against x: ``scale`` inside the interval, 1 outside."""
        w = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        if self.interval is not None:
            tt = t.to(device=x.device)
            inside = (tt >= self.interval[0]) & (tt <= self.interval[1])
            w = torch.where(inside, w, torch.ones_like(w))
        if w.ndim and w.shape != (x.shape[0],):
            raise ValueError(f"scale must be a float or have shape (batch,) = ({x.shape[0]},), got {tuple(w.shape)}")
        return append_dims(w, x.ndim)

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        y = _labels(kwargs.pop(self.label_key, self.y), x)
        t = as_time(t, x)
        if self.interval is not None and t.device.type == "cpu":
            inside = (t >= self.interval[0]) & (t <= self.interval[1])
            if not bool(inside.any()):  # CPU tensor: no device sync
                return self.base.raw(x, t, **{self.label_key: y}, **kwargs)
        tb = batch_time(t, x) if t.ndim else t
        null = torch.full_like(y, self.null_label)
        out = self.base.raw(
            torch.cat([x, x]),
            torch.cat([tb, tb]) if tb.ndim else tb,
            **{self.label_key: torch.cat([y, null])},
            **kwargs,
        )
        cond, uncond = out.chunk(2)
        return uncond + self.weight(x, t) * (cond - uncond)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(scale={self.scale!r}, interval={self.interval!r}, base={self.base!r})"


def classifier_log_prob_grad(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(\log p_\phi(y\mid x, t),\ \nabla_x\log p_\phi(y\mid x, t))` for a classifier returning logits (B, K).

    One forward and one backward pass (``torch.autograd.grad``, under ``enable_grad`` so that it works inside
    ``no_grad`` sampling loops). Shapes: x (B, *data_shape), t (B,), y (B,) long; returns (B,) and x's shape.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = classifier(xg, t)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return logits of shape (batch, num_classes), got {shape}")
        logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(logp.sum(), xg)
    return logp.detach(), grad.detach()


class ClassifierGuidance(DenoiserWrapper):
    r"""Classifier guidance, Dhariwal & Nichol 2021 (Algorithm 2, eq. 14 ff.), as a Denoiser wrapper.

    .. math:: \tilde\varepsilon(x, t) = \hat\varepsilon(x, t) - w\,s(t)\,\nabla_x\log p_\phi(y\mid x, t)

    equivalently the score :math:`\nabla\log p_t(x) + w\,\nabla_x\log p_\phi(y\mid x, t)`. With w = 1 and the exact
    posterior :math:`p(y\mid x_t)` this is :math:`\nabla\log p_t(x\mid y)` exactly (Bayes' rule), the identity the
    tests check on a Gaussian mixture. The wrapper's :meth:`raw` returns eps (``prediction == "eps"``).

    Cost per prediction: one net call (counted in ``nfe``) plus one classifier forward/backward pass (counted in
    ``classifier_nfe``).

    Args:
        base: the diffusion model (unconditional, or a :class:`ConditionalDenoiser`).
        classifier: ``classifier(x, t) -> logits (B, K)``, noise-aware (trained on x_t; see :class:`ClassifierLoss`).
        y: an int or a (batch,) long tensor of target labels.
        scale: the guidance weight w (float or (batch,) tensor).
        classifier_time: what the classifier sees as time: ``"t"`` (continuous t in x's dtype, default), ``"index"``
            or a callable (as :class:`~sdeflow.Denoiser`'s ``time_input``).
    """

    def __init__(
        self,
        base: Denoiser,
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        y: Labels,
        scale: float | torch.Tensor = 1.0,
        classifier_time: str | Callable[[torch.Tensor], torch.Tensor] = "t",
    ) -> None:
        super().__init__(base, prediction="eps")
        if not callable(classifier):
            raise TypeError(f"classifier must be callable classifier(x, t), got {type(classifier).__name__}")
        # the Denoiser's time mapping (validated there), reused for the classifier's time argument
        self._classifier_time = Denoiser(classifier, base.sde, time_input=classifier_time).net_time
        self.classifier, self.y, self.scale = classifier, y, scale
        self.classifier_nfe = 0

    def reset_nfe(self) -> None:
        """Zero the net-call and the classifier-call counters."""
        self.nfe = 0
        self.classifier_nfe = 0

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        y = _labels(kwargs.pop("y", self.y), x)
        t = as_time(t, x)
        eps = self.base.predict(x, t, **kwargs).eps
        _, grad = classifier_log_prob_grad(self.classifier, x, self._classifier_time(batch_time(t, x)), y)
        self.classifier_nfe += 1
        _, s = self.coefficients(x, t)
        w = append_dims(torch.as_tensor(self.scale, dtype=x.dtype, device=x.device), x.ndim)
        return eps - w * s * grad.to(eps.dtype)

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale!r}, base={self.base!r})"


# ---------------------------------------------------------------------------------------------------- classifier
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
        from .nets.embeddings import TimeMLP
        from .nets.mlp import _ResidualBlock

        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth), ("time_dim", time_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        emb_dim = 2 * time_dim
        self.time = TimeMLP(time_dim, emb_dim, embedding)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden, emb_dim, dropout) for _ in range(depth))
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

    def per_sample(  # type: ignore[override]
        self,
        net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
        draw: Any = None,
        **net_kwargs: Any,
    ) -> torch.Tensor:
        """Per-sample weighted cross-entropies (B,); ``draw`` fixes (t, noise, x_t) instead of drawing them."""
        if y is None:
            raise ValueError("y (the class labels, shape (batch,)) is required to train a classifier")
        y = _labels(y, x0)
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
    from .training.trainer import Trainer

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


# ---------------------------------------------------------------------------------------------------- inversion
def _deterministic_stepper(den: Denoiser, solver: Any, solver_options: dict[str, Any]):
    from .integrate import make_stepper

    stepper = make_stepper(den, solver, **solver_options)
    if stepper.stochastic or stepper.noise_draws:
        raise ValueError(
            f"solver {stepper.name!r} is stochastic: inversion needs a deterministic probability-flow ODE solver "
            "(e.g. 'ddim' with eta=0, 'euler', 'heun', 'rk45', 'dpm_solver++')"
        )
    return stepper


def _inversion_grid(
    den: Denoiser, stepper, nfe: int | None, grid: str | torch.Tensor | None, t_data: float, t_noise: float
) -> torch.Tensor:
    """The decreasing float64 grid from t_noise to t_data (as sample() builds it)."""
    if nfe is None or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    kind = grid if grid is not None else stepper.default_grid
    return time_grid(den.sde, stepper.num_steps(nfe), kind, t_end=t_data, t_start=t_noise)


def _span(den: Denoiser, t_data: float | None, t_noise: float | None) -> tuple[float, float]:
    sde = den.sde
    t_data = float(sde.eps if t_data is None else t_data)
    t_noise = float(sde.T if t_noise is None else t_noise)
    if not 0.0 <= t_data < t_noise <= sde.T:
        raise ValueError(f"t_data and t_noise must satisfy 0 <= t_data < t_noise <= T={sde.T}, got {t_data}, {t_noise}")
    return t_data, t_noise


def _run(
    den: Denoiser,
    x: torch.Tensor,
    solver: Any,
    nfe: int | None,
    grid: str | torch.Tensor | None,
    t_data: float | None,
    t_noise: float | None,
    forward: bool,
    solver_options: dict[str, Any],
):
    """Integrate the probability-flow ODE between t_data and t_noise, forward (encode) or backward (decode)."""
    from .integrate import solve, solve_adaptive

    _check_data(x, "x0" if forward else "x_T")
    t_data, t_noise = _span(den, t_data, t_noise)
    stepper = _deterministic_stepper(den, solver, solver_options)
    nfe0 = den.nfe
    if stepper.mode == "adaptive":
        t0, t1 = (t_data, t_noise) if forward else (t_noise, t_data)
        res = solve_adaptive(
            stepper,
            x,
            t0,
            t1,
            rtol=stepper.opts.get("rtol", 1e-3),
            atol=stepper.opts.get("atol", 1e-3),
            h0=stepper.opts.get("h0"),
        )
    else:
        g = _inversion_grid(den, stepper, nfe, grid, t_data, t_noise)
        g = g.flip(0) if forward else g
        res = stepper.integrate(x, g) if stepper.mode == "external" else solve(stepper, x, g)
    res.nfe = den.nfe - nfe0
    res.stats["nfe"] = res.nfe
    return res


def encode(
    den: Denoiser,
    x0: torch.Tensor,
    solver: Any = "ddim",
    nfe: int | None = 50,
    grid: str | torch.Tensor | None = None,
    t_data: float | None = None,
    t_noise: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    **solver_options: Any,
):
    r"""ODE inversion: integrate the probability-flow ODE :math:`dx/dt = f x - \tfrac12 g^2\nabla\log p_t` *forward*
    from data at ``t_data`` to a latent at ``t_noise`` (DDIM inversion, Song, Meng & Ermon 2021, is ``"ddim"``).

    The steppers' updates are formulas from t0 to t1 that hold in either direction (Euler; DDIM's exponential
    integrator :math:`x_1 = a_1\hat x_0 + s_1\hat\varepsilon`; Heun; Runge-Kutta), so the one solve loop walks the
    sampling grid reversed; adaptive solvers run their controller from t_data up to t_noise (``rk45`` with its
    torchdiffeq / scipy backends integrates the increasing span directly). :func:`decode` with the same solver, nfe
    and grid walks the same times back: the round-trip error is twice the solver's global error, of its order.

    Args:
        den: any Denoiser (a guided or conditional wrapper too).
        x0: data (batch, *data_shape).
        solver: a deterministic solver name or Stepper instance; stochastic ones raise ValueError.
        nfe: net-call budget of fixed-step solvers (the step count is the solver's ``num_steps(nfe)``).
        grid: ``"uniform" | "logsnr" | "quadratic" | "karras"`` or a decreasing tensor of times (the sampling grid;
            walked in reverse). Default: the solver's.
        t_data, t_noise: the span, default ``sde.eps`` and ``sde.T``; t_noise < T encodes to an intermediate time.
        rtol, atol: tolerances of adaptive solvers.
        **solver_options: the solver's options.

    Returns:
        :class:`~sdeflow.integrate.SampleResult` whose ``x`` is the latent at t_noise and ``nfe`` the net calls.
    """
    if rtol is not None:
        solver_options["rtol"] = rtol
    if atol is not None:
        solver_options["atol"] = atol
    return _run(den, x0, solver, nfe, grid, t_data, t_noise, True, solver_options)


def decode(
    den: Denoiser,
    x_T: torch.Tensor,
    solver: Any = "ddim",
    nfe: int | None = 50,
    grid: str | torch.Tensor | None = None,
    t_data: float | None = None,
    t_noise: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    **solver_options: Any,
):
    """Decode a latent: the probability-flow ODE from ``t_noise`` back to ``t_data`` (the inverse of :func:`encode`).

    Same arguments as :func:`encode`; with t_noise = T it is ``sample(den, solver, nfe, x_T=x_T, t_end=t_data, ...)``
    restricted to deterministic solvers. Returns a :class:`~sdeflow.integrate.SampleResult`.
    """
    if rtol is not None:
        solver_options["rtol"] = rtol
    if atol is not None:
        solver_options["atol"] = atol
    return _run(den, x_T, solver, nfe, grid, t_data, t_noise, False, solver_options)


def _check_data(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"{name} must be a tensor of shape (batch, *data_shape)")


def slerp(
    z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor, dot_threshold: float = 0.9995
) -> torch.Tensor:
    r"""Spherical linear interpolation (Shoemake 1985), per sample over the flattened data dims.

    .. math:: \mathrm{slerp}(z_0, z_1; \alpha) = \frac{\sin((1-\alpha)\theta)}{\sin\theta} z_0
              + \frac{\sin(\alpha\theta)}{\sin\theta} z_1,\qquad \cos\theta = \frac{\langle z_0, z_1\rangle}{|z_0||z_1|}

    the interpolation of DDIM latents (Song, Meng & Ermon 2021, Sec. 5.3): Gaussian latents concentrate on a sphere,
    where a straight line would pass through low-density, low-norm points. Where :math:`|\cos\theta| >` ``dot_threshold``
    (nearly parallel, sin(theta) -> 0) it falls back to the linear interpolation, its limit.

    Args:
        z0, z1: (B, *data_shape), same shape.
        alpha: a float or a (B,) tensor; alpha = 0 gives z0, alpha = 1 gives z1.
    Returns:
        (B, *data_shape).
    """
    if z0.shape != z1.shape or z0.ndim < 2:
        raise ValueError(
            f"z0 and z1 must have the same shape (batch, *data_shape), got {tuple(z0.shape)}, {tuple(z1.shape)}"
        )
    if not 0.0 < dot_threshold < 1.0:
        raise ValueError(f"dot_threshold must lie in (0, 1), got {dot_threshold}")
    B = z0.shape[0]
    a = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device)
    if a.ndim and a.shape != (B,):
        raise ValueError(f"alpha must be a float or have shape (batch,) = ({B},), got {tuple(a.shape)}")
    f0, f1 = z0.reshape(B, -1), z1.reshape(B, -1)
    cos = (f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1)).clamp_min(torch.finfo(z0.dtype).tiny)
    cos = cos.clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    parallel = cos.abs() > dot_threshold
    sin = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(parallel, 1 - a, torch.sin((1 - a) * theta) / sin)
    c1 = torch.where(parallel, a * torch.ones_like(theta), torch.sin(a * theta) / sin)
    return append_dims(c0, z0.ndim) * z0 + append_dims(c1, z0.ndim) * z1


def interpolate(
    den: Denoiser,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    alphas: Sequence[float] | torch.Tensor,
    solver: Any = "ddim",
    nfe: int = 50,
    **options: Any,
) -> torch.Tensor:
    """Interpolate data through the latent space: encode x_a and x_b, slerp the latents at each alpha, decode.

    Args:
        x_a, x_b: (B, *data_shape) data.
        alphas: N interpolation weights.
        solver, nfe, **options: as for :func:`encode` / :func:`decode` (a deterministic solver).
    Returns:
        (N, B, *data_shape): decoded interpolants, row i at ``alphas[i]``.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    z = encode(den, torch.cat([x_a, x_b]), solver, nfe, **options).x
    za, zb = z.chunk(2)
    B, N = x_a.shape[0], alphas.numel()
    zs = torch.cat([slerp(za, zb, float(a)) for a in alphas])
    out = decode(den, zs, solver, nfe, **options).x
    return out.reshape(N, B, *x_a.shape[1:])


# ---------------------------------------------------------------------------------------------------- GMM oracles
def gmm_class_logits(gmm: GaussianMixture, sde: GaussianSDE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""The exact noise-aware classifier of a mixture whose components are the classes:

    .. math:: \log p(k\mid x_t) = \log w_k + \log N(x_t;\ a\mu_k,\ a^2\sigma_k^2 + s^2) - \log p_t(x_t)

    returned as ``classifier(x, t) -> logits (B, K)`` (the unnormalised log posterior). Differentiable in x.
    """

    def classifier(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = as_time(t, x)
        logits, _, _ = gmm._components(gmm._flat(x), sde.alpha(tt), sde.sigma(tt))
        return logits

    return classifier


def gmm_conditional_net(gmm: GaussianMixture, sde: GaussianSDE, prediction: str = "eps") -> Callable[..., torch.Tensor]:
    r"""The exact class-conditional net of a mixture: ``net(x, t, y)`` returns, per sample, the exact ``prediction``
    target of component y (y in 0..K-1: :math:`\varepsilon_k = s\,(x - a\mu_k)/(a^2\sigma_k^2 + s^2)`) or of the
    whole mixture for the null class y = K (also y=None): :math:`\sum_k p(k\mid x_t)\,\varepsilon_k`. Has
    ``num_classes = K``; one pass over the components per call.
    """
    check_choice("prediction", prediction, PREDICTIONS)

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        labels = _labels(gmm.K if y is None else y, x)
        tt = as_time(t, x)
        a, s = sde.alpha(tt), sde.sigma(tt)
        logits, diff, var = gmm._components(gmm._flat(x), a, s)
        eps_k = s.to(dtype=x.dtype, device=x.device).reshape(-1, 1, 1) * diff / var  # (B, K, d)
        eps_mix = (torch.softmax(logits, dim=1)[..., None] * eps_k).sum(1, keepdim=True)
        table = torch.cat([eps_k, eps_mix], dim=1)  # (B, K + 1, d)
        eps = table.gather(1, labels[:, None, None].expand(-1, 1, gmm.d)).squeeze(1).reshape(x.shape)
        if prediction == "eps":
            return eps
        ab = append_dims(a.to(dtype=x.dtype, device=x.device), x.ndim)
        sb = append_dims(s.to(dtype=x.dtype, device=x.device), x.ndim)
        return convert(eps, x, ab, sb, "eps", prediction)

    net.num_classes = gmm.K  # type: ignore[attr-defined]
    return net
