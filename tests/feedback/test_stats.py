"""Statistics on known data, the SRM check, and the simulations the decision rule is built on."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from feedback import stats


def test_intervals_on_known_data():
    low, high = stats.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert all(np.isnan(stats.wilson_interval(0, 0)))
    low, high = stats.mean_interval(3.0, 1.0, 25)
    assert (low, high) == pytest.approx((3.0 - 2.0639 * 0.2, 3.0 + 2.0639 * 0.2), abs=1e-3)


def test_beta_binomial_comparison():
    clear = stats.beta_binomial(700, 1000, 500, 1000)
    assert clear.prob_beat > 0.999 and clear.expected_loss < 1e-4 and clear.diff_mean == pytest.approx(0.2, abs=0.01)
    same = stats.beta_binomial(500, 1000, 500, 1000)
    assert same.prob_beat == pytest.approx(0.5, abs=0.02)
    worse = stats.beta_binomial(450, 1000, 500, 1000)
    assert worse.prob_beat < 0.02 and worse.expected_loss == pytest.approx(0.05, abs=0.01)


def test_normal_model_matches_closed_form():
    cmp = stats.normal_means(3.02, 1.0, 400, 3.0, 1.0, 400)
    sd = np.sqrt(2 / 400)
    assert cmp.prob_beat == pytest.approx(sps.norm.cdf(0.02 / sd))
    draws = np.random.default_rng(1).normal(0.02, sd, 400_000)
    assert cmp.expected_loss == pytest.approx(np.mean(np.maximum(-draws, 0)), rel=0.05)


def test_msprt_p_values():
    diff, var, tau = 0.05, 0.0004, 0.05
    expected = 1 / (np.sqrt(var / (var + tau**2)) * np.exp(tau**2 * diff**2 / (2 * var * (var + tau**2))))
    assert stats.msprt_p_values([diff], [var], tau)[0] == pytest.approx(min(1.0, expected))
    p = stats.msprt_p_values([0.0, 0.05, 0.0, np.nan], [0.01, 0.0004, 0.0001, 0.0], 0.05)
    assert p[0] == 1.0 and p[1] < 1.0 and p[2] == p[1] and p[3] == p[1]  # running minimum: never goes up
    assert stats.msprt_p_values([0.2], [0.0], 0.05)[0] == 1.0  # no data, no evidence


def test_sample_ratio_mismatch():
    fine = stats.srm_check({"a": 5030, "b": 4970}, {"a": 1, "b": 1})
    assert not fine.flagged and fine.p_value > 0.5
    broken = stats.srm_check({"a": 5300, "b": 4700}, {"a": 1, "b": 1})
    assert broken.flagged and broken.p_value < 1e-6
    uneven = stats.srm_check({"a": 2500, "b": 7500}, {"a": 1, "b": 3})
    assert not uneven.flagged


def test_sample_sizes():
    # (1.95996 + 0.84162)^2 * (0.25 + 0.2475) / 0.05^2 = 1561.9
    assert stats.fixed_sample_size(0.5, 0.05) == 1562
    assert stats.sequential_sample_size(0.5, 0.05) == int(np.ceil(stats.SEQUENTIAL_INFLATION * 1562))


def test_aa_experiments_looked_at_daily_rarely_declare_a_winner():
    rng = np.random.default_rng(20240601)
    winners = stats.simulate_binary(200, days=28, per_day=250, p_control=0.5, p_treatment=0.5, rng=rng)
    assert winners.mean() <= 0.05
    low_rate = stats.simulate_binary(200, days=28, per_day=250, p_control=0.1, p_treatment=0.1, rng=rng)
    assert low_rate.mean() <= 0.05
    # the same data with a naive fixed-horizon z-test at every daily look would be fooled far more often
    s1 = np.cumsum(rng.binomial(250, 0.5, (200, 28)), axis=1)
    s0 = np.cumsum(rng.binomial(250, 0.5, (200, 28)), axis=1)
    n = 250 * np.arange(1, 29)
    pooled = (s1 + s0) / (2 * n)
    z = (s1 - s0) / n / np.sqrt(2 * pooled * (1 - pooled) / n)
    assert (2 * sps.norm.sf(np.abs(z)) < 0.05).any(axis=1).mean() > 0.1


def test_a_five_point_lift_is_found_with_the_documented_sample_size():
    n = stats.sequential_sample_size(0.5, 0.05)  # rated requests per arm, spread over 14 daily looks
    found = stats.simulate_binary(
        200,
        days=14,
        per_day=int(np.ceil(n / 14)),
        p_control=0.5,
        p_treatment=0.55,
        rng=np.random.default_rng(7),
    )
    assert found.mean() >= 0.8


def test_a_unanimous_arm_at_a_tiny_first_look_is_not_evidence():
    """7 of 8 up against 0 of 6 on a canary's first (partial) day, then 10 of 12 against 1 of 12: far too
    little to call a winner, however the ratings fall on days. With each arm's plain p(1-p)/n, two looks
    gave p = 0.014 (the arm without a single thumbs-up had no variance of its own) where one look gives
    p > 0.05; the Agresti-Caffo adjustment fixes that."""
    two_looks = stats.sequential_binary([7, 10], [8, 12], [0, 1], [6, 12])
    one_look = stats.sequential_binary([10], [12], [1], [12])
    assert one_look[-1] > 0.05
    assert two_looks[-1] > 0.05, two_looks


def test_small_daily_samples_keep_the_false_winner_rate():
    """A/A with a handful of ratings a day, where unanimous arms are common at the first looks."""
    rng = np.random.default_rng(11)
    for p in (0.5, 0.85):
        winners = stats.simulate_binary(2000, days=14, per_day=4, p_control=p, p_treatment=p, rng=rng)
        assert winners.mean() <= 0.05, (p, winners.mean())


def test_a_large_effect_is_found_on_a_few_dozen_ratings():
    """28 of 32 up against 4 of 32 (the live promotion test's shape): overwhelming, and the adjustment
    leaves it so; 3 of 4 against 1 of 4 is not."""
    assert stats.sequential_binary([28], [32], [4], [32])[-1] < 0.01
    assert stats.sequential_binary([3], [4], [1], [4])[-1] > 0.2
    assert stats.sequential_binary([0], [0], [0], [0])[-1] == 1.0  # no ratings, no evidence
