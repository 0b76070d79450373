"""Error bars and significance for per-image metrics: bootstrap intervals, paired tests, n.

Every number of Table 1 is a mean over images of a per-image term (docs/protocol.md 2.2 and
section 9): for an image i and a kept fraction nu,

    AD term   a_i = 100 * max(0, Y_i - O_i) / Y_i     (0 where Y_i <= 0)
    IC term   c_i = 100 * [O_i > Y_i]
    AD = mean_i a_i,   IC = mean_i c_i

and likewise the deletion/insertion AUCs and the localisation energy shares. This module
turns the per-image terms into

1. **Confidence intervals**: a seeded nonparametric bootstrap over images (Efron & Tibshirani
   1993): R resamples of n images with replacement, theta*_r = the mean of resample r.

   - ``percentile``: [q_{(1-c)/2}, q_{(1+c)/2}] of the theta*_r (c = the confidence level).
   - ``bca`` (default): bias-corrected and accelerated (Efron 1987; DiCiccio & Efron 1996).
     With Phi the standard normal CDF, z_q = Phi^-1(q),

         z0 = Phi^-1( (#{theta*_r < theta} + #{theta*_r = theta} / 2) / R )
         a  = sum_i d_i^3 / (6 * (sum_i d_i^2)^(3/2)),  d_i = x_i - mean(x)
              (the jackknife acceleration; for a mean it has this closed form)
         q(z) = Phi( z0 + (z0 + z) / (1 - a * (z0 + z)) )
         interval = [quantile(theta*, q(z_{(1-c)/2})), quantile(theta*, q(z_{(1+c)/2}))]

     Why BCa: AD terms are bounded below by 0 with a long right tail (most images lose
     little confidence, a few lose nearly all), and IC is a proportion that sits near 0 at
     low kept fractions. The percentile interval is only first-order accurate and is
     shifted for such skewed statistics; BCa corrects the median bias (z0) and the
     skewness (a) and is second-order accurate, at the cost of one closed-form jackknife.
     z0's proportion is clipped to [1/(2R), 1 - 1/(2R)] so that it stays finite; with
     |a| < 1/6 (always true for a mean) the denominator then stays positive.

   A term that is the same for every image has no spread: its interval is [theta, theta].
   Terms that are NaN (no annotation for a localisation score) are left out before
   resampling, as the mean leaves them out.

2. **Paired comparisons** between the methods of one backbone, evaluated on the same
   images: for methods A and B the per-image differences d_i = x_i^A - x_i^B and the
   two-sided sign-flip permutation test of H0 "A and B are exchangeable on every image"
   (Fisher 1935; Good 2005, sec. 3.1):

         T = |sum_i d_i|,   T*_r = |sum_i s_ri d_i|,  s_ri = +-1 with probability 1/2
         p = (1 + #{T*_r >= T}) / (R + 1)           (Monte Carlo, R sign vectors)
         p = #{T*_s >= T} / 2^n                     (exact, all 2^n vectors, when 2^n <= R)

   It needs no distributional assumption (IC's differences take only the values -100, 0,
   100) and is exact or valid-by-construction in the Monte Carlo form. Within one backbone
   and metric, the m = k(k-1)/2 pairs of k methods form one family; their p values are
   **Holm-adjusted** (Holm 1979): with p_(1) <= ... <= p_(m),
   p~_(j) = max_{l <= j} min(1, (m - l + 1) p_(l)), which controls the family-wise error
   rate at alpha under any dependence between the tests.

   A method is **best** in a column when it is better (lower AD, deletion; higher IC,
   insertion, localisation) than every other method with Holm-adjusted p < alpha; it is
   **second** when, with a best method present, it is so against every method but that one.

3. **Images needed** for a chosen half-width h of the interval, from the observed spread:
   n = ceil((z * s / h)^2) with z = Phi^-1((1 + c) / 2) and s the sample standard deviation
   of the per-image terms (the normal approximation of the mean's interval); per backbone
   and metric the largest s of its methods is used, so that every row reaches h.

Everything is vectorised with numpy and seeded (``numpy.random.default_rng(seed)``): the
same rows and settings give the same bounds and p values. Resamples are drawn in slices of
at most ``SLICE_ELEMENTS`` draws (``_slices``), so that memory stays bounded whatever the
number of images (blocks of 1,000 resamples, as before, held 1,000 x n indices and their
gathered float64 values at once: 600 MB for a 50,000-image cell). numpy's draws do not
depend on how the stream is cut, so the numbers are those of the 1,000-row blocks: the
bootstrap's int32 indices come from the bit generator's continuous stream of 32-bit words,
and each sign flip's int8 bit takes one byte of a 32-bit word, so that slices of a multiple
of 4 draws use exactly the bytes one call would (tests/metrics/test_statistics.py).

References: Efron, B.: Better bootstrap confidence intervals. JASA 82(397), 1987. DiCiccio,
T.J., Efron, B.: Bootstrap confidence intervals. Statistical Science 11(3), 1996. Efron, B.,
Tibshirani, R.J.: An Introduction to the Bootstrap. Chapman & Hall, 1993. Holm, S.: A simple
sequentially rejective multiple test procedure. Scand. J. Statistics 6(2), 1979. Good, P.:
Permutation, Parametric and Bootstrap Tests of Hypotheses, 3rd ed. Springer, 2005.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

SLICE_ELEMENTS = 1 << 22         # draws held at once: 16 MB of int32 indices (32 MB float64)
METHODS = ("bca", "percentile")
_NORMAL = NormalDist()


@dataclass(frozen=True)
class StatisticsSettings:
    """The spec's ``statistics`` section, resolved (seed: the spec's when not given)."""

    resamples: int = 10_000
    confidence: float = 0.95
    method: str = "bca"
    seed: int = 0
    alpha: float = 0.05
    half_width: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.confidence < 1 or not 0 < self.alpha < 1:
            raise ValueError("confidence and alpha must be in (0, 1)")
        if self.resamples < 1 or self.half_width <= 0:
            raise ValueError("resamples must be >= 1 and half_width > 0")

    def as_params(self) -> dict[str, str]:
        """MLflow parameters ``statistics.<field>`` (read back by ``from_params``)."""
        return {f"statistics.{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> "StatisticsSettings":
        """The settings logged by ``as_params``; defaults for the ones not logged."""
        out = {}
        for f in fields(cls):
            value = params.get(f"statistics.{f.name}")
            if value is not None:
                out[f.name] = {"int": int, "float": float, "str": str}[f.type](value)
        return cls(**out)

    @property
    def z(self) -> float:
        """z_{(1+c)/2}: 1.96 at 95%."""
        return _NORMAL.inv_cdf((1 + self.confidence) / 2)


# -- intervals --------------------------------------------------------------------------------
def bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` bootstrap resamples of the rows of ``values``.

    ``values``: (n,) or (n, M) float64 (M metrics resampled with the same image draws);
    returns (resamples,) or (resamples, M)."""
    x = np.asarray(values, dtype=np.float64)
    flat = x.reshape(len(x), -1)
    n, m = flat.shape
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, m))
    index_type = np.int32 if n < 2**31 else np.int64
    for start, k in _slices(resamples, n):
        idx = rng.integers(0, n, size=(k, n), dtype=index_type)
        for j in range(m):
            out[start:start + k, j] = flat[:, j][idx].mean(axis=1)
    return out if x.ndim > 1 else out[:, 0]


def _slices(resamples: int, n: int):
    """(first resample, count) of the slices the resamples of ``n`` images are drawn in: at
    most ``SLICE_ELEMENTS`` draws (but at least 4 rows), a multiple of 4 rows but the last, so
    that the draws do not depend on the slicing (module docstring)."""
    rows = max(4, SLICE_ELEMENTS // max(n, 1) // 4 * 4)
    for start in range(0, resamples, rows):
        yield start, min(rows, resamples - start)


def _bca_levels(x: np.ndarray, boot: np.ndarray, theta: float,
                settings: StatisticsSettings) -> tuple[float, float]:
    """The BCa quantile levels (module docstring, 1.)."""
    r = len(boot)
    tol = 1e-9 * max(1.0, abs(theta))
    below = np.count_nonzero(boot < theta - tol)
    equal = np.count_nonzero(np.abs(boot - theta) <= tol)
    prop = min(max((below + equal / 2) / r, 1 / (2 * r)), 1 - 1 / (2 * r))
    z0 = _NORMAL.inv_cdf(prop)
    d = x - x.mean()
    accel = float((d ** 3).sum() / (6 * (d ** 2).sum() ** 1.5))
    levels = []
    for q in ((1 - settings.confidence) / 2, (1 + settings.confidence) / 2):
        z = z0 + _NORMAL.inv_cdf(q)
        levels.append(_NORMAL.cdf(z0 + z / (1 - accel * z)))
    return levels[0], levels[1]


def interval_from(x: np.ndarray, boot: np.ndarray, settings: StatisticsSettings,
                  point: float | None = None) -> tuple[float, float]:
    """(low, high) of one metric from its per-image terms ``x`` and their bootstrap means."""
    theta = float(x.mean()) if point is None else float(point)
    if len(x) < 2 or not np.ptp(x) > 0:
        return theta, theta
    if settings.method == "bca":
        lo, hi = _bca_levels(x, boot, theta, settings)
    else:
        lo, hi = (1 - settings.confidence) / 2, (1 + settings.confidence) / 2
    low, high = np.quantile(boot, [lo, hi])
    return float(low), float(high)


def intervals(terms: Mapping[str, Sequence[float]], settings: StatisticsSettings,
              points: Mapping[str, float] | None = None) -> dict[str, float]:
    """``{<metric>_ci_low, <metric>_ci_high}`` for every metric of ``terms`` (metric ->
    per-image terms of one cell). Complete columns share one set of image draws; a column
    with NaNs is resampled over its finite terms. ``points``: the logged estimates (used as
    theta, and as both bounds when a term does not vary)."""
    points = points or {}
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in terms.items()}
    complete = [k for k, v in arrays.items() if len(v) and np.isfinite(v).all()]
    partial = [k for k, v in arrays.items() if k not in complete and np.isfinite(v).any()]
    out: dict[str, float] = {}
    if complete:
        stacked = np.stack([arrays[k] for k in complete], axis=1)
        boot = bootstrap_means(stacked, settings.resamples, settings.seed)
        for j, key in enumerate(complete):
            low, high = interval_from(stacked[:, j], boot[:, j], settings, points.get(key))
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low, high
    for key in partial:
        x = arrays[key][np.isfinite(arrays[key])]
        boot = bootstrap_means(x, settings.resamples, settings.seed)
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = interval_from(x, boot, settings,
                                                                    points.get(key))
    return out


# -- paired comparisons -----------------------------------------------------------------------
def _sign_blocks(n: int, resamples: int, seed: int):
    """(sign matrix block (k, n) of +-1.0, exact?) blocks: every vector when 2^n <= R."""
    if 2 ** n <= resamples:
        codes = np.arange(2 ** n, dtype=np.int64)[:, None]
        bits = (codes >> np.arange(n, dtype=np.int64)) & 1
        yield 1.0 - 2.0 * bits, True
        return
    rng = np.random.default_rng(seed)
    for _, k in _slices(resamples, n):
        yield 1.0 - 2.0 * rng.integers(0, 2, size=(k, n), dtype=np.int8), False


def sign_flip_pvalues(diffs: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Two-sided sign-flip p values of ``diffs`` (n images, P pairs) -> (P,) (module doc, 2.)."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d.reshape(len(d), -1)
    n, pairs = d.shape
    if n == 0:
        return np.ones(pairs)
    observed = np.abs(d.sum(axis=0))
    tol = 1e-9 * np.abs(d).sum(axis=0)          # the identity flip reproduces T up to rounding
    hits, total, exact = np.zeros(pairs), 0, False
    for signs, exact in _sign_blocks(n, resamples, seed):
        hits += (np.abs(signs @ d) >= observed - tol).sum(axis=0)
        total += len(signs)
    return hits / total if exact else (hits + 1) / (total + 1)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p values, in the input's order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


@dataclass
class Comparison:
    """The paired tests of one metric between the methods of one backbone."""

    metric: str
    methods: list[str]                 # method ids, in table order
    means: list[float]
    lower_is_better: bool
    pairs: list[dict]                  # one per unordered pair: a, b, diff, p, p_holm, ...
    best: str | None = None
    second: str | None = None
    n: int = 0

    def marks(self) -> dict[str, int]:
        """{method id: 1 (best) or 2 (second)} for the table."""
        return {k: v for k, v in ((self.best, 1), (self.second, 2)) if k is not None}

    def significant(self, a: str, b: str) -> bool:
        """Is ``a`` significantly better than ``b``?"""
        return any(p["significant"] and p["better"] == a and {p["a"], p["b"]} == {a, b}
                   for p in self.pairs)


def compare(metric: str, terms: Mapping[str, np.ndarray], lower_is_better: bool,
            settings: StatisticsSettings) -> Comparison:
    """Paired sign-flip tests of every pair of ``terms`` (method id -> per-image terms,
    aligned on the same images), Holm-adjusted, and the best / second method."""
    ids = list(terms)
    x = np.stack([np.asarray(terms[k], dtype=np.float64) for k in ids], axis=1) \
        if ids else np.zeros((0, 0))
    keep = np.isfinite(x).all(axis=1) if ids else np.zeros(0, bool)
    x = x[keep]
    index = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))]
    diffs = np.stack([x[:, i] - x[:, j] for i, j in index], axis=1) if index else \
        np.zeros((len(x), 0))
    p = sign_flip_pvalues(diffs, settings.resamples, settings.seed)
    adjusted = holm(p)
    means = x.mean(axis=0) if len(x) else np.full(len(ids), np.nan)
    pairs = []
    for (i, j), p_raw, p_adj in zip(index, p, adjusted):
        diff = float(means[i] - means[j])
        better = ids[i] if (diff < 0) == lower_is_better else ids[j]
        pairs.append({"a": ids[i], "b": ids[j], "mean_a": float(means[i]),
                      "mean_b": float(means[j]), "diff": diff, "p": float(p_raw),
                      "p_holm": float(p_adj), "significant": bool(p_adj < settings.alpha
                                                                   and diff != 0),
                      "better": better if diff != 0 else ""})
    out = Comparison(metric, ids, [float(v) for v in means], lower_is_better, pairs, n=len(x))
    out.best, out.second = _winners(out)
    return out


def _winners(c: Comparison) -> tuple[str | None, str | None]:
    """The best (better than all others) and second (all but the best) methods, if any."""
    if len(c.methods) < 2:
        return None, None
    beats = {a: {b for b in c.methods if b != a and c.significant(a, b)} for a in c.methods}
    best = next((a for a in c.methods if len(beats[a]) == len(c.methods) - 1), None)
    if best is None:
        return None, None
    rest = [a for a in c.methods if a != best]
    second = next((a for a in rest if len(beats[a] - {best}) == len(rest) - 1), None) \
        if len(rest) > 1 else None
    return best, second


# -- sample size ------------------------------------------------------------------------------
def images_needed(sd: float, half_width: float, confidence: float = 0.95) -> int:
    """n = ceil((z * sd / h)^2): images for an interval of +-h on a mean with spread sd."""
    z = _NORMAL.inv_cdf((1 + confidence) / 2)
    if not sd > 0:
        return 1
    return max(1, math.ceil((z * sd / half_width) ** 2 - 1e-9))


def sample_sizes(terms: Mapping[str, Mapping[str, np.ndarray]],
                 settings: StatisticsSettings) -> dict[str, dict]:
    """Per metric (metric -> method id -> per-image terms): the largest sd over the methods,
    whose method it is, and the images needed for +-``settings.half_width``."""
    out = {}
    for metric, by_method in terms.items():
        sds = {}
        for method, x in by_method.items():
            x = np.asarray(x, dtype=np.float64)
            x = x[np.isfinite(x)]
            if len(x) > 1:
                sds[method] = float(x.std(ddof=1))
        if not sds:
            continue
        worst = max(sds, key=sds.get)
        out[metric] = {"sd": sds[worst], "method": worst,
                       "images": images_needed(sds[worst], settings.half_width,
                                               settings.confidence)}
    return out
