"""purifytf: adversarial purification of classifier inputs, as torchvision transforms."""

from .base import Purifier
from .diffusion import Backbone, DiffusersUNet, NoiseSchedule, OracleBackbone
from .nfe import count_nfe
from .purifiers import DiffPurify, DiffusionPurifier

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "DiffPurify",
    "DiffusersUNet",
    "DiffusionPurifier",
    "NoiseSchedule",
    "OracleBackbone",
    "Purifier",
    "count_nfe",
]
