"""Gradient scaling policies for FP quantization: the quantizer computes Q(g*s)/s.

One interface for every policy (paper section 4.4 and Table 4):

* ``bind(fmt)`` once (the quantizer does it): the format the policy scales for.
* ``update(stats)`` on the schedule (e.g. each epoch start) from a
  :class:`~gradcomp.numerics.fit.LayerStats` (lognormal fit + sample; a bare ``LognormalFit``
  is accepted where no sample is needed); tensor ops only, no host sync.
* ``scale``: the current scale, a 0-d float64 tensor on the statistics' device.
* ``observe(amax=None, overflow=None)``: per-call feedback, for the policies that need it
  (``amax_timing`` says when the quantizer reports the amax; ``wants_overflow`` whether it
  reports overflow). ``step()`` closes a training step for global dynamic loss scaling and
  returns whether the step must be skipped (0-d bool tensor).
* ``state_dict()`` / ``load_state_dict()`` for checkpoints.

A global policy (``static``, ``dynamic``) is one object shared by every layer's quantizer.
Where a statistic is unusable (no non-zero value, amax 0/inf/NaN) the previous scale is kept,
as TransformerEngine does. The amax and authors' rules are those of
:mod:`gradcomp.numerics.scales` (shared with the communication compressors).
"""

from __future__ import annotations

import numpy as np
import torch

from gradcomp.numerics._checks import require_choice, require_int_range, require_positive
from gradcomp.numerics.fit import LayerStats
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import ROUNDINGS, quantize_fp
from gradcomp.numerics.scales import amax_scale_or_keep, mean_log2_to_scale

__all__ = [
    "ScalingPolicy",
    "NoScaling",
    "PerLayerAuthors",
    "PerLayerOptimal",
    "PerLayerEmpirical",
    "AmaxCurrent",
    "AmaxDelayed",
    "StaticLossScale",
    "DynamicLossScale",
    "SCALING_POLICIES",
    "make_scaling",
]


def _scalar(value: float, like: torch.Tensor | None = None) -> torch.Tensor:
    device = like.device if like is not None else None
    return torch.tensor(float(value), dtype=torch.float64, device=device)


class ScalingPolicy:
    """Base: a fixed scale of 1. Subclasses override what they need."""

    amax_timing: str | None = None  # None | "current" (before quantizing) | "delayed" (after)
    wants_overflow = False

    def __init__(self):
        self._scale = _scalar(1.0)
        self.fmt: FPFormat | None = None

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    def bind(self, fmt: FPFormat) -> None:
        """Tell the policy which format it scales for (the quantizer calls it once)."""
        if not isinstance(fmt, FPFormat):
            raise TypeError(f"fmt must be an FPFormat, got {type(fmt).__name__}")
        self.fmt = fmt

    def _bound(self) -> FPFormat:
        if self.fmt is None:
            raise ValueError(f"{type(self).__name__} needs bind(fmt) (done by FPQuantizer) first")
        return self.fmt

    def update(self, stats: LayerStats) -> None:
        """Refresh the scale from a layer's statistics (no-op for policies without them)."""
        LayerStats.of(stats)

    def observe(self, amax: torch.Tensor | None = None, overflow: torch.Tensor | None = None):
        """Per-call feedback (no-op unless the policy needs it)."""

    def step(self) -> torch.Tensor:
        """Close a training step; returns a 0-d bool tensor: True = skip this step."""
        return torch.zeros((), dtype=torch.bool, device=self._scale.device)

    def _keep(self, new: torch.Tensor, ok: torch.Tensor) -> None:
        new = new.to(torch.float64)
        old = self._scale.to(new.device)
        good = ok & torch.isfinite(new) & (new > 0)
        self._scale = torch.where(good, new, old)

    def state_dict(self) -> dict:
        return {"scale": self._scale.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        self._scale = state["scale"].detach().clone().to(torch.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoScaling(ScalingPolicy):
    """s = 1 always."""


class PerLayerAuthors(ScalingPolicy):
    """The authors' per-layer rule s = 2^(-mean(log2|g|) - margin), margin 3 (section 4.4).

    Puts the mean of log2|g*s| ``margin`` binades below 1, keeping the largest gradients
    representable. The rule was made for the authors' IEEE-like formats; in the paper's Eq. 2
    formats (range 2^-Emax..2^Emax, centred at 1) it puts the mean near the bottom of the range
    and flushes many FP4 gradients to zero; the recipes use ``amax`` (README, "Choices
    measured"). mean(log2|g|) is over the finite non-zeros (the authors' code mapped zeros
    to -126 inside the mean; excluding them fits the lognormal model of section 3, which is
    a model of the non-zero magnitudes).
    """

    def __init__(self, margin: float = 3.0):
        super().__init__()
        self.margin = float(margin)

    def update(self, stats):
        fit = LayerStats.of(stats).fit
        self._keep(mean_log2_to_scale(fit.mean_log2, margin=self.margin), fit.ok)


class PerLayerOptimal(ScalingPolicy):
    """s minimising the exact expected relative error for the fitted (mu, sigma) and format.

    The error depends on mu + ln s and sigma only, so the optimal centre c(sigma) = mu + ln s*
    is tabulated once per format on a sigma grid (host, cached) and interpolated on the device:
    s = exp(c(sigma) - mu), no host sync per update.
    """

    _SIGMAS = np.concatenate([np.arange(0.1, 2.0, 0.1), np.arange(2.0, 12.01, 0.25)])

    def __init__(self, rounding: str = "nearest"):
        super().__init__()
        self.rounding = rounding
        self._tables: dict = {}

    def _table(self, fmt: FPFormat, device):
        key = (fmt, str(device))
        if key not in self._tables:
            from gradcomp.numerics.fp_error import optimal_centre

            centres = [optimal_centre(fmt, float(s), self.rounding) for s in self._SIGMAS]
            self._tables[key] = (torch.tensor(self._SIGMAS, dtype=torch.float64, device=device),
                                 torch.tensor(centres, dtype=torch.float64, device=device))
        return self._tables[key]

    def update(self, stats):
        fit = LayerStats.of(stats).fit
        sig_grid, centres = self._table(self._bound(), fit.mu.device)
        sigma = fit.sigma.to(torch.float64).clamp(sig_grid[0], sig_grid[-1])
        i = torch.searchsorted(sig_grid, sigma.reshape(1)).clamp(1, len(sig_grid) - 1)
        s0, s1 = sig_grid[i - 1], sig_grid[i]
        w = (sigma - s0) / (s1 - s0)
        centre = (centres[i - 1] + w * (centres[i] - centres[i - 1])).reshape(())
        self._keep(torch.exp(centre - fit.mu), fit.ok)


class PerLayerEmpirical(PerLayerOptimal):
    """s minimising the relative error measured directly on the layer's refresh sample.

    The lognormal optimum s0 (:class:`PerLayerOptimal`) centres a grid of candidates
    s0 * 2^(j/steps_per_octave), |j| <= octaves * steps_per_octave; each candidate is scored by
    the mean |Q(y) - y| / y over the sample's finite non-zero values, y = |x| s (the relative
    error of Q(x s)/s, scale-invariant as in ``empirical_relative_error``), and the argmin is
    taken on the device: one quantization of a (candidates, n) matrix per update, no host
    sync. Candidates are ordered by |j|, so ties go to the one nearest the lognormal optimum.
    ``rounding="stochastic"`` scores one draw per value from a fixed-seed generator (an
    unbiased estimate of the expected error; candidates share no random numbers).

    ``update(stats)`` uses ``stats.sample``; without a sample, or with fewer than two usable
    values, the lognormal optimum is used.
    ``error`` is the measured error at the chosen scale (0-d tensor; NaN before a sample).
    """

    def __init__(self, rounding: str = "nearest", octaves: int = 3, steps_per_octave: int = 4):
        super().__init__(require_choice(rounding, "rounding", ROUNDINGS))
        self.octaves = require_int_range(octaves, "octaves", 0, 16)
        self.steps_per_octave = require_int_range(steps_per_octave, "steps_per_octave", 1, 64)
        self.error = _scalar(float("nan"))

    def _offsets(self, device) -> torch.Tensor:
        k = self.octaves * self.steps_per_octave
        j = sorted(range(-k, k + 1), key=lambda v: (abs(v), v))
        return torch.tensor(j, dtype=torch.float64, device=device) / self.steps_per_octave

    def search(self, sample: torch.Tensor, fmt: FPFormat, centre: torch.Tensor):
        """(best scale, its measured error) over the grid around ``centre`` (0-d tensors).

        ``sample``: any float tensor (zeros, NaN and inf are ignored); ``centre``: a positive
        0-d scale. With fewer than two usable values: (centre, NaN). No host sync.
        """
        x = sample.detach().reshape(-1)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        ax = x.to(dt).abs()
        used = torch.isfinite(ax) & (ax > 0)
        ax = torch.where(used, ax, torch.ones_like(ax))  # masked out below; avoids inf*s, 0/0
        cand = centre.to(x.device, torch.float64) * torch.exp2(self._offsets(x.device))
        y = ax.unsqueeze(0) * cand.to(dt).unsqueeze(1)
        gen = None
        if self.rounding == "stochastic":
            gen = torch.Generator(device=x.device).manual_seed(0)
        # scale 1 (exact) selects the same fused kernel variant as the training path, so the
        # compiled quantizer is reused (flat input: one dynamic-shape compile at most)
        one = torch.ones((), dtype=torch.float64, device=x.device)
        q = quantize_fp(y, fmt, self.rounding, scale=one, generator=gen)
        # in the sample's precision (y > 0 everywhere: masked entries are 1 * s), summed in
        # float64; the argmin needs ~1e-4 relative resolution, float32 gives ~1e-7
        rel = torch.where(used, (q - y).abs_().div_(y), 0.0)  # where, not *: inf * 0 = NaN
        errs = rel.sum(1, dtype=torch.float64) / used.sum().clamp_min(1)
        i = torch.argmin(errs)  # first minimum: candidates are ordered by distance to centre
        ok = used.sum() >= 2
        return torch.where(ok, cand[i], centre), torch.where(ok, errs[i], float("nan"))

    def update(self, stats):
        stats = LayerStats.of(stats)
        super().update(stats)
        if stats.sample is None:
            return
        s, err = self.search(stats.sample, self._bound(), self._scale)
        self._keep(s, stats.fit.ok)
        self.error = err


class AmaxCurrent(ScalingPolicy):
    """Per-tensor s = max_normal / (amax * 2^margin) from the tensor being quantized."""

    amax_timing = "current"

    def __init__(self, margin: float = 0.0):
        super().__init__()
        self.margin = float(margin)

    def observe(self, amax=None, overflow=None):
        if amax is None:
            return
        self._scale = amax_scale_or_keep(amax.detach(), self._bound().max_normal,
                                         2.0 ** self.margin, self._scale.to(amax.device))

    def commit(self, scale: torch.Tensor) -> None:
        """Take the scale that a fused amax-quantize kernel (``numerics.rounding.
        quantize_fp_amax``, ``numerics.pruning.prune_quantize_amax``) derived from this call's
        amax with this policy's rule (``amax_scale_or_keep``, margin, the current scale kept):
        what ``observe(amax=...)`` would set, without its dozen small device ops."""
        self._scale = scale


class AmaxDelayed(AmaxCurrent):
    """Per-tensor delayed scaling: s = max_normal / (max of the last ``history`` amaxes * 2^margin).

    The quantizer uses the scale from the previous calls, then reports this call's amax
    (TransformerEngine's DelayedScaling, amax_compute_algo="max"). Bad amaxes (0, inf, NaN) are
    not recorded, so the previous scale is kept.
    """

    amax_timing = "delayed"

    def __init__(self, history: int = 16, margin: float = 0.0):
        super().__init__(margin)
        self.history = require_int_range(history, "history", 1, 1 << 16)
        self._hist = torch.zeros(self.history, dtype=torch.float64)
        self._pos = 0

    def observe(self, amax=None, overflow=None):
        if amax is None:
            return
        fmt = self._bound()
        amax = amax.detach().to(torch.float64).reshape(())
        hist = self._hist.to(amax.device)
        good = torch.isfinite(amax) & (amax > 0)
        slot = hist[self._pos]
        hist[self._pos] = torch.where(good, amax, slot)
        self._pos = (self._pos + 1) % self.history
        self._hist = hist
        top = hist.max()
        self._scale = amax_scale_or_keep(top, fmt.max_normal, 2.0 ** self.margin,
                                         self._scale.to(top.device))

    def state_dict(self):
        return {**super().state_dict(), "hist": self._hist.clone(), "pos": self._pos}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._hist = state["hist"].clone()
        self._pos = int(state["pos"])


class StaticLossScale(ScalingPolicy):
    """One global static loss scale (Table 4 baseline, 2^13..2^19)."""

    def __init__(self, scale: float = 2.0**16):
        super().__init__()
        self._scale = _scalar(require_positive(scale, "scale"))


class DynamicLossScale(ScalingPolicy):
    """Global dynamic loss scaling (Table 4 baseline, as torch.amp.GradScaler).

    Every quantizer sharing this object reports overflow (any |g*s| above max_normal, or a
    non-finite value) with ``observe(overflow=...)``; ``step()`` then halves the scale
    (``backoff``) and returns True (skip the step) when any overflow was seen, or counts a clean
    step and multiplies by ``growth`` after ``interval`` clean steps in a row.
    """

    wants_overflow = True

    def __init__(self, init_scale: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5,
                 interval: int = 2000):
        super().__init__()
        self._scale = _scalar(require_positive(init_scale, "init_scale"))
        self.growth = require_positive(growth, "growth")
        self.backoff = require_positive(backoff, "backoff")
        self.interval = require_int_range(interval, "interval", 1, 1 << 40)
        self._found = torch.zeros((), dtype=torch.bool)
        self._clean = torch.zeros((), dtype=torch.int64)

    def observe(self, amax=None, overflow=None):
        if overflow is not None:
            self._found = self._found.to(overflow.device) | overflow.detach().reshape(()).bool()

    def step(self) -> torch.Tensor:
        found = self._found.to(self._scale.device)
        clean = torch.where(found, 0, self._clean.to(found.device) + 1)
        grow = clean >= self.interval
        scale = torch.where(found, self._scale * self.backoff,
                            torch.where(grow, self._scale * self.growth, self._scale))
        self._scale = scale
        self._clean = torch.where(grow, 0, clean)
        self._found = torch.zeros_like(found)
        return found

    def state_dict(self):
        return {**super().state_dict(), "clean": self._clean.clone(), "found": self._found.clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._clean = state["clean"].clone()
        self._found = state["found"].clone()


SCALING_POLICIES = {
    "none": NoScaling,
    "per_layer": PerLayerAuthors,
    "per_layer_optimal": PerLayerOptimal,
    "per_layer_empirical": PerLayerEmpirical,
    "amax": AmaxCurrent,
    "amax_delayed": AmaxDelayed,
    "static": StaticLossScale,
    "dynamic": DynamicLossScale,
}


def make_scaling(name: str, **kw) -> ScalingPolicy:
    """Build a scaling policy by registry name; unknown names list the valid ones."""
    if name not in SCALING_POLICIES:
        allowed = ", ".join(repr(k) for k in SCALING_POLICIES)
        raise ValueError(f"scaling must be one of {allowed}; got {name!r}")
    return SCALING_POLICIES[name](**kw)

