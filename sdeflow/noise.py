r"""Noise sources: the only place where sampling draws randomness (steppers never do).

A source answers ``source(i, t0, t1, like, draws)`` with a tensor of shape ``(draws, *like.shape)`` of standard
normals for step i over [t1, t0] (t1 < t0). Draw 0 is the *normalized Brownian increment*
:math:`z = (W(t_0) - W(t_1))/\sqrt{t_0 - t_1}`; further draws (corrector steps, ...) are independent normals.

* :class:`IIDNoise`: fresh normals from a ``torch.Generator`` (or one generator per sample, so a sample does not
  change when the batch size does).
* :class:`BrownianNoise`: one Brownian path through torchsde's ``BrownianInterval`` (dyadic "halfway" tree), so solves
  on different grids (20 steps or 200) see the same Brownian motion: the basis of strong-convergence tests.
* :class:`TensorNoise`: a presampled tensor (parallel-in-time sampling, reproducing another library's draws).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["NoiseSource", "IIDNoise", "BrownianNoise", "TensorNoise", "PerSampleGenerator", "randn"]


class PerSampleGenerator:
    """One ``torch.Generator`` per sample, seeded with ``seeds[b]``: sample b's stream does not depend on the batch.

    Every draw of shape (B, *rest) takes rest-sized normals from each sample's own generator in turn, so a sample's
    values depend only on its seed and on the sequence of draws, never on its neighbours.
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> None:
        seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        if not seeds:
            raise ValueError("seeds must not be empty")
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normals of ``shape`` (batch first), row b from sample b's generator; with ``index`` (the batch rows the
        draw is for, e.g. the samples an adaptive solver still steps) only those samples' generators advance."""
        shape = tuple(shape)
        gens = self.generators if index is None else [self.generators[int(b)] for b in index.tolist()]
        if shape[0] != len(gens):
            what = "per-sample seeds" if index is None else "rows of the index"
            raise ValueError(f"batch size {shape[0]} does not match the {len(gens)} {what}")
        out = torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype, device=self.device) for g in gens])
        return out.to(device) if device is not None else out


Generatorish = torch.Generator | PerSampleGenerator | None


def randn(
    shape: Sequence[int], generator: Generatorish = None, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Standard normals of ``shape`` from a generator, a per-sample generator, or the global RNG."""
    if isinstance(generator, PerSampleGenerator):
        return generator.randn(shape, dtype=dtype, device=device)
    if generator is not None and device is not None and torch.device(device) != generator.device:
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=generator.device).to(device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)


class NoiseSource:
    """Base class: ``__call__(i, t0, t1, like, draws, index=None) -> (draws, *like.shape)`` standard normals.

    ``index`` (a long tensor) says which rows of the full batch ``like`` holds when a driver steps a subset of the
    batch (per-sample adaptive stepping): per-sample streams then advance for those samples only."""

    def __call__(
        self,
        i: int,
        t0: torch.Tensor,
        t1: torch.Tensor,
        like: torch.Tensor,
        draws: int = 1,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class IIDNoise(NoiseSource):
    """Independent standard normals from ``generator`` (a torch.Generator, a PerSampleGenerator, or None)."""

    def __init__(self, generator: Generatorish = None) -> None:
        self.generator = generator

    def __call__(self, i, t0, t1, like, draws=1, index=None):
        if isinstance(self.generator, PerSampleGenerator):  # batch axis first, so each sample owns its draws
            z = self.generator.randn((like.shape[0], draws, *like.shape[1:]), like.dtype, like.device, index=index)
            return z.transpose(0, 1)
        return randn((draws, *like.shape), self.generator, like.dtype, like.device)


class BrownianNoise(NoiseSource):
    r"""A fixed Brownian path W on [t_min, t_max] (torchsde ``BrownianInterval`` with ``halfway_tree=True``).

    Draw 0 of step [t1, t0] is :math:`(W(t_0) - W(t_1))/\sqrt{t_0-t_1}`, so the increments of a coarse grid are exact
    sums of the increments of any finer grid. Extra draws come from ``generator``.

    Args:
        shape: the state's shape (batch, *data_shape).
        seed: the path's entropy (same seed, same path).
        t_min, t_max: the span the path covers (the sampling interval).
        tol: the tree's resolution for off-dyadic queries.
        levy_area_approximation: torchsde's Levy-area option (``"space-time"`` for the torchsde bridge's ``srk``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        seed: int = 0,
        t_min: float = 0.0,
        t_max: float = 1.0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        tol: float = 1e-10,
        generator: torch.Generator | None = None,
        levy_area_approximation: str = "none",
    ) -> None:
        import torchsde

        if not t_min < t_max:
            raise ValueError(f"t_min must be < t_max, got {t_min} >= {t_max}")
        self.shape = tuple(shape)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.bm = torchsde.BrownianInterval(
            t0=self.t_min,
            t1=self.t_max,
            size=self.shape,
            dtype=dtype,
            device=device,
            entropy=int(seed),
            tol=tol,
            halfway_tree=True,
            levy_area_approximation=levy_area_approximation,
        )
        self.generator = generator

    def increment(self, t_lo: float, t_hi: float) -> torch.Tensor:
        """W(t_hi) - W(t_lo)."""
        return self.bm(t_lo, t_hi)

    def __call__(self, i, t0, t1, like, draws=1, index=None):
        if index is not None:
            raise ValueError("BrownianNoise is one path for the whole batch: it cannot serve a subset of the samples")
        if tuple(like.shape) != self.shape:
            raise ValueError(f"the Brownian path has shape {self.shape}, the state {tuple(like.shape)}")
        if t0.ndim != 0 or t1.ndim != 0:
            raise ValueError("BrownianNoise needs scalar step times (one time for the whole batch)")
        hi, lo = float(t0), float(t1)
        lo = max(lo, self.t_min)
        hi = min(hi, self.t_max)
        z = (self.increment(lo, hi) / math.sqrt(hi - lo)).to(dtype=like.dtype, device=like.device)
        if draws == 1:
            return z[None]
        extra = randn((draws - 1, *like.shape), self.generator, like.dtype, like.device)
        return torch.cat([z[None], extra])


class TensorNoise(NoiseSource):
    """Presampled noise: ``noise[i]`` of shape (draws, *x.shape) or (*x.shape,) for step i."""

    def __init__(self, noise: torch.Tensor) -> None:
        self.noise = noise

    def __call__(self, i, t0, t1, like, draws=1, index=None):
        if i >= self.noise.shape[0]:
            raise ValueError(f"TensorNoise holds {self.noise.shape[0]} steps, step {i} was asked for")
        z = self.noise[i]
        if index is not None:  # the rows of the stepped subset
            idx = index.to(z.device)
            z = z[:, idx] if z.ndim == like.ndim + 1 else z[idx]
        if z.shape == like.shape:
            z = z[None]
        if z.shape[0] < draws or tuple(z.shape[1:]) != tuple(like.shape):
            raise ValueError(f"TensorNoise step {i} has shape {tuple(z.shape)}, needs ({draws}, *{tuple(like.shape)})")
        return z[:draws].to(dtype=like.dtype, device=like.device)
