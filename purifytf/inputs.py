"""Input checks shared by every purifier: clear errors instead of silent wrong answers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RANGE_TOLERANCE", "check_choice", "check_images"]

RANGE_TOLERANCE = 1e-3
"""Values within this distance outside [0, 1] are clamped (rounding); further out is an error."""


def check_images(x: object, channels: int | None, min_size: int) -> Tensor:
    """Validate an image tensor ``(..., C, H, W)`` in [0, 1] and return it as ``(B, C, H, W)``.

    Raises:
        TypeError: PIL images, NumPy arrays, non-tensors, non-float dtypes.
        ValueError: too few dims, empty batch, wrong channel count, too small, NaN/Inf, out of range.
    """
    if type(x).__module__.startswith("PIL."):
        raise TypeError("got a PIL image; purifiers take float tensors in [0, 1]: "
                        "add v2.ToImage() and v2.ToDtype(torch.float32, scale=True) before the purifier")
    if type(x).__module__ == "numpy":
        raise TypeError("got a NumPy array; purifiers take float tensors (..., C, H, W) in [0, 1]: add v2.ToImage() "
                        "(an (H, W, C) array) and v2.ToDtype(torch.float32, scale=True) before the purifier")
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a float image tensor (..., C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"got a {x.dtype} tensor; purifiers take float images in [0, 1]: "
                        "add v2.ToDtype(torch.float32, scale=True) before the purifier")
    if x.dim() < 3:
        raise ValueError(f"expected an image (C, H, W) or a batch (..., C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"empty input of shape {tuple(x.shape)}: nothing to purify")
    c, h, w = x.shape[-3:]
    if channels is not None and c != channels:
        raise ValueError(f"this purifier's model takes {channels}-channel images, got {c} channels "
                         f"(shape {tuple(x.shape)}); {_channel_hint(x.shape, channels)}")
    if min(h, w) < min_size:
        raise ValueError(f"image of {h}x{w} is smaller than the {min_size}x{min_size} this purifier can handle")
    lo, hi = torch.aminmax(x.detach())
    if not (torch.isfinite(lo) & torch.isfinite(hi) & (lo >= -RANGE_TOLERANCE) & (hi <= 1 + RANGE_TOLERANCE)):
        _raise_values(x, lo, hi)  # one data-dependent branch: one graph break under torch.compile
    return x.reshape(-1, c, h, w)


def _channel_hint(shape: torch.Size, channels: int) -> str:
    """What to put before the purifier to give it ``channels`` channels."""
    if shape[-1] == channels:
        return "this looks like (H, W, C): add v2.ToImage() (or permute to (C, H, W))"
    if channels == 1:
        return "add v2.Grayscale() before the purifier"
    return "add v2.RGB() before the purifier" if channels == 3 else f"give it {channels} channels"


def _raise_values(x: Tensor, lo: Tensor, hi: Tensor) -> None:
    if not torch.isfinite(x.detach()).all():
        raise ValueError("input contains NaN or Inf")
    raise ValueError(f"input values span [{lo.item():.3g}, {hi.item():.3g}], expected [0, 1]: purify "
                     "before v2.Normalize, and scale 0-255 floats by 1/255")


def check_choice(name: str, value, choices) -> None:
    """Raise a ``ValueError`` naming ``name``, the ``choices`` and ``value`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
