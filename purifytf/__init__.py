"""purifytf: adversarial purification of classifier inputs, as torchvision transforms."""

from .base import Purifier
from .diffusion import Backbone, DiffusersUNet, NoiseSchedule, OracleBackbone
from .nfe import count_nfe
from .purifiers import (
    BitDepthPurify,
    BlurPurify,
    DiffPurify,
    DiffusionPurifier,
    JPEGPurify,
    RandomResizePadPurify,
)

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "BitDepthPurify",
    "BlurPurify",
    "DiffPurify",
    "DiffusersUNet",
    "DiffusionPurifier",
    "JPEGPurify",
    "NoiseSchedule",
    "OracleBackbone",
    "Purifier",
    "RandomResizePadPurify",
    "count_nfe",
]
