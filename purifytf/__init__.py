"""purifytf: adversarial purification of classifier inputs, as torchvision transforms."""

from .base import Purifier
from .diffusion import DiffusersUNet, NoiseSchedule, OracleBackbone
from .nfe import count_nfe
from .purifiers import DiffPurify, DiffusionPurifier

__version__ = "0.1.0"

__all__ = [
    "DiffPurify",
    "DiffusersUNet",
    "DiffusionPurifier",
    "NoiseSchedule",
    "OracleBackbone",
    "Purifier",
    "count_nfe",
]
