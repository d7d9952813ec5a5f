"""Statistics for experiments: intervals, Bayesian comparisons, an always-valid sequential test
(mSPRT), the sample-ratio-mismatch check and sample sizes. Distributions come from scipy.

Conventions: "treatment" is the arm compared with the control; higher metric values are better.
Everything that the simulation tests exercise accepts numpy arrays (broadcasting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

#: Mixing-distribution scale of the mSPRT, in standard deviations of one observation: the test is
#: most sensitive to effects of about this size (0.1 sd = 5 points at a 50 % thumbs-up rate).
DEFAULT_TAU_SD = 0.1


@dataclass(frozen=True)
class Comparison:
    """Bayesian comparison of one arm with the control."""

    prob_beat: float  # P(arm metric > control metric | data)
    expected_loss: float  # E[max(control - arm, 0)]: what shipping the arm costs if it is worse
    diff_mean: float  # posterior mean of arm - control
    diff_samples: NDArray[np.float64]  # posterior draws of arm - control (for plots)


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's binomtest); (nan, nan) without trials."""
    if trials <= 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def mean_interval(mean: float, sd: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of a mean; (nan, nan) with fewer than two observations."""
    if n < 2 or not np.isfinite(sd):
        return float("nan"), float("nan")
    if sd == 0:
        return mean, mean
    low, high = stats.t.interval(level, df=n - 1, loc=mean, scale=sd / np.sqrt(n))
    return float(low), float(high)


def beta_binomial(
    successes: int,
    trials: int,
    control_successes: int,
    control_trials: int,
    *,
    prior: tuple[float, float] = (1.0, 1.0),
    draws: int = 40_000,
    rng: np.random.Generator | None = None,
) -> Comparison:
    """Beta-Binomial model of a rate (uniform prior by default), compared by Monte Carlo."""
    rng = rng or np.random.default_rng(0)
    a, b = prior
    arm = stats.beta(a + successes, b + trials - successes).rvs(size=draws, random_state=rng)
    ctrl = stats.beta(a + control_successes, b + control_trials - control_successes).rvs(size=draws, random_state=rng)
    diff = arm - ctrl
    return Comparison(
        prob_beat=float(np.mean(diff > 0)),
        expected_loss=float(np.mean(np.maximum(-diff, 0.0))),
        diff_mean=float(np.mean(diff)),
        diff_samples=diff,
    )


def normal_means(
    mean: float,
    var: float,
    n: int,
    control_mean: float,
    control_var: float,
    control_n: int,
    *,
    draws: int = 40_000,
    rng: np.random.Generator | None = None,
) -> Comparison:
    """Normal model of a mean (flat prior): difference ~ N(m1 - m0, v1/n1 + v0/n0), in closed form."""
    if n < 2 or control_n < 2:
        return Comparison(float("nan"), float("nan"), float("nan"), np.empty(0))
    mu = mean - control_mean
    sd = float(np.sqrt(var / n + control_var / control_n))
    if sd == 0:
        return Comparison(float(mu > 0), float(max(-mu, 0.0)), mu, np.full(16, mu))
    post = stats.norm(loc=mu, scale=sd)
    # E[max(-D, 0)] for D ~ N(mu, sd^2) = sd * pdf(mu / sd) - mu * cdf(-mu / sd)
    loss = sd * stats.norm.pdf(mu / sd) - mu * stats.norm.cdf(-mu / sd)
    samples = post.rvs(size=draws, random_state=rng or np.random.default_rng(0))
    return Comparison(float(post.sf(0.0)), float(loss), float(mu), samples)


def msprt_p_values(
    diff: ArrayLike, var_diff: ArrayLike, tau: ArrayLike, *, running: bool = True
) -> NDArray[np.float64]:
    """Always-valid p-values of the mixture SPRT (Johari et al., 2017) for H0: difference = 0.

    ``diff`` is the observed difference of means at each look (last axis = looks), ``var_diff``
    its variance (s1²/n1 + s0²/n0) and ``tau`` the sd of the normal mixing distribution. The
    likelihood ratio is N(diff; 0, V + tau²) / N(diff; 0, V); p = min over looks so far of 1/ratio.
    Looks without data (V = 0 or NaN) give p = 1.
    """
    d = np.asarray(diff, dtype=float)
    v = np.asarray(var_diff, dtype=float)
    t2 = np.asarray(tau, dtype=float) ** 2
    ok = np.isfinite(d) & np.isfinite(v) & (v > 0)
    v_safe = np.where(ok, v, 1.0)
    d_safe = np.where(ok, d, 0.0)
    log_ratio = stats.norm.logpdf(d_safe, scale=np.sqrt(v_safe + t2)) - stats.norm.logpdf(d_safe, scale=np.sqrt(v_safe))
    p = np.where(ok, np.minimum(1.0, np.exp(-np.clip(log_ratio, -700, 700))), 1.0)
    return np.minimum.accumulate(p, axis=-1) if running else p


def sequential_binary(
    successes: ArrayLike,
    trials: ArrayLike,
    control_successes: ArrayLike,
    control_trials: ArrayLike,
    tau_sd: float = DEFAULT_TAU_SD,
) -> NDArray[np.float64]:
    """Always-valid p-values at each look for cumulative counts (arrays, last axis = looks).

    The difference and its variance are Agresti-Caffo's: one success and one failure added to each
    arm. The plain per-arm p(1-p)/n is 0 for an arm whose few ratings all agree: 7 of 8 up against
    0 of 6 at a canary's first, partial look, then 10 of 12 against 1 of 12, gave p = 0.014; with
    the adjustment those looks give p = 0.57 and 0.37. The adjustment fades as the counts grow, and
    keeps the power on large effects that a pooled variance would take away."""
    s1, n1 = np.asarray(successes, float) + 1, np.asarray(trials, float) + 2
    s0, n0 = np.asarray(control_successes, float) + 1, np.asarray(control_trials, float) + 2
    p1, p0 = s1 / n1, s0 / n0
    var = p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0
    pooled = (s1 + s0) / (n1 + n0)
    tau = tau_sd * np.sqrt(pooled * (1 - pooled))
    # a look with no ratings on either arm carries no evidence
    empty = (np.asarray(trials, float) <= 0) | (np.asarray(control_trials, float) <= 0)
    return msprt_p_values(np.where(empty, np.nan, p1 - p0), var, tau)


def sequential_means(
    mean: ArrayLike,
    var: ArrayLike,
    n: ArrayLike,
    control_mean: ArrayLike,
    control_var: ArrayLike,
    control_n: ArrayLike,
    tau_sd: float = DEFAULT_TAU_SD,
) -> NDArray[np.float64]:
    """Always-valid p-values at each look for cumulative means/variances (last axis = looks)."""
    m1, v1, n1 = (np.asarray(x, float) for x in (mean, var, n))
    m0, v0, n0 = (np.asarray(x, float) for x in (control_mean, control_var, control_n))
    with np.errstate(divide="ignore", invalid="ignore"):
        var_diff = v1 / n1 + v0 / n0
        tau = tau_sd * np.sqrt((v1 * n1 + v0 * n0) / (n1 + n0))
    return msprt_p_values(m1 - m0, var_diff, tau)


@dataclass(frozen=True)
class SRMResult:
    """Sample-ratio-mismatch check: are the units split as the weights say?"""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    flagged: bool


def srm_check(observed: dict[str, int], weights: dict[str, float], threshold: float = 0.001) -> SRMResult:
    """Chi-squared goodness of fit of unit counts against the arm weights; flagged when p < threshold."""
    names = [n for n in weights if weights[n] > 0]
    counts = np.array([observed.get(n, 0) for n in names], dtype=float)
    total = counts.sum()
    share = np.array([weights[n] for n in names], dtype=float)
    expected = total * share / share.sum()
    if total == 0 or len(names) < 2:
        return SRMResult({n: int(c) for n, c in zip(names, counts, strict=True)}, {}, 0.0, 1.0, False)
    chi2, p = stats.chisquare(counts, expected)
    return SRMResult(
        observed={n: int(c) for n, c in zip(names, counts, strict=True)},
        expected={n: float(e) for n, e in zip(names, expected, strict=True)},
        chi2=float(chi2),
        p_value=float(p),
        flagged=bool(p < threshold),
    )


def fixed_sample_size(p0: float, lift: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per-arm n of a two-sided two-proportion z-test (fixed horizon, one look):
    n = (z_{1-α/2} + z_{power})² · (p0(1-p0) + p1(1-p1)) / lift²."""
    p1 = p0 + lift
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return int(np.ceil(z**2 * (p0 * (1 - p0) + p1 * (1 - p1)) / lift**2))


#: Per-arm sample size of the mSPRT (tau = 0.1 sd, daily looks, alpha 5 %) relative to the
#: fixed-horizon z-test at the same power: the price of being allowed to look every day. Measured
#: with :func:`simulate_binary` (see docs/event-store.md and tests/feedback/test_simulation.py).
SEQUENTIAL_INFLATION = 2.0


def sequential_sample_size(p0: float, lift: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Per-arm rated requests the sequential test needs to find ``lift`` with ``power``."""
    return int(np.ceil(SEQUENTIAL_INFLATION * fixed_sample_size(p0, lift, alpha, power)))


def simulate_binary(
    experiments: int,
    days: int,
    per_day: int,
    p_control: float,
    p_treatment: float,
    *,
    alpha: float = 0.05,
    tau_sd: float = DEFAULT_TAU_SD,
    rng: np.random.Generator | None = None,
) -> NDArray[np.bool_]:
    """Simulate ``experiments`` two-arm binary experiments looked at daily; True where a winner is declared.

    Each day brings ``per_day`` rated requests per arm; a winner is declared at the first look
    whose always-valid p-value is below ``alpha``. Vectorised over experiments and days.
    """
    rng = rng or np.random.default_rng()
    shape = (experiments, days)
    s1 = np.cumsum(rng.binomial(per_day, p_treatment, size=shape), axis=1)
    s0 = np.cumsum(rng.binomial(per_day, p_control, size=shape), axis=1)
    n = np.cumsum(np.full(shape, per_day), axis=1)
    p = sequential_binary(s1, n, s0, n, tau_sd)
    return np.asarray((p < alpha).any(axis=1))


def guardrail_ok(value: float | None, limit: float | None) -> bool | None:
    """None when there is no limit or no data, else whether value <= limit."""
    if limit is None or value is None or not np.isfinite(value):
        return None
    return bool(value <= limit)


def bonferroni(alpha: float, comparisons: int) -> float:
    """Per-comparison level keeping the family-wise error at ``alpha``."""
    return alpha / max(1, comparisons)


def as_float_list(values: Sequence[float]) -> list[float]:
    """Plain floats (JSON-friendly)."""
    return [float(v) for v in values]
