"""Stochastic pruning operators (paper section 5, Eq. 5): pure functions, the hot path.

    stochastic_prune(x, a)     Eq. 5, unbiased: E[T(x)] = x. One fused pass (torch.compile).
    prune_quantize(x, a, fmt)  Eq. 5 then quantize_fp, in one pass (same bits as the two calls).
    topk_prune(x, S)           deterministic baseline (SAW / meProp): keep the k largest |x|.
    topk_stochastic_prune      "top-k then stochastic": a = k-th largest |x|, then Eq. 5.
    topk_threshold(x, S)       that k-th largest |x|.

Speed: the fused path takes one set of hash keys per call (``random.draw_keys``: one seed drawn
from the caller's ``torch.Generator``, or the next draw of a ``random.Stream``) and hashes
(keys, element index) inside the kernel (:mod:`gradcomp.numerics.random`), so there is no
``torch.rand`` pass and no full-size random buffer. Fused vs eager follows the one compile
policy of :mod:`gradcomp.numerics.kernels` (same numbers, bit for bit).
"""

from __future__ import annotations

import math

import torch

from gradcomp.numerics._checks import require_float_tensor, require_open_unit
from gradcomp.numerics.kernels import FusedOp, use_compiled, variant
from gradcomp.numerics.random import (
    counter_layout,
    draw_keys,
    layout_columns,
    uniform_like,
)
from gradcomp.numerics.rounding import COUNTS as QUANTIZE_COUNTS
from gradcomp.numerics.rounding import (
    _nonfinite_amax,
    _quantize_flat,
    amax_args,
    bind_kernel,
    count_names,
    in_place_fuses,
    prepare,
    quantize_fp_amax,
    stack_counts,
)
from gradcomp.numerics.scales import amax_scale_or_keep

__all__ = ["stochastic_prune", "prune_quantize", "prune_quantize_amax", "topk_prune",
           "topk_stochastic_prune", "topk_threshold", "keep_count", "prune_kernel",
           "prune_quantize_amax_kernel", "prune_layout", "prune_unchecked",
           "prune_quantize_amax_unchecked", "threshold_step", "track_written", "PRUNE_COUNTS",
           "PRUNE_QUANTIZE_COUNTS"]


def _kernel_threshold(x: torch.Tensor, thr: torch.Tensor):
    """(a in compute precision, a rounded to x's dtype) from the 0-d threshold tensor, inside
    the kernel (scalar work in the compiled call, not separate small ops per call): a is
    rounded to x's dtype (so +-a is representable), held in compute precision; NaN or a
    negative value -> 0 (nothing below it)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    a_at = thr.to(x.dtype)
    a = a_at.to(cdt)
    return torch.where(a > 0, a, torch.zeros_like(a)), a_at


def _prune_kernel(x: torch.Tensor, thr: torch.Tensor, keys: torch.Tensor, start: int = 0):
    """Eq. 5 on a flat tensor (or its 2-D counter layout, ``random.counter_layout``) at
    threshold ``thr`` (``_kernel_threshold``), random keys
    ``keys`` = [k1, k2, ...] (``random.draw_keys``; the first two key the 24-bit uniforms).

    |x| >= a (and NaN, whose comparisons are false): kept; u*a < |x| < a: sign(x)*a;
    |x| <= u*a: 0; u ~ U[0,1) from the counter hash, so P(keep as a) = P(u < |x|/a) = |x|/a
    up to the 2^-24 grid of u: unbiased. The comparison is strict so that a zero stays zero
    also when u = 0 (probability 2^-24); every element it keeps is then nonzero, so its sign
    is x < 0 (a select: ``copysign`` is a library call per vector in inductor's CPU code).
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    a, _ = _kernel_threshold(x, thr)
    xf = x.to(cdt)
    u = uniform_like(keys, x, cdt, start)
    ax = xf.abs()
    small = torch.where(ax > a * u, torch.where(xf < 0, -a, a), torch.zeros_like(xf))
    return torch.where(ax < a, small, xf).to(x.dtype)


def _prune_count_kernel(x: torch.Tensor, thr: torch.Tensor, keys: torch.Tensor,
                        start: int = 0, *, count: tuple):
    """``_prune_kernel`` plus the counts ``count`` (names of ``PRUNE_COUNTS``) from the same
    loop, int64, in that order."""
    out = _prune_kernel(x, thr, keys, start)
    return out, _prune_counts(x, out, _kernel_threshold(x, thr)[1], count)


def _prune_flag_kernel(x: torch.Tensor, thr: torch.Tensor, keys: torch.Tensor, start: int = 0):
    """``_prune_kernel`` plus x's non-finite flag from the same loop: a 0-d float64, 1.0 when
    x holds a NaN or +-inf (its max |x| is then NaN or inf), else 0.0; x non-empty. A max
    reduction instead of the count (a hot-path call needs only the flag): no int32 mask sum
    in the loop, and the flag comes out as the float64 its caller keeps (no conversion op
    per layer). The eager path adds the flags of its chunks: still > 0 exactly then."""
    return _prune_kernel(x, thr, keys, start), _nonfinite_amax(x.abs().amax())


def _result_counts(out, thr, *, count: tuple):
    """The counts ``count`` (``PRUNE_COUNTS`` names) of a pruning's result ``out`` alone, for
    a pruning written in place: x's non-finite count is the result's (Eq. 5 keeps NaN and
    +-inf and maps every finite value to 0, +-a or itself, all finite: a NaN or infinite
    threshold prunes nothing or everything to 0, ``_kernel_threshold``)."""
    return _prune_counts(out, out, _kernel_threshold(out, thr)[1], count)


def _result_counts_op(count: tuple) -> FusedOp:
    return variant(_result_counts, "prune_counts", elementwise=False, count=count)


def _prune_counts(x, out, a_at, names, gate=None):
    """The counts ``names`` of one pruning; ``gate``: an always-true 0-d bool that ties the
    counts of ``out`` to the loop that writes it (see ``_prune_quantize_amax_kernel``)."""
    def of_out(mask):
        return mask if gate is None else mask & gate
    terms = {"nonfinite": lambda: ~torch.isfinite(x),
             "zeros": lambda: of_out(out == 0),
             "at_threshold": lambda: of_out(out.abs() == a_at)}
    return stack_counts([terms[n]() for n in names])


def _prune_quantize_kernel(x, thr, pkeys, scale, ints, floats, keys, start: int = 0, *,
                           stochastic: bool, scaled: bool, count: tuple, fast: bool = False,
                           overflow_inf: bool = False, gate=None):
    """Eq. 5, then ``quantize_fp`` of the pruned values, in one loop (the pruned tensor is never
    written); ``count``: names of ``PRUNE_QUANTIZE_COUNTS``, counted in the same loop."""
    p = _prune_kernel(x, thr, pkeys, start)
    if x.dim() == 2:
        # the 2-D counter layout (nearest rounding only): p passes unchanged (the columns are
        # >= 0), but through a select that reads the columns, so the rounding's loop keeps
        # the (rows, L) shape and fuses with the hash's (without it inductor merged the
        # rounding into a flat loop, wrote the hash's mask to memory between the two:
        # measured 10x slower)
        p = torch.where(layout_columns(x, pkeys) >= 0, p, torch.full_like(p, float("nan")))
    qnames = tuple(n for n in count if n in QUANTIZE_COUNTS)  # "nonfinite" of p is x's
    pnames = tuple(n for n in count if n not in QUANTIZE_COUNTS)
    q = _quantize_flat(p, scale, ints, floats, keys, start, stochastic=stochastic,
                       scaled=scaled, count=qnames, fast=fast, overflow_inf=overflow_inf)
    if not count:
        return q
    got = {}
    if qnames:
        q, qc = q
        got.update(zip(qnames, qc.unbind()))
    if pnames:  # "pruned_zeros" is stochastic_prune's "zeros" of p
        pc = _prune_counts(x, p, _kernel_threshold(x, thr)[1],
                           tuple(n.removeprefix("pruned_") for n in pnames), gate)
        got.update(zip(pnames, pc.unbind()))
    return q, torch.stack([got[n] for n in count])


def _prune_quantize_amax_kernel(x, thr, pkeys, maxn, factor, keep, ints, floats, keys, *,
                                stochastic: bool, scaled: bool, count: tuple, fast: bool,
                                overflow_inf: bool, flag: bool = False):
    """``_prune_quantize_kernel`` at the amax scale of the pruned values, one compiled call.

    amax(P(x)) needs no pass over P(x): an element with |x| >= a is kept as it is and every
    other becomes 0 or +-a, so amax(P(x)) = amax(x) when amax(x) >= a (NaN: NaN), else a when
    some element survived, else 0. The reduction reads x (no hash), the rounding loop prunes
    at the scale of max(amax(x), a) and reduces "some element survived"; where none did the
    output is all zeros whatever the scale, and the scale returned is ``keep`` (amax 0).
    Returns (out, [counts,] s, amax(P(x))[, bad]); ``flag``: ``bad``, x's non-finite flag
    from amax(x) (``rounding._nonfinite_amax``: no count in the loop).
    """
    amax_x = x.abs().amax().to(torch.float64)
    a64 = _kernel_threshold(x, thr)[0].to(torch.float64)
    guess = amax_scale_or_keep(torch.maximum(amax_x, a64), maxn, factor, keep)
    # the counts of the pruned values must come from the loop that prunes: inductor would
    # otherwise fuse them into the amax loop (they do not need the scale) and hash every
    # element twice; an always-true gate computed from the scale ties them to that loop
    gate = (guess == guess) | (guess != guess)
    res = _prune_quantize_kernel(x, thr, pkeys, guess, ints, floats, keys,
                                 stochastic=stochastic, scaled=scaled, count=count, fast=fast,
                                 overflow_inf=overflow_inf, gate=gate)
    out = res[0] if count else res
    survived = (out != 0).any()  # NaN != 0: a NaN survives (its amax is NaN: keep anyway)
    big = (amax_x >= a64) | torch.isnan(amax_x)
    amax_p = torch.where(big, amax_x, torch.where(survived, a64, torch.zeros_like(a64)))
    s = torch.where(survived, guess, keep.to(guess))
    tail = (s, amax_p, _nonfinite_amax(amax_x)) if flag else (s, amax_p)
    return (*res, *tail) if count else (res, *tail)


# what ``stochastic_prune(..., counts=True)`` counts, in this order
PRUNE_COUNTS = ("nonfinite", "zeros", "at_threshold")
# what ``prune_quantize(..., counts=True)`` counts: the pruned values' zeros and +-a symbols,
# then ``quantize_fp``'s counts of the quantized result (rounding.COUNTS)
PRUNE_QUANTIZE_COUNTS = ("nonfinite", "pruned_zeros", "at_threshold", "overflow", "underflow",
                         "nan", "zeros")
_PRUNE = FusedOp(_prune_kernel, "stochastic_prune", elementwise=True)


def _threshold_step(a, zeros, bad, slope, consts):
    n, target, gain, min_slope = consts.unbind()
    achieved = zeros.to(torch.float64) / n
    step = (gain * (target - achieved) / slope.clamp_min(min_slope)).clamp(-1.0, 1.0)
    keep = (a <= 0) | (bad != 0)
    return torch.where(keep, a, a * torch.exp(step).to(a.dtype))


_THRESHOLD_STEP = FusedOp(_threshold_step, "threshold_step")


def _track_written(out, a, slope, consts):
    """``track_written``'s body: the zeros of ``out`` (``stack_counts``' exact int32 sum), its
    non-finite flag (max |out|), then ``_threshold_step`` from them."""
    zeros = stack_counts([out == 0])[0]
    bad = _nonfinite_amax(out.abs().amax())
    return _threshold_step(a, zeros, bad, slope, consts), bad


_TRACK_WRITTEN = FusedOp(_track_written, "track_written")


def track_written(out: torch.Tensor, a: torch.Tensor, slope: torch.Tensor, consts: torch.Tensor,
                  compile: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tracking's work after a pruning at threshold ``a`` written in place (``out``, flat
    and non-empty), in one compiled call: ``(threshold_step(a, zeros of out, bad, slope,
    consts), bad)``, ``bad`` the input's non-finite flag (a 0-d float64, 1.0 when out holds a
    NaN or +-inf, which Eq. 5 keeps while it maps every finite value to a finite one, so out's
    flag is x's). The same bits as ``_result_counts`` then ``threshold_step`` (one read-only
    pass over out, the step as its epilogue: one call per layer and step fewer)."""
    return _TRACK_WRITTEN(out, a, slope, consts, compile=compile)


def threshold_step(a: torch.Tensor, zeros: torch.Tensor, bad: torch.Tensor, slope: torch.Tensor,
                   consts: torch.Tensor, compile: bool | None = None) -> torch.Tensor:
    """One Newton step in ln a toward a target sparsity (the tracking of
    ``compressors.pruning.Pruner``): with ``consts`` = [n, target, gain, min_slope] (float64)

        S = zeros / n,  ln a <- ln a + clip(gain * (target - S) / max(slope, min_slope), -1, 1)

    ``zeros``: the zeros of a pruning's result (a count, or their number as float64), ``slope``
    dS/d ln a (the fraction of +-a symbols); a is kept where ``a <= 0`` (the zeros alone meet
    the target) or ``bad`` is nonzero (the call saw a NaN/inf: its counts are garbage). 0-d
    tensors on one device; returns the new 0-d threshold in a's dtype. One compiled call (a
    dozen scalar operations, which eager pays per layer and step), the same bits eager."""
    return _THRESHOLD_STEP(a, zeros, bad, slope, consts, compile=compile)


def _threshold_arg(x: torch.Tensor, threshold) -> torch.Tensor:
    """The threshold as the kernels take it: a 0-d tensor on x's device (any float dtype;
    ``_kernel_threshold`` rounds it to x's dtype inside the kernel)."""
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a float or a 0-d tensor, got shape "
                             f"{tuple(threshold.shape)}")
        if not threshold.is_floating_point():
            threshold = threshold.double()
        t = threshold.detach()
        t = t if t.dim() == 0 else t.reshape(())
        t = t if t.device == x.device else t.to(x.device)
    else:
        a_f = float(threshold)
        if not math.isfinite(a_f) or a_f < 0:
            raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
        t = torch.tensor(a_f, dtype=torch.float64, device=x.device)
    # half types: rounded here, because inductor keeps a half-precision scalar in float32
    # inside the kernel (the +-a symbols would then not compare equal to the stored values)
    return t.to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else t


def stochastic_prune(x: torch.Tensor, threshold, generator: torch.Generator | None = None, *,
                     compile: bool | None = None, counts=False):
    """Unbiased stochastic pruning (Eq. 5) of ``x`` at ``threshold`` a; returns a new tensor.

    Semantics per element: |x| >= a keeps x; a*u < |x| < a gives sign(x)*a; |x| <= a*u gives
    +0, with u uniform on the 2^-24 grid of [0, 1) (so E[T(x)] = x up to that resolution, and
    exactly 0 for x = 0).
    a is first rounded to x's dtype (so +-a is representable and the operator is exactly
    unbiased for that rounded a). NaN and +-inf pass through unchanged; zeros stay zero; an
    all-zero tensor is returned unchanged. A tensor threshold that is <= 0 or NaN means no
    pruning (checked on the device, no sync); a float threshold must be finite and >= 0.

    Args:
        x: any float dtype, any device and shape (numel < 2^31).
        threshold: float, or a 0-d tensor (any float dtype, preferably on x's device).
        generator: torch.Generator on x's device, or None for torch's default generator
            (one int64 seed is drawn from it per call; same state -> same output), or a
            ``random.Stream`` (its next draw: no generator call).
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
    thr = _threshold_arg(x, threshold)
    if x.numel() == 0:
        if names:
            return x.clone(), torch.zeros(len(names), dtype=torch.int64, device=x.device)
        return x.clone()
    return prune_unchecked(x.detach(), thr, generator, names, use_compiled(compile))


def prune_unchecked(x: torch.Tensor, threshold: torch.Tensor, generator, counts: tuple = (),
                    compiled: bool = True, into: bool = False, flag: bool = False):
    """``stochastic_prune`` after its argument checks, for a hot path that made them once (a
    compressor's layer): x a float tensor outside autograd, ``threshold`` as the kernels take
    it (``_threshold_arg``: a 0-d float tensor on x's device, x's own dtype for a half x),
    ``counts`` a tuple of ``PRUNE_COUNTS`` names, ``compiled`` the fused path or the eager
    one. Its results, the same draw from ``generator``. ``into`` (x contiguous): x is
    overwritten with the pruned tensor, which is x itself (one read and one write of x, no
    output buffer: for a caller that owns x); counts of the result (zeros, +-a symbols), which
    would split the writing loop (``rounding.in_place_fuses``), then come from a read-only
    pass over the written x. ``flag`` (x non-empty, no ``counts``): a last result, x's
    non-finite flag (``_prune_flag_kernel``: a 0-d float64, 1.0 when x holds a NaN or +-inf)
    instead of the count."""
    flat, keys = counter_layout(x, draw_keys(generator, x.device, compiled), compiled)
    if into and not in_place_fuses(counts):
        # counts of the result in the writing loop would split it (``in_place_fuses``): the
        # pruning writes x with no count, then one read-only pass counts the written x
        # (``_result_counts``: no hash; the same numbers as the fused counts)
        prune_kernel((), True)(flat, threshold, keys, compile=compiled)
        return x, _result_counts_op(tuple(counts))(x.reshape(-1), threshold, compile=compiled)
    if flag:
        op = variant(_prune_flag_kernel, "stochastic_prune", into=into)
        res = op(flat, threshold, keys, compile=compiled)
        return (x, res[0]) if into else (res[0].view(x.shape), res[1])
    res = prune_kernel(counts, into)(flat, threshold, keys, compile=compiled)
    if into:
        return (x, res[0]) if counts else x
    if counts:
        return res[0].view(x.shape), res[1]
    return res.view(x.shape)


def prune_kernel(counts: tuple = (), into: bool = False) -> FusedOp:
    """``stochastic_prune``'s fused operator, for a hot path that checked its arguments once
    (a compressor's layer): ``op(x, threshold, keys, compile=...)`` with ``(x, keys) =
    random.counter_layout(flat, draw_keys(...), compiled)``, ``threshold`` a 0-d float tensor
    on x's device (x float32 or float64: a half x needs ``stochastic_prune``'s rounding of
    it); returns the pruned x in that layout, with ``counts`` (names of ``PRUNE_COUNTS``)
    ``(out, counts)``; ``into``: writes it into x and returns ``(counts,)`` or ``()``."""
    if counts:
        return variant(_prune_count_kernel, "stochastic_prune", count=tuple(counts), into=into)
    return variant(_prune_kernel, "stochastic_prune", into=True) if into else _PRUNE


def prune_quantize_amax_kernel(fmt, rounding: str, dtype: torch.dtype, device: torch.device,
                               margin: float = 0.0, counts: tuple = (), into: bool = False,
                               flag: bool = False):
    """``prune_quantize_amax``'s compiled kernel for a hot path (as ``prune_kernel``):
    ``kernel(x, threshold, pkeys, keep[, keys], compile=True)`` with ``(x, pkeys) =
    prune_layout(x, pkeys, rounding)``, ``keep`` a 0-d float64 scale on x's device and, for
    stochastic rounding, the rounding's own keys (drawn after ``pkeys``); returns
    ``prune_quantize_amax``'s results in that layout (``into``: the first written into x, the
    others returned); ``flag``: a last result, x's non-finite flag (a 0-d float64, 1.0 when x
    holds a NaN or +-inf). Cached per argument set."""
    return bind_kernel(_prune_quantize_amax_kernel, "prune_quantize_amax",
                       (fmt, rounding, dtype, device, float(margin)), tuple(counts), lead=3,
                       amax=True, elementwise=False, into=bool(into), flag=bool(flag))


def prune_quantize(x: torch.Tensor, threshold, fmt, rounding: str = "nearest", scale=None,
                   generator: torch.Generator | None = None, *, compile: bool | None = None,
                   counts=False):
    """``quantize_fp(stochastic_prune(x, threshold, generator), fmt, rounding, scale,
    generator)`` in one pass: the same bits (the same two draws from ``generator``, seeds of
    a torch.Generator or a ``random.Stream``'s draws, in the same order), without writing and
    re-reading the pruned tensor.

    ``counts``: True, or a sequence of names of ``PRUNE_QUANTIZE_COUNTS``: ``nonfinite`` (NaN
    or +-inf elements of x), ``pruned_zeros`` and ``at_threshold`` (``stochastic_prune``'s
    ``zeros`` and ``at_threshold`` of the pruned values), ``overflow``, ``underflow``,
    ``nan``, ``zeros`` (``quantize_fp``'s counts of quantizing the pruned values); returns
    ``(result, counts)`` then, counted in the same loop. Arguments as the two functions.
    """
    require_float_tensor(x, "x")
    names = count_names(counts, PRUNE_QUANTIZE_COUNTS)
    thr = _threshold_arg(x, threshold)
    pkeys = draw_keys(generator, x.device, _layout_keys(rounding, compile)) \
        if x.numel() else None
    args = prepare(x, fmt, rounding, scale, generator)
    if x.numel() == 0:
        if names:
            return x.clone(), torch.zeros(len(names), dtype=torch.int64, device=x.device)
        return x.clone()
    op = bind_kernel(_prune_quantize_kernel, "prune_quantize", args.key, names, lead=3)
    flat, pkeys = prune_layout(x, pkeys, rounding, use_compiled(compile))
    res = op(flat, thr, pkeys, *args.varying, compile=compile)
    if names:
        return res[0].view(x.shape), res[1]
    return res.view(x.shape)


def prune_quantize_amax(x: torch.Tensor, threshold, fmt, rounding: str = "nearest", *,
                        margin: float = 0.0, keep: torch.Tensor | None = None,
                        generator: torch.Generator | None = None,
                        compile: bool | None = None, counts=False):
    """``quantize_fp_amax(stochastic_prune(x, threshold, generator), fmt, rounding, margin=...,
    keep=..., generator=generator)`` in one compiled call, without writing the pruned tensor:
    the same bits, scale and amax (amax of the *pruned* values, derived from x's: see
    ``_prune_quantize_amax_kernel``), the same two draws from ``generator`` in the same order.

    Returns ``(out, s, amax)``, with ``counts`` (names of ``PRUNE_QUANTIZE_COUNTS``)
    ``(out, counts, s, amax)``. Compiled: a reduction over x, then the prune-and-round loop;
    eager: the two functions.
    """
    require_float_tensor(x, "x")
    names = count_names(counts, PRUNE_QUANTIZE_COUNTS)
    if not use_compiled(compile) or x.numel() == 0:  # the two calls
        pnames = tuple(n for n in names if n in PRUNE_QUANTIZE_COUNTS[:3])
        qnames = tuple(n for n in names if n not in PRUNE_QUANTIZE_COUNTS[:3])
        p = stochastic_prune(x, threshold, generator, compile=False,
                             counts=tuple(n.removeprefix("pruned_") for n in pnames) or False)
        got = {}
        if pnames:
            p, pc = p
            got.update(zip(pnames, pc.unbind()))
        q, *rest = quantize_fp_amax(p, fmt, rounding, margin=margin, keep=keep,
                                    generator=generator, compile=False, counts=qnames or False)
        if qnames:
            got.update(zip(qnames, rest[0].unbind()))
        if not names:
            return q, *rest[-2:]
        return q, torch.stack([got[n] for n in names]), *rest[-2:]
    thr = _threshold_arg(x, threshold)
    pkeys = draw_keys(generator, x.device, _layout_keys(rounding, True))
    args = amax_args(x, fmt, rounding, margin, keep, generator)
    op = prune_quantize_amax_kernel(*args.key, names)
    flat, pkeys = prune_layout(x, pkeys, rounding)
    res = op(flat, thr, pkeys, *args.varying, compile=True)
    return (res[0].view(x.shape), *res[1:])


def prune_quantize_amax_unchecked(x: torch.Tensor, threshold: torch.Tensor, fmt, rounding: str,
                                  margin: float, keep: torch.Tensor, generator,
                                  counts: tuple = (), into: bool = False, flag: bool = False):
    """``prune_quantize_amax``'s fused call after its argument checks (as ``prune_unchecked``;
    ``keep`` a 0-d float64 scale on x's device, ``fmt`` an FPFormat, ``counts`` a tuple of
    ``PRUNE_QUANTIZE_COUNTS`` names): its results, the same two draws in the same order.
    ``into`` (x contiguous): x is overwritten with the result, which is x itself, where the
    counts allow it (``rounding.in_place_fuses``). ``flag`` (x non-empty): a last result, x's
    non-finite flag (``prune_quantize_amax_kernel``)."""
    into = into and in_place_fuses(counts)
    pkeys = draw_keys(generator, x.device, rounding != "stochastic")
    rkeys = (draw_keys(generator, x.device),) if rounding == "stochastic" else ()
    flat, pkeys = prune_layout(x, pkeys, rounding)
    res = prune_quantize_amax_kernel(fmt, rounding, x.dtype, x.device, margin, counts, into,
                                     flag)(flat, threshold, pkeys, keep, *rkeys, compile=True)
    if into:
        return (x, *res)
    out, *rest = res
    return (out.view(x.shape), *rest)


def _layout_keys(rounding: str, compile: bool | None) -> bool:
    """Whether a prune + quantize call draws its pruning keys with the counter's columns
    (``random.draw_keys``): where ``prune_layout`` may take the 2-D layout."""
    return rounding != "stochastic" and use_compiled(compile)


def prune_layout(x, pkeys, rounding: str, compiled: bool = True):
    """(x, pruning keys) of a prune + quantize kernel: the 2-D counter layout
    (``random.counter_layout``) for nearest rounding; stochastic rounding's bit path hashes a
    flat counter of its own, so x stays flat there. One view op for a contiguous x outside
    autograd (a hot path's), a detach first for one inside."""
    x = x.detach() if x.requires_grad else x
    if rounding == "stochastic":
        return x.reshape(-1), pkeys
    return counter_layout(x, pkeys, compiled)


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
