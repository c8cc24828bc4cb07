"""Stochastic pruning of neural gradients (paper section 5, Eq. 5-8): the stateful side.

The operators (``stochastic_prune`` Eq. 5, ``topk_prune``, ``topk_stochastic_prune``,
``topk_threshold``) are pure functions in :mod:`gradcomp.numerics.pruning`, re-exported here.
State refreshed on a schedule: ``Pruner`` (one layer) and ``PrunerGroup`` (every layer of a
model: the vectorised empirical threshold refresh and the heterogeneous allocation of
``allocate_sparsity``, appendix A.9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradcomp.compressors._counts import CountsMixin, nonfinite_flag, read_floats
from gradcomp.numerics._checks import require_choice, require_float_tensor, require_open_unit
from gradcomp.numerics.fit import LayerStats
from gradcomp.numerics.kernels import use_compiled
from gradcomp.numerics.pruning import (
    prune_quantize,
    prune_quantize_amax,
    prune_quantize_amax_unchecked,
    prune_unchecked,
    stochastic_prune,
    threshold_step,
    topk_prune,
    topk_stochastic_prune,
    topk_threshold,
    track_written,
)
from gradcomp.numerics.random import Stream
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
    "HETEROGENEOUS_METHODS",
    "PRUNE_METHODS",
    "Pruner",
    "TRACKING_METHODS",
    "PrunerGroup",
    "allocate_sparsity",
    "stochastic_prune",
    "topk_prune",
    "topk_stochastic_prune",
    "topk_threshold",
]


# ---------------------------------------------------------------------------------------------
# Pruner: one layer


def _atp_mean_abs(fit, sample: torch.Tensor | None) -> float:
    if sample is not None:
        s = sample.detach().reshape(-1)
        s = s[torch.isfinite(s)]
        return float(s.abs().double().mean()) if s.numel() else 0.0
    # lognormal moment of the non-zeros times the non-zero fraction (ATP's mean over all)
    z, mu, sig = float(fit.zero_fraction), float(fit.mu), float(fit.sigma)
    return (1 - z) * math.exp(mu + sig * sig / 2)


class Pruner(CountsMixin):
    """Pruning of one layer's neural gradient at a target sparsity.

    ``update(stats)`` runs on the refresh schedule (e.g. once per epoch) and sets the threshold
    from a :class:`~gradcomp.numerics.fit.LayerStats`; ``__call__(x, generator)`` prunes in the
    hot path; before the first update a threshold method passes tensors through unchanged (dense
    warm-up). Methods and their cost:

    =============== ================================================== ========================
    method          threshold at update                                 cost
    =============== ================================================== ========================
    empirical       exact expected sparsity on ``stats.sample``         update: sort of the
                    (distribution free; the default)                    sample, no sync
    lognormal       Eq. 8 from the fit (mu, sigma, zero fraction)       update: 1 host sync
                                                                        (60-step scalar solve)
    calibrated      lognormal x a bounded running factor corrected by   update: 2 host syncs
                    the achieved sparsity measured since the last       (solve + measured
                    refresh (a Newton step in ln a using dS/d ln a);    sparsity)
                    factor in [1/bound, bound], reset to 1 when mu or
                    sigma jump (e.g. after a learning-rate drop)
    atp             normal assumption, sigma from mean|g| (baseline)    update: 1 host sync
    topk_stochastic a = k-th largest |x| of *each* call's tensor, then  call: + one kthvalue
                    Eq. 5
    topk            deterministic top-k (meProp/SAW; biased), no        call: one topk
                    threshold, active from the first call
    =============== ================================================== ========================

    Tracking (method ``empirical``, homogeneous or with allocated per-layer targets): the
    refresh sets a threshold exact for the refresh step's gradient, but the gradients drift
    between refreshes (early in training they shrink step after step, so a threshold held
    fixed over-prunes by several points by the next refresh; late in training single batches
    differ by a few points). So every measured call (``measure=True``: the wrapper's metric
    steps, every ``metrics_every`` steps) also corrects the threshold from the sparsity it just
    achieved, a Newton step in ln a on device (no host sync):

        ln a <- ln a + gain * (S_target - S) / (dS/d ln a),   step clipped to [-1, 1]

    where S is the call's fraction of zeros and dS/d ln a = E[|x|/a; |x| < a] (for
    S(a) = E[max(0, 1 - |x|/a)]) is exactly the expected fraction of +-a symbols, so both are
    counted on the call's output (the two reductions a measured call takes anyway, so tracking
    adds no pass). With ``gain=1`` the next call uses the threshold that would have met the
    target on this call (to first order): the achieved sparsity follows the target with a lag
    of one metric period of drift, and batch-to-batch noise
    averages out because the error is integrated (stochastic approximation of the threshold
    at which the mean achieved sparsity equals the target). ``tracking_gain=0`` turns it off.

    Every call with ``measure=True`` adds its counts (elements, zeros, elements at +-a) to
    device accumulators read by ``metrics()`` (no sync in the call). With ``fit.count < 2``
    (nothing to fit) the model-based thresholds are 0 (no pruning).

    Args:
        sparsity: target fraction of zeros, in (0, 1).
        method: one of ``PRUNE_METHODS``.
        calibration_bound: the calibrated factor stays in [1/bound, bound] (> 1).
        jump_tolerance: reset the factor when |d mu| > tol * sigma or |d sigma| > tol * sigma.
        tracking_gain: gain of the per-call threshold correction of the tracking methods
            (``TRACKING_METHODS``), in [0, 1]; 0 holds the threshold fixed between refreshes.
    """

    def __init__(self, sparsity: float = 0.8, method: str = "empirical", *,
                 calibration_bound: float = 4.0, jump_tolerance: float = 0.5,
                 tracking_gain: float = 1.0):
        self.sparsity = require_open_unit(sparsity, "sparsity")
        self.method = require_choice(method, "method", PRUNE_METHODS)
        if not (math.isfinite(calibration_bound) and calibration_bound > 1):
            raise ValueError(f"calibration_bound must be finite and > 1, got {calibration_bound!r}")
        if not (math.isfinite(jump_tolerance) and jump_tolerance > 0):
            raise ValueError(f"jump_tolerance must be finite and > 0, got {jump_tolerance!r}")
        if isinstance(tracking_gain, bool) or not isinstance(tracking_gain, (int, float)) or \
                not 0 <= tracking_gain <= 1:
            raise ValueError(f"tracking_gain must be a number in [0, 1], got {tracking_gain!r}")
        self.tracking_gain = float(tracking_gain)
        self.calibration_bound = float(calibration_bound)
        self.jump_tolerance = float(jump_tolerance)
        self._threshold: torch.Tensor | None = None
        # ``_track``'s device constants: (key, [n, target, gain, min slope], False)
        self._step_consts = None
        self._target: float | None = None  # an allocated per-layer sparsity (PrunerGroup)
        self.log_factor = 0.0
        self._prev: tuple[float, float, float] | None = None  # mu, sigma, slope dS/d ln a
        self._last_sparsity: torch.Tensor | None = None
        self._slope: torch.Tensor | None = None  # dS/d ln a from the last measured call
        self._calls_since_update = 0
        self._acc: dict[str, torch.Tensor] = {}
        self._elements = 0

    @property
    def threshold(self) -> torch.Tensor | None:
        """The current threshold a (0-d tensor), or None (no pruning yet, or a top-k method)."""
        return self._threshold

    @property
    def target(self) -> float:
        """The sparsity this layer aims at: the allocated one (heterogeneous) or ``sparsity``."""
        return self.sparsity if self._target is None else self._target

    # --- threshold methods (a registry, not an if/elif chain) ---
    def _lognormal(self, stats):
        fit = stats.fit
        if int(fit.count) < 2:
            return 0.0
        return lognormal_threshold(self.sparsity, fit.mu, fit.sigma, fit.zero_fraction)

    def _empirical(self, stats):
        if stats.sample is None:
            raise ValueError("method 'empirical' needs a sample: update(LayerStats(fit, sample))")
        return empirical_threshold(stats.sample.detach().reshape(-1), self.sparsity)

    def _calibrated(self, stats):
        fit, sample = stats.fit, stats.sample
        if int(fit.count) < 2:
            return 0.0
        mu, sig, z = float(fit.mu), float(fit.sigma), float(fit.zero_fraction)
        measured = None
        if self._last_sparsity is not None and self._calls_since_update > 0:
            measured = float(self._last_sparsity)
        elif sample is not None and self._threshold is not None:
            measured = float(empirical_sparsity(sample.detach().reshape(-1), self._threshold))
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

    def _atp(self, stats):
        return normal_threshold(self.sparsity, _atp_mean_abs(stats.fit, stats.sample))

    def _per_call(self, stats):
        return None  # top-k methods: computed from each call's tensor

    def update(self, stats: LayerStats) -> None:
        """Refresh the threshold from this layer's statistics.

        ``stats``: a ``LayerStats`` (``fit_lognormal`` of the layer's recent neural gradient and
        a 1-D sample of its values, zeros included: required by 'empirical', used by 'atp' and
        'calibrated' when given); a bare ``LognormalFit`` is accepted by the methods that need
        no sample.
        """
        stats = LayerStats.of(stats)
        a = _METHODS[self.method](self, stats)
        if a is None:
            self._threshold = None
        else:
            dev = stats.fit.mu.device
            self._threshold = torch.as_tensor(a, dtype=torch.float64).to(dev).reshape(())
        self._target = None
        self._calls_since_update = 0

    def assign(self, threshold: torch.Tensor | None, target: float | None = None,
               sample: torch.Tensor | None = None) -> None:
        """Set a threshold solved elsewhere (``PrunerGroup``: the vectorised empirical refresh
        or a heterogeneous allocation, whose per-layer sparsity is ``target``). ``sample``: the
        refresh sample, from which a tracking pruner takes its first slope dS/d ln a."""
        if self.method in ("topk", "topk_stochastic"):
            raise ValueError(f"method {self.method!r} takes its threshold from each call")
        if threshold is not None:
            require_float_tensor(threshold, "threshold")
            threshold = threshold.detach().reshape(())
        self._threshold = threshold
        self._target = None if target is None else float(target)
        self._calls_since_update = 0
        if sample is not None and threshold is not None and self.method in TRACKING_METHODS:
            # dS/d ln a = E[|x|/a; |x| < a] on the sample (device ops; a refresh step)
            v = sample.detach().abs().to(torch.float64)
            a = threshold.to(v.device, torch.float64)
            ok = torch.isfinite(v)
            r = torch.where(ok & (v < a), v / a.clamp_min(1e-300), torch.zeros_like(v))
            self._slope = (r.sum() / ok.sum().clamp_min(1)).clamp_min(_MIN_SLOPE)

    @property
    def active(self) -> bool:
        """Whether a call prunes (a top-k method always does; the others after an update)."""
        return self.method in ("topk", "topk_stochastic") or self._threshold is not None

    def compress(self, x: torch.Tensor, generator: torch.Generator | Stream | None = None,
                 measure: bool = True, finite: torch.Tensor | bool | None = None,
                 check: bool = False, then=None, into: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(pruned, nonfinite)``: the pruned tensor and whether x held a NaN/inf; no host sync.

        ``measure`` adds this call's counts to the metrics. ``finite``: whether ``x`` is all
        finite, if the caller knows (a 0-d bool tensor or a bool); otherwise the pruning
        kernel counts the non-finite values in its own pass: a tracking call that saw a NaN/inf
        leaves the threshold as it was (its counts are garbage).
        ``nonfinite``: a 0-d float64 device tensor, > 0 exactly when x held a NaN or +-inf
        (on measured calls: their number); None when neither ``check`` nor ``measure`` asked
        and the call needed no count. Stochastic pruning at a threshold counts what the call
        needs (non-finite inputs, zeros, +-a symbols) in the pruning kernel's own loop (no
        extra pass); the top-k methods and the dense warm-up (no threshold yet) take one extra
        pass when asked.
        ``then``: a quantizer (``FPQuantizer`` / ``BlockQuantizer``) applied to the pruned
        tensor, with ``measure``; the result is then the quantized tensor. When the quantizer
        is ``fusable`` and this call prunes at a threshold, both run in one kernel
        (``numerics.pruning.prune_quantize``: the pruned tensor is never written; the same bits
        and counts as the two calls).
        ``into``: the caller owns x and allows it to be overwritten: a threshold call on the
        fused hot path then writes its result into x (and returns x); otherwise a new tensor.
        """
        require_float_tensor(x, "x")
        n = x.numel()
        names = ()
        got = {}  # the kernel's counts by name (non-finite inputs, zeros, +-a symbols)
        fused = tracked = False
        if self.method == "topk":
            out = topk_prune(x, self.sparsity) if n else x.clone()
        elif self.method == "topk_stochastic":
            out = topk_stochastic_prune(x, self.sparsity, generator) if n else x.clone()
        elif self._threshold is None:
            out = x.clone()
        else:
            if self._threshold.device != x.device:  # e.g. restored from a CPU checkpoint
                self._threshold = self._threshold.to(x.device)
            if self._slope is not None and self._slope.device != x.device:  # (the tracking's
                self._slope = self._slope.to(x.device)  # compiled step takes one device)
            names = self._count_names(measure, check, finite)
            fused = then is not None and getattr(then, "fusable", False)
            hot = self._hot(x)
            if fused:
                out, got = self._prune_quantize(x, generator, measure, names, then, hot, into)
            elif hot and into and n and finite is None and not measure \
                    and names == ("nonfinite", "zeros") and self.tracking \
                    and self._slope is not None:
                # the tracking's unmeasured call, in place: the pruning writes x, then one
                # compiled call counts the written x's zeros and flag and takes the Newton step
                # (``track_written``: the bits of the counts pass and ``_track``)
                out = prune_unchecked(x, self._threshold, generator, into=True)
                self._threshold, got["nonfinite"] = track_written(
                    out.view(-1), self._threshold, self._slope, self._track_consts(n))
                tracked = True
            elif hot and names == ("nonfinite",) and n:  # the flag alone: float64 already
                out, got["nonfinite"] = prune_unchecked(x, self._threshold, generator,
                                                        into=into, flag=True)
            elif hot:  # arguments checked when set: ``stochastic_prune`` without its checks
                out = prune_unchecked(x, self._threshold, generator, names, into=into)
                if names:
                    out, c = out
                    got = dict(zip(names, c.unbind()))
            elif names:
                out, c = stochastic_prune(x, self._threshold, generator, counts=names)
                got = dict(zip(names, c.unbind()))
            else:
                out = stochastic_prune(x, self._threshold, generator)
        bad = None
        held = None  # nonzero: this call saw a NaN/inf (the tracking then holds its threshold)
        if finite is None:
            held = got.get("nonfinite")
        elif self.tracking and finite is not True and finite is not False:
            held = ~torch.as_tensor(finite, device=x.device)
        if "nonfinite" in got:  # a count (or the flag alone: float64 already)
            bad = got["nonfinite"]
            bad = bad if bad.dtype == torch.float64 else bad.double()
        elif measure and n:
            bad = (~torch.isfinite(x)).sum().double()
        elif check or measure:
            bad = nonfinite_flag(x)
        # a measured call counts zeros and +-a symbols and refreshes the slope dS/d ln a; an
        # unmeasured call corrects with that slope and its zero count (the kernel counts both
        # in its own pass)
        track = self.tracking and n > 0
        if track and not measure and self._slope is not None:
            if finite is not False and not tracked:
                self._track(got["zeros"], n, self._slope, held)
            track = False
        elif not measure:
            track = False
        if n and (measure or self.method == "calibrated"):
            zeros = (got["zeros"] if "zeros" in got else (out == 0).sum()).to(torch.float64)
            self._last_sparsity = zeros / n
            at = None
            if self._threshold is not None and (measure or track):
                # the +-a symbols of the encoded stream (Appendix A.10's entropy estimate)
                at = (got["at_threshold"] if "at_threshold" in got else
                      (out.abs() == self._threshold.to(out.dtype)).sum()).to(torch.float64)
            if measure:
                self._add("zeros", zeros)
                if at is not None:
                    self._add("at_threshold", at)
                self._elements += n
            if track and finite is not False:
                self._slope = (at / n).clamp_min(_MIN_SLOPE)
                self._track(zeros, n, self._slope, held)
        self._calls_since_update += 1
        if then is not None and not fused:
            # out is this call's own tensor (new, or x written in place with ``into``)
            out = then.compress(out, generator, measure=measure, into=True)[0]
        return out, bad

    def _count_names(self, measure: bool, check: bool, finite) -> tuple:
        """The counts (``PRUNE_COUNTS`` names) a threshold call needs from its kernel: each is a
        reduction in the loop, so an unmeasured call asks only for what it uses."""
        names = []
        if check or measure or (self.tracking and finite is None):
            names.append("nonfinite")
        if measure or self.tracking or self.method == "calibrated":
            names.append("zeros")
        if measure:
            names.append("at_threshold")
        return tuple(names)

    def _hot(self, x: torch.Tensor) -> bool:
        """Whether this call can take the kernels directly (the hot path: one per layer and
        step): fused path, a contiguous float32/float64 x outside autograd, the threshold a 0-d
        float tensor on x's device (what ``stochastic_prune`` would check and convert)."""
        a = self._threshold
        return (x.dtype in _HOT_DTYPES and x.is_contiguous() and not x.requires_grad
                and use_compiled(None) and a.dim() == 0 and a.device == x.device
                and a.is_floating_point() and not a.requires_grad)

    def _prune_quantize(self, x, generator, measure, names, q, hot: bool = False,
                        into: bool = False):
        """This call's pruning and ``q``'s quantization in one kernel; returns (out, the
        pruning counts by name) after ``q`` has accounted for its own counts."""
        qnames = q.count_names(measure, False)
        fused = tuple("pruned_zeros" if k == "zeros" else k for k in names)
        fused += tuple(k for k in qnames if k not in fused)
        if q.fused_amax:  # the pruned values' amax scale, found in the same compiled call
            keep = q.scaling.scale
            if hot and keep.dtype == torch.float64 and keep.dim() == 0 \
                    and keep.device == x.device:
                # the non-finite check alone: a flag from the kernel's amax of x, not a count
                flag = fused == ("nonfinite",) and not qnames and x.numel() > 0
                out, *rest = prune_quantize_amax_unchecked(
                    x, self._threshold, q.fmt, q.rounding, q.scaling.margin, keep, generator,
                    () if flag else fused, into, flag)
                if flag:
                    s, amax, bad = rest
                    q.scaling.commit(s)
                    q.account(x.numel(), s, None, None, measure, {})
                    return out, {"nonfinite": bad}
            else:
                out, *rest = prune_quantize_amax(x, self._threshold, q.fmt, q.rounding,
                                                 generator=generator, counts=fused or False,
                                                 **q.amax_rule())
            s, amax = rest[-2:]
            q.scaling.commit(s)
            allc = dict(zip(fused, rest[0].unbind())) if fused else {}
            q.account(x.numel(), s, None, None, measure, {k: allc[k] for k in qnames})
            return out, {k: allc["pruned_zeros" if k == "zeros" else k] for k in names}
        s, amax, qbad = q.scale_for(x)
        if fused:
            out, c = prune_quantize(x, self._threshold, q.fmt, q.rounding, s, generator,
                                    counts=fused)
            allc = dict(zip(fused, c.unbind()))
        else:
            out = prune_quantize(x, self._threshold, q.fmt, q.rounding, s, generator)
            allc = {}
        q.account(x.numel(), s, amax, qbad, measure, {k: allc[k] for k in qnames})
        return out, {k: allc["pruned_zeros" if k == "zeros" else k] for k in names}

    @property
    def tracking(self) -> bool:
        """Whether calls correct the threshold (a tracking method with a threshold, gain > 0)."""
        return (self.method in TRACKING_METHODS and self._threshold is not None
                and self.tracking_gain > 0)

    def _track(self, zeros: torch.Tensor, n: int, slope: torch.Tensor,
               held: torch.Tensor | None) -> None:
        """One Newton step in ln a toward the target (class docstring) from this call's
        ``zeros`` of ``n`` elements and the slope dS/d ln a, unless ``held`` is nonzero (the
        call saw a NaN/inf); one compiled call on the device (``threshold_step``)."""
        a = self._threshold
        consts = self._track_consts(n)
        nothing = self._step_consts[2]
        self._threshold = threshold_step(a, zeros, nothing if held is None else held, slope,
                                         consts)

    def _track_consts(self, n: int) -> torch.Tensor:
        """The tracking step's constants [n, target, gain, min_slope] (float64, on the
        threshold's device), cached per (n, target, gain, device)."""
        a = self._threshold
        key = (n, self.target, self.tracking_gain, a.device)
        if self._step_consts is None or self._step_consts[0] != key:
            consts = torch.tensor(key[:3] + (_MIN_SLOPE,), dtype=torch.float64, device=a.device)
            self._step_consts = (key, consts, torch.zeros((), dtype=torch.bool, device=a.device))
        return self._step_consts[1]

    def metrics(self, reset: bool = False) -> dict:
        """Floats (one host transfer): achieved sparsity over the measured calls since the last
        reset (NaN before any), elements measured, threshold (NaN when none), target sparsity,
        calibration factor."""
        n = self._elements
        z = self._acc.get("zeros")
        got = read_floats({"zeros": z, "threshold": self._threshold})
        out = {
            "sparsity": got["zeros"] / n if (z is not None and n) else math.nan,
            "elements": n,
            "threshold": got["threshold"] if self._threshold is not None else math.nan,
            "target_sparsity": self.target,
            "calibration_factor": math.exp(self.log_factor),
        }
        if reset:
            self.reset_metrics()
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume: target, method, threshold, calibration state."""
        return {
            "sparsity": self.sparsity,
            "method": self.method,
            "threshold": None if self._threshold is None else self._threshold.detach().cpu(),
            "target": self._target,
            "log_factor": self.log_factor,
            "prev": self._prev,
            "slope": None if self._slope is None else self._slope.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (the threshold moves to its previous device: CPU)."""
        self.sparsity = require_open_unit(state["sparsity"], "state['sparsity']")
        self.method = require_choice(state["method"], "state['method']", PRUNE_METHODS)
        th = state["threshold"]
        self._threshold = None if th is None else torch.as_tensor(th, dtype=torch.float64)
        self._target = state.get("target")
        self.log_factor = float(state["log_factor"])
        self._prev = None if state["prev"] is None else tuple(state["prev"])
        slope = state.get("slope")
        self._slope = None if slope is None else torch.as_tensor(slope, dtype=torch.float64)


_METHODS = {
    "lognormal": Pruner._lognormal,
    "empirical": Pruner._empirical,
    "calibrated": Pruner._calibrated,
    "atp": Pruner._atp,
    "topk_stochastic": Pruner._per_call,
    "topk": Pruner._per_call,
}
PRUNE_METHODS = tuple(_METHODS)
TRACKING_METHODS = ("empirical",)  # thresholds corrected on measured calls (Pruner docstring)
# a floor on dS/d ln a in the tracking step: with almost no value below the threshold the
# derivative vanishes and the step is bounded by its clip instead
_MIN_SLOPE = 1e-2
# the dtypes whose threshold the kernels take as it is (a half x needs it rounded first)
_HOT_DTYPES = (torch.float32, torch.float64)
HETEROGENEOUS_METHODS = ("lognormal", "empirical")  # thresholds for the allocated sparsities


# ---------------------------------------------------------------------------------------------
# Heterogeneous allocation (paper section 5.3, appendix A.9)


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


# ---------------------------------------------------------------------------------------------
# PrunerGroup: every layer of a model, refreshed together


class PrunerGroup:
    """The pruners of a model's layers at one target, refreshed together by ``update``.

    Homogeneous: every layer aims at ``sparsity``. Method ``empirical`` solves all layers on one
    device with ONE padded sort of their samples (``empirical_threshold`` of a list: no host
    sync); the other methods call each ``Pruner.update``. Heterogeneous (section 5.3, A.9):
    ``allocate_sparsity`` picks per-layer sparsities S_i whose element-weighted mean is
    ``sparsity`` (lognormal closed forms); method ``lognormal`` prunes each layer at the Eq. 8
    threshold of S_i, ``empirical`` at ``empirical_threshold(sample_i, S_i)`` (each layer then
    meets its S_i up to sampling error, so the overall budget holds on non-lognormal gradients).

    Args:
        n_layers, sparsity, method: as ``Pruner`` (one pruner per layer).
        heterogeneous: use the allocation (methods in ``HETEROGENEOUS_METHODS``).
        cos_target, cap, truncate_k: as ``allocate_sparsity``.
    """

    def __init__(self, n_layers: int, sparsity: float = 0.8, method: str = "empirical", *,
                 heterogeneous: bool = False, cos_target: float = 0.9, cap: float = 0.95,
                 truncate_k: float | None = 2.7):
        self.pruners = [Pruner(sparsity, method) for _ in range(int(n_layers))]
        self.sparsity, self.method = self.pruners[0].sparsity if n_layers else sparsity, method
        if heterogeneous and method not in HETEROGENEOUS_METHODS:
            raise ValueError(f"heterogeneous needs method 'lognormal' or 'empirical' (thresholds "
                             f"for the allocated sparsities), got {method!r}")
        self.heterogeneous = bool(heterogeneous)
        self.cos_target = require_open_unit(cos_target, "cos_target")
        self.cap = require_open_unit(cap, "cap")
        self.truncate_k = truncate_k
        self.level: float | None = None  # the allocation's common cosine (phase 2), if any

    def __len__(self) -> int:
        return len(self.pruners)

    def __getitem__(self, i: int) -> Pruner:
        return self.pruners[i]

    def update(self, stats: Sequence[LayerStats | None]) -> None:
        """Refresh from one entry per layer (None: no statistics for that layer this time)."""
        if len(stats) != len(self.pruners):
            raise ValueError(f"stats must have {len(self.pruners)} entries, got {len(stats)}")
        live = [(p, LayerStats.of(s)) for p, s in zip(self.pruners, stats) if s is not None]
        if not live or self.method in ("topk", "topk_stochastic"):
            return
        if self.heterogeneous:
            self._allocate([(p, s) for p, s in live if bool(s.fit.ok)])
        elif self.method == "empirical":
            by_device: dict[torch.device, list] = {}
            for p, s in live:
                if s.sample is None:
                    raise ValueError("method 'empirical' needs LayerStats with a sample")
                by_device.setdefault(s.sample.device, []).append((p, s))
            for group in by_device.values():
                ths = empirical_threshold([s.sample for _, s in group], self.sparsity)
                for (p, s), th in zip(group, ths):
                    p.assign(th, sample=s.sample)
        else:
            for p, s in live:
                p.update(s)

    def _allocate(self, ok) -> None:
        if not ok:
            return
        if any(s.numel is None for _, s in ok):
            raise ValueError("a heterogeneous refresh needs LayerStats with numel")
        alloc = allocate_sparsity(
            [s.numel for _, s in ok],
            torch.stack([s.fit.mu for _, s in ok]).cpu(),
            torch.stack([s.fit.sigma for _, s in ok]).cpu(),
            torch.stack([s.fit.zero_fraction for _, s in ok]).cpu(),
            self.sparsity, cos_target=self.cos_target, cap=self.cap, truncate_k=self.truncate_k,
        )
        self.level = alloc.level
        ths = alloc.thresholds
        if self.method == "empirical":
            # the allocation's S_i, met on each layer's own sample (not Eq. 8); a layer the
            # allocation leaves unpruned (threshold 0, S_i = z_i) stays unpruned
            pruned = alloc.thresholds > 0
            s_i = torch.where(pruned, alloc.sparsities, torch.full_like(ths, 0.5))
            emp = empirical_threshold([s.sample for _, s in ok], s_i).cpu()
            ths = torch.where(pruned, emp, torch.zeros_like(emp))
        for (p, s), th, target in zip(ok, ths, alloc.sparsities):
            p.assign(th.to(s.fit.mu.device), target=float(target), sample=s.sample)

    def state_dict(self) -> dict:
        return {"method": self.method, "sparsity": self.sparsity, "level": self.level,
                "pruners": [p.state_dict() for p in self.pruners]}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method or len(state["pruners"]) != len(self.pruners):
            raise ValueError(f"state is for {len(state['pruners'])} {state['method']!r} pruners, "
                             f"this group has {len(self.pruners)} {self.method!r}")
        self.level = state["level"]
        for p, st in zip(self.pruners, state["pruners"]):
            p.load_state_dict(st)
