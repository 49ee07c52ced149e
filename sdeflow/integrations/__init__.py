"""Interop with other diffusion libraries: diffusers models and schedulers, EDM / k-diffusion denoisers.

``from_diffusers`` and ``from_edm`` need no third-party import; :class:`~sdeflow.integrations.diffusers.
SdeflowScheduler` and :class:`~sdeflow.integrations.diffusers.DiffusersSolver` need diffusers.
"""

from __future__ import annotations

from .diffusers import DiffusersSolver, diffusers_grid, from_diffusers
from .edm import from_edm

__all__ = ["from_diffusers", "from_edm", "diffusers_grid", "DiffusersSolver"]
