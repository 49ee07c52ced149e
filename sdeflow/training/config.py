"""Runs as plain dicts: build the SDE, the net and the loss from a checkpoint's config, and load a Denoiser.

A checkpoint's ``config`` (primitives only, so ``weights_only`` loading reads it) has the sections::

    {"sde":  {"name": "vp", "beta_min": 0.1, "beta_max": 20.0, "schedule": "linear"},   # or subvp / ve / flow
     "net":  {"name": "mlp", "dim": 2, "hidden": 256, ..., "input_scaling": true, "sigma_data": 1.0},
     "loss": {"prediction": "eps", "weighting": "simple", ...},                          # DenoisingScoreMatching
     "data": {"name": "checkerboard", "data_shape": [2], "num_classes": null, ...},
     "train": {"steps": 5000, "batch_size": 256, "lr": ..., "seed": 0, ...}}

Flow matching (Lipman et al. 2023; Liu et al. 2023) is ``"sde": {"name": "flow", "shift": 1.0}``
(:class:`~sdeflow.sdes.FlowMatchingPath`, a = 1 - t, s = t, SD3's time shift) with ``"loss": {"prediction": "flow"}``:
the net regresses the velocity u = a' x0 + s' eps (eps - x0 on the plain path) and loads as a ``prediction="flow"``
Denoiser.

EDM (Karras et al. 2022) is two options: ``"net": {..., "preconditioning": "edm", "sigma_data": 0.5}`` wraps the net
in :class:`~sdeflow.preconditioning.EDMPreconditioning` (instead of input scaling; the net then predicts x0), and
``"loss": {"objective": "edm", "prediction": "x0", "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2}`` selects
:class:`~sdeflow.training.losses.EDMLoss` (the :meth:`EDMLoss.config` fields). :func:`edm_options` writes both.

:func:`load_denoiser` is the one entry point other modules (sampling, likelihood, benchmarks) use.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .._utils import check_choice
from ..denoiser import Denoiser
from ..nets import InputScaling, MLPScoreNet, UNet
from ..preconditioning import EDMPreconditioning
from ..sdes import VESDE, VPSDE, FlowMatchingPath, GaussianSDE, SubVPSDE
from .checkpoint import CheckpointError, load_checkpoint
from .losses import OBJECTIVES, DenoisingScoreMatching, EDMLoss

__all__ = [
    "SDE_NAMES",
    "NET_NAMES",
    "PRECONDITIONINGS",
    "edm_options",
    "build_sde",
    "build_net",
    "build_loss",
    "build_trainer",
    "load_denoiser",
    "load_run",
]

SDE_NAMES = ("vp", "subvp", "ve", "flow")
NET_NAMES = ("mlp", "unet")
#: ``config["net"]["preconditioning"]``: ``"none"`` (the net as built, optionally input-scaled) or ``"edm"``
PRECONDITIONINGS = ("none", "edm")

_SDE_KEYS = {
    "vp": ("beta_min", "beta_max", "schedule"),
    "subvp": ("beta_min", "beta_max"),
    "ve": ("sigma_min", "sigma_max"),
    "flow": ("shift",),
}
_SDE_CLASSES: dict[str, type[GaussianSDE]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "flow": FlowMatchingPath}
_MLP_KEYS = ("dim", "hidden", "depth", "time_dim", "embedding", "num_classes", "dropout")
_UNET_KEYS = (
    "in_channels",
    "channels",
    "channel_mult",
    "num_res_blocks",
    "attention_levels",
    "num_heads",
    "dropout",
    "num_classes",
    "embedding",
)


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    sec = config.get(name)
    if not isinstance(sec, dict) or "name" not in sec:
        raise ValueError(f"config has no usable {name!r} section (got {sec!r})")
    return sec


def build_sde(config: dict[str, Any]) -> GaussianSDE:
    """The SDE of ``config["sde"]``: ``{"name": "vp" | "subvp" | "ve" | "flow", ...its constructor arguments}``."""
    sec = _section(config, "sde")
    check_choice("sde", sec["name"], SDE_NAMES)
    kwargs = {k: sec[k] for k in _SDE_KEYS[sec["name"]] if k in sec}
    return _SDE_CLASSES[sec["name"]](**kwargs)


def build_net(config: dict[str, Any], sde: GaussianSDE | None = None) -> nn.Module:
    """The net of ``config["net"]`` (``"mlp"`` or ``"unet"``), wrapped in :class:`InputScaling` when asked."""
    sec = _section(config, "net")
    check_choice("net", sec["name"], NET_NAMES)
    if sec["name"] == "mlp":
        net: nn.Module = MLPScoreNet(**{k: sec[k] for k in _MLP_KEYS if k in sec})
    else:
        net = UNet(**{k: sec[k] for k in _UNET_KEYS if k in sec})
    precond = sec.get("preconditioning", "none")
    check_choice("preconditioning", precond, PRECONDITIONINGS)
    if precond == "edm":
        if sec.get("input_scaling", False):
            raise ValueError('preconditioning="edm" scales the input itself (c_in): set input_scaling to false')
        net = EDMPreconditioning(net, sde if sde is not None else build_sde(config), sec.get("sigma_data", 0.5))
    elif sec.get("input_scaling", False):
        net = InputScaling(net, sde if sde is not None else build_sde(config), sec.get("sigma_data", 1.0))
    return net


def build_loss(config: dict[str, Any], sde: GaussianSDE | None = None) -> DenoisingScoreMatching:
    """The objective of ``config["loss"]``: ``objective`` ``"dsm"`` (the default; the
    :meth:`DenoisingScoreMatching.config` fields) or ``"edm"`` (the :meth:`EDMLoss.config` fields)."""
    sec = dict(config.get("loss", {}))
    objective = sec.pop("objective", "dsm")
    check_choice("objective", objective, OBJECTIVES)
    sde = sde if sde is not None else build_sde(config)
    if objective == "edm":
        return EDMLoss(sde, **sec)
    return DenoisingScoreMatching(sde, **sec)


def edm_options(
    config: dict[str, Any],
    sigma_data: float = 0.5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    preconditioning: bool = True,
) -> dict[str, Any]:
    """A copy of a run config switched to the EDM recipe (Karras et al. 2022): the EDM loss (x0 prediction,
    lambda(sigma) weighting, log-normal sigma) and, with ``preconditioning``, the net wrapped in
    :class:`~sdeflow.preconditioning.EDMPreconditioning` in place of input scaling. ``p_uncond``, ``stratified``,
    ``t_min`` and ``t_max`` of the existing loss section are kept. For the CLI: ``--objective edm`` maps here."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    old = out.get("loss", {})
    loss: dict[str, Any] = {
        "objective": "edm",
        "prediction": "x0" if preconditioning else old.get("prediction", "eps"),
        "sigma_data": float(sigma_data),
        "p_mean": float(p_mean),
        "p_std": float(p_std),
    }
    loss.update({k: old[k] for k in ("p_uncond", "stratified", "t_min", "t_max") if k in old})
    out["loss"] = loss
    if preconditioning:
        net = dict(out.get("net", {}))
        net.update(preconditioning="edm", input_scaling=False, sigma_data=float(sigma_data))
        out["net"] = net
    return out


def load_run(
    path: str | os.PathLike,
    ema: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Denoiser, dict[str, Any], dict[str, Any]]:
    """(Denoiser, config, raw checkpoint) from a checkpoint written by ``sdeflow train`` / :class:`Trainer`."""
    ckpt = load_checkpoint(path)
    config = ckpt.get("config") or {}
    try:
        sde = build_sde(config)
        net = build_net(config, sde)
        prediction = config.get("loss", {}).get("prediction", "eps")
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: its config cannot rebuild the SDE and net ({err})") from err
    weights = ckpt["ema" if ema else "model"]
    net.load_state_dict(weights)
    net.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        net.to(device=device, dtype=dtype)
    return Denoiser(net, sde, prediction=prediction), config, ckpt


def load_denoiser(
    path: str | os.PathLike,
    ema: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Denoiser:
    """A :class:`~sdeflow.denoiser.Denoiser` (net in eval mode, EMA weights by default) from a training checkpoint.

    The SDE, the net architecture and the prediction type come from the checkpoint's config; the file is read with
    ``weights_only=True``.
    """
    return load_run(path, ema=ema, device=device, dtype=dtype)[0]


def build_trainer(
    config: dict[str, Any],
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
):
    """A :class:`~sdeflow.training.trainer.Trainer` for a full run config (sections sde, net, loss, data, train).

    The data source is rebuilt from ``config["data"]["spec"]`` (a toy name, ``gmm``, ``digits``, a .npy file or an
    image folder); ``config["train"]`` holds the trainer's keyword arguments (``steps`` is read by the caller).
    """
    from .data import make_data
    from .trainer import Trainer

    data_cfg = config.get("data", {})
    if "spec" not in data_cfg:
        raise ValueError("config['data'] needs a 'spec' entry (what --data was)")
    data = make_data(data_cfg["spec"], size=data_cfg.get("size"))
    sde = build_sde(config)
    train = dict(config.get("train", {}))
    train.pop("steps", None)
    seed = int(train.pop("seed", 0))
    dev = device if device is not None else train.pop("device", None)
    train.pop("device", None)
    torch.manual_seed(seed)  # the net's initialisation
    net = build_net(config, sde)
    if "betas" in train:
        train["betas"] = tuple(train["betas"])
    return Trainer(
        net,
        build_loss(config, sde),
        data,
        seed=seed,
        device=dev,
        out_dir=None if out_dir is None else str(out_dir),
        progress=progress,
        config=config,
        **train,
    )
