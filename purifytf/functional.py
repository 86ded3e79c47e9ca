"""The conventions every module spells the same way: value ranges and straight-through gradients.

Images are in [0, 1] at every public boundary; diffusion networks work in model space [-1, 1].
"""

from torch import Tensor

__all__ = ["straight_through", "to_image_space", "to_model_space"]


def to_model_space(x: Tensor) -> Tensor:
    """Images in [0, 1] -> model space [-1, 1] (any shape)."""
    return x * 2 - 1


def to_image_space(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> images in [0, 1] (any shape); inverse of :func:`to_model_space`."""
    return (x + 1) / 2


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass (bit for bit), the gradient of ``surrogate`` in the backward pass.

    ``value.detach() + (surrogate - surrogate.detach())``: the added term is exactly zero, so a rounded
    noise level stays an exact integer and a binary mask stays binary. Same shapes (or broadcastable).
    """
    return value.detach() + (surrogate - surrogate.detach())
