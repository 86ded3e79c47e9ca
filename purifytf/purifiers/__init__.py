"""The purifiers. Importing this package registers every purifier class by name (Hub coder)."""

from .classic import BitDepthPurify, BlurPurify, JPEGPurify, RandomResizePadPurify
from .diffpure import DiffPurify
from .diffusion import DiffusionPurifier

__all__ = [
    "BitDepthPurify",
    "BlurPurify",
    "DiffPurify",
    "DiffusionPurifier",
    "JPEGPurify",
    "RandomResizePadPurify",
]
