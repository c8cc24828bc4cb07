"""Stochastic-pruning analysis: expected sparsity, thresholds, cosine similarity (Eq. 6-8, A.9).

The operator (paper Eq. 5) keeps ``|x| >= a``, maps ``a*eps <= |x| < a`` to ``sign(x) a`` and
zeroes the rest, eps ~ U[0, 1). An element is therefore zeroed with probability
``max(0, 1 - |x|/a)``, which gives every threshold solver here:

* ``lognormal_threshold``: ln|x| ~ N(mu, sigma^2) on the non-zeros (corrected Eq. 8), with the
  zero correction S' = (S - z)/(1 - z): exact zeros are already pruned, so only the remaining
  fraction is asked of the lognormal non-zeros. Vectorised: one call solves every layer.
* ``normal_threshold``: ATP's normal assumption (baseline).
* ``empirical_threshold``: distribution free, exact on a sample (no model of |x|).

All functions accept Python floats, numpy arrays or tensors (broadcast together) and return the
same kind: a float64 tensor on the inputs' device if any input is a tensor, else a numpy array,
else a float. Validation of the arguments reads them on the host (one sync per call, meant for
the once-per-refresh solve); ``empirical_threshold`` and ``empirical_sparsity`` never sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.special import log_ndtr, ndtr, ndtri

from gradcomp.numerics._checks import require_float_tensor

__all__ = [
    "empirical_sparsity",
    "empirical_threshold",
    "expected_sparsity",
    "lognormal_threshold",
    "normal_threshold",
    "pruned_cosine",
]

_NEWTON_STEPS = 60  # each step at least halves the bracket: 2^-60 of a width <= ~40 in ln a
_SQRT1_2 = math.sqrt(0.5)


def _prepare(*values):
    """Broadcast to float64 tensors; remember the output kind ('tensor'/'numpy'/'float')."""
    kind = "float"
    device = None
    for v in values:
        if isinstance(v, torch.Tensor):
            kind = "tensor"
            device = v.device if device is None else device
        elif isinstance(v, np.ndarray) and kind == "float":
            kind = "numpy"
    ts = [torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]
    return list(torch.broadcast_tensors(*ts)), kind


def _finish(t: torch.Tensor, kind: str):
    if kind == "tensor":
        return t
    if kind == "numpy":
        return t.cpu().numpy()
    return float(t)


def _layer_name(i: int, names) -> str:
    return f"layer {names[i]!r}" if names is not None else f"layer {i}"


def _check_open_unit(t: torch.Tensor, name: str) -> None:
    bad = ~((t > 0) & (t < 1))
    if bool(bad.any()):
        v = t.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]].item()
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {v!r}")


def _check_finite(t: torch.Tensor, name: str, names=None, lo: float | None = None) -> None:
    flat = t.reshape(-1)
    bad = ~torch.isfinite(flat)
    if lo is not None:
        bad |= flat < lo
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        rule = "finite" if lo is None else f"finite and >= {lo}"
        where = _layer_name(i, names)
        raise ValueError(f"{name} must be {rule}, got {flat[i].item()!r} for {where}")


def _sparsity_of_t(t: torch.Tensor, sigma: torch.Tensor):
    """Eq. 8 (corrected) in t = ln(a) - mu for the non-zeros, and dS/dt.

    S(t) = Phi(t/s) - exp(s^2/2 - t) Phi((t - s^2)/s). The second term is computed in the log
    domain (log_ndtr) so it neither overflows nor cancels for large sigma. Its value is also the
    derivative: dS/dt = E[|x|/a; |x| < a] (the two density terms cancel), so S is increasing.
    """
    term2 = torch.exp(sigma * sigma / 2 - t + log_ndtr((t - sigma * sigma) / sigma))
    return ndtr(t / sigma) - term2, term2


def expected_sparsity(a, mu, sigma, zero_fraction=0.0):
    """Expected fraction of zeros after stochastic pruning at threshold ``a`` (Eq. 8, corrected).

    ln|x| ~ N(mu, sigma^2) on the non-zeros; a fraction ``zero_fraction`` of exact zeros stays
    zero: S = z + (1 - z) S_nonzero(a). ``a <= 0`` (no pruning) gives z; sigma = 0 gives the
    point-mass limit max(0, 1 - e^mu/a). NaN in any argument propagates to the result.
    """
    (a, mu, sigma, z), kind = _prepare(a, mu, sigma, zero_fraction)
    t = torch.log(a.clamp_min(torch.finfo(torch.float64).tiny)) - mu
    s_pos, _ = _sparsity_of_t(t, sigma.clamp_min(1e-300))
    s_point = (1 - torch.exp(-t)).clamp_min(0)
    s = torch.where(sigma > 0, s_pos, s_point)
    s = torch.where(a > 0, s, torch.zeros_like(s))
    s = torch.where(torch.isnan(a) | torch.isnan(mu) | torch.isnan(sigma), torch.nan, s)
    return _finish(z + (1 - z) * s, kind)


def _check_lognormal_args(s, mu, sigma, z, names) -> None:
    """Argument checks of ``lognormal_threshold``: one host read when all is well."""
    bad = ~((s > 0) & (s < 1)) | ~torch.isfinite(mu) | ~(sigma >= 0) | ~torch.isfinite(sigma)
    bad |= ~((z >= 0) & (z <= 1))
    if not bool(bad.any()):
        return
    _check_open_unit(s, "sparsity")  # each raises with the argument and the layer named
    _check_finite(mu, "mu", names)
    _check_finite(sigma, "sigma", names, lo=0.0)
    _check_finite(z, "zero_fraction", names, lo=0.0)
    raise ValueError(f"zero_fraction must be in [0, 1], got max {z.max().item()!r}")


def _bracketed_solve(sp, sig):
    """Safeguarded Newton/bisection on S(t) = S' in the closed-form bracket (fallback solver).

    Every step is Newton (dS/dt in closed form) or, when Newton leaves the bracket [sigma
    Phi^-1(S'), sigma^2/2 - ln(1 - S')] (S <= Phi(t/sigma) and S >= 1 - E|x|/a), bisection;
    the bracket shrinks every step, so 60 steps reach a relative error of a ~1e-15.
    """
    lo = sig * ndtri(sp)
    hi = sig * sig / 2 - torch.log1p(-sp)
    t = (lo + hi) / 2
    for _ in range(_NEWTON_STEPS):
        f, fp = _sparsity_of_t(t, sig)
        f = f - sp
        lo = torch.where(f < 0, t, lo)
        hi = torch.where(f < 0, hi, t)
        newton = t - f / fp
        ok = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        t = torch.where(ok, newton, (lo + hi) / 2)
    return t


def lognormal_threshold(sparsity, mu, sigma, zero_fraction=0.0, names: Sequence | None = None):
    """Threshold ``a`` with expected sparsity ``sparsity`` for lognormal |x| (Eq. 8).

    Solves S(a) = S' with S' = (S - z)/(1 - z) on the non-zeros; where ``zero_fraction >=
    sparsity`` the zeros already meet the target and the threshold is 0 (no pruning).
    sigma = 0 gives a = e^mu / (1 - S'). Vectorised: all arguments broadcast, one call solves
    all layers (about 5 passes of Newton over the vector of layers, no loop over layers).

    Method, in t = ln a - mu: S(t) and 1 - S(t) = E[min(1, |x|/a)] are both log-concave in t
    (their integrands are jointly log-concave in (ln|x|, t), Prekopa's theorem), so Newton on
    ln S(t) = ln S' (used for S' <= 1/2) converges monotonically from below and Newton on
    ln(1 - S(t)) = ln(1 - S') (S' > 1/2) monotonically from above, from any start after one
    step. The quantity solved for is the one computed without cancellation (1 - S as a sum of
    two positive terms), so targets near 1 keep full relative accuracy in 1 - S'. Start: the
    best one-step image of 8 points spread over the closed-form bracket [sigma Phi^-1(S'),
    sigma^2/2 - ln(1 - S')]. A layer has converged when a Newton step moves t by at most
    1e-11 (1 + |t|) (the next error is then ~ the square of that); layers that have not after
    8 steps (none for sigma in (0, 40], S' in [1e-6, 1 - 1e-12]) are solved by safeguarded
    Newton/bisection in the same bracket, which converges unconditionally. Relative error
    of a: a few ulp of t (<= 3e-13 over that range, ~1e-15 for sigma <= 4).

    Raises ValueError for sparsity outside (0, 1), zero_fraction outside [0, 1], and non-finite
    mu or negative/non-finite sigma, naming the layer (``names[i]`` if given, else its index).
    """
    (s, mu, sigma, z), kind = _prepare(sparsity, mu, sigma, zero_fraction)
    _check_lognormal_args(s, mu, sigma, z, names)
    prune = z < s
    sp = torch.where(prune, (s - z) / (1 - z).clamp_min(1e-300), torch.full_like(s, 0.5))
    sig = sigma.clamp_min(1e-300)
    t = _monotone_newton(sp, sig, active=prune & (sigma > 0))
    t = torch.where(sigma > 0, t, -torch.log1p(-sp))
    a = torch.where(prune, torch.exp(mu + t), torch.zeros_like(t))
    return _finish(a, kind)


def _monotone_newton(sp, sig, active):
    """t = ln a - mu solving S(t) = S' (see ``lognormal_threshold``), all layers at once."""
    upper = sp > 0.5
    k = torch.where(upper, 1.0, -1.0).to(sp.dtype)  # R = Phi(-k u) + k e^(..): 1 - S or S
    inv_s = 1 / sig
    neg_s = -sig
    c = sig * sig / 2
    m = k * inv_s * _SQRT1_2
    log_target = torch.where(upper, torch.log1p(-sp), torch.log(sp))

    def newton(t):
        # S(t) = Phi(u) - T2, 1 - S(t) = Phi(-u) + T2 with u = t/sigma (Eq. 8) and
        # T2 = exp(sigma^2/2 - t) Phi(u - sigma) = dS/dt, in the log domain (no overflow);
        # Phi(-k u) as erfc(k u/sqrt 2)/2: accurate in both tails (ndtr is not in the lower)
        log_t2 = (c - t).add_(log_ndtr(torch.addcmul(neg_s, t, inv_s)))
        r = torch.special.erfc(t * m).mul_(0.5).addcmul_(k, torch.exp(log_t2))
        log_r = torch.log(r)
        # d ln R/dt = -k T2/R: t_new = t + k (ln R - ln R*) R/T2, with R/T2 in the log domain
        return torch.addcmul(t, k, (log_r - log_target).mul_(torch.exp(log_r - log_t2)))

    lo = sig * ndtri(sp)
    hi = c - torch.log1p(-sp)
    starts = torch.lerp(lo, hi, torch.linspace(0, 1, 8, dtype=sp.dtype, device=sp.device)
                        .reshape((8,) + (1,) * sp.dim()))
    # every one-step image lies on the far side of the root (k t >= k t*), as does the bound
    images = (newton(starts) * k).nan_to_num_(nan=math.inf, posinf=math.inf)
    bound = torch.where(upper, hi, lo) * k
    t = torch.minimum(images.amin(0), bound).mul_(k)
    for step in range(8):
        t_new = newton(t)
        if step >= 2:  # converged layers stop moving (one host read per check)
            moved = (t_new - t).abs() > 1e-11 * (1 + t_new.abs())
            moved |= ~torch.isfinite(t_new)
            if not bool((moved & active).any()):
                return t_new
        t = t_new
    return torch.where(moved, _bracketed_solve(sp, sig), t)


def normal_threshold(sparsity, mean_abs):
    """ATP baseline threshold (Ye et al. 2019): x ~ N(0, sigma_hat^2).

    sigma_hat = sqrt(pi/2) * mean|g| (mean over *all* elements, zeros included, as ATP does);
    a = sigma_hat * Phi^-1((1 + p)/2), the |x| quantile p of that normal. ``mean_abs = 0`` gives
    a = 0 (nothing to prune). Raises ValueError for p outside (0, 1) or a negative or
    non-finite mean_abs.
    """
    (p, m), kind = _prepare(sparsity, mean_abs)
    _check_open_unit(p, "sparsity")
    _check_finite(m, "mean_abs", lo=0.0)
    return _finish(math.sqrt(math.pi / 2) * m * ndtri((1 + p) / 2), kind)


def _padded(sample, counts):
    """(rows, n) |sample| matrix in the sample's dtype (float32 at least) and ``counts``.

    A list is padded with NaN; with ``counts`` given, entries past each row's count become NaN
    (excluded like the sample's own NaN/inf entries).
    """
    fresh = False  # whether mat is a copy this function may modify in place
    if isinstance(sample, torch.Tensor):
        require_float_tensor(sample, "sample")
        if sample.dim() == 1:
            mat = sample.detach().unsqueeze(0)
        elif sample.dim() == 2:
            mat = sample.detach()
        else:
            raise ValueError(f"sample must be 1-D or a padded 2-D matrix, got {sample.dim()}-D")
    elif isinstance(sample, Sequence) and len(sample) > 0:
        for i, s in enumerate(sample):
            require_float_tensor(s, f"sample[{i}]")
        flat = [s.detach().reshape(-1) for s in sample]
        mat = torch.nn.utils.rnn.pad_sequence(flat, batch_first=True, padding_value=math.nan)
        fresh = True
    else:
        raise TypeError("sample must be a tensor or a non-empty list of 1-D tensors")
    if mat.dtype not in (torch.float32, torch.float64):
        mat, fresh = mat.float(), True  # exact; the sort needs a dtype numpy also has
    # never modify the caller's tensor: the sort works in place
    mat = mat.abs_() if fresh else mat.abs()
    if counts is not None:
        counts = torch.as_tensor(counts, device=mat.device).reshape(-1, 1)
        mat.masked_fill_(torch.arange(mat.shape[1], device=mat.device) >= counts, math.nan)
    return mat


def _sorted_rows(mat: torch.Tensor) -> torch.Tensor:
    """Each row ascending (+inf, then NaN, last), in place where possible.

    On the CPU numpy's sort (values only, vectorised quicksort) is an order of magnitude
    faster than torch.sort (a stable sort that also produces indices); the values are the
    same either way.
    """
    if mat.device.type == "cpu":
        mat.numpy().sort(axis=1)
        return mat
    return torch.sort(mat, dim=1).values


def empirical_threshold(sample, sparsity, counts=None):
    """Threshold ``a`` solving mean_i max(0, 1 - |x_i|/a) = S exactly on a sample.

    The left side is the exact expected sparsity of stochastic pruning (Eq. 5) on those
    values; it is continuous and increasing in a. After one sort of |x| (ascending v_1..v_n,
    prefix sums P_j), on the segment where the first j values lie below a it equals
    (j - P_j/a)/n, so a = P_j / (j - nS) for the segment j whose knots bracket S. The knot
    a = v_j lies at or below the root iff (j - nS) v_j <= P_j, true for j = 1..j* and false
    after (the left side increases in a), so j* is a count, found on ~2 sqrt(n) knots per row
    (every sqrt(n)-th knot, then the knots after the last true one). Cost: one sort of the
    padded (layers, n) matrix and one float64 cumsum, all layers at once; no loop over layers.
    Exact up to float64 rounding (the same bits as evaluating every knot).

    Args:
        sample: a 1-D tensor (one layer, 0-d result), a list of tensors (one per layer,
            flattened and padded internally) or a padded (layers, n) matrix with ``counts``
            valid entries per row (1-D result). Any float dtype and device; NaN/inf entries
            are excluded (n counts the finite values).
        sparsity: float (or a CPU sequence/tensor, one per row) strictly inside (0, 1).
    Returns a float64 tensor on the sample's device. Where the sample's zeros already reach
    the target (including an all-zero or empty sample) the threshold is 0: no pruning.
    No host synchronisation (the solve is sort, cumsum, compare, gather).
    """
    if isinstance(sparsity, torch.Tensor):
        s_host = sparsity.detach().cpu().to(torch.float64)
    else:
        s_host = torch.as_tensor(sparsity, dtype=torch.float64)
    _check_open_unit(s_host, "sparsity")
    single = isinstance(sample, torch.Tensor) and sample.dim() == 1
    v = _sorted_rows(_padded(sample, counts))  # finite |x| ascending, then +inf, then NaN
    rows, n = v.shape

    def knot(j):
        """v_j (1-based, float64) and whether 1 <= j <= n; j may run past the row."""
        i = j.clamp(1, n) - 1
        return torch.gather(v, 1, i).to(torch.float64), j <= n

    def finite(j):
        vj, inside = knot(j)
        return (vj < math.inf) & inside

    n_fin = _count_monotone(finite, n, rows, v.device)  # the sample size n of each row
    s = s_host.to(v.device).reshape(-1, 1) if s_host.dim() else s_host.to(v.device)
    ns = n_fin.to(torch.float64) * s
    P = v.to(torch.float64, copy=True).cumsum_(1)  # P[:, j-1] = sum of the j smallest

    def below(j):
        """Knot a = v_j at or below the root: (j - nS) v_j <= P_j, for j <= n_fin."""
        vj, _ = knot(j)
        Pj = torch.gather(P, 1, j.clamp(1, n) - 1)
        return ((j - ns) * vj <= Pj) & (j <= n_fin)

    jstar = _count_monotone(below, n, rows, v.device)  # the root lies in [v_j*, v_j*+1)
    Pj = torch.gather(P, 1, (jstar - 1).clamp_min(0))
    a = Pj / (jstar.to(torch.float64) - ns)
    # zeros >= nS  <=>  the ceil(nS)-th smallest value is 0: the zeros meet the target alone
    m = torch.ceil(ns).to(torch.int64).clamp(1, n) - 1
    no_prune = (torch.gather(v, 1, m) == 0) | (n_fin == 0)
    a = torch.where(no_prune, torch.zeros_like(a), a).reshape(rows)
    return a[0] if single else a


def _count_monotone(pred, n: int, rows: int, device) -> torch.Tensor:
    """Per row, the number of knots j in 1..n with ``pred(j)`` (true up to some j, then false).

    Counted on every B-th knot, then on the B - 1 knots after the last true one: two small
    passes of ~sqrt(n) gathers per row instead of one over all n knots.
    """
    B = max(1, math.isqrt(n))
    coarse = torch.arange(B, n + 1, B, device=device).expand(rows, -1)
    q = pred(coarse).sum(1, keepdim=True) * B
    return q + pred(q + torch.arange(1, B, device=device)).sum(1, keepdim=True)


def empirical_sparsity(sample, threshold, counts=None):
    """Exact expected sparsity mean_i max(0, 1 - |x_i|/a) of pruning ``sample`` at ``threshold``.

    Same sample forms as ``empirical_threshold``; ``threshold`` a float or a tensor with one
    value per row. a <= 0 means no pruning (only exact zeros count). No host synchronisation.
    """
    single = isinstance(sample, torch.Tensor) and sample.dim() == 1
    mat = _padded(sample, counts).to(torch.float64)
    a = torch.as_tensor(threshold, dtype=torch.float64, device=mat.device)
    a = a.reshape(-1, 1) if a.dim() else a
    fin = torch.isfinite(mat)
    frac = torch.where(a > 0, (1 - mat / a.clamp_min(1e-300)).clamp_min(0), (mat == 0).double())
    frac = torch.where(fin, frac, torch.zeros_like(frac))
    out = frac.sum(1) / fin.sum(1).clamp_min(1)
    return out[0] if single else out


def _log_diff(la, lb):
    """log(exp(la) - exp(lb)) for la >= lb (-inf when equal)."""
    return la + torch.log1p(-torch.exp(torch.clamp(lb - la, max=0)))


def pruned_cosine(a, mu, sigma, truncate_k=None):
    """Expected cosine similarity between x and its stochastically pruned T(x) (section 5.3, A.9).

    Unbiasedness gives E[x T(x)] = E[x^2] and E[T^2] = E[x^2; |x| > a] + a E[|x|; |x| <= a],
    so cos = sqrt(E[x^2] / E[T^2]), with the lognormal partial moments
    E[X^k; X <= b] = exp(k mu + k^2 sigma^2/2) Phi((ln b - mu - k sigma^2)/sigma).
    ``truncate_k`` (e.g. 2.7) restricts both moments to |x| <= K = e^(mu + k sigma), as the
    authors did because the untruncated value tends to 1 for large sigma. Exact zeros add
    nothing to either moment, so the zero fraction does not enter. a <= 0 gives 1.
    Computed in the log domain (no overflow for large sigma). Vectorised like the solvers.
    """
    trunc = math.inf if truncate_k is None else float(truncate_k)
    (a, mu, sigma), kind = _prepare(a, mu, sigma)
    sig = sigma.clamp_min(1e-300)
    t = torch.log(a.clamp_min(torch.finfo(torch.float64).tiny)) - mu
    T = torch.full_like(t, math.inf) if math.isinf(trunc) else trunc * sig
    m = torch.minimum(t, T)
    s2 = sig * sig
    # moments relative to exp(2 mu + 2 sigma^2) (the mu factors cancel in the ratio)
    l_num = log_ndtr((T - 2 * s2) / sig)
    l_low2 = log_ndtr((m - 2 * s2) / sig)
    l_lin = t + s2 / 2 - 2 * s2 + log_ndtr((m - s2) / sig)
    l_den = torch.logaddexp(_log_diff(l_num, l_low2), l_lin)
    cos = torch.exp(0.5 * (l_num - l_den)).clamp(max=1.0)
    cos = torch.where(a > 0, cos, torch.ones_like(cos))
    return _finish(cos, kind)
