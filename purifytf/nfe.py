"""Counting network function evaluations (NFE).

A batched network call counts once: NFE is per image. Counters nest, so a purifier that calls
another (SSNI around DiffPurify) sees the calls of both::

    with count_nfe() as counter:
        purifier(x)
    counter.count
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["NFECounter", "count_nfe", "record_nfe"]


@dataclass
class NFECounter:
    count: int = 0


_ACTIVE: ContextVar[tuple[NFECounter, ...]] = ContextVar("purifytf_nfe_counters", default=())


@contextlib.contextmanager
def count_nfe() -> Iterator[NFECounter]:
    """Count the network evaluations made inside the ``with`` block."""
    counter = NFECounter()
    token = _ACTIVE.set(_ACTIVE.get() + (counter,))
    try:
        yield counter
    finally:
        _ACTIVE.reset(token)


def record_nfe(n: int = 1) -> None:
    """Called by every network call site: adds ``n`` to each active counter."""
    for counter in _ACTIVE.get():
        counter.count += n
