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
_F32_MAX = float(np.finfo(np.float32).max)


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


def _scale_jumps(bf: BlockFormat, t: float, lo: float, hi: float) -> np.ndarray:
    """log2 of the block maxima in (lo, hi) (log2 units) where the scale s(m) jumps and that
    are not already piece edges: E8M0 rceil at m = max * 2^j; E4M3 at m = max * t * (the
    midpoints of the E4M3 grid, where round-to-nearest changes value) and at the clamps.
    (E8M0 floor jumps at m = 2^j, an edge; the FP32 scale is continuous.)"""
    mx = bf.elem.max_normal
    if bf.scale == "e8m0" and bf.rule == "rceil":
        j = np.arange(math.floor(lo - math.log2(mx)), math.ceil(hi - math.log2(mx)) + 1)
        pts = j + math.log2(mx)
    elif bf.scale == "e4m3":
        grid = FPFormat.from_name("e4m3fn").grid()
        grid = grid[(grid >= 2.0**-6) & (grid <= 448.0)]
        pts = np.log2(np.concatenate([(grid[:-1] + grid[1:]) / 2, [2.0**-6, 448.0]]) * mx * t)
    else:
        return np.empty(0)
    return pts[(pts > lo) & (pts < hi)]


def _block_sizes(n: int, zero_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(k, P(K = k)): non-zeros K in the block of a non-zero element, K - 1 ~ Binomial(n - 1, q)
    with q = 1 - zero_fraction (zeros iid); the tails below 1e-13 are dropped, then renormalised."""
    if zero_fraction == 0.0:
        return np.array([n]), np.array([1.0])
    k = np.arange(n)
    pk = np.exp(special.gammaln(n) - special.gammaln(k + 1) - special.gammaln(n - k)
                + k * np.log1p(-zero_fraction) + (n - 1 - k) * math.log(zero_fraction))
    keep = pk > 1e-13 * pk.max()
    return k[keep] + 1, pk[keep] / pk[keep].sum()


def expected_block_error(bf, sigma: float, mu: float = 0.0, rounding: str = "nearest",
                         tensor_numel: int = 1 << 20, pieces_per_octave: int = 8,
                         zero_fraction: float = 0.0,
                         tensor_amax: float | None = None) -> BlockError:
    """Expected relative error and normalised MSE of block format ``bf`` for ln|x| ~ N(mu, sigma^2).

    Args:
        bf: BlockFormat or name (the block's element count n = prod(block) matters; 2-D tiles
            of iid elements behave as 1-D blocks of the same count).
        sigma: std of ln|x| (> 0). mu: mean of ln|x| (the result is periodic in mu with period
            ln 2 for E8M0 scales and nearly independent of it otherwise).
        rounding: ``"nearest"`` or ``"stochastic"`` (elements).
        tensor_numel: for a per-tensor scale (NVFP4), the tensor size whose median maximum
            sets t = amax / (448 * max) (when ``tensor_amax`` is not given).
        zero_fraction: probability z in [0, 1) that an element is exactly 0, independently
            (ReLU gradients). Zeros do not move a block's amax and are exact, so the errors are
            per *non-zero* element: the average over K, the non-zeros in the block of a
            non-zero element, K - 1 ~ Binomial(n - 1, 1 - z), of the error of a full block of
            K lognormal elements (K = 1: the block is its own maximum). The normalised MSE is
            E[(Q - x)^2 | x != 0] / E[x^2 | x != 0], equal to the same ratio over all elements.
        tensor_amax: the tensor's largest finite magnitude A (> 0), for a finite tensor: the
            model becomes the lognormal truncated at A (no element exceeds the tensor's
            maximum; without this the lognormal tail beyond A, never seen in the tensor, would
            dominate E x^2 and an NVFP4 tensor's saturation once sigma >~ 2), and a per-tensor
            scale is t = A / (448 * max) as :func:`quantize_block` computes it. None: the
            untruncated lognormal, t from ``tensor_numel``.

    Method: the integrals over the block maximum M (module docstring) are evaluated on one set
    of nodes in log2(m) (``pieces_per_octave`` pieces per octave, 12-point Gauss-Legendre each,
    from the 1e-15 quantile of one value to the 1 - 1e-15 quantile of the maximum of n) and
    weighted by the density of M, d F(m)^p, for every block size p needed.
    """
    bf = _as_bf(bf)
    sigma = require_positive(sigma, "sigma")
    mu = float(mu)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}")
    require_choice(rounding, "rounding", _ROUNDINGS)
    require_int_range(tensor_numel, "tensor_numel", 2, 1 << 40)
    require_int_range(pieces_per_octave, "pieces_per_octave", 1, 256)
    zero_fraction = float(zero_fraction)
    if not 0.0 <= zero_fraction < 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1), got {zero_fraction!r}")
    n = bf.block_numel
    if n < 2:
        raise ValueError("bf must have at least 2 elements per block")
    if tensor_amax is not None:
        tensor_amax = float(tensor_amax)
        if not (math.isfinite(tensor_amax) and tensor_amax > 0):
            raise ValueError(f"tensor_amax must be finite and > 0, got {tensor_amax!r}")
    t = 1.0
    if bf.tensor_scale:
        t = (_default_tensor_scale(bf, mu, sigma, tensor_numel) if tensor_amax is None
             else min(max(tensor_amax / (448.0 * bf.elem.max_normal), 2.0**-126), _F32_MAX))
    ks, pk = _block_sizes(n, zero_fraction)
    kmax = int(ks.max())

    # nodes in u = log2(m) between the quantiles, cut at multiples of 1/pieces_per_octave (where
    # the E8M0 scale and the grid position of the maximum change)
    ln2 = math.log(2.0)
    lo = (mu + sigma * special.ndtri(1e-15)) / ln2
    hi = (mu - sigma * special.ndtri(-np.expm1(np.log1p(-1e-15) / kmax))) / ln2
    log_fa = 0.0  # ln F(A) of the truncation point (A = inf: 0)
    if tensor_amax is not None:
        top = math.log2(tensor_amax)
        log_fa = float(special.log_ndtr((math.log(tensor_amax) - mu) / sigma))
        hi = min(hi, top)  # beyond the quantile the mass is < 1e-15 anyway
        lo = min(lo, top - 1.0)
    edges = np.arange(math.floor(lo * pieces_per_octave),
                      math.ceil(hi * pieces_per_octave) + 1) / pieces_per_octave
    edges = np.union1d(edges, _scale_jumps(bf, t, edges[0], edges[-1]))
    if tensor_amax is not None:
        edges = np.union1d(edges[edges < hi], [hi])
    nodes, weights = _GL
    h = np.diff(edges)
    u = (edges[:-1, None] + h[:, None] * (nodes + 1) / 2).ravel()
    z = (u * ln2 - mu) / sigma
    # d F(m) = phi(z) dz = phi(z) ln2 / sigma du
    wf = (h[:, None] * weights / 2).ravel() * ln2 / sigma * np.exp(-z * z / 2) \
        / math.sqrt(2 * math.pi)
    logF = special.log_ndtr(z)
    m = np.exp2(u)
    s = _scale_of(m, bf, t)
    a_rel, a_sq, g_rel, g_sq = _errors(m, s, bf, mu, sigma, rounding == "stochastic")

    if log_fa:  # truncated at A: f_A = f / F(A), F_A = F / F(A)
        g_rel, g_sq = g_rel / math.exp(log_fa), g_sq / math.exp(log_fa)

    def dens(p):  # d F_A(m)^p per node: p F_A^(p-1) f_A
        return p * np.exp((p - 1) * (logF - log_fa) - log_fa) * wf

    total_rel = total_sq = 0.0
    for k, w in zip(ks.tolist(), pk.tolist()):
        da = dens(k) / k  # (1/k) E[a(M_k)]
        rel, sq = float(da @ a_rel), float(da @ a_sq)
        if k > 1:  # (k - 1)/k E[g(M_k) / F(M_k)] = int g d F^(k-1)
            dg = dens(k - 1)
            rel, sq = rel + float(dg @ g_rel), sq + float(dg @ g_sq)
        total_rel += w * rel
        total_sq += w * sq
    ex2 = math.exp(2 * mu + 2 * sigma * sigma)
    if tensor_amax is not None:  # E[x^2 | x <= A]: the second partial moment
        za = (math.log(tensor_amax) - mu) / sigma
        ex2 *= math.exp(float(special.log_ndtr(za - 2 * sigma)) - log_fa)
    return BlockError(relative=total_rel, nmse=total_sq / ex2)


def monte_carlo_block_error(bf, sigma: float, mu: float = 0.0, rounding: str = "nearest",
                            blocks: int = 20000, generator: torch.Generator | None = None,
                            tensor_numel: int = 1 << 20, zero_fraction: float = 0.0
                            ) -> tuple[BlockError, BlockError]:
    """Monte-Carlo estimate (mean, standard error) with :func:`quantize_block` in float64.

    Samples ``blocks`` blocks of n iid lognormal magnitudes with random signs (1-D blocks of
    n = prod(block) elements), each element set to 0 with probability ``zero_fraction``; the
    errors are over the non-zero elements (as :func:`expected_block_error`). For a per-tensor
    scale, t is set as in :func:`expected_block_error` (not from the sample), so both see the
    same t.
    """
    bf = _as_bf(bf)
    sigma = require_positive(sigma, "sigma")
    require_int_range(blocks, "blocks", 2, 1 << 26)
    zero_fraction = float(zero_fraction)
    if not 0.0 <= zero_fraction < 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1), got {zero_fraction!r}")
    n = bf.block_numel
    flat = bf.replace(block=(n,), dims=None)
    z = torch.randn(blocks, n, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(blocks, n, generator=generator) < 0.5, -1.0, 1.0).double()
    x = torch.exp(float(mu) + sigma * z) * sign
    if zero_fraction > 0:
        x = torch.where(torch.rand(blocks, n, generator=generator) < zero_fraction, 0.0, x)
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
    nz = x != 0
    rel = torch.where(nz, (q - x).abs() / x.abs(), 0.0)
    sq = (q - x) ** 2 / math.exp(2 * mu + 2 * sigma * sigma)
    # blocks are independent: ratio estimators sum / count over blocks, standard errors by
    # linearisation over the per-block sums
    cnt = nz.sum(1).double()
    k = math.sqrt(blocks)
    means, ses = [], []
    for v in (rel, sq):
        tot = v.sum(1)
        mean = tot.sum() / cnt.sum()
        means.append(float(mean))
        ses.append(float((tot - mean * cnt).std() / cnt.mean() / k))
    return BlockError(*means), BlockError(*ses)


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
