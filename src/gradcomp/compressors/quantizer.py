"""``FPQuantizer``: format + rounding + scaling policy, the FP compressor of neural gradients.

``q(x, generator)`` returns Q(x*s)/s in x's dtype (see
:func:`gradcomp.numerics.rounding.quantize_fp` for rounding, overflow, zeros and NaN), with s
from the scaling policy. The metrics of the last
call stay on the device (no host sync in ``__call__``); ``metrics()`` reads them.
"""

from __future__ import annotations

import torch

from gradcomp.compressors.scaling import ScalingPolicy, make_scaling
from gradcomp.numerics._checks import require_choice, require_float_tensor
from gradcomp.numerics.fit import LognormalFit
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import ROUNDINGS, quantize_fp

__all__ = ["FPQuantizer"]


class FPQuantizer:
    """Quantize tensors to ``fmt`` with ``rounding`` and a scaling policy.

    Args:
        fmt: FPFormat or format name (``"e5m2"``, ``"1-4-3"``, ...).
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased).
        scaling: a ScalingPolicy, a registry name (``make_scaling``), or None (s = 1). A global
            policy object may be shared by many quantizers.
        track_metrics: keep overflow/underflow/NaN fractions of the last call (extra reductions).

    Metrics of the last call (0-d device tensors): ``overflow`` = fraction of |x*s| above
    max_normal (incl. inf), ``underflow`` = fraction of non-zero finite values flushed to 0,
    ``nan`` = fraction of NaN inputs, ``scale`` = the scale used.
    """

    def __init__(self, fmt, rounding: str = "nearest", scaling=None, track_metrics: bool = True):
        self.fmt = FPFormat.from_name(fmt) if isinstance(fmt, str) else fmt
        if not isinstance(self.fmt, FPFormat):
            raise TypeError(f"fmt must be an FPFormat or a format name, got {type(fmt).__name__}")
        self.rounding = require_choice(rounding, "rounding", ROUNDINGS)
        if scaling is None:
            scaling = make_scaling("none")
        elif isinstance(scaling, str):
            scaling = make_scaling(scaling)
        if not isinstance(scaling, ScalingPolicy):
            raise TypeError(f"scaling must be a ScalingPolicy or a name, got {scaling!r}")
        self.scaling = scaling
        self.scaling.bind(self.fmt)
        self.track_metrics = bool(track_metrics)
        self._metrics: dict[str, torch.Tensor] = {}

    def update(self, fit: LognormalFit) -> None:
        """Refresh the scale from a lognormal fit of this layer's gradients (on the schedule)."""
        self.scaling.update(fit, self.fmt)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        require_float_tensor(x, "x")
        pol = self.scaling
        amax = None
        if pol.amax_timing is not None and x.numel():
            # two passes (abs, max); a NaN/inf makes amax non-finite and the policy then keeps
            # its previous scale (as TransformerEngine does), so no masking pass is needed
            amax = x.detach().abs().amax().double()
        if pol.amax_timing == "current" and amax is not None:
            pol.observe(amax=amax)
        s = pol.scale.to(x.device)
        q = quantize_fp(x, self.fmt, self.rounding, scale=s, generator=generator)
        if pol.amax_timing == "delayed" and amax is not None:
            pol.observe(amax=amax)
        if self.track_metrics or pol.wants_overflow:
            # the product in the kernel's own dtype, so the count matches what was saturated
            cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
            y = x.detach().to(cdt) * s.to(cdt)
            over = (y.abs() > self.fmt.max_normal).sum()  # inf counts, NaN does not
            if pol.wants_overflow:
                pol.observe(overflow=(over > 0) | torch.isnan(x).any())
            if self.track_metrics:
                n = max(x.numel(), 1)
                flushed = ((q == 0) & (x != 0) & torch.isfinite(x)).sum()
                self._metrics = {
                    "overflow": over.double() / n,
                    "underflow": flushed.double() / n,
                    "nan": torch.isnan(x).sum().double() / n,
                    "scale": s.detach().clone(),
                }
        return q

    def metrics(self, sync: bool = True) -> dict:
        """Metrics of the last call: floats (one host sync) or, with sync=False, 0-d tensors."""
        if not sync:
            return dict(self._metrics)
        return {k: float(v) for k, v in self._metrics.items()}

    def state_dict(self) -> dict:
        return {"fmt": self.fmt, "rounding": self.rounding, "scaling": self.scaling.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["fmt"] != self.fmt or state["rounding"] != self.rounding:
            raise ValueError(
                f"state is for format {state['fmt']} / {state['rounding']}, this quantizer is "
                f"{self.fmt} / {self.rounding}"
            )
        self.scaling.load_state_dict(state["scaling"])

    def __repr__(self) -> str:
        return f"FPQuantizer({self.fmt.name}, rounding={self.rounding!r}, scaling={self.scaling!r})"
