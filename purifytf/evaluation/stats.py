"""Confidence intervals and paired tests for accuracies measured on the same images.

Two defences evaluated on the same images with the same seeds give paired outcomes (correct or not per
image). :func:`paired_comparison` compares them: the difference in accuracy with Newcombe's hybrid score
interval for paired proportions (Newcombe 1998, Stat. Med. 17:2635, method 10: Wilson intervals of both
accuracies combined with the phi correlation of the pairs, its cross product corrected by N/2) and McNemar's
exact test (two-sided binomial test of the discordant pairs against 1/2). Single accuracies get Wilson score
intervals. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from statistics import NormalDist

__all__ = ["mcnemar_exact", "paired_comparison", "paired_counts", "wilson_interval"]


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (lower, upper) in [0, 1] of a proportion ``successes / n``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (A right and B wrong, the reverse).

    ``min(1, 2 P[X <= min(only_a, only_b)])`` for ``X ~ Binomial(only_a + only_b, 1/2)``; 1 without
    discordant pairs.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def paired_counts(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, int, int]:
    """(both right, only A right, only B right, both wrong) of per-image outcomes on the same images."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same images: {len(a)} vs {len(b)} outcomes")
    pairs = [(bool(x), bool(y)) for x, y in zip(a, b, strict=True)]
    return (pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)),
            pairs.count((False, False)))


def _corrected_phi(both: int, only_a: int, only_b: int, neither: int) -> float:
    """Method 10's correlation of the pairs: phi with the cross product ``AD - BC`` reduced by ``N/2`` when
    positive (0 when that crosses zero), which widens the interval of positively correlated pairs."""
    n = both + only_a + only_b + neither
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    if not margins or 0 <= cross <= n / 2:
        return 0.0
    return (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)


def paired_comparison(a: Sequence[bool], b: Sequence[bool], confidence: float = 0.95) -> dict:
    """Accuracy of A minus accuracy of B on the same images, with interval and exact McNemar p-value.

    ``a``, ``b``: per-image correctness (same order, same images). Returns ``n``, ``difference`` (in
    [-1, 1]), ``interval`` (Newcombe's paired hybrid score interval, see the module doc), ``p_value``
    (exact McNemar), ``only_a`` and ``only_b`` (the discordant pairs: images A gets right and B wrong,
    and the reverse) and ``method``.
    """
    both, only_a, only_b, neither = paired_counts(a, b)
    n = both + only_a + only_b + neither
    if n == 0:
        raise ValueError("no images to compare")
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_a, n, confidence), wilson_interval(both + only_b, n, confidence)
    phi = _corrected_phi(both, only_a, only_b, neither)
    difference = p1 - p2
    lower = difference - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = difference + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"n": n, "difference": difference, "interval": (max(-1.0, lower), min(1.0, upper)),
            "p_value": mcnemar_exact(only_a, only_b), "only_a": only_a, "only_b": only_b,
            "method": "Newcombe paired hybrid score interval; exact McNemar test"}
