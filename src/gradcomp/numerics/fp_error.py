"""Expected relative error of FP quantization and the optimal format / scale (Eq. 3-4, Table 2).

The quantity is E|Q(x*s)/s - x| / |x| = E|Q(y) - y| / y with y = |x|*s (scaling by s is
exact in the relative error), for |x| lognormal (ln|x| ~ N(mu, sigma^2), sigma of the
*natural* log) or for x normal (the Fig. 3c baseline).

``method="exact"`` is the ground truth for ANY format (either semantics, subnormals or not,
any scale, nearest or stochastic rounding): the error is a piecewise function of y on the
format's grid, and on each grid interval it integrates in closed form against the density
through the partial moments P = int f, J = int f/y, K = int y f (normal CDFs for the
lognormal, exponential integrals for the normal). Summing over every grid interval (and the
saturation tail) gives the expectation to float64 accuracy; no quadrature error.
Limits: formats with more than 2^20 non-negative grid values (man_bits + exp_bits > ~20) are
refused; ``overflow="inf"`` formats have infinite expected error (any lognormal sample can
overflow), reported as inf.

``method="closed_form"`` is the paper's Eq. 4 (its in-range term rederived here as
2^-n1/(8 ln 2), with exact flush and saturation tails), for the
idealised format (semantics "paper") and nearest rounding only, generalised to a centre
m = mu + ln s: in-range error 2^-n1/(8 ln 2) (log-uniform mantissa assumption: off by about
5% for n1 = 0 and by less for larger n1), plus the flush and saturation tails, which are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from scipy import optimize, special

from gradcomp.numerics._checks import (
    require_choice,
    require_float_tensor,
    require_int_range,
    require_positive,
)
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import quantize_fp

__all__ = [
    "expected_relative_error",
    "optimal_scale",
    "optimal_centre",
    "optimal_format",
    "OptimalFormat",
    "monte_carlo_relative_error",
    "empirical_relative_error",
    "empirical_optimal_format",
    "split_formats",
]

_MAX_GRID = 1 << 20
_DISTRIBUTIONS = ("lognormal", "normal")
_ROUNDINGS = ("nearest", "stochastic")
_SEMANTICS = ("paper", "ieee")


def _phi_diff(a, b):
    """Phi(b) - Phi(a) for a <= b, computed in the tail where it does not cancel."""
    return np.where(a > 0, special.ndtr(-a) - special.ndtr(-b), special.ndtr(b) - special.ndtr(a))


def _lognormal_moments(A, B, m, s):
    """P, J, K of ln y ~ N(m, s^2) over [A, B] (arrays broadcast; A may be 0, B may be inf)."""
    with np.errstate(divide="ignore"):
        la, lb = np.log(A), np.log(B)
    P = _phi_diff((la - m) / s, (lb - m) / s)
    J = np.exp(-m + s * s / 2) * _phi_diff((la - m + s * s) / s, (lb - m + s * s) / s)
    K = np.exp(m + s * s / 2) * _phi_diff((la - m - s * s) / s, (lb - m - s * s) / s)
    return P, J, K


def _halfnormal_moments(A, B, m, s):
    """P, J, K of |x|, x ~ N(0, (s e^m)^2) over [A, B] (m: log of the scale applied)."""
    sd = s * np.exp(m)
    ta, tb = A / sd, B / sd
    P = 2 * _phi_diff(ta, tb)
    with np.errstate(divide="ignore", invalid="ignore"):
        # int_A^B f/y dy = (E1(ta^2/2) - E1(tb^2/2)) / (sd sqrt(2 pi)); E1(0) = inf
        J = (special.exp1(ta * ta / 2) - special.exp1(tb * tb / 2)) / (sd * math.sqrt(2 * np.pi))
    K = 2 * sd / math.sqrt(2 * np.pi) * (np.exp(-ta * ta / 2) - np.exp(-tb * tb / 2))
    return P, J, K


@lru_cache(maxsize=512)
def _intervals(fmt: FPFormat):
    grid = fmt.grid()
    if grid.size > _MAX_GRID:
        raise ValueError(
            f"method 'exact' supports formats with at most 2^20 grid values; {fmt.name} has "
            f"{grid.size}"
        )
    lo, hi = grid[:-1], grid[1:]
    split = (lo + hi) / 2
    if not fmt.subnormals:
        split[0] = hi[0]  # nearest flushes [0, min_normal) to 0 (Eq. 2)
    return lo, hi, split, grid[-1]


def _times(c, J):
    """c * J with 0 * inf = 0 (a zero grid point times a divergent 1/y moment)."""
    with np.errstate(invalid="ignore"):
        return np.where(c == 0, 0.0, c * J)


def _exact(fmt, m, s, rounding, distribution):
    """Expected relative error for centres ``m`` (array, ln-scale applied) and spread s."""
    moments = _lognormal_moments if distribution == "lognormal" else _halfnormal_moments
    lo, hi, split, top = _intervals(fmt)
    m = np.asarray(m, dtype=np.float64)[..., None]
    if rounding == "nearest":
        P1, J1, _ = moments(lo, split, m, s)
        P2, J2, _ = moments(split, hi, m, s)
        inner = (P1 - _times(lo, J1)) + (_times(hi, J2) - P2)
    else:
        P, J, K = moments(lo, hi, m, s)
        inner = 2.0 / (hi - lo) * (-K + (lo + hi) * P - _times(lo * hi, J))
    err = inner.sum(-1)
    Pt, Jt, _ = moments(np.array([top]), np.array([np.inf]), m, s)
    tail = (Pt - top * Jt).sum(-1)
    if fmt.overflow == "inf":
        return np.where(Pt.sum(-1) > 0, np.inf, err)
    return err + tail


def _closed_form(fmt, m, s):
    if fmt.semantics != "paper":
        raise ValueError("method 'closed_form' is the paper's Eq. 4: it needs semantics 'paper'")
    a = 2 ** (fmt.exp_bits - 1) * math.log(2.0)
    m = np.asarray(m, dtype=np.float64)
    p_in = _phi_diff((-a - m) / s, (a - m) / s)
    p_lo = special.ndtr((-a - m) / s)
    p_hi = special.ndtr((m - a) / s)
    sat = np.exp(a - m + s * s / 2) * special.ndtr((m - s * s - a) / s)
    return 2.0 ** (-fmt.man_bits) / (8 * math.log(2.0)) * p_in + p_lo + p_hi - sat


def _as_format(fmt) -> FPFormat:
    if isinstance(fmt, str):
        return FPFormat.from_name(fmt)
    if not isinstance(fmt, FPFormat):
        raise TypeError(f"fmt must be an FPFormat or a format name, got {type(fmt).__name__}")
    return fmt


def expected_relative_error(
    fmt,
    mu: float,
    sigma: float,
    scale: float = 1.0,
    method: str = "exact",
    rounding: str = "nearest",
    distribution: str = "lognormal",
) -> float:
    """E|Q(x*s)/s - x| / |x| for ln|x| ~ N(mu, sigma^2) (natural log), as a float.

    Args:
        fmt: FPFormat or name. mu: mean of ln|x| (any finite value). sigma: std of ln|x| (> 0).
        scale: s > 0, finite. method: ``"exact"`` (any format; see module doc) or
            ``"closed_form"`` (paper semantics, nearest rounding, lognormal only).
        rounding: ``"nearest"`` (ties to even; measure zero) or ``"stochastic"``.
        distribution: ``"lognormal"`` or ``"normal"`` (x ~ N(0, sigma^2): then ``sigma`` is the
            std of x itself and ``mu`` is ignored).
    Zeros of x are excluded (relative error undefined); values that flush to 0 count as 1;
    saturated values count |max - y|/y; overflow to inf gives inf.
    """
    fmt = _as_format(fmt)
    mu = float(mu)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}")
    sigma = require_positive(sigma, "sigma")
    scale = require_positive(scale, "scale")
    require_choice(method, "method", ("exact", "closed_form"))
    require_choice(rounding, "rounding", _ROUNDINGS)
    require_choice(distribution, "distribution", _DISTRIBUTIONS)
    m = (mu if distribution == "lognormal" else 0.0) + math.log(scale)
    if method == "closed_form":
        if rounding != "nearest" or distribution != "lognormal":
            raise ValueError("method 'closed_form' needs rounding 'nearest' and a lognormal")
        return float(_closed_form(fmt, m, sigma))
    return float(_exact(fmt, m, sigma, rounding, distribution))


@lru_cache(maxsize=4096)
def _best_centre(fmt, sigma, rounding, distribution, points: int = 161) -> tuple[float, float]:
    """The centre m* = mu + ln s* minimising the exact error, and that error."""
    lo_ln = math.log(fmt.min_subnormal)
    hi_ln = math.log(fmt.max_normal)
    if distribution == "normal":
        # the scale maps sigma*s onto the grid: search centres of log(sigma*s) over the range
        lo_ln, hi_ln = lo_ln - math.log(sigma) - 2, hi_ln - math.log(sigma) + 2
    grid = np.linspace(lo_ln - 1.0, hi_ln + 1.0, points)
    errs = _exact(fmt, grid, sigma, rounding, distribution)
    # a flat optimum (a wide format for a narrow distribution): take the middle of the plateau
    flat = np.flatnonzero(errs <= np.nanmin(errs) * (1 + 1e-9))
    i = int(flat[len(flat) // 2])
    step = grid[1] - grid[0]
    res = optimize.minimize_scalar(
        lambda t: float(_exact(fmt, t, sigma, rounding, distribution)),
        bounds=(grid[i] - step, grid[i] + step),
        method="bounded",
        options={"xatol": 1e-5},
    )
    if res.fun <= errs[i]:
        return float(res.x), float(res.fun)
    return float(grid[i]), float(errs[i])


def optimal_centre(fmt, sigma: float, rounding: str = "nearest") -> float:
    """The optimal centre c = mu + ln s* for a lognormal of spread ``sigma`` (mu-free form).

    :func:`optimal_scale` is exp(c - mu); the per-layer optimal scaling policy tabulates c.
    """
    fmt = _as_format(fmt)
    sigma = require_positive(sigma, "sigma")
    require_choice(rounding, "rounding", _ROUNDINGS)
    return _best_centre(fmt, sigma, rounding, "lognormal")[0]


def optimal_scale(fmt, mu: float, sigma: float, rounding: str = "nearest",
                  distribution: str = "lognormal") -> float:
    """The scale s > 0 minimising the exact expected relative error (1-D search over ln s).

    A grid search over the format's whole log range, refined by a bounded Brent step (the
    error is smooth in ln s but can ripple with period ln 2 for small sigma). For the normal
    distribution ``mu`` is ignored and ``sigma`` is the std of x.
    """
    fmt = _as_format(fmt)
    mu = float(mu)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}")
    sigma = require_positive(sigma, "sigma")
    require_choice(rounding, "rounding", _ROUNDINGS)
    require_choice(distribution, "distribution", _DISTRIBUTIONS)
    centre, _ = _best_centre(fmt, sigma, rounding, distribution)
    return math.exp(centre - (mu if distribution == "lognormal" else 0.0))


def split_formats(bits: int, semantics: str = "paper") -> list[FPFormat]:
    """Every 1-n2-n1 split of ``bits`` total bits (n2 = 1..bits-1, n1 = bits-1-n2)."""
    require_int_range(bits, "bits", 3, 32)
    require_choice(semantics, "semantics", _SEMANTICS)
    make = FPFormat.paper if semantics == "paper" else FPFormat.ieee
    return [make(n2, bits - 1 - n2) for n2 in range(1, bits) if n2 <= 8 and bits - 1 - n2 <= 23]


@dataclass(frozen=True)
class OptimalFormat:
    """Result of :func:`optimal_format`: the best split and the error of every split.

    ``scale`` is the scale used for the best format for a distribution centred at mu = 0
    (multiply by e^-mu for another mu). ``table`` rows: (format name, n2, n1, error, scale).
    """

    fmt: FPFormat
    error: float
    scale: float
    table: list = field(default_factory=list)


def optimal_format(
    bits: int,
    sigma: float,
    semantics: str = "paper",
    distribution: str = "lognormal",
    rounding: str = "nearest",
    scale: str = "optimal",
) -> OptimalFormat:
    """The 1-n2-n1 split of ``bits`` bits with the least exact expected relative error.

    Args:
        bits: total bits incl. sign (3..32). sigma: std of ln|x| (lognormal) or of x (normal).
        semantics: ``"paper"`` (Eq. 2 formats) or ``"ieee"`` (eXmY, subnormals, saturating).
        scale: ``"optimal"``: each split is scored at its own optimal scale (the per-layer
            scaling of section 4.4); ``"centered"``: at s = 1 with ln|x| centred at 0
            (the paper's symmetric-range assumption; lognormal only).
    Ties between splits go to the smaller n2.
    """
    require_int_range(bits, "bits", 3, 32)
    sigma = require_positive(sigma, "sigma")
    require_choice(scale, "scale", ("optimal", "centered"))
    require_choice(distribution, "distribution", _DISTRIBUTIONS)
    rows = []
    for fmt in split_formats(bits, semantics):
        if scale == "optimal":
            centre, err = _best_centre(fmt, sigma, rounding, distribution)
            s = math.exp(centre)
        else:
            if distribution != "lognormal":
                raise ValueError("scale 'centered' needs distribution 'lognormal'")
            s, err = 1.0, float(_exact(fmt, 0.0, sigma, rounding, distribution))
        rows.append((fmt.name, fmt.exp_bits, fmt.man_bits, err, s))
    best = min(range(len(rows)), key=lambda i: (rows[i][3], rows[i][1]))
    fmts = split_formats(bits, semantics)
    return OptimalFormat(fmt=fmts[best], error=rows[best][3], scale=rows[best][4], table=rows)


def monte_carlo_relative_error(
    fmt,
    mu: float,
    sigma: float,
    scale: float = 1.0,
    n: int = 200_000,
    rounding: str = "nearest",
    distribution: str = "lognormal",
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Monte-Carlo estimate of the expected relative error: (mean, standard error of the mean).

    Samples n float64 values (ln|x| ~ N(mu, sigma^2), or x ~ N(0, sigma^2)), quantizes them with
    :func:`quantize_fp` (float64 path) and averages |Q(x*s)/s - x|/|x|.
    """
    fmt = _as_format(fmt)
    sigma = require_positive(sigma, "sigma")
    require_int_range(n, "n", 2, 1 << 30)
    require_choice(distribution, "distribution", _DISTRIBUTIONS)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    x = torch.exp(float(mu) + sigma * z) if distribution == "lognormal" else sigma * z
    x = x[x != 0]
    q = quantize_fp(x, fmt, rounding, scale=scale, generator=generator, compile=False)
    e = ((q - x).abs() / x.abs()).double()
    return float(e.mean()), float(e.std() / math.sqrt(e.numel()))


def empirical_relative_error(sample: torch.Tensor, fmt, scale=1.0, rounding: str = "nearest",
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean |Q(x*s)/s - x|/|x| over the finite non-zero entries of ``sample`` (0-d tensor).

    Runs on the sample's device without a host sync; NaN when no entry is finite and non-zero.
    """
    require_float_tensor(sample, "sample")
    x = sample.detach().reshape(-1)
    q = quantize_fp(x, _as_format(fmt), rounding, scale=scale, generator=generator)
    used = torch.isfinite(x) & (x != 0)
    xd, qd = x.double(), q.double()
    rel = torch.where(used, (qd - xd).abs() / torch.where(used, xd.abs(), 1.0), 0.0)
    return rel.sum() / used.sum()


def empirical_optimal_format(
    sample: torch.Tensor,
    bits: int,
    semantics: str = "paper",
    rounding: str = "nearest",
    steps_per_octave: int = 4,
) -> OptimalFormat:
    """The split and scale minimising the error measured directly on ``sample`` (host search).

    For every split, the scales tried are the analytic optimum for the sample's lognormal fit
    times 2^(j / steps_per_octave), j = -4*steps..4*steps (a +-4 octave bracket); the table's
    errors are measured on the sample, not predicted.
    """
    from gradcomp.numerics.fit import fit_lognormal

    require_float_tensor(sample, "sample")
    require_int_range(steps_per_octave, "steps_per_octave", 1, 64)
    fit = fit_lognormal(sample)
    if int(fit.count) < 2:
        raise ValueError("sample must hold at least two finite non-zero values")
    mu, sigma = float(fit.mu), max(float(fit.sigma), 1e-6)
    rows, fmts = [], split_formats(bits, semantics)
    for fmt in fmts:
        s0 = optimal_scale(fmt, mu, sigma, rounding)
        best = (math.inf, s0)
        for j in range(-4 * steps_per_octave, 4 * steps_per_octave + 1):
            s = s0 * 2.0 ** (j / steps_per_octave)
            if not math.isfinite(s) or s <= 0:
                continue
            e = float(empirical_relative_error(sample, fmt, s, rounding))
            if e < best[0]:
                best = (e, s)
        rows.append((fmt.name, fmt.exp_bits, fmt.man_bits, best[0], best[1]))
    i = min(range(len(rows)), key=lambda k: (rows[k][3], rows[k][1]))
    return OptimalFormat(fmt=fmts[i], error=rows[i][3], scale=rows[i][4], table=rows)
