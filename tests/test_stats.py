"""Paired statistics: exact oracles from scipy (Wilson intervals, binomial tests) and numpy (phi correlation)."""

import math

import pytest
from scipy.stats import binomtest

from purifytf.evaluation.stats import mcnemar_exact, paired_comparison, paired_counts, wilson_interval


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (410, 512), (1, 1), (128, 256)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_interval_matches_scipy(k, n, confidence):
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-12)


@pytest.mark.parametrize("only_a, only_b", [(12, 4), (4, 12), (9, 8), (0, 0), (0, 7), (5, 5), (1, 30), (200, 230)])
def test_mcnemar_exact_is_the_binomial_test_of_the_discordant_pairs(only_a, only_b):
    n = only_a + only_b
    expected = binomtest(only_a, n, 0.5).pvalue if n else 1.0
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_known_value():
    """Issue 17's example: SSNI against DDPM, 12 images won and 4 lost: p = 0.077 (2 * 697 / 65536)."""
    assert mcnemar_exact(12, 4) == pytest.approx(2 * (1 + 16 + 120 + 560 + 1820) / 2**16)


def _outcomes(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


@pytest.mark.parametrize("table", [(400, 30, 12, 70), (80, 9, 8, 103), (10, 0, 0, 0), (0, 3, 5, 4), (300, 0, 6, 206)])
def test_paired_comparison_is_newcombes_hybrid_score_interval(table):
    a, b = _outcomes(*table)
    result = paired_comparison(a, b)
    n, k1, k2 = len(a), sum(a), sum(b)
    p1, p2 = k1 / n, k2 / n
    cis = [binomtest(k, n).proportion_ci(method="wilson") for k in (k1, k2)]
    (l1, u1), (l2, u2) = ((ci.low, ci.high) for ci in cis)
    both, only_a, only_b, neither = table
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b  # method 10's phi: AD - BC less N/2 when positive, floored at 0
    corrected = max(cross - n / 2, 0) if cross >= 0 else cross
    phi = corrected / math.sqrt(margins) if margins else 0.0
    lower = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    upper = p1 - p2 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    assert result["difference"] == pytest.approx(p1 - p2)
    assert result["interval"] == pytest.approx((lower, upper), abs=1e-9)
    assert (result["only_a"], result["only_b"], result["n"]) == (table[1], table[2], n)
    assert result["p_value"] == pytest.approx(mcnemar_exact(table[1], table[2]))
    assert result["interval"][0] <= result["difference"] <= result["interval"][1]


def test_paired_interval_matches_a_published_value():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8 (R package
    contingencytables): Cavo et al.'s paired table (59, 6, 16, 80), Newcombe's method 10: -0.0621 [-0.1186, -0.0046]."""
    a, b = _outcomes(59, 6, 16, 80)
    result = paired_comparison(a, b)
    assert result["difference"] == pytest.approx(-0.0621, abs=5e-5)
    assert result["interval"] == pytest.approx((-0.1186, -0.0046), abs=5e-5)


def test_paired_interval_is_narrower_than_the_unpaired_one_when_outcomes_agree():
    """Positively correlated pairs (phi > 0) shrink the interval below the independent-samples square-and-add."""
    a, b = _outcomes(400, 20, 8, 84)
    paired = paired_comparison(a, b)["interval"]
    n, p1, p2 = len(a), sum(a) / len(a), sum(b) / len(b)
    (l1, u1), (l2, u2) = wilson_interval(sum(a), n), wilson_interval(sum(b), n)
    unpaired = (p1 - p2 - math.hypot(p1 - l1, u2 - p2), p1 - p2 + math.hypot(u1 - p1, p2 - l2))
    assert unpaired[0] < paired[0] and paired[1] < unpaired[1]


def test_paired_counts_and_errors():
    assert paired_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="same images"):
        paired_comparison([True], [True, False])
    with pytest.raises(ValueError, match="no images"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 4, confidence=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 3)
