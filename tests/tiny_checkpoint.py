"""A small VP / MLP eps-model checkpoint for the likelihood CLI tests (tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from sdeflow.training import build_net, build_sde, save_checkpoint


def write_mlp_checkpoint(path: Path, dim: int, init_std: float | None = None) -> None:
    """Save a linear-VP eps MLP on ``dim`` coordinates (hidden 16, depth 1) built under ``torch.manual_seed(0)``;
    with ``init_std`` every parameter is redrawn from N(0, init_std^2) (the output layers start at zero, so the
    untouched net is the zero field)."""
    config = {
        "sde": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0, "schedule": "linear"},
        "net": {"name": "mlp", "dim": dim, "hidden": 16, "depth": 1, "time_dim": 8},
        "loss": {"prediction": "eps"},
    }
    torch.manual_seed(0)
    net = build_net(config, build_sde(config))
    if init_std is not None:
        for p in net.parameters():
            torch.nn.init.normal_(p, std=init_std)
    save_checkpoint({"config": config, "model": net.state_dict(), "ema": net.state_dict()}, path)
