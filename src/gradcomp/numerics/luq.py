"""LUQ: logarithmic unbiased quantization of neural gradients (Chmiel et al., ICLR 2023), and
closed-form variances of stochastic rounding for lognormal inputs.

Format (b bits: 1 sign bit + b-1 exponent bits, no mantissa: radix-2 logarithmic "1-(b-1)-0").
With E = 2^(b-1) (``range_exponent``, the paper's choice) the grid is

    {0} U {+-alpha * 2^j : j = 0 .. E},   alpha = max|g| / 2^E,

i.e. the seed paper's idealised 1-(b-1)-0 format of its Eq. 2 (2^(b-1) binades plus the
saturation value) placed so that its top value is max|g|: max|g| is representable by
construction, so nothing overflows. (The authors' released code uses E = 2^(b-1) - 1, one binade
fewer; pass ``range_exponent`` to get it.)

Operator, per element (u uniform from the counter hash, see ``numerics.random``):

* |g| < alpha: stochastic underflow, the seed paper's Eq. 5 (the semantics of
  ``compressors.pruning.stochastic_prune`` at alpha: sign(g) * alpha if |g| >= u * alpha, else
  0, so with probability |g| / alpha);
* alpha <= |g| <= max|g|: with 2^k alpha <= |g| < 2^(k+1) alpha, stochastic rounding between the
  two powers of two: up with probability (|g| - 2^k alpha) / (2^k alpha), else down.

Both steps are unbiased, so E[Q(g)] = g for every finite g (up to the float rounding of the ratio
|g|/alpha, relative 2^-24 in float32, and the 2^-24 grid of u). ``samples = S > 1`` returns the
average of S independent draws (LUQ's repeated-sampling variance reduction: variance / S; the
output then leaves the grid). Zeros stay zero; NaN and +-inf pass through unchanged and are
excluded from max|g|; an all-zero (or all non-finite) tensor is returned unchanged. Computed in
float32 (float64 for float64 input) and returned in g's dtype; half inputs must have every grid
value representable (alpha must not underflow the dtype).

Variance of stochastic rounding (SR) for a lognormal input. For a <= x <= b and SR onto {a, b},
Q = b with probability (x - a)/(b - a), so E[Q] = x and

    Var[Q | x] = a^2 + (a + b)(x - a) - x^2 = (b - x)(x - a).

With |g| ~ LogNormal(mu, sigma) (ln|g| normal, the seed paper's section 3 model) and the partial
moments M_k(a, b) = E[|g|^k ; a <= |g| < b] = exp(k mu + k^2 sigma^2 / 2) *
[Phi((ln b - mu - k sigma^2)/sigma) - Phi((ln a - mu - k sigma^2)/sigma)],

    E[Var] = sum over grid intervals [a, b) of  -M_2 + (a + b) M_1 - a b M_0,

which covers stochastic pruning (one interval [0, alpha): E[alpha x - x^2; x < alpha]), SR on a
power-of-two grid (LUQ), and SR on any FP grid (``FPFormat.grid()`` times a scale). Values above
the top grid value T (clamped) add the squared error E[(|g| - T)^2 ; |g| > T] =
M_2 - 2 T M_1 + T^2 M_0 on [T, inf).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ndtr

from gradcomp.numerics._checks import require_float_tensor, require_int_range
from gradcomp.numerics.kernels import use_compiled, variant
from gradcomp.numerics.random import counter_layout, draw_keys, uniform_like
from gradcomp.numerics.rounding import veltkamp

__all__ = [
    "LUQ_BITS",
    "luq_alpha",
    "luq_grid",
    "luq_mse_lognormal",
    "luq_quantize",
    "prune_variance_lognormal",
    "sr_mse_lognormal",
]

LUQ_BITS = (2, 8)  # 1 sign + 1..7 exponent bits
# the largest range exponent E whose binades come from float operations (r * (2^23 + 1) must
# stay finite in float32 for r <= 2^E: 2^100 * 2^24 < 2^128); the 8-bit format's E = 128 takes
# frexp
_FLOAT_LOG2_MAX = 100


def _range_exponent(bits: int, range_exponent: int | None) -> int:
    bits = require_int_range(bits, "bits", *LUQ_BITS)
    if range_exponent is None:
        return 2 ** (bits - 1)
    return require_int_range(range_exponent, "range_exponent", 1, 2 ** (bits - 1))


def luq_alpha(g: torch.Tensor, bits: int = 4, range_exponent: int | None = None) -> torch.Tensor:
    """alpha = max|g| / 2^E over finite values (0-d tensor, float32/float64, on g's device)."""
    require_float_tensor(g, "g")
    e = _range_exponent(bits, range_exponent)
    cdt = torch.float64 if g.dtype == torch.float64 else torch.float32
    y = g.detach().to(cdt)
    amax = _finite_amax(y) if y.numel() else torch.zeros((), dtype=cdt, device=g.device)
    return amax * 2.0**-e


def luq_grid(alpha: float, bits: int = 4, range_exponent: int | None = None) -> np.ndarray:
    """The non-negative grid {0, alpha, 2 alpha, ..., 2^E alpha} (float64, ascending)."""
    e = _range_exponent(bits, range_exponent)
    return np.concatenate([[0.0], float(alpha) * 2.0 ** np.arange(e + 1)])


def _luq_once(g: torch.Tensor, alpha: torch.Tensor | None, e: int, generator) -> torch.Tensor:
    """One draw of the operator; ``alpha`` None: found in the same compiled call (the fused
    path, ``_luq_amax_body``)."""
    keys = draw_keys(generator, g.device, alpha is None)  # columns: the 2-D layout below
    cdt = torch.float64 if g.dtype == torch.float64 else torch.float32
    y = g.detach().to(cdt).reshape(-1)
    if alpha is None:  # one compiled call: the finite amax, then the operator's loop
        # on the CPU y as (rows, L) with the counter's columns after the keys
        # (``random.counter_layout``): the same counter per element as the flat pass, without
        # the in-kernel arange that inductor's CPU code builds from 16 scalars
        y, keys = counter_layout(y, keys, True)
        op = variant(_luq_amax_body, "luq_quantize", elementwise=False, e=e)
        return op(y, keys, compile=True).reshape(g.shape)
    return variant(_luq_body, "luq_quantize", e=e)(y, alpha, keys,
                                                   compile=False).reshape(g.shape)


def _finite_amax(y: torch.Tensor) -> torch.Tensor:
    """max |y| over the finite values (0 where there are none)."""
    a = y.abs()
    return torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax()


def _luq_amax_body(y: torch.Tensor, keys: torch.Tensor, *, e: int) -> torch.Tensor:
    """``_luq_body`` at alpha = ``luq_alpha`` of y, in one compiled call (y non-empty)."""
    return _luq_body(y, _finite_amax(y) * 2.0**-e, keys, e=e)


def _luq_body(y: torch.Tensor, alpha: torch.Tensor, keys: torch.Tensor, start: int = 0, *,
              e: int) -> torch.Tensor:
    """The LUQ operator on a flat y (compute precision), or its 2-D counter layout with the
    columns after the keys (``random.counter_layout``), at ``alpha``, hash keys ``keys``."""
    cdt = alpha.dtype
    ay = y.abs()
    live = torch.isfinite(y) & (ay > 0) & (alpha > 0)
    safe_alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    r = torch.where(live, ay / safe_alpha, torch.ones_like(ay))
    if e <= _FLOAT_LOG2_MAX:
        # 2^floor(log2 r) on float operations (inductor's CPU code calls frexp per element):
        # Veltkamp's splitting rounds r to one significant bit, 2^k or 2^(k+1), halved when
        # above r; exact (r * K stays finite for r <= 2^e), the same powers of two as frexp's
        t = 23 if cdt == torch.float32 else 52
        p2 = veltkamp(r, 2.0**t + 1)
        p2 = torch.clamp(torch.where(p2 > r, p2 * 0.5, p2), 1.0, 2.0**e)
        lo = safe_alpha * p2
        top = p2 >= 2.0**e
    else:  # floor(log2 r) exactly: frexp gives r = m 2^p with m in [0.5, 1)
        _, p = torch.frexp(r)
        k = torch.clamp(p.to(cdt) - 1, 0, e)
        lo = safe_alpha * torch.exp2(k)
        top = k >= e
    prob_up = torch.clamp((ay - lo) / lo, 0.0, 1.0)
    prob_up = torch.where(top, torch.zeros_like(prob_up), prob_up)  # top level: clamp
    u = uniform_like(keys, y, cdt, start)  # flat y, or its (rows, L) counter layout
    mag = torch.where(u < prob_up, 2 * lo, lo)
    # underflow (Eq. 5 at alpha, the semantics of stochastic_prune): alpha if |g| >= u alpha
    mag = torch.where(ay < safe_alpha, torch.where(ay >= u * safe_alpha, lo, 0.0), mag)
    # y's sign by a select (mag >= 0; ``copysign`` is a library call per vector in inductor's
    # CPU code): the same bits as copysign(mag, y) on the live (finite, non-zero) elements
    return torch.where(live, torch.where(y < 0, -mag, mag), y)


def luq_quantize(g: torch.Tensor, bits: int = 4, *, samples: int = 1,
                 generator: torch.Generator | None = None,
                 range_exponent: int | None = None) -> torch.Tensor:
    """LUQ-quantize ``g`` (see the module docstring for the grid and the operator).

    Args:
        g: float tensor, any shape and device (numel < 2^31).
        bits: total bits b in [2, 8] (1 sign + b-1 exponent bits); 4 = the paper's FP4 1-3-0.
        samples: S >= 1 independent draws averaged (repeated sampling; S = 1 stays on the grid).
        generator: torch.Generator on g's device (None: torch's default); one seed per draw.
        range_exponent: E = log2(max|g| / alpha), default 2^(b-1) (the paper's alpha).
    Returns a new tensor of g's shape and dtype; unbiased: E[Q(g)] = g. No host sync.
    """
    require_float_tensor(g, "g")
    e = _range_exponent(bits, range_exponent)
    samples = require_int_range(samples, "samples", 1, 1 << 16)
    if g.numel() == 0:
        return g.clone()
    # fused: one compiled call per draw (alpha found in it; inductor's CPU frexp, which the
    # 8-bit format's E = 128 needs, is a float32-only library call: that format stays eager);
    # eager: alpha once, then the chunked operator (the same operations, the same bits)
    fused = e <= _FLOAT_LOG2_MAX and use_compiled(None)
    alpha = None if fused else luq_alpha(g, bits, e)
    out = _luq_once(g, alpha, e, generator)
    for _ in range(samples - 1):
        out = out + _luq_once(g, alpha, e, generator)
    if samples > 1:
        out = out / samples
        out = torch.where(torch.isfinite(g), out, g.to(out.dtype))
    return out.to(g.dtype)


# ---------------------------------------------------------------------------------------------
# closed forms for lognormal inputs


def _partial_moment(k: int, lo: np.ndarray, hi: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """E[X^k ; lo <= X < hi] for X ~ LogNormal(mu, sigma); lo may be 0, hi may be inf."""
    with np.errstate(divide="ignore"):
        llo = np.where(lo > 0, np.log(np.maximum(lo, 1e-300)), -np.inf)
        lhi = np.where(np.isfinite(hi), np.log(np.where(np.isfinite(hi), hi, 1.0)), np.inf)
    s2 = k * sigma * sigma
    return math.exp(k * mu + 0.5 * k * k * sigma * sigma) * (
        ndtr((lhi - mu - s2) / sigma) - ndtr((llo - mu - s2) / sigma))


def _check_lognormal(mu: float, sigma: float) -> tuple[float, float]:
    mu, sigma = float(mu), float(sigma)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    return mu, sigma


def sr_mse_lognormal(mu: float, sigma: float, grid) -> dict:
    """Expected squared error per element of SR onto ``grid`` for |x| ~ LogNormal(mu, sigma).

    ``grid``: ascending non-negative values (0 first for underflow to zero; otherwise values
    below the first point are treated like values above the top: rounded to it, deterministic).
    Returns ``{"variance": sum of (b-x)(x-a) over the intervals, "clamp": squared error of the
    values above the top point (and below the bottom one when it is > 0), "mse": their sum}``.
    """
    mu, sigma = _check_lognormal(mu, sigma)
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size < 2 or np.any(np.diff(g) <= 0) or g[0] < 0:
        raise ValueError("grid must be a 1-d ascending array of >= 2 distinct values >= 0")
    a, b = g[:-1], g[1:]
    m0, m1, m2 = (_partial_moment(k, a, b, mu, sigma) for k in (0, 1, 2))
    var = float(np.sum(-m2 + (a + b) * m1 - a * b * m0))
    top = g[-1:]
    inf = np.array([np.inf])
    clamp = float(np.sum(_partial_moment(2, top, inf, mu, sigma)
                         - 2 * top * _partial_moment(1, top, inf, mu, sigma)
                         + top * top * _partial_moment(0, top, inf, mu, sigma)))
    if g[0] > 0:
        z, bot = np.array([0.0]), g[:1]
        clamp += float(np.sum(_partial_moment(2, z, bot, mu, sigma)
                              - 2 * bot * _partial_moment(1, z, bot, mu, sigma)
                              + bot * bot * _partial_moment(0, z, bot, mu, sigma)))
    return {"variance": max(var, 0.0), "clamp": max(clamp, 0.0), "mse": max(var, 0.0)
            + max(clamp, 0.0)}


def prune_variance_lognormal(mu: float, sigma: float, threshold: float) -> float:
    """Variance per element of stochastic pruning (Eq. 5) at ``threshold`` a for a lognormal
    |x|: E[a|x| - x^2 ; |x| < a] (values >= a are kept exactly)."""
    mu, sigma = _check_lognormal(mu, sigma)
    a = float(threshold)
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"threshold must be finite and > 0, got {threshold!r}")
    lo, hi = np.array([0.0]), np.array([a])
    return float((a * _partial_moment(1, lo, hi, mu, sigma)
                  - _partial_moment(2, lo, hi, mu, sigma))[0])


def luq_mse_lognormal(mu: float, sigma: float, amax: float, bits: int = 4, *, samples: int = 1,
                      range_exponent: int | None = None) -> dict:
    """Expected squared error per element of :func:`luq_quantize` for |g| ~ LogNormal(mu, sigma)
    with max|g| = ``amax`` (the tensor's actual maximum sets alpha; lognormal mass above it, which
    a real tensor does not have, is reported as ``clamp``). ``variance`` is divided by S."""
    amax = float(amax)
    if not (math.isfinite(amax) and amax > 0):
        raise ValueError(f"amax must be finite and > 0, got {amax!r}")
    samples = require_int_range(samples, "samples", 1, 1 << 16)
    e = _range_exponent(bits, range_exponent)
    out = sr_mse_lognormal(mu, sigma, luq_grid(amax * 2.0**-e, bits, e))
    out["variance"] /= samples
    out["mse"] = out["variance"] + out["clamp"]
    return out
