"""Scale rules shared by every quantizer: the scale s in Q(x * s) / s, computed on the device.

One home for the rules that the neural-gradient quantizers (``compressors.scaling``) and the
communication compressors (``compressors.comm``) both use, so that "amax scaling" means one
thing everywhere:

* ``amax_to_scale``: s = max_normal / (amax * 2^margin) puts the largest magnitude at the
  format's largest normal value (no overflow by construction, section 4.4's per-layer scaling
  taken to its limit); with ``power_of_two=True`` s is rounded down to a power of two, so that
  scaling and unscaling are exact in binary floating point.
* ``mean_log2_to_scale``: the authors' per-layer rule s = 2^(-mean(log2|g|) - margin)
  (section 4.4), which centres the lognormal bulk ``margin`` binades below 1.

Unusable statistics (amax 0, inf or NaN; no finite non-zero value) give ``fallback`` (default
1): the callers that keep a previous scale instead use ``scale_is_usable``. Everything is tensor
ops, so no host synchronisation happens here.
"""

from __future__ import annotations

import torch

from gradcomp.numerics.formats import FPFormat

__all__ = ["amax_to_scale", "amax_scale_or_keep", "mean_log2_to_scale", "scale_is_usable"]


def scale_is_usable(stat: torch.Tensor) -> torch.Tensor:
    """True where a statistic (amax, or a finite fit) can define a scale: finite and > 0."""
    return torch.isfinite(stat) & (stat > 0)


def amax_to_scale(amax: torch.Tensor, fmt: FPFormat, *, margin: float = 0.0,
                  power_of_two: bool = False, fallback: float = 1.0) -> torch.Tensor:
    """s = fmt.max_normal / (amax * 2^margin), in float64; ``fallback`` where amax is unusable.

    power_of_two: s = 2^floor(log2(max_normal / (amax * 2^margin))), clamped to 2^[-126, 126]
    so that it is a normal float32 (the scale travels as one fp32 on the wire).
    """
    amax = amax.detach().to(torch.float64)
    ok = scale_is_usable(amax)
    safe = torch.where(ok, amax, torch.ones_like(amax))
    s = fmt.max_normal / (safe * 2.0 ** float(margin))
    if power_of_two:
        s = torch.exp2(torch.clamp(torch.floor(torch.log2(s)), -126, 126))
    return torch.where(ok, s, torch.full_like(s, float(fallback)))


def amax_scale_or_keep(amax: torch.Tensor, max_normal, margin_factor,
                       keep: torch.Tensor) -> torch.Tensor:
    """The amax policies' update: s = max_normal / (amax * margin_factor) (``amax_to_scale``
    with margin_factor = 2^margin), or ``keep`` (the previous scale) where amax is unusable or
    s is not a positive finite float64 (as TransformerEngine keeps its scale).

    ``max_normal`` and ``margin_factor``: Python floats or float64 0-d tensors (the same
    float64 operations either way, so the fused amax-quantize kernels that compute it inside
    their compiled call get the bits of the policy's own update).
    """
    amax = amax.to(torch.float64)
    ok = scale_is_usable(amax)
    safe = torch.where(ok, amax, torch.ones_like(amax))
    # reciprocal then multiply, as ``amax_to_scale``'s float / tensor (Tensor.__rtruediv__)
    # computes it: the same bits whether max_normal is a Python float or a tensor
    new = torch.reciprocal(safe * margin_factor) * max_normal
    return torch.where(ok & torch.isfinite(new) & (new > 0), new, keep.to(new))


def mean_log2_to_scale(mean_log2: torch.Tensor, *, margin: float = 3.0,
                       power_of_two: bool = False, fallback: float = 1.0) -> torch.Tensor:
    """The authors' rule s = 2^(-mean(log2|g|) - margin) (section 4.4), float64.

    power_of_two: the exponent is floored (and clamped to [-126, 126]). A non-finite mean (no
    finite non-zero value was fitted) gives ``fallback``.
    """
    m = mean_log2.detach().to(torch.float64)
    ok = torch.isfinite(m)
    e = -torch.where(ok, m, torch.zeros_like(m)) - float(margin)
    if power_of_two:
        e = torch.clamp(torch.floor(e), -126, 126)
    return torch.where(ok, torch.exp2(e), torch.full_like(e, float(fallback)))
