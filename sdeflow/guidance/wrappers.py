r"""Conditioning and guidance as Denoiser wrappers.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .._utils import TimeLike, append_dims, as_time, batch_time, check_choice
from ..denoiser import PREDICTIONS, Denoiser

__all__ = [
    "Labels",
    "as_labels",
    "DenoiserWrapper",
    "ConditionalDenoiser",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "classifier_log_prob_grad",
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


def as_labels(y: Labels, x: torch.Tensor, name: str = "y") -> torch.Tensor:
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
    def nfe(self) -> int:
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
        y = as_labels(kwargs.pop(self.label_key, self.y), x)
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
        y = as_labels(kwargs.pop(self.label_key, self.y), x)
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


def guidance_rescale(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    r"""Guidance rescale, Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16,
    diffusers' ``guidance_rescale``): per sample, :math:`o_{re} = o_{cfg}\,\sigma(o_y)/\sigma(o_{cfg})` and the result
    :math:`\phi\,o_{re} + (1-\phi)\,o_{cfg}`, with sigma the standard deviation over the non-batch axes."""
    if phi == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(
        torch.finfo(guided.dtype).tiny
    )
    return phi * guided * ratio + (1.0 - phi) * guided


class ConditioningGuidance(DenoiserWrapper):
    r"""Classifier-free guidance (Ho & Salimans 2021, eq. 6) with any conditioning tensors: text embeddings, image
    latents, a negative prompt in place of the null one.

    .. math:: \tilde o = o(x, t, c_\varnothing) + w\,(o(x, t, c) - o(x, t, c_\varnothing))

    on the net's raw output (affine conversions make this the same guidance in eps, x0, v or score; see
    :class:`ClassifierFreeGuidance`), then optionally :func:`guidance_rescale`. Both branches run in ONE net call on
    ``[x, x]`` with each keyword ``[cond, uncond]`` concatenated along the batch.

    Args:
        base: a Denoiser whose net takes the conditioning as keywords (e.g. diffusers' ``encoder_hidden_states``).
        cond: keyword tensors of the conditional branch; each has one row per sample or a single row (shared).
        uncond: the same keywords for the unconditional (or negative) branch.
        scale: the guidance weight w (float or (batch,) tensor).
        rescale: guidance rescale phi in [0, 1] (0: off; Lin et al. recommend 0.7).

    Per-sample rows follow the samples a solver steps (:meth:`~sdeflow.Denoiser.rows`).
    """

    def __init__(
        self,
        base: Denoiser,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor],
        scale: float | torch.Tensor = 1.0,
        rescale: float = 0.0,
    ) -> None:
        super().__init__(base)
        if not isinstance(cond, dict) or not isinstance(uncond, dict) or set(cond) != set(uncond) or not cond:
            raise ValueError("cond and uncond must be dicts of tensors with the same (non-empty) keys")
        for k in cond:
            c, u = cond[k], uncond[k]
            if not (isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor)) or c.shape[1:] != u.shape[1:]:
                raise ValueError(f"cond[{k!r}] and uncond[{k!r}] must be tensors of the same per-row shape")
            if c.is_floating_point() and not bool(torch.isfinite(c).all() and torch.isfinite(u).all()):
                raise ValueError(f"cond[{k!r}] / uncond[{k!r}] must be finite")
        if isinstance(scale, torch.Tensor):
            if not bool(torch.isfinite(scale).all()):
                raise ValueError("scale must be finite")
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number or a (batch,) tensor, got {scale!r}")
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must lie in [0, 1], got {rescale!r}")
        self.cond, self.uncond, self.scale, self.rescale = dict(cond), dict(uncond), scale, float(rescale)
        self._index: torch.Tensor | None = None

    @contextmanager
    def rows(self, index: torch.Tensor) -> Iterator[None]:
        previous, self._index = self._index, index
        try:
            with self.base.rows(index):
                yield
        finally:
            self._index = previous

    def _rows(self, v: torch.Tensor, n: int, key: str) -> torch.Tensor:
        if v.shape[0] == 1:
            return v.expand(n, *v.shape[1:])
        if self._index is not None:
            v = v[self._index.to(v.device)]
        if v.shape[0] != n:
            if n % v.shape[0]:
                raise ValueError(f"{key} has {v.shape[0]} rows for a call on {n} samples: give 1 or one per sample")
            v = v.repeat(n // v.shape[0], *([1] * (v.ndim - 1)))
        return v

    def raw(self, x: torch.Tensor, t: TimeLike, **kwargs: Any) -> torch.Tensor:
        n = x.shape[0]
        t = as_time(t, x)
        tb = batch_time(t, x) if t.ndim else t
        both = {
            k: torch.cat([self._rows(self.cond[k], n, f"cond[{k!r}]"), self._rows(self.uncond[k], n, f"uncond[{k!r}]")])
            for k in self.cond
        }
        out = self.base.raw(torch.cat([x, x]), torch.cat([tb, tb]) if tb.ndim else tb, **both, **kwargs)
        c, u = out.chunk(2)
        w = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
        if w.ndim:
            w = self._rows(w.reshape(-1, *([1] * (x.ndim - 1))), n, "scale") if w.numel() > 1 else w.reshape(())
        guided = u + w * (c - u)
        return guidance_rescale(guided, c, self.rescale)


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
        y = as_labels(kwargs.pop("y", self.y), x)
        t = as_time(t, x)
        eps = self.base.predict(x, t, **kwargs).eps
        _, grad = classifier_log_prob_grad(self.classifier, x, self._classifier_time(batch_time(t, x)), y)
        self.classifier_nfe += 1
        _, s = self.coefficients(x, t)
        w = append_dims(torch.as_tensor(self.scale, dtype=x.dtype, device=x.device), x.ndim)
        return eps - w * s * grad.to(eps.dtype)

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale!r}, base={self.base!r})"
