"""purifytf: adversarial purification of classifier inputs, as torchvision transforms."""

from . import pretrained  # the model entry points (hubconf.py re-exports them)
from .base import Purifier
from .defended import DefendedModel
from .diffusion import Backbone, DiffusersUNet, GuidedDiffusionUNet, NoiseSchedule, OracleBackbone
from .factory import create_purifier, default_defences, list_purifiers, load_purifier
from .nfe import count_nfe
from .purifiers import (
    BitDepthPurify,
    BlurPurify,
    DiffPurify,
    DiffusionPurifier,
    IMPurify,
    JPEGPurify,
    RandomResizePadPurify,
    SaliencyDiffPurify,
    SSNIPurify,
)

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "DefendedModel",
    "BitDepthPurify",
    "BlurPurify",
    "DiffPurify",
    "DiffusersUNet",
    "DiffusionPurifier",
    "GuidedDiffusionUNet",
    "IMPurify",
    "JPEGPurify",
    "NoiseSchedule",
    "OracleBackbone",
    "Purifier",
    "RandomResizePadPurify",
    "SSNIPurify",
    "SaliencyDiffPurify",
    "count_nfe",
    "create_purifier",
    "default_defences",
    "list_purifiers",
    "load_purifier",
    "pretrained",
]
