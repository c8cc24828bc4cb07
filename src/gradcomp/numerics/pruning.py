"""Stochastic pruning operators (paper section 5, Eq. 5): pure functions, the hot path.

    stochastic_prune(x, a)     Eq. 5, unbiased: E[T(x)] = x. One fused pass (torch.compile).
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
from gradcomp.numerics.kernels import FusedOp, kernel_seed_keys
from gradcomp.numerics.random import draw_seed, uniform_from_keys

__all__ = ["stochastic_prune", "topk_prune", "topk_stochastic_prune", "topk_threshold",
           "keep_count"]


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
                        k2: torch.Tensor, start: int = 0):
    """``_prune_kernel`` plus its counts from the same loop: int64 [non-finite elements of x,
    zeros of the result, elements of the result with |value| == ``a_at``]."""
    out = _prune_kernel(x, a, k1, k2, start)
    counts = torch.stack([(~torch.isfinite(x)).sum(), (out == 0).sum(),
                          (out.abs() == a_at).sum()])
    return out, counts


_PRUNE = FusedOp(_prune_kernel, "stochastic_prune", elementwise=True)
_PRUNE_COUNT = FusedOp(_prune_count_kernel, "stochastic_prune", elementwise=True)


def stochastic_prune(x: torch.Tensor, threshold, generator: torch.Generator | None = None, *,
                     compile: bool | None = None, counts: bool = False):
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
    if x.numel() == 0:
        if counts:
            return x.clone(), torch.zeros(3, dtype=torch.int64, device=x.device)
        return x.clone()
    k1, k2 = kernel_seed_keys(draw_seed(generator, x.device))  # = random.seed_keys
    if counts:
        out, c = _PRUNE_COUNT(x.detach().reshape(-1), a, a_at, k1, k2, compile=compile)
        return out.view(x.shape), c
    out = _PRUNE(x.detach().reshape(-1), a, k1, k2, compile=compile)
    return out.view(x.shape)


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
