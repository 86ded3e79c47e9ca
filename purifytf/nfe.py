"""Counting network function evaluations (NFE).

A batched network call counts once: NFE is per image. Every network call site calls
:func:`record_nfe`, which adds to a running total kept in a 0-dim int64 CPU tensor per thread
(:func:`total_nfe`), in place. Under ``torch.compile`` that addition is one more operation of the graph:
no Python value is guarded, nothing recompiles, and a compiled call counts exactly as an eager one.
Counters read the total when they open and when they close, so they nest: a purifier that calls
another (SSNI around DiffPurify) sees the calls of both::

    with count_nfe() as counter:
        purifier(x)
    counter.count

(With ``torch.compile(mode="reduce-overhead")`` on CUDA, the CPU counter keeps CUDA graphs off.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["NFECounter", "count_nfe", "record_nfe", "total_nfe"]

_STATE = threading.local()


def total_nfe() -> Tensor:
    """This thread's running total of network calls: a 0-dim int64 CPU tensor, never reset."""
    total = getattr(_STATE, "total", None)
    if total is None:
        with torch.inference_mode(False):  # a normal tensor, updatable in and out of inference mode
            total = _STATE.total = torch.zeros((), dtype=torch.int64)
    return total


class NFECounter:
    """Network calls made in this thread since the counter opened (until it closed)."""

    def __init__(self):
        self._start = int(total_nfe())
        self._stop: int | None = None

    @property
    def count(self) -> int:
        return (int(total_nfe()) if self._stop is None else self._stop) - self._start

    def close(self) -> None:
        self._stop = int(total_nfe())


@contextlib.contextmanager
def count_nfe() -> Iterator[NFECounter]:
    """Count the network evaluations made inside the ``with`` block."""
    counter = NFECounter()
    try:
        yield counter
    finally:
        counter.close()


def record_nfe(n: int = 1) -> None:
    """Called by every network call site: adds ``n`` to this thread's total."""
    total_nfe().add_(n)


total_nfe()  # the main thread's total exists before anything is compiled
