"""The purifiers."""

from .diffpure import DiffPurify
from .diffusion import DiffusionPurifier

__all__ = ["DiffPurify", "DiffusionPurifier"]
