"""Goodness of fit of |g| against candidate distributions (paper section 3, Table 1, Fig. A.2).

The paper's test: Kolmogorov-Smirnov statistic D (the largest distance between the empirical CDF
of |g| and the fitted CDF) for a lognormal against a normal and the other candidates of the
appendix. As in the paper's section 3 (a fit of the non-zero magnitudes), every test is run on the
finite non-zero magnitudes |g| of a
random subsample (the authors used about 30,000 values per tensor).

What "normal" means for a magnitude: neural gradients are centred at zero, so the symmetric
candidates are the zero-mean hypotheses g ~ F(0, scale), and |g| then follows the *folded* (half)
distribution. Testing |g| against a two-sided normal with a fitted mean would be a strawman (it
puts mass below zero), so the symmetric families are folded at 0; the log-families model |g|
directly. Each candidate is fitted by a closed-form estimator, so a table over many layers costs
only sorts (no iterative optimiser per layer):

==========  ============================================  =========================================
name        hypothesis for |g| (scipy.stats)              estimator (on a = |g|)
==========  ============================================  =========================================
normal      halfnorm(scale)      (g ~ N(0, s^2))          MLE: scale = sqrt(mean a^2)
lognormal   lognorm(s=sigma, scale=e^mu)                  MLE: mu, sigma = mean, std of ln a
laplace     expon(scale)         (g ~ Laplace(0, b))      MLE: scale = mean a
uniform     uniform(0, max)      (g ~ U(-m, m))           MLE: m = max a
cauchy      halfcauchy(scale)    (g ~ Cauchy(0, c))       quantile: scale = median a
logistic    halflogistic(scale)  (g ~ Logistic(0, s))     moment: scale = mean a / (2 ln 2)
loglaplace  loglaplace(c=1/b, scale=e^m)                  MLE on ln a: m = median,
                                                          b = mean |ln a - m|
==========  ============================================  =========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from gradcomp.numerics._checks import require_float_tensor, require_int_range

__all__ = ["DISTRIBUTIONS", "KSResult", "ks_table", "fit_distribution", "finite_magnitudes"]


def _fit_normal(a, la):
    return stats.halfnorm(scale=math.sqrt(float(np.mean(a * a))))


def _fit_lognormal(a, la):
    return stats.lognorm(s=la.std(), scale=math.exp(la.mean()))


def _fit_laplace(a, la):
    return stats.expon(scale=a.mean())


def _fit_uniform(a, la):
    return stats.uniform(loc=0.0, scale=a.max())


def _fit_cauchy(a, la):
    return stats.halfcauchy(scale=np.median(a))


def _fit_logistic(a, la):
    return stats.halflogistic(scale=a.mean() / (2 * math.log(2)))


def _fit_loglaplace(a, la):
    m = np.median(la)
    b = np.abs(la - m).mean()
    return stats.loglaplace(c=1.0 / b, scale=math.exp(m))


DISTRIBUTIONS = {
    "normal": _fit_normal,
    "lognormal": _fit_lognormal,
    "laplace": _fit_laplace,
    "uniform": _fit_uniform,
    "cauchy": _fit_cauchy,
    "logistic": _fit_logistic,
    "loglaplace": _fit_loglaplace,
}


@dataclass(frozen=True)
class KSResult:
    distribution: str
    statistic: float  # KS D
    pvalue: float
    n: int  # values tested


def finite_magnitudes(
    t: torch.Tensor, sample_size: int | None = 30_000, seed: int = 0
) -> np.ndarray:
    """|t| over finite non-zero entries as float64 numpy, subsampled without replacement.

    The subsample is drawn with a fixed ``seed`` (reproducible); ``sample_size=None`` keeps all.
    """
    require_float_tensor(t, "t")
    x = t.detach().reshape(-1)
    a = x.abs()
    a = a[torch.isfinite(a) & (a > 0)].to(torch.float64).cpu().numpy()
    if sample_size is not None and a.size > sample_size:
        rng = np.random.default_rng(seed)
        a = rng.choice(a, size=sample_size, replace=False)
    return a


def fit_distribution(name: str, magnitudes: np.ndarray):
    """Frozen scipy distribution of family ``name`` fitted to positive ``magnitudes``."""
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {', '.join(DISTRIBUTIONS)}; got {name!r}"
        )
    a = np.asarray(magnitudes, dtype=np.float64)
    return DISTRIBUTIONS[name](a, np.log(a))


def ks_table(
    t: torch.Tensor,
    distributions=tuple(DISTRIBUTIONS),
    sample_size: int | None = 30_000,
    seed: int = 0,
) -> list[KSResult]:
    """KS statistic D and p-value of |t| against each fitted candidate distribution.

    Args:
        t: floating tensor, any dtype/device (non-floating raises TypeError). Zeros and non-finite
            values are excluded (count them with ``fit_lognormal``).
        distributions: names from ``DISTRIBUTIONS``; unknown names raise ValueError.
        sample_size: subsample size (without replacement, fixed ``seed``); None uses every value.

    Returns:
        One KSResult per distribution, in the order given. With fewer than 2 usable values the
        statistic and p-value are NaN and ``n`` says why (never raises for data content).
    """
    if sample_size is not None:
        require_int_range(sample_size, "sample_size", 2, 2**40)
    for name in distributions:
        if name not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}; got {name!r}"
            )
    a = finite_magnitudes(t, sample_size, seed)
    out = []
    degenerate = a.size < 2 or float(a.max()) == float(a.min())
    for name in distributions:
        if degenerate:
            out.append(KSResult(name, math.nan, math.nan, int(a.size)))
            continue
        dist = fit_distribution(name, a)
        res = stats.kstest(a, dist.cdf)
        out.append(KSResult(name, float(res.statistic), float(res.pvalue), int(a.size)))
    return out
