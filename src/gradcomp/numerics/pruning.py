"""Stochastic pruning operators (paper section 5, Eq. 5): pure functions, the hot path.

    stochastic_prune(x, a)     Eq. 5, unbiased: E[T(x)] = x. One fused pass (torch.compile).
    prune_quantize(x, a, fmt)  Eq. 5 then quantize_fp, in one pass (same bits as the two calls).
    topk_prune(x, S)           deterministic baseline (SAW / meProp): keep the k largest |x|.
    topk_stochastic_prune      "top-k then stochastic": a = k-th largest |x|, then Eq. 5.
    topk_threshold(x, S)       that k-th largest |x|.

Speed: the fused path draws ONE int64 seed per call from the caller's generator and hashes
(seed, element index) inside the kernel (:mod:`gradcomp.numerics.random`), so there is no
``torch.rand`` pass and no full-size random buffer. Fused vs eager follows the one compile
policy of :mod:`gradcomp.numerics.kernels` (same numbers, bit for bit).
"""

from __future__ import annotations

import math

import torch

from gradcomp.numerics._checks import require_float_tensor, require_open_unit
from gradcomp.numerics.kernels import FusedOp, kernel_seed_keys, variant
from gradcomp.numerics.random import draw_seed, uniform_from_keys
from gradcomp.numerics.rounding import COUNTS as QUANTIZE_COUNTS
from gradcomp.numerics.rounding import _quantize_flat, count_names, prepare

__all__ = ["stochastic_prune", "prune_quantize", "topk_prune", "topk_stochastic_prune",
           "topk_threshold", "keep_count", "PRUNE_COUNTS", "PRUNE_QUANTIZE_COUNTS"]


def _prune_kernel(x: torch.Tensor, a: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                  start: int = 0):
    """Eq. 5 on a flat tensor; ``a`` is already rounded to x's dtype, held in compute precision.

    |x| >= a (and NaN, whose comparisons are false): kept; u*a <= |x| < a: sign(x)*a;
    |x| < u*a: 0; u ~ U[0,1) from the counter hash, so P(keep as a) = |x|/a: unbiased.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cdt)
    u = uniform_from_keys(k1, k2, x.numel(), x.device, cdt, start)
    ax = xf.abs()
    small = torch.where(ax >= a * u, torch.copysign(a.expand_as(xf), xf), torch.zeros_like(xf))
    return torch.where(ax < a, small, xf).to(x.dtype)


def _prune_count_kernel(x: torch.Tensor, a: torch.Tensor, a_at: torch.Tensor, k1: torch.Tensor,
                        k2: torch.Tensor, start: int = 0, *, count: tuple):
    """``_prune_kernel`` plus the counts ``count`` (names of ``PRUNE_COUNTS``) from the same
    loop, int64, in that order."""
    out = _prune_kernel(x, a, k1, k2, start)
    return out, _prune_counts(x, out, a_at, count)


def _prune_counts(x, out, a_at, names):
    terms = {"nonfinite": lambda: (~torch.isfinite(x)).sum(),
             "zeros": lambda: (out == 0).sum(),
             "at_threshold": lambda: (out.abs() == a_at).sum()}
    return torch.stack([terms[n]() for n in names])


def _prune_quantize_kernel(x, a, a_at, k1, k2, scale, ints, floats, keys, start: int = 0, *,
                           stochastic: bool, scaled: bool, count: tuple):
    """Eq. 5, then ``quantize_fp`` of the pruned values, in one loop (the pruned tensor is never
    written); ``count``: names of ``PRUNE_QUANTIZE_COUNTS``, counted in the same loop."""
    p = _prune_kernel(x, a, k1, k2, start)
    qnames = tuple(n for n in count if n in QUANTIZE_COUNTS)  # "nonfinite" of p is x's
    pnames = tuple(n for n in count if n not in QUANTIZE_COUNTS)
    q = _quantize_flat(p, scale, ints, floats, keys, start, stochastic=stochastic,
                       scaled=scaled, count=qnames)
    if not count:
        return q
    got = {}
    if qnames:
        q, qc = q
        got.update(zip(qnames, qc.unbind()))
    if pnames:  # "pruned_zeros" is stochastic_prune's "zeros" of p
        pc = _prune_counts(x, p, a_at, tuple(n.removeprefix("pruned_") for n in pnames))
        got.update(zip(pnames, pc.unbind()))
    return q, torch.stack([got[n] for n in count])


# what ``stochastic_prune(..., counts=True)`` counts, in this order
PRUNE_COUNTS = ("nonfinite", "zeros", "at_threshold")
# what ``prune_quantize(..., counts=True)`` counts: the pruned values' zeros and +-a symbols,
# then ``quantize_fp``'s counts of the quantized result (rounding.COUNTS)
PRUNE_QUANTIZE_COUNTS = ("nonfinite", "pruned_zeros", "at_threshold", "overflow", "underflow",
                         "nan", "zeros")
_PRUNE = FusedOp(_prune_kernel, "stochastic_prune", elementwise=True)


def _threshold(x: torch.Tensor, threshold):
    """(a in compute precision, a rounded to x's dtype) from a float or 0-d tensor threshold."""
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a float or a 0-d tensor, got shape "
                             f"{tuple(threshold.shape)}")
        a = threshold.detach().reshape(()).to(x.device)
    else:
        a_f = float(threshold)
        if not math.isfinite(a_f) or a_f < 0:
            raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
        a = torch.tensor(a_f, dtype=torch.float64, device=x.device)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    a_at = a.to(x.dtype)
    a = a_at.to(cdt)
    a = torch.where(a > 0, a, torch.zeros_like(a))  # NaN / negative -> 0: nothing below it
    return a, a_at


def stochastic_prune(x: torch.Tensor, threshold, generator: torch.Generator | None = None, *,
                     compile: bool | None = None, counts=False):
    """Unbiased stochastic pruning (Eq. 5) of ``x`` at ``threshold`` a; returns a new tensor.

    Semantics per element: |x| >= a keeps x; a*u <= |x| < a gives sign(x)*a; |x| < a*u gives
    +0, with u uniform on the 2^-24 grid of [0, 1) (so E[T(x)] = x up to that resolution).
    a is first rounded to x's dtype (so +-a is representable and the operator is exactly
    unbiased for that rounded a). NaN and +-inf pass through unchanged; zeros stay zero; an
    all-zero tensor is returned unchanged. A tensor threshold that is <= 0 or NaN means no
    pruning (checked on the device, no sync); a float threshold must be finite and >= 0.

    Args:
        x: any float dtype, any device and shape (numel < 2^31).
        threshold: float, or a 0-d tensor (any float dtype, preferably on x's device).
        generator: torch.Generator on x's device, or None for torch's default generator.
            One int64 seed is drawn from it per call; same state -> same output.
        compile: True = fused path, False = eager, None = the process-wide policy
            (:mod:`gradcomp.numerics.kernels`). Both give identical bits.
        counts: also return, from the same pass, a 1-d int64 tensor on x's device: [number of
            non-finite (NaN, +-inf) elements of x, number of zeros of the result, number of
            elements of the result whose magnitude equals the threshold rounded to x's dtype
            (the +-a symbols)]. Returns ``(result, counts)`` then. The result is the same.
    Cost: one pass (read x, write the result) in the fused path, counts included; no host sync.
    """
    require_float_tensor(x, "x")
    names = count_names(counts, PRUNE_COUNTS)
    a, a_at = _threshold(x, threshold)
    if x.numel() == 0:
        if names:
            return x.clone(), torch.zeros(len(names), dtype=torch.int64, device=x.device)
        return x.clone()
    k1, k2 = kernel_seed_keys(draw_seed(generator, x.device))  # = random.seed_keys
    flat = x.detach().reshape(-1)
    if names:
        op = variant(_prune_count_kernel, "stochastic_prune", count=names)
        out, c = op(flat, a, a_at, k1, k2, compile=compile)
        return out.view(x.shape), c
    return _PRUNE(flat, a, k1, k2, compile=compile).view(x.shape)


def prune_quantize(x: torch.Tensor, threshold, fmt, rounding: str = "nearest", scale=None,
                   generator: torch.Generator | None = None, *, compile: bool | None = None,
                   counts=False):
    """``quantize_fp(stochastic_prune(x, threshold, generator), fmt, rounding, scale,
    generator)`` in one pass: the same bits (the same two seeds drawn from ``generator`` in
    the same order), without writing and re-reading the pruned tensor.

    ``counts``: True, or a sequence of names of ``PRUNE_QUANTIZE_COUNTS``: ``nonfinite`` (NaN
    or +-inf elements of x), ``pruned_zeros`` and ``at_threshold`` (``stochastic_prune``'s
    ``zeros`` and ``at_threshold`` of the pruned values), ``overflow``, ``underflow``,
    ``nan``, ``zeros`` (``quantize_fp``'s counts of quantizing the pruned values); returns
    ``(result, counts)`` then, counted in the same loop. Arguments as the two functions.
    """
    require_float_tensor(x, "x")
    names = count_names(counts, PRUNE_QUANTIZE_COUNTS)
    a, a_at = _threshold(x, threshold)
    k1, k2 = kernel_seed_keys(draw_seed(generator, x.device)) if x.numel() else (None, None)
    args = prepare(x, fmt, rounding, scale, generator)
    if x.numel() == 0:
        if names:
            return x.clone(), torch.zeros(len(names), dtype=torch.int64, device=x.device)
        return x.clone()
    op = variant(_prune_quantize_kernel, "prune_quantize", stochastic=args.stochastic,
                  scaled=args.scaled, count=names)
    res = op(x.detach().reshape(-1), a, a_at, k1, k2, *args.tensors, compile=compile)
    if names:
        return res[0].view(x.shape), res[1]
    return res.view(x.shape)


def keep_count(n: int, sparsity: float) -> int:
    """Elements kept by top-k at sparsity S: max(1, n - round(S*n))."""
    # round-half-even of S*n zeros (Python round), never fewer than one kept element
    return max(1, n - round(sparsity * n))


def topk_threshold(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The k-th largest |x| (0-d tensor of x's dtype) with k = max(1, n - round(S*n)).

    The "top-k then stochastic" baseline prunes at this threshold. NaN counts as largest.
    Cost: one selection (``kthvalue``) over the tensor, no host sync.
    """
    require_float_tensor(x, "x")
    s = require_open_unit(sparsity, "sparsity")
    n = x.numel()
    if n == 0:
        raise ValueError("x must have at least one element")
    k = keep_count(n, s)
    return torch.kthvalue(x.detach().reshape(-1).abs(), n - k + 1).values


def topk_prune(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Deterministic top-k pruning: keep the k = max(1, n - round(S*n)) largest |x|, zero the rest.

    Biased (no rescaling). Ties at the k-th magnitude are broken by ``torch.topk`` (which
    elements win is unspecified, but the count is exactly k). NaN counts as largest.
    """
    require_float_tensor(x, "x")
    s = require_open_unit(sparsity, "sparsity")
    flat = x.detach().reshape(-1)
    if flat.numel() == 0:
        return x.clone()
    idx = torch.topk(flat.abs(), keep_count(flat.numel(), s), sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view(x.shape)


def topk_stochastic_prune(x: torch.Tensor, sparsity: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """"Top-k then stochastic" baseline: Eq. 5 at a = ``topk_threshold(x, S)`` (the k-th largest
    magnitude of the tensor itself, recomputed on every call).

    Its expected sparsity is below S (elements under a are kept as +-a with probability |x|/a).
    """
    return stochastic_prune(x, topk_threshold(x, sparsity), generator)
