"""Seeded noise: every random draw of a purifier goes through here."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["randn_like", "rand_like", "make_generator"]


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` (global RNG if ``None``).

    The draw happens on the generator's device and is moved to ``x.device``, so a CPU generator
    gives the same noise for CPU and CUDA inputs.
    """
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def rand_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) noise shaped like ``x`` (see :func:`randn_like` for the device rule)."""
    if generator is None:
        return torch.rand_like(x)
    return torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
