"""Intervals against values worked by hand (formulas written out in each test)."""

import math

import pytest

from leanpo_core import stats

Z2 = stats.Z95 ** 2  # 3.841459


def test_wilson_interval_hand_worked():
    # k=5, n=10: centre (0.5 + z^2/20) / (1 + z^2/10) = 0.5; half = z*sqrt(0.025 + z^2/400) / (1 + z^2/10)
    #   = 1.959964 * sqrt(0.025 + 0.0096036) / 1.3841459 = 1.959964 * 0.186020 / 1.3841459 = 0.263407
    low, high = stats.wilson_interval(5, 10)
    assert low == pytest.approx(0.5 - 0.263407, abs=1e-6) and high == pytest.approx(0.5 + 0.263407, abs=1e-6)
    # k=0: the interval is [0, z^2 / (n + z^2)] = [0, 3.841459 / 13.841459] = [0, 0.277533]
    low, high = stats.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(Z2 / (10 + Z2), abs=1e-9) and high == pytest.approx(0.277533, 1e-5)
    # k=n mirrors k=0
    low, high = stats.wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(1 - 0.277533, abs=1e-6)
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_mcnemar_exact_hand_worked():
    # 8 gained, 2 lost: 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * (1 + 10 + 45) / 1024 = 0.109375
    assert stats.mcnemar_exact(8, 2) == pytest.approx(0.109375)
    assert stats.mcnemar_exact(2, 8) == pytest.approx(0.109375)
    # 6 gained, 0 lost: 2 * (1/64) = 0.03125
    assert stats.mcnemar_exact(6, 0) == pytest.approx(0.03125)
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(3, 3) == 1.0  # capped at 1


def test_paired_difference_counts_and_degenerate_intervals():
    before = [1, 0, 0, 1, 0]
    after = [1, 1, 0, 0, 1]
    result = stats.paired_difference(before, after)
    assert result["delta"] == pytest.approx(1 / 5) and result["n"] == 5
    assert (result["gained"], result["lost"]) == (2, 1)
    assert result["p_value"] == pytest.approx(1.0)  # 2 * P(X <= 1 | n=3) = 2 * 4/8 = 1
    assert -1 <= result["ci_low"] <= result["delta"] <= result["ci_high"] <= 1
    # identical models: every resample has difference 0
    same = stats.paired_difference([1, 0, 1], [1, 0, 1])
    assert (same["delta"], same["ci_low"], same["ci_high"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    # every question gained: the interval is the point 1
    up = stats.paired_difference([0] * 4, [1] * 4)
    assert (up["ci_low"], up["ci_high"]) == (1.0, 1.0)
    # seeded: the same inputs give the same interval
    assert stats.paired_difference(before, after) == result
    with pytest.raises(ValueError):
        stats.paired_difference([1, 0], [1])


def test_paired_bootstrap_matches_the_normal_approximation_at_large_n():
    # 300 questions, 40 gained, 10 lost: delta 0.1; the variance of the per-question difference d in {-1,0,1}
    # is E[d^2] - delta^2 = 50/300 - 0.01 = 0.156667, so the normal half-width is 1.96 * sqrt(0.156667/300) = 0.04479
    before = [0] * 40 + [1] * 10 + [1] * 100 + [0] * 150
    after = [1] * 40 + [0] * 10 + [1] * 100 + [0] * 150
    result = stats.paired_difference(before, after, resamples=20_000)
    assert result["delta"] == pytest.approx(0.1)
    assert result["ci_low"] == pytest.approx(0.1 - 0.04479, abs=0.006)
    assert result["ci_high"] == pytest.approx(0.1 + 0.04479, abs=0.006)
    assert result["p_value"] < 1e-4


def test_accuracy_summary_per_category():
    summary = stats.accuracy_summary([True, False, True, True], ["colour", "colour", "count", "count"])
    assert summary["all"]["value"] == 0.75 and summary["all"]["n"] == 4
    assert summary["colour"] == {"value": 0.5, "n": 2, "ci_low": pytest.approx(stats.wilson_interval(1, 2)[0]),
                                 "ci_high": pytest.approx(stats.wilson_interval(1, 2)[1])}
    assert summary["count"]["value"] == 1.0


def test_format_interval():
    assert stats.format_interval(0.5, 0.2366, 0.7634, 10) == "0.500 [0.237, 0.763] (n=10)"
    assert stats.format_interval(0.065, 0.015, 0.115, points=True) == "+6.5 pp [+1.5, +11.5]"
    assert stats.format_interval(math.nan, 0, 0) == "n/a"


def test_bootstrap_interval_of_a_mean():
    assert stats.bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    assert all(math.isnan(v) for v in stats.bootstrap_interval([]))
    # 0/1 values with mean 0.3 over 400: the normal half-width is 1.96 * sqrt(0.21 / 400) = 0.0449
    low, high = stats.bootstrap_interval([1] * 120 + [0] * 280, resamples=20_000)
    assert low == pytest.approx(0.3 - 0.0449, abs=0.006) and high == pytest.approx(0.3 + 0.0449, abs=0.006)
