"""Expected error of a block-scaled format for lognormal gradients (order statistics).

Model: the magnitudes of a block's n elements are iid lognormal, ln|x| ~ N(mu, sigma^2)
(sigma of the natural log). The block's scale is a deterministic function s(M) of the block
maximum M (the format's rule: E8M0 floor / rceil, E4M3 nearest with a per-tensor scale t, FP32),
and every element is rounded at y = |x| / s(M). So, with f and F the lognormal density and CDF:

* M has density n f(m) F(m)^(n-1) (the maximum of n iid values);
* given M = m, the other n - 1 values are iid with density f(x) / F(m) on (0, m) (the
  lognormal truncated at m);
* the expected error per element is

      E = (1/n) E[a(M)] + (n-1)/n E[g(M) / F(M)]
        = int f F^(n-1) a dm + (n-1) int f F^(n-2) g dm,

  with a(m) the error of the maximum itself (y = m / s(m)) and g(m) = int_0^m e(x / s(m)) f(x) dx
  the partial expectation of the per-element error e over the values below m.

g is exact: on every interval of the element grid e(y) is |Q - y| / y (relative) or
s^2 (Q - y)^2 (squared) with Q constant (nearest) or the two neighbours with probabilities
(stochastic: E|Q - y| = 2 (hi - y)(y - lo) / (hi - lo), E(Q - y)^2 = (hi - y)(y - lo)), so each
interval integrates in closed form against the lognormal through its partial moments (the
machinery of :mod:`gradcomp.numerics.fp_error`, with the intervals cut at m / s). The outer
integral over M runs in the variables v = F(M)^(n-1) and w = F(M)^n (uniform for the two terms),
by composite Gauss-Legendre on pieces between the points where s(m) or the grid position of the
maximum change (8 pieces per octave of m): this is quadrature, accurate to about 1e-4 relative
(checked against Monte Carlo in the tests).

Outputs: the mean relative error E|Q(x) - x| / |x| and the normalised MSE
E(Q(x) - x)^2 / E x^2 (E x^2 = exp(2 mu + 2 sigma^2)). The E8M0 clamp to [2^-127, 2^127] is
included; float32 rounding of the scale arithmetic is not (relative 2^-24 effects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special

from gradcomp.numerics._checks import require_choice, require_int_range, require_positive
from gradcomp.numerics.block import BlockFormat, quantize_block
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.fp_error import _phi_diff

__all__ = [
    "BlockError",
    "ELEMENT_CANDIDATES",
    "expected_block_error",
    "monte_carlo_block_error",
    "optimal_block_element",
]

# element formats of equal bit width that a block format can use (OCP MX and NVFP4 elements)
ELEMENT_CANDIDATES = {8: ("e4m3fn", "e5m2"), 6: ("e2m3fn", "e3m2fn"), 4: ("e2m1fn",)}
_ROUNDINGS = ("nearest", "stochastic")
_GL = np.polynomial.legendre.leggauss(12)


@dataclass(frozen=True)
class BlockError:
    """Expected error per element: mean relative error and normalised MSE."""

    relative: float
    nmse: float


def _as_bf(bf) -> BlockFormat:
    if isinstance(bf, str):
        return BlockFormat.from_name(bf)
    if not isinstance(bf, BlockFormat):
        raise TypeError(f"bf must be a BlockFormat or a name, got {type(bf).__name__}")
    return bf


def _moments(A, B, c, s):
    """P, J, K, L = int g, int g/z, int z g, int z^2 g over [A, B] for ln z ~ N(c, s^2)."""
    with np.errstate(divide="ignore"):
        la, lb = np.log(A), np.log(B)

    def part(shift, k):
        return np.exp(k * c + k * k * s * s / 2) * _phi_diff((la - c - shift) / s,
                                                              (lb - c - shift) / s)

    return part(0.0, 0), part(-s * s, -1), part(s * s, 1), part(2 * s * s, 2)


def _e4m3_round(v: np.ndarray) -> np.ndarray:
    grid = FPFormat.from_name("e4m3fn").grid()
    i = np.clip(np.searchsorted(grid, v, side="right") - 1, 0, len(grid) - 2)
    lo, hi = grid[i], grid[i + 1]
    up = (hi - v < v - lo) | ((hi - v == v - lo) & ((i + 1) % 2 == 0))
    return np.where(up, hi, lo)


def _scale_of(m: np.ndarray, bf: BlockFormat, t: float) -> np.ndarray:
    mx, emax = bf.elem.max_normal, bf.elem.emax
    if bf.scale == "e8m0":
        if bf.rule == "floor":
            k = np.floor(np.log2(m)) - emax
        else:
            k = np.ceil(np.log2(m / mx))
        return np.exp2(np.clip(k, -127, 127))
    if bf.scale == "fp32":
        return np.maximum(m / mx, 2.0**-126)
    return _e4m3_round(np.clip(m / mx / t, 2.0**-6, 448.0)) * t


def _errors(m: np.ndarray, s: np.ndarray, bf: BlockFormat, mu: float, sigma: float,
            stochastic: bool):
    """(a_rel, a_sq, g_rel, g_sq) at block maxima m with scales s (arrays of the same shape)."""
    fmt = bf.elem
    grid = fmt.grid()
    lo, hi = grid[:-1], grid[1:]
    top = grid[-1]
    U = (m / s)[:, None]
    c = (mu - np.log(s))[:, None]

    def clip(v):
        return np.minimum(v, U)

    if stochastic:
        A, B = clip(lo), clip(hi)
        P, J, K, L = _moments(A, B, c, sigma)
        w = 1.0 / (hi - lo)
        with np.errstate(invalid="ignore"):
            lj = np.where(lo == 0, 0.0, lo * hi * J)
        g_rel = (2 * w * (-K + (lo + hi) * P - lj)).sum(-1)
        g_sq = (-L + (lo + hi) * K - lo * hi * P).sum(-1)
    else:
        mid = (lo + hi) / 2
        P1, J1, K1, L1 = _moments(clip(lo), clip(mid), c, sigma)
        P2, J2, K2, L2 = _moments(clip(mid), clip(hi), c, sigma)
        with np.errstate(invalid="ignore"):
            lj = np.where(lo == 0, 0.0, lo * J1)
        g_rel = (P1 - lj + hi * J2 - P2).sum(-1)
        g_sq = (L1 - 2 * lo * K1 + lo * lo * P1 + L2 - 2 * hi * K2 + hi * hi * P2).sum(-1)
    # saturation: y in [top, m/s] rounds to top
    Pt, Jt, Kt, Lt = _moments(np.minimum(top, U), U, c, sigma)
    g_rel = g_rel + (Pt - top * Jt)[:, 0]
    g_sq = g_sq + (Lt - 2 * top * Kt + top * top * Pt)[:, 0]
    # the maximum itself
    y = m / s
    yc = np.minimum(y, top)
    i = np.clip(np.searchsorted(grid, yc, side="right") - 1, 0, len(grid) - 2)
    l, h = grid[i], grid[i + 1]
    if stochastic:
        var = (h - yc) * (yc - l)
        a_rel = (2 * var / (h - l) + (y - yc)) / y
        a_sq = var + (y - yc) ** 2
    else:
        q = np.where((h - yc < yc - l) | ((h - yc == yc - l) & ((i + 1) % 2 == 0)), h, l)
        a_rel = np.abs(q - y) / y
        a_sq = (q - y) ** 2
    return a_rel, a_sq * s * s, g_rel, g_sq * s * s


def _default_tensor_scale(bf: BlockFormat, mu: float, sigma: float, tensor_numel: int) -> float:
    # the median of the maximum of tensor_numel lognormal values: F(m)^N = 1/2
    z = -special.ndtri(-np.expm1(np.log(0.5) / tensor_numel))
    amax = math.exp(mu + sigma * z)
    return max(amax / (448.0 * bf.elem.max_normal), 2.0**-126)


def expected_block_error(bf, sigma: float, mu: float = 0.0, rounding: str = "nearest",
                         tensor_numel: int = 1 << 20, pieces_per_octave: int = 8) -> BlockError:
    """Expected relative error and normalised MSE of block format ``bf`` for ln|x| ~ N(mu, sigma^2).

    Args:
        bf: BlockFormat or name (the block's element count n = prod(block) >= 2 is what
            matters; 2-D tiles of iid elements behave as 1-D blocks of the same count).
        sigma: std of ln|x| (> 0). mu: mean of ln|x| (the result is periodic in mu with period
            ln 2 for E8M0 scales and nearly independent of it otherwise).
        rounding: ``"nearest"`` or ``"stochastic"`` (elements).
        tensor_numel: for a per-tensor scale (NVFP4), the tensor size whose median maximum
            sets t = amax / (448 * max).
    """
    bf = _as_bf(bf)
    sigma = require_positive(sigma, "sigma")
    mu = float(mu)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}")
    require_choice(rounding, "rounding", _ROUNDINGS)
    require_int_range(tensor_numel, "tensor_numel", 2, 1 << 40)
    require_int_range(pieces_per_octave, "pieces_per_octave", 1, 256)
    n = bf.block_numel
    if n < 2:
        raise ValueError("bf must have at least 2 elements per block")
    t = _default_tensor_scale(bf, mu, sigma, tensor_numel) if bf.tensor_scale else 1.0
    stochastic = rounding == "stochastic"

    def m_of(p, power):
        # m with F(m)^power = p, accurate near p = 1: 1 - F = -expm1(ln p / power)
        return np.exp(mu - sigma * special.ndtri(-np.expm1(np.log(p) / power)))

    total_rel = total_sq = 0.0
    for power, which in ((n - 1, "g"), (n, "a")):
        lo_m, hi_m = m_of(1e-15, power), m_of(1 - 1e-15, power)
        k0 = math.floor(math.log2(lo_m) * pieces_per_octave)
        k1 = math.ceil(math.log2(hi_m) * pieces_per_octave)
        edges_m = np.exp2(np.arange(k0, k1 + 1) / pieces_per_octave)
        edges = special.ndtr((np.log(edges_m) - mu) / sigma) ** power
        edges[0], edges[-1] = 0.0, 1.0
        a, b = edges[:-1], edges[1:]
        keep = b > a
        a, b = a[keep], b[keep]
        nodes, weights = _GL
        p = ((b - a)[:, None] * (nodes + 1) / 2 + a[:, None]).ravel()
        wt = ((b - a)[:, None] * weights / 2).ravel()
        p = np.clip(p, 1e-300, 1 - 1e-16)
        m = m_of(p, power)
        s = _scale_of(m, bf, t)
        a_rel, a_sq, g_rel, g_sq = _errors(m, s, bf, mu, sigma, stochastic)
        if which == "g":
            total_rel += float((wt * g_rel).sum())
            total_sq += float((wt * g_sq).sum())
        else:
            total_rel += float((wt * a_rel).sum()) / n
            total_sq += float((wt * a_sq).sum()) / n
    ex2 = math.exp(2 * mu + 2 * sigma * sigma)
    return BlockError(relative=total_rel, nmse=total_sq / ex2)


def monte_carlo_block_error(bf, sigma: float, mu: float = 0.0, rounding: str = "nearest",
                            blocks: int = 20000, generator: torch.Generator | None = None,
                            tensor_numel: int = 1 << 20) -> tuple[BlockError, BlockError]:
    """Monte-Carlo estimate (mean, standard error) with :func:`quantize_block` in float64.

    Samples ``blocks`` blocks of n iid lognormal magnitudes with random signs (1-D blocks of
    n = prod(block) elements). For a per-tensor scale, t is set as in
    :func:`expected_block_error` (not from the sample), so both see the same t.
    """
    bf = _as_bf(bf)
    sigma = require_positive(sigma, "sigma")
    require_int_range(blocks, "blocks", 2, 1 << 26)
    n = bf.block_numel
    flat = bf.replace(block=(n,), dims=None)
    z = torch.randn(blocks, n, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(blocks, n, generator=generator) < 0.5, -1.0, 1.0).double()
    x = torch.exp(float(mu) + sigma * z) * sign
    if bf.tensor_scale:
        # pin the tensor amax: one extra element at the theory's tensor maximum, in its own block
        t = _default_tensor_scale(bf, mu, sigma, tensor_numel)
        amax = t * 448.0 * bf.elem.max_normal
        x = torch.cat([x, torch.full((1, n), 0.0, dtype=torch.float64)])
        x[-1, 0] = amax
        q = quantize_block(x, flat, rounding, generator=generator, compile=False)[:-1]
        x = x[:-1]
    else:
        q = quantize_block(x, flat, rounding, generator=generator, compile=False)
    rel = ((q - x).abs() / x.abs()).reshape(-1)
    sq = ((q - x) ** 2).reshape(-1) / math.exp(2 * mu + 2 * sigma * sigma)
    # blocks are independent: standard errors from per-block means
    rb = rel.reshape(blocks, n).mean(1)
    sb = sq.reshape(blocks, n).mean(1)
    k = math.sqrt(blocks)
    return (BlockError(float(rb.mean()), float(sb.mean())),
            BlockError(float(rb.std() / k), float(sb.std() / k)))


def optimal_block_element(bits: int, sigma: float, block: int = 32, scale: str = "e8m0",
                          rule: str = "floor", rounding: str = "nearest",
                          metric: str = "relative") -> tuple[str, list]:
    """The element format of ``bits`` bits (``ELEMENT_CANDIDATES``) with the least expected
    error at this sigma and block size; returns (name, [(name, relative, nmse), ...])."""
    require_choice(bits, "bits", tuple(ELEMENT_CANDIDATES))
    require_choice(metric, "metric", ("relative", "nmse"))
    rows = []
    for el in ELEMENT_CANDIDATES[bits]:
        bf = BlockFormat(FPFormat.from_name(el), (block,), scale, rule,
                         tensor_scale=scale == "e4m3")
        e = expected_block_error(bf, sigma, rounding=rounding)
        rows.append((el, e.relative, e.nmse))
    col = 1 if metric == "relative" else 2
    best = min(rows, key=lambda r: r[col])
    return best[0], rows
