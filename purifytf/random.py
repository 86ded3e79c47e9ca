"""Seeded noise: every random draw of a purifier goes through :func:`randn_like` and :func:`rand_like`.

Where a purifier takes a ``generator``, three sources of noise are accepted:

- ``None``: the global RNG of the input's device, one draw for the whole batch;
- a ``torch.Generator``: one draw for the whole batch, made on the generator's device and moved to the
  input's device (a CPU generator gives the same noise for CPU and CUDA inputs; a CUDA generator draws
  CUDA's numbers, which differ from a CPU generator's of the same seed);
- :class:`SampleStreams`, what a purifier built with ``seed=`` uses: **per-sample streams**. Every
  sample of a batch draws from its own stream and every stream is determined by the seed alone, so a
  sample's noise never depends on its batch position or its batch-mates: ``purify(x)`` equals
  ``purify(x.repeat(4))[i]``, and EOT copies of an image all receive the noise the deployed defence
  uses for it. Draw ``k`` of a stream is made on the CPU from a generator seeded with
  ``(seed, k)`` and moved to the input's device: the same numbers on CPU and CUDA.

The first dimension of ``x`` is the batch: a per-sample draw has shape ``x.shape[1:]`` and is
broadcast over it. Per-sample draws are one ``torch`` operator (``purifytf::stream_draw``), so
``torch.compile`` keeps them inside its graph and reproduces eager's numbers.

Every source draws in float32 and casts to the input's dtype, so a purifier computing in float64 (e.g.
made ``.double()`` for exact gradients) or in half precision draws the noise it draws in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SampleStreams", "Source", "rand_like", "randn_like", "stream_seed"]

_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, index: int) -> int:
    """The seed of draw ``index`` of the stream of ``seed`` (SplitMix64 of both): a 64-bit integer."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@torch.library.custom_op("purifytf::stream_draw", mutates_args=())
def _stream_draw(seed: int, index: int, shape: list[int], normal: bool, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(stream_seed(seed, index))
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator).to(device=device, dtype=dtype)


@_stream_draw.register_fake
def _(seed, index, shape, normal, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


class SampleStreams:
    """Per-sample random streams of a seeded purifier (see the module doc); a fresh one per call.

    Args:
        seed: any integer accepted by ``torch.manual_seed``.
    Attributes:
        draws: draws made so far (draw ``k`` uses :func:`stream_seed` ``(seed, k)``).
    """

    def __init__(self, seed: int):
        self.seed = (seed + (1 << 63)) % (1 << 64) - (1 << 63)  # signed 64-bit: what the custom op takes
        self.draws = 0

    def draw(self, x: Tensor, normal: bool) -> Tensor:
        """Noise shaped like ``x`` (B, ...): one draw of shape ``x.shape[1:]``, the same for every sample."""
        noise = _stream_draw(self.seed, self.draws, [1, *x.shape[1:]], normal, x.dtype, x.device)
        self.draws += 1
        return noise.expand(x.shape)

    def __repr__(self) -> str:
        return f"SampleStreams(seed={self.seed}, draws={self.draws})"


Source = torch.Generator | SampleStreams | None
"""What a ``generator`` argument of a purifier takes (see the module doc)."""


def _draw(x: Tensor, generator: Source, normal: bool) -> Tensor:
    if isinstance(generator, SampleStreams):
        return generator.draw(x, normal)
    draw = torch.randn if normal else torch.rand
    device = x.device if generator is None else generator.device
    return draw(x.shape, generator=generator, device=device).to(device=x.device, dtype=x.dtype)


def randn_like(x: Tensor, generator: Source) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` (see the module doc)."""
    return _draw(x, generator, normal=True)


def rand_like(x: Tensor, generator: Source) -> Tensor:
    """Uniform [0, 1) noise shaped like ``x``, drawn from ``generator`` (see the module doc)."""
    return _draw(x, generator, normal=False)
