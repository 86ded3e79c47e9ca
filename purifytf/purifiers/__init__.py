"""The purifiers. Importing this package registers every purifier class by name (Hub coder)."""

from .classic import BitDepthPurify, BlurPurify, JPEGPurify, RandomResizePadPurify
from .diffpure import DiffPurify
from .diffusion import DiffusionPurifier
from .impure import IMPurify
from .saliency_diffpure import SaliencyDiffPurify
from .ssni import SSNIPurify

__all__ = [
    "BitDepthPurify",
    "BlurPurify",
    "DiffPurify",
    "DiffusionPurifier",
    "IMPurify",
    "JPEGPurify",
    "RandomResizePadPurify",
    "SSNIPurify",
    "SaliencyDiffPurify",
]
