"""Stochastic pruning of neural gradients (paper section 5, Eq. 5-8; notes sections 3-4).

Operators (hot path, tensor ops, no host sync):
    stochastic_prune(x, a)     Eq. 5, unbiased: E[T(x)] = x. One fused pass (torch.compile).
    topk_prune(x, S)           deterministic baseline (SAW / meProp): keep the k largest |x|.
    topk_stochastic_prune      "top-k then stochastic": a = k-th largest |x|, then Eq. 5.
State (refreshed on a schedule): ``Pruner``; heterogeneous budgets: ``allocate_sparsity``.

Speed: the fused path draws ONE int64 seed per call from the caller's generator and hashes
(seed, element index) inside the kernel (``gradcomp.numerics.random``), so there is no
``torch.rand`` pass and no full-size random buffer. ``GRADCOMP_COMPILE=0`` selects the eager
path (same numbers, bit for bit; much slower on the CPU); ``1`` (default) compiles with
``torch.compile`` and falls back to eager, with one warning, if compilation fails.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from gradcomp.numerics._checks import require_choice, require_float_tensor, require_open_unit
from gradcomp.numerics.fit import LognormalFit
from gradcomp.numerics.random import draw_seed, seed_keys, uniform_from_keys
from gradcomp.numerics.sparsity import (
    _sparsity_of_t,
    empirical_sparsity,
    empirical_threshold,
    expected_sparsity,
    lognormal_threshold,
    normal_threshold,
    pruned_cosine,
)

__all__ = [
    "Allocation",
    "PRUNE_METHODS",
    "Pruner",
    "allocate_sparsity",
    "stochastic_prune",
    "topk_prune",
    "topk_stochastic_prune",
    "topk_threshold",
]


def _prune_kernel(x: torch.Tensor, a: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor):
    """Eq. 5 on a flat tensor; ``a`` is already rounded to x's dtype, held in compute precision.

    |x| >= a (and NaN, whose comparisons are false): kept; u*a <= |x| < a: sign(x)*a;
    |x| < u*a: 0; u ~ U[0,1) from the counter hash, so P(keep as a) = |x|/a: unbiased.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cdt)
    u = uniform_from_keys(k1, k2, x.numel(), x.device, cdt)
    ax = xf.abs()
    small = torch.where(ax >= a * u, torch.copysign(a.expand_as(xf), xf), torch.zeros_like(xf))
    return torch.where(ax < a, small, xf).to(x.dtype)


_compiled = None
_compile_failed = False


def _kernel():
    """The fused kernel per ``GRADCOMP_COMPILE`` (read at each call so tests can switch it)."""
    global _compiled
    flag = os.environ.get("GRADCOMP_COMPILE", "1")
    require_choice(flag, "GRADCOMP_COMPILE", ("0", "1"))
    if flag == "0" or _compile_failed:
        return _prune_kernel
    if _compiled is None:
        _compiled = torch.compile(_prune_kernel, dynamic=None)
    return _compiled


def stochastic_prune(x: torch.Tensor, threshold, generator: torch.Generator | None = None):
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
    Cost: one pass (read x, write the result) in the fused path; no host sync.
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
    a = a.to(x.dtype).to(cdt)
    a = torch.where(a > 0, a, torch.zeros_like(a))  # NaN / negative -> 0: nothing below it
    if x.numel() == 0:
        return x.clone()
    k1, k2 = seed_keys(draw_seed(generator, x.device))
    flat = x.detach().reshape(-1)
    global _compile_failed
    kernel = _kernel()
    try:
        out = kernel(flat, a, k1, k2)
    except Exception as exc:  # compiler missing / unsupported backend: eager is exact too
        if kernel is _prune_kernel:
            raise
        _compile_failed = True
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); using the eager "
                      "stochastic_prune path", RuntimeWarning, stacklevel=2)
        out = _prune_kernel(flat, a, k1, k2)
    return out.view(x.shape)


def _keep_count(n: int, sparsity: float) -> int:
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
    k = _keep_count(n, s)
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
    idx = torch.topk(flat.abs(), _keep_count(flat.numel(), s), sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view(x.shape)


def topk_stochastic_prune(x: torch.Tensor, sparsity: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """"Top-k then stochastic" baseline (notes 3): Eq. 5 at a = ``topk_threshold(x, S)``.

    Its expected sparsity is below S (elements under a are kept as +-a with probability |x|/a).
    """
    return stochastic_prune(x, topk_threshold(x, sparsity), generator)


# ---------------------------------------------------------------------------------------------
# Pruner: one interface for the model wrapper


def _atp_mean_abs(fit: LognormalFit, sample: torch.Tensor | None) -> float:
    if sample is not None:
        s = sample.detach().reshape(-1)
        s = s[torch.isfinite(s)]
        return float(s.abs().double().mean()) if s.numel() else 0.0
    # lognormal moment of the non-zeros times the non-zero fraction (ATP's mean over all)
    z, mu, sig = float(fit.zero_fraction), float(fit.mu), float(fit.sigma)
    return (1 - z) * math.exp(mu + sig * sig / 2)


class Pruner:
    """Stochastic pruning of one layer's neural gradient at a target sparsity.

    ``update(fit, sample)`` runs on the refresh schedule (e.g. once per epoch) and sets the
    threshold; ``__call__(x, generator)`` prunes in the hot path; before the first update the
    pruner passes tensors through unchanged (dense warm-up). Methods and their cost:

    ============== =================================================== ========================
    method         threshold at update                                  cost
    ============== =================================================== ========================
    lognormal      Eq. 8 from the fit (mu, sigma, zero fraction)        update: 1 host sync
                                                                        (60-step scalar solve)
    empirical      exact expected sparsity on ``sample`` (issue 8)      update: sort of the
                                                                        sample, no sync
    calibrated     lognormal x a bounded running factor corrected by    update: 2 host syncs
                   the achieved sparsity measured since the last        (solve + measured
                   refresh (a Newton step in ln a using dS/d ln a);     sparsity)
                   factor in [1/bound, bound], reset to 1 when mu or
                   sigma jump (e.g. after a learning-rate drop)
    atp            normal assumption, sigma from mean|g| (baseline)     update: 1 host sync
    topk_stochastic a = k-th largest |x| of *each* call's tensor        call: + one kthvalue
    ============== =================================================== ========================

    Every call: one fused pass over x plus one reduction for ``metrics()`` (achieved sparsity,
    a device tensor; no sync). With ``fit.count < 2`` (nothing to fit) the threshold is 0.

    Args:
        sparsity: target fraction of zeros, in (0, 1).
        method: one of ``PRUNE_METHODS``.
        calibration_bound: the calibrated factor stays in [1/bound, bound] (> 1).
        jump_tolerance: reset the factor when |d mu| > tol * sigma or |d sigma| > tol * sigma.
    """

    def __init__(self, sparsity: float, method: str = "lognormal", *,
                 calibration_bound: float = 4.0, jump_tolerance: float = 0.5):
        self.sparsity = require_open_unit(sparsity, "sparsity")
        self.method = require_choice(method, "method", PRUNE_METHODS)
        if not (math.isfinite(calibration_bound) and calibration_bound > 1):
            raise ValueError(f"calibration_bound must be finite and > 1, got {calibration_bound!r}")
        if not (math.isfinite(jump_tolerance) and jump_tolerance > 0):
            raise ValueError(f"jump_tolerance must be finite and > 0, got {jump_tolerance!r}")
        self.calibration_bound = float(calibration_bound)
        self.jump_tolerance = float(jump_tolerance)
        self.threshold: torch.Tensor | None = None
        self.log_factor = 0.0
        self._prev: tuple[float, float, float] | None = None  # mu, sigma, slope dS/d ln a
        self._last_sparsity: torch.Tensor | None = None
        # measuring the achieved sparsity costs a pass over x; a caller that counts zeros
        # itself (the model wrapper, on metric steps) turns it off between measurements
        self.track_sparsity = True
        self._calls_since_update = 0

    # --- threshold methods (a registry, not an if/elif chain) ---
    def _lognormal(self, fit, sample):
        if int(fit.count) < 2:
            return 0.0
        return lognormal_threshold(self.sparsity, fit.mu, fit.sigma, fit.zero_fraction)

    def _empirical(self, fit, sample):
        if sample is None:
            raise ValueError("method 'empirical' needs a sample: call update(fit, sample)")
        return empirical_threshold(sample.detach().reshape(-1), self.sparsity)

    def _calibrated(self, fit, sample):
        if int(fit.count) < 2:
            return 0.0
        mu, sig, z = float(fit.mu), float(fit.sigma), float(fit.zero_fraction)
        measured = None
        if self._last_sparsity is not None and self._calls_since_update > 0:
            measured = float(self._last_sparsity)
        elif sample is not None and self.threshold is not None:
            measured = float(empirical_sparsity(sample.detach().reshape(-1), self.threshold))
        if self._prev is not None:
            pmu, psig, slope = self._prev
            tol = self.jump_tolerance * max(sig, psig, 1e-12)
            if abs(mu - pmu) > tol or abs(sig - psig) > tol:
                self.log_factor = 0.0  # statistics jumped: the old correction is stale
            elif measured is not None and slope > 0:
                step = (self.sparsity - measured) / slope
                bound = math.log(self.calibration_bound)
                step = max(-bound / 2, min(bound / 2, step))  # damp single noisy readings
                self.log_factor = max(-bound, min(bound, self.log_factor + step))
        base = lognormal_threshold(self.sparsity, mu, sig, z)
        a = base * math.exp(self.log_factor)
        slope = 0.0
        if a > 0 and sig > 0:
            t = torch.tensor(math.log(a) - mu, dtype=torch.float64)
            slope = (1 - z) * float(_sparsity_of_t(t, torch.tensor(sig, dtype=torch.float64))[1])
        self._prev = (mu, sig, slope)
        return a

    def _atp(self, fit, sample):
        return normal_threshold(self.sparsity, _atp_mean_abs(fit, sample))

    def _topk_stochastic(self, fit, sample):
        return None  # computed from each call's tensor

    def update(self, fit: LognormalFit, sample: torch.Tensor | None = None) -> None:
        """Refresh the threshold from this layer's statistics (and a device-side sample).

        ``fit`` is ``fit_lognormal`` of the layer's recent neural gradient; ``sample`` a 1-D
        tensor of its values (zeros included; required by 'empirical', used by 'atp' and
        'calibrated' when given).
        """
        if not isinstance(fit, LognormalFit):
            raise TypeError(f"fit must be a LognormalFit, got {type(fit).__name__}")
        if sample is not None:
            require_float_tensor(sample, "sample")
        a = _METHODS[self.method](self, fit, sample)
        if a is None:
            self.threshold = None
        else:
            dev = fit.mu.device
            self.threshold = torch.as_tensor(a, dtype=torch.float64).to(dev).reshape(())
        self._calls_since_update = 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prune ``x`` with the current threshold (see ``stochastic_prune``); no host sync."""
        require_float_tensor(x, "x")
        if self.method == "topk_stochastic":
            out = topk_stochastic_prune(x, self.sparsity, generator) if x.numel() else x.clone()
        elif self.threshold is None:
            out = x.clone()
        else:
            out = stochastic_prune(x, self.threshold, generator)
        if out.numel() and (self.track_sparsity or self.method == "calibrated"):
            self._last_sparsity = (out == 0).sum().to(torch.float64) / out.numel()
        self._calls_since_update += 1
        return out

    def metrics(self) -> dict:
        """Device tensors for logging: achieved sparsity of the last call, threshold, factor."""
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return {
            "sparsity": self._last_sparsity if self._last_sparsity is not None else nan,
            "threshold": self.threshold if self.threshold is not None else nan,
            "calibration_factor": math.exp(self.log_factor),
        }

    def state_dict(self) -> dict:
        """Everything needed to resume: target, method, threshold, calibration state."""
        return {
            "sparsity": self.sparsity,
            "method": self.method,
            "threshold": None if self.threshold is None else self.threshold.detach().cpu(),
            "log_factor": self.log_factor,
            "prev": self._prev,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (the threshold moves to its previous device: CPU)."""
        self.sparsity = require_open_unit(state["sparsity"], "state['sparsity']")
        self.method = require_choice(state["method"], "state['method']", PRUNE_METHODS)
        th = state["threshold"]
        self.threshold = None if th is None else torch.as_tensor(th, dtype=torch.float64)
        self.log_factor = float(state["log_factor"])
        self._prev = None if state["prev"] is None else tuple(state["prev"])


_METHODS = {
    "lognormal": Pruner._lognormal,
    "empirical": Pruner._empirical,
    "calibrated": Pruner._calibrated,
    "atp": Pruner._atp,
    "topk_stochastic": Pruner._topk_stochastic,
}
PRUNE_METHODS = tuple(_METHODS)


# ---------------------------------------------------------------------------------------------
# Heterogeneous allocation (paper section 5.3, appendix A.9; notes section 4)


@dataclass(frozen=True)
class Allocation:
    """Per-layer result of ``allocate_sparsity`` (float64 tensors, one entry per layer).

    sparsities: total fraction of zeros per layer (exact zeros included).
    thresholds: Eq. 8 threshold reaching that sparsity (0 = no pruning).
    cosines: predicted (truncated) cosine similarity of each pruned layer.
    overall: element-weighted mean of ``sparsities``.
    level: the common cosine of phase 2, or None when phase 1 (all >= cos_target) sufficed.
    """

    sparsities: torch.Tensor
    thresholds: torch.Tensor
    cosines: torch.Tensor
    overall: float
    level: float | None


def _t_at_cosine(level, mu, sig, t_hi, truncate_k, steps=70):
    """Largest t <= t_hi with cos(t) >= level, per layer (cos decreases in t: bisection)."""
    lo = t_hi - 40 * sig - 60  # S ~ Phi(-40): cos = 1 to double precision
    hi = t_hi.clone()
    ok_hi = pruned_cosine(torch.exp(mu + hi), mu, sig, truncate_k) >= level
    for _ in range(steps):
        mid = (lo + hi) / 2
        good = pruned_cosine(torch.exp(mu + mid), mu, sig, truncate_k) >= level
        lo = torch.where(good, mid, lo)
        hi = torch.where(good, hi, mid)
    return torch.where(ok_hi, t_hi, lo)


def allocate_sparsity(numels, mus, sigmas, zero_fractions, target: float, *,
                      cos_target: float = 0.9, cap: float = 0.95,
                      truncate_k: float | None = 2.7) -> Allocation:
    """Per-layer sparsities whose element-weighted mean equals ``target`` (to 1e-9), capped.

    Each layer's sparsity lives in [z_i, max(z_i, cap)] (its zeros cannot be un-pruned) and its
    predicted cosine (``pruned_cosine``, truncated at e^(mu + k sigma)) decreases as it rises.
    Algorithm (two monotone one-parameter families, each solved by bisection):

    1. Layers share one sparsity s, except that a layer never goes above C_i, the sparsity at
       which its cosine reaches ``cos_target``: S_i(s) = clip(min(s, C_i), z_i, cap). The
       overall sparsity is continuous and non-decreasing in s; bisection on s hits the target.
       Every layer then keeps cos >= cos_target (layers held at C_i free budget for the rest).
    2. If even s = cap is short of the target, the budget cannot keep every layer at
       cos_target: all free layers drop to one common cosine level L < cos_target, found by
       bisection (S_i(L) = clip(sparsity where cos = L, z_i, cap)); this maximises the
       smallest cosine under the budget and the caps.

    If the zeros alone exceed the target, no layer is pruned (overall > target, thresholds 0).
    Raises ValueError when the target exceeds what the caps allow, or for bad arguments.
    The authors' released code never updated its running budget; this one meets it exactly.
    """
    n = torch.as_tensor(numels, dtype=torch.float64).reshape(-1)
    mu = torch.as_tensor(mus, dtype=torch.float64).reshape(-1)
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    z = torch.as_tensor(zero_fractions, dtype=torch.float64).reshape(-1)
    if not (n.shape == mu.shape == sig.shape == z.shape) or n.numel() == 0:
        raise ValueError("numels, mus, sigmas and zero_fractions must be non-empty and of one "
                         f"length, got {n.numel()}, {mu.numel()}, {sig.numel()}, {z.numel()}")
    if bool((n <= 0).any()):
        raise ValueError("numels must all be > 0")
    target = require_open_unit(target, "target")
    cos_target = require_open_unit(cos_target, "cos_target")
    cap = require_open_unit(cap, "cap")
    # validates mu/sigma/z per layer with the layer named, and gives t at the cap
    cap_i = torch.maximum(z, torch.full_like(z, cap))
    a_cap = lognormal_threshold(cap_i.clamp(max=1 - 1e-12), mu, sig, z)
    N = n.sum()

    def overall(S):
        return float((n * S).sum() / N)

    if overall(z) >= target:
        S = z.clone()
    elif overall(cap_i) < target:
        raise ValueError(f"target {target} exceeds the largest overall sparsity the cap {cap} "
                         f"allows ({overall(cap_i):.6f})")
    else:
        S = None
    level = None
    if S is None:
        pruned = a_cap > 0
        t_cap = torch.where(pruned, torch.log(a_cap.clamp_min(1e-300)) - mu, torch.zeros_like(mu))

        def sparsity_at_level(lvl):
            t = _t_at_cosine(lvl, mu, sig, t_cap, truncate_k)
            s = expected_sparsity(torch.exp(mu + t), mu, sig, z)
            return torch.where(pruned, s, z).clamp(min=z, max=cap_i)

        c_i = sparsity_at_level(cos_target)
        if overall(c_i) >= target:  # phase 1
            lo, hi = 0.0, cap
            for _ in range(100):
                mid = (lo + hi) / 2
                if overall(torch.minimum(torch.full_like(z, mid), c_i).clamp(min=z)) < target:
                    lo = mid
                else:
                    hi = mid
            S = torch.minimum(torch.full_like(z, hi), c_i).clamp(min=z)
        else:  # phase 2
            lo, hi = 0.0, cos_target  # overall(level) decreases with the level
            for _ in range(60):
                mid = (lo + hi) / 2
                if overall(sparsity_at_level(mid)) >= target:
                    lo = mid
                else:
                    hi = mid
            level = lo
            S = sparsity_at_level(lo)
    prune = S > z
    a = lognormal_threshold(torch.where(prune, S, torch.full_like(S, 0.5)), mu, sig,
                            torch.where(prune, z, torch.zeros_like(z)))
    a = torch.where(prune, a, torch.zeros_like(a))
    return Allocation(sparsities=S, thresholds=a, cosines=pruned_cosine(a, mu, sig, truncate_k),
                      overall=overall(S), level=level)
