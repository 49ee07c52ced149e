"""Training runs from Python: a run config from keyword options, a run folder trained or resumed, train-if-needed.

What ``sdeflow train`` does, as library functions (the CLI is a thin layer over them)::

    from sdeflow.training import ensure_trained, run_config, train

    config = run_config("checkerboard", net="mlp", hidden=128, steps=4000)  # plain primitives, as in checkpoints
    result = train(config, "runs/cb")                                      # FitResult; runs/cb/ckpt.pt
    train(None, "runs/cb", resume=True, steps=8000)                        # continue the saved run
    ensure_trained("runs/cb", {"data": "checkerboard", "hidden": 128}, 8000)  # reuse / resume / train

Under torchrun every rank calls :func:`train` together: the :class:`~sdeflow.training.Trainer` finds the process
group itself, and only rank 0 writes ``config.json`` and the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._utils import check_choice
from ..denoiser import ALL_PREDICTIONS
from .checkpoint import load_checkpoint, previous_path
from .config import NET_NAMES, SDE_NAMES, build_trainer, edm_options
from .data import DataSource, make_data
from .losses import OBJECTIVES
from .trainer import FitResult, Trainer

__all__ = ["run_config", "prepare_run", "train", "ensure_trained", "VP_SCHEDULES", "DEVICE_TYPES"]

VP_SCHEDULES = ("linear", "cosine", "sigmoid")
#: device types a new run may name (``cuda:1`` is type ``cuda``)
DEVICE_TYPES = ("cpu", "cuda", "mps")


def run_config(
    data: str,
    *,
    data_source: DataSource | None = None,
    image_size: int | None = None,
    conditional: bool = False,
    p_uncond: float | None = None,
    sde: str = "vp",
    schedule: str = "linear",
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    sigma_min: float = 0.01,
    sigma_max: float | None = None,
    shift: float | None = None,
    net: str = "mlp",
    prediction: str | None = None,
    embedding: str = "sinusoidal",
    hidden: int = 256,
    depth: int = 3,
    channels: int = 64,
    channel_mult: Sequence[int] = (1, 2, 2),
    num_res_blocks: int = 2,
    attention_levels: Sequence[int] = (1,),
    dropout: float = 0.0,
    input_scaling: bool = True,
    sigma_data: float | None = None,
    weighting: str = "simple",
    time_sampling: str | None = None,
    stratified: bool = False,
    min_snr_gamma: float = 5.0,
    objective: str = "dsm",
    p_mean: float = -1.2,
    p_std: float = 1.2,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    warmup: int = 100,
    grad_clip: float = 1.0,
    ema_decay: float = 0.999,
    seed: int = 0,
    amp: bool = False,
    save_every: int = 1000,
    log_every: int = 50,
) -> dict[str, Any]:
    """The run config (sections sde, net, loss, data, train; plain primitives) for a data spec and options.

    The keywords are ``sdeflow train``'s options (``--beta-min`` is ``beta_min``). Defaults that depend on the data
    or the net: ``sigma_max`` 10 for 2-D data and 50 else (VE); ``sigma_data`` 0.5 for images, 1 else; ``p_uncond``
    0.1 with ``conditional``; ``time_sampling`` importance for the likelihood weighting, uniform else; ``steps`` 5000;
    ``batch_size`` 256 (mlp) / 64 (unet); ``lr`` 1e-3 (mlp) / 2e-4 (unet); ``prediction`` ``"flow"`` on
    ``sde="flow"`` (the flow-matching path a = 1 - t, s = t; ``shift`` is SD3's time shift, default 1), ``"eps"``
    else.

    Args:
        data: a toy name (8gaussians, checkerboard, moons, swissroll, 2spirals, rings), ``gmm``, ``digits``, a .npy
            file or an image folder (:func:`~sdeflow.training.make_data`).
        data_source: the already built source of ``data`` (skips building it again).

    Raises:
        ValueError: an unknown sde / net / schedule / prediction name, ``conditional`` on unlabelled data,
        ``net="unet"`` on data that is not (C, H, W), ``shift`` on another sde than ``"flow"``, and on
        ``sde="flow"`` an eps or score prediction or ``objective="edm"`` (both undefined where the path reaches
        a(T) = 0).
    """
    check_choice("sde", sde, SDE_NAMES)
    check_choice("objective", objective, OBJECTIVES)
    prediction = prediction if prediction is not None else ("flow" if sde == "flow" else "eps")
    check_choice("prediction", prediction, ALL_PREDICTIONS)
    if shift is not None and sde != "flow":
        raise ValueError(f"shift={shift} is the flow path's time shift: it needs sde='flow', got sde={sde!r}")
    if sde == "flow" and prediction in ("eps", "score"):
        raise ValueError(
            f"prediction={prediction!r} on sde='flow': the path reaches a(T) = 0 (pure noise) at T = 1, where an "
            f"{prediction} net carries no information about x0 and sampling from T divides by a(T) = 0; use "
            "prediction='flow' (the velocity eps - x0, as SD3 / Flux), 'x0' or 'v'"
        )
    if sde == "flow" and objective == "edm":
        raise ValueError(
            "objective='edm' on sde='flow': EDM's preconditioning works on x/a(t) and sigma = s/a, infinite at the "
            "flow path's T = 1; train it with objective='dsm' and prediction='flow'"
        )
    check_choice("net", net, NET_NAMES)
    check_choice("schedule", schedule, VP_SCHEDULES)
    source = data_source if data_source is not None else make_data(data, size=image_size)
    shape = list(source.data_shape)
    is_image = len(shape) == 3
    if sde == "vp":
        sde_cfg: dict[str, Any] = {"name": "vp", "beta_min": beta_min, "beta_max": beta_max, "schedule": schedule}
    elif sde == "subvp":
        sde_cfg = {"name": "subvp", "beta_min": beta_min, "beta_max": beta_max}
    elif sde == "flow":
        sde_cfg = {"name": "flow", "shift": float(shift) if shift is not None else 1.0}
    else:
        sde_cfg = {
            "name": "ve",
            "sigma_min": sigma_min,
            "sigma_max": sigma_max if sigma_max is not None else (10.0 if shape == [2] else 50.0),
        }
    num_classes = source.num_classes if conditional else None
    if conditional and num_classes is None:
        raise ValueError(f"conditional training needs labelled data; data={data!r} has no labels")
    if net == "mlp":
        net_cfg: dict[str, Any] = {
            "name": "mlp",
            "dim": math.prod(shape),
            "hidden": hidden,
            "depth": depth,
            "time_dim": 128,
            "embedding": embedding,
            "num_classes": num_classes,
            "dropout": dropout,
        }
    else:
        if not is_image:
            raise ValueError(f"net='unet' needs image data of shape (C, H, W), got data_shape {tuple(shape)}")
        net_cfg = {
            "name": "unet",
            "in_channels": shape[0],
            "channels": channels,
            "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks,
            "attention_levels": list(attention_levels),
            "num_heads": 4,
            "dropout": dropout,
            "num_classes": num_classes,
            "embedding": embedding,
        }
    net_cfg["input_scaling"] = bool(input_scaling)
    net_cfg["sigma_data"] = sigma_data if sigma_data is not None else (0.5 if is_image else 1.0)
    loss = {
        "prediction": prediction,
        "weighting": weighting,
        "time_sampling": time_sampling or ("importance" if weighting == "likelihood" else "uniform"),
        "stratified": stratified,
        "min_snr_gamma": min_snr_gamma,
        "p_uncond": p_uncond if p_uncond is not None else (0.1 if conditional else 0.0),
    }
    mlp = net == "mlp"
    train_cfg = {
        "steps": steps if steps is not None else 5000,
        "batch_size": batch_size if batch_size is not None else (256 if mlp else 64),
        "lr": lr if lr is not None else (1e-3 if mlp else 2e-4),
        "weight_decay": weight_decay,
        "warmup": warmup,
        "grad_clip": grad_clip,
        "ema_decay": ema_decay,
        "seed": seed,
        "amp": amp,
        "conditional": conditional,
        "save_every": save_every,
        "log_every": log_every,
    }
    data_cfg: dict[str, Any] = {"spec": data, **source.config()}
    if image_size is not None:
        data_cfg["size"] = image_size
    from .. import __version__

    config = {
        "sde": sde_cfg,
        "net": net_cfg,
        "loss": loss,
        "data": data_cfg,
        "train": train_cfg,
        "sdeflow": __version__,
    }
    if objective == "edm":  # Karras et al. 2022: EDM loss + preconditioning (sdeflow.training.config.edm_options)
        config = edm_options(
            config, sigma_data=sigma_data if sigma_data is not None else 0.5, p_mean=p_mean, p_std=p_std
        )
    return config


def _default_device(device: torch.device | str | None) -> str:
    return str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError as err:  # torch's own message lists every backend it knows
        raise ValueError(f"device={device!r} is not a device; allowed types: {', '.join(DEVICE_TYPES)}") from err
    check_choice("device", kind, DEVICE_TYPES)


def prepare_run(
    config: Mapping[str, Any] | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    steps: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    amp: bool = False,
) -> tuple[Trainer, dict[str, Any], int]:
    """Build (or restore) the Trainer of a run folder and write its ``config.json``: everything :func:`train` does
    before ``fit``. Returns ``(trainer, config, steps)``, ``steps`` the total to train to.

    A new run (``resume=False``) needs ``config`` and refuses a folder that already holds ``ckpt.pt``. A resumed
    run reads the config and the state from ``out_dir/ckpt.pt`` (``config`` must then be None); ``steps`` and
    ``amp=True`` override the saved ones. ``device`` defaults to CUDA when available.

    Raises:
        FileNotFoundError: resume without a checkpoint. FileExistsError: a new run into a folder with one.
        ValueError: bad config or device. CheckpointError: an unreadable checkpoint.
    """
    from ..distributed import is_main_process

    out = Path(out_dir)
    ckpt_path = out / "ckpt.pt"
    dev = _default_device(device)
    state = None
    if resume:
        if config is not None:
            raise ValueError("config must be None with resume=True: a resumed run keeps the checkpoint's config")
        if not ckpt_path.exists() and not previous_path(ckpt_path).exists():
            raise FileNotFoundError(f"resume: no checkpoint in {out}")
        state = load_checkpoint(ckpt_path)
        cfg = state["config"]
        if steps is not None:
            cfg["train"]["steps"] = steps
        if amp:
            cfg["train"]["amp"] = True
    else:
        if config is None:
            raise ValueError("config is required for a new run (see run_config)")
        if ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists: resume it or choose another output folder")
        _check_device(dev)
        cfg = json.loads(json.dumps(dict(config)))  # a deep copy of plain primitives
        if steps is not None:
            cfg["train"]["steps"] = steps
        if amp:
            cfg["train"]["amp"] = True
    trainer = build_trainer(cfg, out_dir=out, progress=progress, device=dev)
    if state is not None:
        trainer.load_state_dict(state)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return trainer, cfg, int(cfg["train"]["steps"])


def train(
    config: Mapping[str, Any] | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    steps: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    amp: bool = False,
) -> FitResult:
    """Train a run into ``out_dir`` (``ckpt.pt``, ``ckpt.prev.pt``, ``config.json``), or resume the one saved there.

    :func:`prepare_run`, then ``trainer.fit(steps)``. A SIGINT / SIGTERM writes a checkpoint and returns with
    ``FitResult.interrupted`` set to the signal number. Arguments and errors as in :func:`prepare_run`.
    """
    trainer, _, total = prepare_run(
        config, out_dir, resume=resume, steps=steps, device=device, progress=progress, amp=amp
    )
    return trainer.fit(total)


def ensure_trained(
    run_dir: str | os.PathLike,
    options: Mapping[str, Any],
    steps: int,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> str:
    """Make sure ``run_dir/ckpt.pt`` holds a model trained for ``steps`` steps.

    A checkpoint with at least ``steps`` steps is reused; one with fewer (an interrupted run) is resumed to
    ``steps``; with none, ``train(run_config(**options, steps=steps), run_dir)`` trains one. ``options`` are
    :func:`run_config`'s keywords and must name ``data``.

    Returns:
        a sentence saying which of the three happened.

    Raises:
        ValueError: a checkpoint trained on other data than ``options["data"]``. RuntimeError: training was
        interrupted by a signal (the checkpoint it wrote can be resumed).
    """
    opts = dict(options)
    if "data" not in opts:
        raise ValueError("options must name the data (options['data'], e.g. 'checkerboard')")
    run_dir = Path(run_dir)
    ckpt = run_dir / "ckpt.pt"
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        spec = state.get("config", {}).get("data", {}).get("spec")
        if spec != opts["data"]:
            raise ValueError(
                f"{ckpt} was trained on data={spec!r}, not {opts['data']!r}: delete it or choose another folder"
            )
        objective = state.get("config", {}).get("loss", {}).get("objective", "dsm")
        if objective != opts.get("objective", "dsm"):
            raise ValueError(
                f"{ckpt} was trained with objective={objective!r}, not {opts.get('objective', 'dsm')!r}: delete it "
                "or choose another folder"
            )
        if state["step"] >= steps:
            return f"reused {ckpt} (step {state['step']})"
        action = f"resumed {ckpt} from step {state['step']} to {steps}"
        result = train(None, run_dir, resume=True, steps=steps, device=device, progress=progress)
    else:
        action = f"trained {ckpt} ({steps} steps)"
        opts["steps"] = steps
        result = train(run_config(**opts), run_dir, device=device, progress=progress)
    if result.interrupted is not None:
        raise RuntimeError(
            f"training {run_dir} was interrupted by signal {result.interrupted} at step {result.step}; "
            "run again to resume it"
        )
    return action
