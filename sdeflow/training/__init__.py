"""Training: denoising score matching losses, data sources, the trainer with safe checkpoints, and run loading."""

from .checkpoint import CheckpointError, load_checkpoint, previous_path, save_checkpoint
from .config import build_loss, build_net, build_sde, build_trainer, load_denoiser, load_run
from .data import (
    TOYS,
    DataSource,
    SampledData,
    TensorData,
    default_gmm,
    load_digits,
    load_image_folder,
    load_npy,
    make_data,
    toy_2d,
)
from .losses import TIME_SAMPLINGS, WEIGHTINGS, DenoisingScoreMatching, DSMDraw
from .run import ensure_trained, prepare_run, run_config, train
from .trainer import FitResult, Trainer

__all__ = [
    "DenoisingScoreMatching",
    "DSMDraw",
    "WEIGHTINGS",
    "TIME_SAMPLINGS",
    "Trainer",
    "FitResult",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "previous_path",
    "build_sde",
    "build_net",
    "build_loss",
    "build_trainer",
    "load_denoiser",
    "load_run",
    "TOYS",
    "toy_2d",
    "default_gmm",
    "DataSource",
    "SampledData",
    "TensorData",
    "load_digits",
    "load_npy",
    "load_image_folder",
    "make_data",
    "run_config",
    "prepare_run",
    "train",
    "ensure_trained",
]
