"""Score networks: a residual MLP for low-dimensional data and an image U-Net, both optionally class-conditional."""

from .embeddings import ClassEmbedding, FourierEmbedding, SinusoidalEmbedding, TimeMLP
from .mlp import MLPScoreNet
from .scaling import InputScaling
from .unet import UNet

__all__ = [
    "MLPScoreNet",
    "UNet",
    "InputScaling",
    "SinusoidalEmbedding",
    "FourierEmbedding",
    "TimeMLP",
    "ClassEmbedding",
]
