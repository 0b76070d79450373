"""Intervals, paired tests and sample sizes (harness.metrics.statistics, docs/protocol.md 9).

Hand-computed cases (two-point bootstrap, an exactly enumerated sign-flip test, Holm, the
sample-size formula), agreement with SciPy's independent implementations (``bootstrap``
with BCa and percentile intervals, the paired ``permutation_test``), coverage of the BCa
interval on skewed data, and the speed the issue asks for (10,000 resamples x 2,000 images).
"""
from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pytest
import scipy.stats

from harness.metrics import localisation
from harness.metrics.aggregate import LOCALISATION, aggregate, per_image_terms
from harness.metrics.statistics import (StatisticsSettings, bootstrap_means, compare, holm,
                                        images_needed, interval_from, intervals, sample_sizes,
                                        sign_flip_pvalues)

SKEWED = np.random.default_rng(7).exponential(10.0, 150)       # AD-like: >= 0, long right tail


# -- intervals --------------------------------------------------------------------------------
def test_two_point_bootstrap_by_hand():
    """x = (0, 100): a resample's mean is 0, 50 or 100 with probability 1/4, 1/2, 1/4, so the
    2.5% and 97.5% percentiles are 0 and 100, and the resampled means average 50."""
    settings = StatisticsSettings(method="percentile", resamples=20_000, seed=3)
    boot = bootstrap_means(np.array([0.0, 100.0]), settings.resamples, settings.seed)
    assert set(np.unique(boot)) == {0.0, 50.0, 100.0}
    assert abs((boot == 50).mean() - 0.5) < 0.02 and abs((boot == 0).mean() - 0.25) < 0.02
    assert intervals({"IC_100": [0.0, 100.0]}, settings) == {"IC_100_ci_low": 0.0,
                                                           "IC_100_ci_high": 100.0}


@pytest.mark.parametrize("method, scipy_method", [("bca", "BCa"), ("percentile", "percentile")])
def test_intervals_agree_with_scipy(method, scipy_method):
    """Same data, independent resamples: the bounds agree within the Monte Carlo error."""
    settings = StatisticsSettings(method=method, resamples=100_000, seed=1)
    ours = intervals({"AD_100": SKEWED}, settings)
    theirs = scipy.stats.bootstrap((SKEWED,), np.mean, n_resamples=100_000, method=scipy_method,
                                   confidence_level=0.95, random_state=2).confidence_interval
    width = theirs.high - theirs.low
    assert abs(ours["AD_100_ci_low"] - theirs.low) < 0.02 * width
    assert abs(ours["AD_100_ci_high"] - theirs.high) < 0.02 * width


def test_bca_is_shifted_right_of_percentile_for_a_right_skewed_mean():
    bca = intervals({"m": SKEWED}, StatisticsSettings(method="bca"))
    pct = intervals({"m": SKEWED}, StatisticsSettings(method="percentile"))
    assert bca["m_ci_low"] > pct["m_ci_low"] and bca["m_ci_high"] > pct["m_ci_high"]


def test_bca_coverage_on_skewed_data():
    """95% BCa intervals of the mean of 40 exponential draws cover the true mean in about
    95% of 300 seeded repetitions (binomial sd 1.3 points)."""
    rng = np.random.default_rng(11)
    settings = StatisticsSettings(resamples=2000)
    hits = 0
    for rep in range(300):
        x = rng.exponential(10.0, 40)
        boot = bootstrap_means(x, settings.resamples, rep)
        low, high = interval_from(x, boot, settings)
        hits += low <= 10.0 <= high
    assert 0.90 <= hits / 300 <= 0.985


def test_seeded_and_degenerate_and_nan_columns():
    s = StatisticsSettings(resamples=500, seed=4)
    terms = {"AD_100": SKEWED[:30], "IC_100": np.zeros(30),
             "localisation_energy": np.r_[np.full(10, np.nan), np.linspace(0, 1, 20)],
             "localisation_energy_mask": np.full(30, np.nan)}
    a, b = intervals(terms, s, {"IC_100": 0.0}), intervals(terms, s, {"IC_100": 0.0})
    assert a == b                                                   # seeded
    assert (a["IC_100_ci_low"], a["IC_100_ci_high"]) == (0.0, 0.0)  # no spread
    assert a["localisation_energy_ci_low"] < 0.5 < a["localisation_energy_ci_high"]
    assert "localisation_energy_mask_ci_low" not in a               # nothing to resample
    assert intervals(terms, StatisticsSettings(resamples=500, seed=5)) != a


def test_the_interval_contains_the_estimate_with_few_images():
    """12 images (the smoke run), skewed terms and rare IC hits: theta in [low, high]."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = np.where(rng.random(12) < 0.2, 100.0, 0.0)
        y = 100 * rng.beta(0.3, 3, 12)
        out = intervals({"IC": x, "AD": y}, StatisticsSettings(resamples=1000, seed=1))
        for key, v in (("IC", x), ("AD", y)):
            assert out[f"{key}_ci_low"] <= v.mean() <= out[f"{key}_ci_high"]


# -- paired tests -----------------------------------------------------------------------------
def _block_draws(kind: str, n: int, resamples: int, seed: int) -> np.ndarray:
    """The draws as the statistics were first made: whole blocks of 1,000 resamples."""
    rng, out = np.random.default_rng(seed), []
    for start in range(0, resamples, 1000):
        k = min(1000, resamples - start)
        out.append(rng.integers(0, n, size=(k, n), dtype=np.int32) if kind == "bootstrap"
                   else rng.integers(0, 2, size=(k, n), dtype=np.int8))
    return np.concatenate(out)


@pytest.mark.parametrize("n", [13, 50, 333])
def test_slicing_bounds_memory_and_keeps_every_number(monkeypatch, n):
    """Draws are cut in slices of at most SLICE_ELEMENTS (a few rows here, as for 50,000
    images by default), and the bootstrap means and sign-flip p values are bit for bit those
    of whole 1,000-resample blocks, for an odd and an even n, a resample count that is not a
    multiple of the slice, and one of 4."""
    from harness.metrics import statistics
    rng = np.random.default_rng(1)
    x = rng.exponential(5.0, (n, 2))
    d = rng.normal(0.3, 1.0, (n, 3))
    resamples = 2_501
    idx = _block_draws("bootstrap", n, resamples, seed=4)
    expected_means = np.stack([x[:, j][idx].mean(axis=1) for j in range(2)], axis=1)
    signs = 1.0 - 2.0 * _block_draws("signs", n, resamples, seed=4)
    hits = (np.abs(signs @ d) >= np.abs(d.sum(axis=0)) - 1e-9 * np.abs(d).sum(axis=0)).sum(0)
    expected_p = (hits + 1) / (resamples + 1)
    monkeypatch.setattr(statistics, "SLICE_ELEMENTS", 7 * n)     # slices of 4 rows
    sliced = list(statistics._slices(resamples, n))
    assert {k for _, k in sliced[:-1]} == {4} and sum(k for _, k in sliced) == resamples
    np.testing.assert_array_equal(bootstrap_means(x, resamples, 4), expected_means)
    np.testing.assert_array_equal(sign_flip_pvalues(d, resamples, 4), expected_p)


def test_sign_flip_exact_by_hand():
    """d = (1, 2, 3): the 8 sign vectors give |sum| = 6, 4, 2, 0, 0, 2, 4, 6; two reach 6."""
    assert sign_flip_pvalues(np.array([[1.0], [2.0], [3.0]]), 10_000, 0)[0] == 0.25
    assert sign_flip_pvalues(np.zeros((5, 1)), 10_000, 0)[0] == 1.0


def test_sign_flip_agrees_with_scipy_paired_permutation_test():
    """SciPy's paired ('samples') permutation test swaps the two values of each image, i.e.
    flips the sign of each difference: exact p values must be equal."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(1.0, 1.0, 12), rng.normal(0.4, 1.0, 12)
    ours = sign_flip_pvalues((a - b)[:, None], 10_000, 0)[0]
    theirs = scipy.stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                                          permutation_type="samples", n_resamples=np.inf,
                                          alternative="two-sided").pvalue
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_monte_carlo_sign_flip_is_close_to_exact():
    d = np.random.default_rng(2).normal(0.5, 2.0, (20, 1))
    exact = sign_flip_pvalues(d, 2 ** 20, 0)[0]
    assert abs(sign_flip_pvalues(d, 10_000, 3)[0] - exact) < 0.015


def test_holm_by_hand():
    """p = (.01, .04, .03, .005): sorted x (4, 3, 2, 1) = .02, .03, .06, .04 -> running max."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])      # 2 x .5 = 1, then max(1, .9)


def test_best_only_when_better_than_every_other_row():
    rng = np.random.default_rng(0)
    base = rng.normal(30, 10, 200)
    s = StatisticsSettings(resamples=2000)
    terms = {"good": base - 10 + rng.normal(0, 1, 200), "mid": base + rng.normal(0, 1, 200),
             "bad": base + 10 + rng.normal(0, 1, 200)}
    ad = compare("AD_100", terms, lower_is_better=True, settings=s)
    assert (ad.best, ad.second) == ("good", "mid") and ad.marks() == {"good": 1, "mid": 2}
    assert all(p["significant"] for p in ad.pairs)
    ic = compare("IC_100", terms, lower_is_better=False, settings=s)
    assert (ic.best, ic.second) == ("bad", "mid")
    twin = {"good": terms["good"], "twin": terms["good"][::-1].copy(), "bad": terms["bad"]}
    tied = compare("AD_100", twin, True, s)        # two rows within noise: nobody is best
    assert tied.best is None and tied.marks() == {}
    assert compare("AD_100", {"only": base}, True, s).best is None


def test_per_image_terms_average_to_aggregate():
    rng = np.random.default_rng(3)
    n = 40
    y = rng.uniform(0, 1, n)
    y[0] = 0.0                                             # a term with Y = 0 adds 0 to AD
    table = pa.table({"image_id": [str(i) for i in range(n)], "Y": y,
                      "O_100": y * rng.uniform(0.5, 1.5, n), "O_15": rng.uniform(0, 1, n),
                      "degenerate": [False] * n, "forward_passes": [1.0] * n,
                      "seconds": [0.1] * n, "energy_box": rng.uniform(0, 1, n)})
    agg = aggregate(table, (1.0, 0.15), 1, n)
    terms = per_image_terms(table, (1.0, 0.15))
    for key in ("AD_100", "IC_100", "AD_15", "IC_15"):
        assert terms[key].mean() == pytest.approx(agg[key], rel=1e-12)
    assert set(LOCALISATION.values()) == set(localisation.energy_metrics(
        {c: [0.5] for c in LOCALISATION})) - {"localisation_images"}      # a count, not a mean
    assert terms["localisation_energy"].mean() == pytest.approx(
        localisation.energy_metrics(table)["localisation_energy"])


# -- sample size, settings, speed -------------------------------------------------------------
def test_images_needed_by_hand():
    """(1.959964 * 10 / 1)^2 = 384.15 -> 385; half the half-width: four times the images."""
    assert images_needed(10.0, 1.0) == 385
    assert images_needed(10.0, 0.5) == math.ceil((1.959963984540054 * 20) ** 2) == 1537
    assert images_needed(0.0, 1.0) == 1
    sizes = sample_sizes({"AD_100": {"a": np.array([0.0, 10.0, 20.0]),
                                     "b": np.array([0.0, 30.0, 60.0])}}, StatisticsSettings())
    assert sizes["AD_100"] == {"sd": 30.0, "method": "b", "images": images_needed(30.0, 1.0)}


def test_settings_round_trip_through_mlflow_params():
    s = StatisticsSettings(resamples=2000, confidence=0.9, method="percentile", seed=3,
                           alpha=0.01, half_width=0.5)
    assert StatisticsSettings.from_params(s.as_params()) == s
    assert StatisticsSettings.from_params({}) == StatisticsSettings()
    with pytest.raises(ValueError, match="method"):
        StatisticsSettings(method="bcx")


def test_speed_10000_resamples_of_2000_images():
    """The issue's budget: well under a second per metric (README/report quote the number)."""
    rng = np.random.default_rng(0)
    x = 100 * rng.beta(0.5, 3, 2000)
    intervals({"AD_100": x}, StatisticsSettings())                    # warm-up
    t0 = time.perf_counter()
    intervals({"AD_100": x}, StatisticsSettings())
    one_metric = time.perf_counter() - t0
    d = rng.normal(0, 1, (2000, 28))                                   # 8 methods: 28 pairs
    t0 = time.perf_counter()
    sign_flip_pvalues(d, 10_000, 0)
    pairs = time.perf_counter() - t0
    assert one_metric < 1.0 and pairs < 1.5, (one_metric, pairs)
