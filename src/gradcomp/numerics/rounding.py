"""``quantize_fp``: round a tensor onto an :class:`FPFormat` grid with integer ops on its bits.

How (one pass, branch-free, the same code on CPU and CUDA):

1. Work in a *container*: float32 bits as int32 for float32/float16/bfloat16 inputs (half types
   are upcast, exactly), float64 bits as int64 for float64 inputs (its own int64 path, so wide
   formats and the paper's 8-exponent-bit formats are exact too). A float32/half input whose
   format does not fit in float32 (e.g. paper 1-8-y, max 2^128) raises ValueError: pass float64.
2. Split ``a = |bits|`` and the sign bit. In the format's normal range (|y| >= min_normal) the
   grid spacing is the container's spacing times 2^d0, d0 = container_man_bits - man_bits, so
   rounding is an integer add and mask on ``a``; a carry walks into the exponent by itself.
   Nearest: add 2^(d0-1) - 1 + (bit d0 of a), then clear the low d0 bits: round half to even
   (the even *code* of the format: even mantissa LSB; for man_bits = 0, even exponent code).
   Stochastic: add d0 uniform random bits, then clear: rounds up with probability equal to the
   dropped fraction (exactly unbiased).
3. Below min_normal the grid is uniform (step 2^(emin - man_bits) with subnormals, else
   min_normal itself). Nearest is ``(|y| + C) - C`` with C = step * 2^container_man_bits: the
   FPU's own round-half-to-even add lands on a multiple of step. Stochastic uses
   p = |y| / step (exact, a power-of-two product) and ``floor(p) + (u < frac(p))``.
   Without subnormals nearest *flushes* |y| < min_normal to 0 (Eq. 2); stochastic rounding
   stays unbiased and picks 0 or min_normal.
4. Overflow: a rounded magnitude above max_normal (and +-inf) becomes max_normal
   (``overflow="saturate"``) or inf (``overflow="inf"``); NaN stays NaN (payload kept).
5. The sign bit is put back (so -0 stays -0 and a flushed negative value is -0).

Nearest rounding of a float32 container on the CPU takes a float path instead of step 2 where
it is exact (``_float_path``: 1 to 21 mantissa bits, range well inside float32): saturate
first (rounding is monotone, so clamping |y| to max_normal before rounding equals saturating
after), then Veltkamp's splitting c = a*(2^d0 + 1), hi = c - (c - a), which rounds a to
man_bits + 1 significant bits, half to even, in three hardware operations. The same bits as
the integer path (checked on every float32 input: ``benchmarks/rounding_exactness.py``; the
tests sweep every float32 of the boundary binades against ml_dtypes); why: inductor's CPU code
reinterprets float <-> int element by element, which made the integer path compute-bound on
cache-resident gradients. The kernels are compiled without FMA contraction (an FMA would skip
the rounding of a*K); Triton contracts, so CUDA keeps the integer path.

Random bits for stochastic rounding: one set of hash keys per call (``random.draw_keys``: ONE
int64 seed drawn from the user's ``torch.Generator``, a 0-d tensor on the generator's device, no
host sync on CUDA; or the next draw of a ``random.Stream``, no generator call at all), and each
element hashes (keys, element index) with the package's counter hash
(:func:`gradcomp.numerics.random.random_bits`). Why: inside a fused kernel there is no
per-element call to torch's stateful generator, and ``torch.rand_like`` would cost an extra
full-size buffer and pass. A counter-based hash is pure integer math, so the fused and eager
paths give bit-identical results for the same generator state. Per element the bits are exactly
uniform over seeds (the mixer is a bijection of ``index ^ key``); precision: 31 bits (float32
container; 24 in the sub-normal range) or 63 bits (float64), i.e. below min_normal the
up-probability is quantised to 2^-24 (2^-53 for float64).

Fused vs eager: the compile policy of :mod:`gradcomp.numerics.kernels` (``set_compile``,
``GRADCOMP_COMPILE``; ``compile=`` per call). One fused kernel per rounding mode and scaling;
the format's constants are passed as tensors, so a new format reuses it. Both paths give
identical bits; if compilation fails the eager path is used, with a warning.
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import torch

from gradcomp.numerics._checks import require_choice, require_float_tensor
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.kernels import (
    INT32_LIMIT,
    compile_enabled,
    set_compile,
    use_compiled,
    variant,
)
from gradcomp.numerics.random import draw_keys, random_bits
from gradcomp.numerics.scales import amax_scale_or_keep

__all__ = ["quantize_fp", "quantize_fp_amax", "set_compile", "compile_enabled", "count_names",
           "prepare", "amax_args", "amax_kernel", "bind_kernel", "quantize_fp_amax_unchecked",
           "quantize_fp_unchecked", "in_place_fuses",
           "stack_counts", "COUNTS", "ROUNDINGS", "KernelArgs", "AmaxArgs"]

ROUNDINGS = ("nearest", "stochastic")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# container: (float dtype, int dtype, mantissa bits, exponent bits, numpy float, numpy int)
_F32 = (torch.float32, torch.int32, 23, 8, np.float32, np.int32)
_F64 = (torch.float64, torch.int64, 52, 11, np.float64, np.int64)


def _pow2_factors(e: int) -> tuple[float, float]:
    """2^e as two float factors, each inside the float32 normal range (2^e may not be)."""
    e1 = e // 2
    return 2.0**e1, 2.0 ** (e - e1)


@lru_cache(maxsize=256)
def _constants_host(fmt: FPFormat, wide: bool):
    """The format's constants for one container, as Python numbers (cached per format)."""
    fdt, idt, T, ebits, npf, npi = _F64 if wide else _F32
    cbias = 2 ** (ebits - 1) - 1
    if not fmt.fits(ebits, T):
        raise ValueError(
            f"format {fmt.name} (min normal 2^{fmt.emin}, max {fmt.max_normal!r}, "
            f"{fmt.man_bits} mantissa bits) is not representable in "
            f"{'float64' if wide else 'float32'}; pass a float64 tensor"
        )
    m = fmt.man_bits
    d0 = T - m
    ints = [
        d0,
        (1 << (d0 - 1)) - 1 if d0 > 0 else 0,  # nearest: half - 1 (0 when nothing is dropped)
        1 if d0 > 0 else 0,  # nearest: weight of the "odd" bit for ties to even
        ~((1 << d0) - 1),  # mask clearing the dropped bits
        (fmt.emin + cbias) << T,  # bits of min_normal
        int(np.array(fmt.max_normal, dtype=npf).view(npi)),  # bits of max_normal
        int(np.array(np.inf if fmt.overflow == "inf" else fmt.max_normal, dtype=npf).view(npi)),
        (2 ** ebits - 1) << T,  # bits of +inf
        (8 * np.dtype(npi).itemsize - 1) - d0,  # right shift turning random bits into d0 bits
        # man_bits = 0: bit d0 is the container's exponent LSB; ties go to the even *format*
        # code, whose parity differs from the container's when the biases differ in parity
        (cbias - fmt.bias) & 1 if (m == 0 and d0 > 0) else 0,
    ]
    e_step = fmt.emin - m if fmt.subnormals else fmt.emin
    inv1, inv2 = _pow2_factors(-e_step)
    st1, st2 = _pow2_factors(e_step)
    # nearest below min_normal: (|y| + C) - C with C = step * 2^T rounds |y| to a multiple of
    # the subnormal step in one hardware RNE add (|y| < min_normal <= C, so ulp(|y|+C) = step).
    # Without subnormals C = min_normal * 2^(T+2): ulp(|y|+C) = 4 min_normal, so every
    # |y| < min_normal (< half that ulp) rounds to exactly 0: the flush, in the same add
    magic = 2.0 ** (fmt.emin - m + T) if fmt.subnormals else 2.0 ** (fmt.emin + T + 2)
    # float path of nearest rounding (``_float_path``): Veltkamp's splitting constant, the
    # normal-range bounds, the clamp (max_normal when saturating; 2 max_normal, which rounds to
    # itself above max_normal, with overflow="inf") and what an overflow becomes
    inf = fmt.overflow == "inf"
    floats = [inv1, inv2, st1, st2, 0.0, magic, 2.0 ** d0 + 1, fmt.min_normal, fmt.max_normal,
              2.0 * fmt.max_normal if inf else fmt.max_normal,
              math.inf if inf else fmt.max_normal]
    if not _float_path(fmt, wide):
        floats[6:] = [0.0] * 5  # not used: that format takes the integer path
    return ints, floats


def _float_path(fmt: FPFormat, wide: bool) -> bool:
    """Whether nearest rounding to ``fmt`` runs on float operations (``_quantize_flat``).

    Veltkamp's splitting c = a*(2^d0 + 1), hi = c - (c - a) rounds a float32 ``a`` to
    24 - d0 = man_bits + 1 significant bits, round half to even, in three hardware operations
    (no bit reinterpretation, which inductor's CPU code does element by element). Exact where
    2 <= d0 (man_bits <= 21), where ties to even of the significand are ties to the even code
    (man_bits >= 1; for man_bits = 0 the even code is the exponent's parity) and where
    c cannot overflow (2 max_normal (2^d0 + 1) < 2^128). Verified against the integer path
    on every float32 input for 22 formats of 1 to 21 mantissa bits
    (``benchmarks/rounding_exactness.py``) and against ml_dtypes on every float32 of the
    boundary binades (tests/numerics/test_rounding.py); float64 inputs keep the integer path.
    """
    if wide or not 1 <= fmt.man_bits <= 21:
        return False
    return math.log2(fmt.max_normal) + 1 + (23 - fmt.man_bits) + 1 < 128


@lru_cache(maxsize=256)
def _constants(fmt: FPFormat, wide: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    # cached per (format, container, device): building them on a GPU is a host-to-device copy,
    # which would synchronise every call
    ints, floats = _constants_host(fmt, wide)
    fdt, idt = (_F64 if wide else _F32)[:2]
    return (torch.tensor(ints, dtype=idt, device=device),
            torch.tensor(floats, dtype=fdt, device=device))


def _quantize_flat(x, scale, ints, floats, keys, start=0, *, stochastic: bool, scaled: bool,
                   count: tuple = (), fast: bool = False, overflow_inf: bool = False):
    """Core on a 1-d tensor (eager, or traced by torch.compile); returns x's dtype, and with
    ``count`` (names of ``COUNTS``) also their int64 counts, in that order, from the same loop.
    ``fast``: nearest rounding on float operations (only where ``_float_path`` holds for the
    format; ``overflow_inf``: its overflow is inf)."""
    out_dtype = x.dtype
    wide = out_dtype == torch.float64
    fdt, idt, T = (_F64 if wide else _F32)[:3]
    y = x.to(fdt)
    if scaled:
        s = scale.to(fdt)
        y = y * s
    bits = y.view(idt)
    sign_mask = -(1 << (8 * (8 if wide else 4) - 1))
    sign = bits & sign_mask
    inf_bits = ints[7]
    mag = bits & ~sign_mask
    a = torch.minimum(mag, inf_bits)  # NaN payloads clamped: no integer overflow below

    if fast:  # nearest on float operations (``_float_path``): the same bits, vectorised
        ay = y.abs()
        a = torch.minimum(ay, floats[9])  # saturate first: rounding is monotone
        r = nearest_on_floats(a, floats[6], floats[5], floats[7])
        if overflow_inf:
            r = torch.where(r > floats[8], floats[10], r)
        out = signed_like(y, r)
        if scaled:
            out = out / s
        out = out.to(out_dtype)
        if not count:
            return out
        return out, _counts(x, out, lambda: ay > floats[8], count)

    # normal range: integer rounding of the bit pattern at bit d0
    if stochastic:
        rbits = random_bits(keys, y.numel(), wide, y.device, start)
        ar = (a + (rbits >> ints[8])) & ints[3]
    else:
        ar = (a + ints[1] + (((a >> ints[0]) ^ ints[9]) & ints[2])) & ints[3]

    # below min_normal: a uniform grid, p = |y| / step exactly (power-of-two products)
    if stochastic:
        p = (y.abs() * floats[0]) * floats[1]
        k = torch.floor(p)
        if wide:
            u = (rbits >> 10).to(fdt) * 2.0**-53
        else:
            u = (rbits >> 7).to(fdt) * 2.0**-24
        k = k + (u < p - k).to(fdt)
        sub = ((k * floats[2]) * floats[3]).view(idt)
    else:  # round half to even by the FPU; flushed to 0 when there are no subnormals
        sub = ((y.abs() + floats[5]) - floats[5]).view(idt)

    r = torch.where(a < ints[4], sub, ar)
    # overflow (a rounded magnitude above max_normal; +-inf in, or y*s overflowed, rounds to
    # inf's bits, which are above it too): saturate or inf
    r = torch.where(r > ints[5], ints[6], r)
    r = torch.where(mag > inf_bits, mag, r)  # NaN in -> the same NaN out (integer test)
    out = (r | sign).view(fdt)
    if scaled:
        out = out / s
    out = out.to(out_dtype)
    if not count:
        return out
    # |x*s| > max_normal on the bits: inf counts, NaN (magnitude bits above inf's) does not
    return out, _counts(x, out, lambda: (mag > ints[5]) & (mag <= inf_bits), count)


def veltkamp(a, k):
    """Veltkamp's splitting: with c = a * k, k = 2^d + 1, ``c - (c - a)`` is a rounded to its
    leading (significand bits - d) bits, round half to even (no FMA contraction: the kernels
    are compiled without it, ``kernels.COMPILE_OPTIONS``; a * k must not overflow)."""
    c = a * k
    return c - (c - a)


def nearest_on_floats(a, k, magic, min_normal):
    """a >= 0 (saturated; NaN passes) rounded to nearest, ties to even, on an FP grid with
    float operations only (no float <-> int reinterpretation, which inductor's CPU code does
    element by element): ``veltkamp(a, 2^(T - m) + 1)`` in the normal range, and below
    ``min_normal`` the FPU's own round-half-to-even add (a + magic) - magic, magic = the
    subnormal step times 2^T (or the flush constant, ``_constants_host``)."""
    hi = veltkamp(a, k)
    sub = (a + magic) - magic  # below min_normal, as the integer path
    return torch.where(a < min_normal, sub, hi)


def signed_like(y, r):
    """r (>= 0) with y's sign by selects (``copysign`` is a library call per vector in
    inductor's CPU code): y < 0 -> -r (-0 where r = 0, as copysign); +-0 and NaN -> y itself
    (the same signed zero, the same NaN)."""
    return torch.where(y < 0, -r, torch.where(y > 0, r, y))


def _counts(x, out, overflowed, names):
    """The int64 counts ``names`` (of ``COUNTS``) of one quantization, stacked in that order;
    ``overflowed()``: the mask of |x*s| > max_normal (inf included, NaN not)."""
    zero = out == 0
    terms = {
        "nonfinite": lambda: ~torch.isfinite(x),
        "overflow": overflowed,
        "underflow": lambda: zero & (x != 0) & torch.isfinite(x),
        "nan": lambda: torch.isnan(x),
        "zeros": lambda: zero,
    }
    return stack_counts([terms[n]() for n in names])


def nonfinite_flag(x: torch.Tensor) -> torch.Tensor:
    """0-d float64 on x's device: 1 when x holds a NaN/inf, else 0 (one min/max pass: both
    propagate; measured 10x cheaper than an inf-norm on the CPU); 0 for an empty x. For a call
    whose kernel counted nothing (the compressors, ``block.quantize_block_checked``)."""
    if not x.numel():
        return torch.zeros((), dtype=torch.float64, device=x.device)
    lo, hi = torch.aminmax(x.detach())
    return (~(torch.isfinite(lo) & torch.isfinite(hi))).double()


INT32_COUNT_LIMIT = INT32_LIMIT  # masks with fewer elements are counted in int32 (exact)


def stack_counts(masks) -> torch.Tensor:
    """The number of True elements of each mask, as one 1-d int64 tensor.

    Summed in int32 where a mask has fewer than 2^31 elements (exact) and widened once at the
    end: an int64 sum widens every vector of the loop (measured on the pruning kernel, 1.6M
    float32: its one non-finite count added 25% to the kernel's time as an int64 sum, 12% as
    an int32 sum). A larger mask sums in int64 (inside a compiled kernel the size test is a
    guard: such a tensor gets its own graph; ``kernels._signature`` keeps direct calls apart).
    """
    return torch.stack([m.sum(dtype=torch.int32 if m.numel() < INT32_COUNT_LIMIT
                              else torch.int64) for m in masks]).to(torch.int64)


# what ``quantize_fp(..., counts=True)`` counts, in this order
COUNTS = ("nonfinite", "overflow", "underflow", "nan", "zeros")

def count_names(counts, allowed: tuple, name: str = "counts") -> tuple:
    """``counts`` of a kernel call as a tuple of names: False -> (), True -> ``allowed``, a
    sequence of names (a subset of ``allowed``, in any order) -> that tuple."""
    if counts is False or counts is None:
        return ()
    if counts is True:
        return allowed
    if isinstance(counts, str) or not all(isinstance(c, str) for c in counts):
        raise TypeError(f"{name} must be True, False or a sequence of names from {allowed}, "
                        f"got {counts!r}")
    names = tuple(counts)
    for c in names:
        require_choice(c, f"{name} entry", allowed)
    if not names:
        raise ValueError(f"{name} must name at least one of {allowed}")
    return names


def quantize_fp(
    x: torch.Tensor,
    fmt: FPFormat | str,
    rounding: str = "nearest",
    scale=None,
    generator: torch.Generator | None = None,
    compile: bool | None = None,
    counts=False,
):
    """Round ``x`` onto the grid of ``fmt``; returns a new tensor of x's dtype, shape and device.

    Args:
        x: float32, float16, bfloat16 or float64 tensor (integer tensors raise TypeError).
            Half types are upcast to float32 for the bit work and the result is cast back
            (exact when the format fits in that half type, e.g. e5m2 in float16).
        fmt: an :class:`FPFormat` or a name accepted by ``FPFormat.from_name``.
        rounding: ``"nearest"``: round half to even on the grid (without subnormals,
            |y| < min_normal is flushed to 0, Eq. 2). ``"stochastic"``: up with probability
            equal to the distance fraction to the lower neighbour, so E[Q(y)] = y for every y
            inside [-max_normal, max_normal] (also below min_normal, where the neighbours are 0
            and the smallest grid value).
        scale: None, a positive finite number or 0-d tensor s: returns Q(x*s)/s (exact
            scaling when s is a power of two). A Python/CPU scale of 0, inf or NaN raises
            ValueError; a device scale is not inspected (that would sync the host).
        generator: torch.Generator for stochastic rounding (one seed drawn per call, on the
            generator's device); None uses torch's default generator of x's device; or a
            ``random.Stream`` (its next draw of the step, no generator call).
        compile: True = fused torch.compile path, False = eager, None = module switch /
            ``GRADCOMP_COMPILE`` env (:func:`gradcomp.numerics.kernels.set_compile`). Both
            give identical bits.
        counts: also return, from the same pass, a 1-d int64 tensor on x's device with the
            counts named by ``COUNTS``: ``nonfinite`` (NaN or +-inf elements of x),
            ``overflow`` (|x*s| > max_normal, inf included, NaN not), ``underflow`` (finite
            non-zero x whose result is 0), ``nan`` (NaN elements of x), ``zeros`` (zeros of the
            result). Returns ``(result, counts)`` then; the result is the same. A sequence of
            those names counts only them, in that order (each count is a reduction in the
            loop: the hot path asks for ``("nonfinite",)`` and the rest on metric steps).

    Overflow per ``fmt.overflow``: saturate to +-max_normal (also +-inf inputs) or round to
    +-inf. NaN stays NaN. Signed zeros keep their sign.
    """
    names = count_names(counts, COUNTS)
    args = prepare(x, fmt, rounding, scale, generator)
    flat = x.reshape(-1)
    if flat.numel() == 0:
        if names:
            return x.clone(), torch.zeros(len(names), dtype=torch.int64, device=x.device)
        return x.clone()
    # one variant (its own compiled code object) per rounding, scaling and set of counts; the
    # format's constants are tensors, not guards, so a new format reuses the variant
    res = bind_kernel(_quantize_flat, "quantize_fp", args.key, names)(
        flat, *args.varying, compile=compile)
    if names:
        return res[0].view(x.shape), res[1]
    return res.view(x.shape)


def in_place_fuses(counts: tuple) -> bool:
    """Whether a hot-path kernel with these counts writes its result into x in the loop that
    computes it (``into``): with none, or only the inputs' non-finite count (a reduction over
    x, its own read-only loop). A count of the result (zeros, +-a symbols, underflow, ...)
    reads it in the loop that writes it, and the write into x then made inductor keep the
    result in a buffer, count it in a scalar loop and copy it (generated code; measured: a
    ResNet-8 step +75% with the empirical threshold's zero count): the rounding kernels then
    write a new tensor, as measured steps do; the pruning writes x and counts the written x in
    a read-only pass of its own (``pruning.prune_unchecked``)."""
    return all(n == "nonfinite" for n in counts)


def quantize_fp_unchecked(x: torch.Tensor, fmt: FPFormat, rounding: str, scale: torch.Tensor,
                          generator, counts: tuple = (), into: bool = False):
    """``quantize_fp(x, fmt, rounding, scale=scale, generator=generator, counts=counts)``
    after its argument checks, for a hot path that made them once (a compressor's layer): x a
    contiguous float tensor outside autograd, ``scale`` a positive finite 0-d tensor on x's
    device, ``fmt`` an FPFormat, ``rounding`` one of ``ROUNDINGS``, ``counts`` a tuple of
    ``COUNTS`` names; the fused path. Its results, the same draw from ``generator``.
    ``into``: x is overwritten with the result, which is x itself (one read and one write of
    x, no output buffer: for a caller that owns x), where the counts allow it
    (``in_place_fuses``; otherwise a new tensor)."""
    key = (fmt, rounding, x.dtype, x.device, True)
    if scale.dim() == 0 and scale.device == x.device and not scale.requires_grad \
            and scale.dtype in (torch.float32, torch.float64):
        # as it is: the kernel rounds it to its compute dtype itself (``_quantize_flat``: the
        # same conversion, no op per call for a compressor's float64 scale)
        s = scale
    else:
        s = _scale_arg(scale, x.device, _plan(*key)[3].dtype)  # the kernel's scale dtype
    into = into and in_place_fuses(counts)
    keys = (draw_keys(generator, x.device),) if rounding == "stochastic" else ()
    res = bind_kernel(_quantize_flat, "quantize_fp", key, tuple(counts), into=into)(
        x.view(-1), s, *keys, compile=True)
    if into:
        return (x, *res) if counts else x
    return (res[0].view(x.shape), res[1]) if counts else res.view(x.shape)


@lru_cache(maxsize=1024)
def bind_kernel(fn, name: str, key: tuple, names: tuple, lead: int = 1, amax: bool = False,
                elementwise: bool = True, **extra):
    """The variant of the rounding kernel ``fn`` (``quantize_fp``'s, the amax one, the fused
    prune + quantize ones) for a ``prepare`` key (``KernelArgs.key``; ``amax``: an
    ``amax_args`` key) and a set of counts, the format's constant tensors bound
    (``kernels.Bound``, cached: a hot-path call then costs no rebuilding of them). A call
    passes ``lead`` leading arguments (x; the pruning kernels also the threshold and its keys),
    then the key's ``varying`` arguments. ``extra``: more static arguments of ``fn``."""
    if amax:
        fmt, rounding, dtype, device, margin = key
        static, ints, floats, _, zero_keys = _plan(fmt, rounding, dtype, device, True)
        maxn, factor = _amax_constants(fmt, margin, device)
        fixed = (maxn, factor, None, ints, floats, zero_keys)
    else:
        static, ints, floats, one, zero_keys = _plan(*key)
        fixed = (None if key[-1] else one, ints, floats, zero_keys)
    op = variant(fn, name, elementwise=elementwise, count=names, **static, **extra)
    return op.bind(*(None,) * lead, *fixed)


def _amax_flat(x, maxn, factor, keep, ints, floats, keys, *, stochastic: bool, scaled: bool,
               count: tuple, fast: bool, overflow_inf: bool, flag: bool = False):
    """The amax scale of the whole flat x, then ``_quantize_flat`` with it, in one compiled
    call (a reduction loop, then the rounding loop); returns (out, [counts,] s, amax[, bad])
    (``bad``: ``_nonfinite_amax``, with ``flag``)."""
    amax = x.abs().amax().to(torch.float64)  # NaN propagates: the scale is then kept
    s = amax_scale_or_keep(amax, maxn, factor, keep)
    res = _quantize_flat(x, s, ints, floats, keys, 0, stochastic=stochastic, scaled=scaled,
                         count=count, fast=fast, overflow_inf=overflow_inf)
    tail = (s, amax, _nonfinite_amax(amax)) if flag else (s, amax)
    return (*res, *tail) if count else (res, *tail)


def _nonfinite_amax(amax: torch.Tensor) -> torch.Tensor:
    """1.0 (float64) where an amax is NaN or +-inf, i.e. its tensor held a NaN/inf, else 0."""
    return (~torch.isfinite(amax)).to(torch.float64)


def _scale_arg(keep, device, dtype=torch.float64) -> torch.Tensor:
    """A 0-d tensor scale ``keep`` (None: 1) as ``dtype`` on ``device``, with no op where it
    already is one."""
    if keep is None:
        return _one64(torch.device(device))
    t = keep.detach()
    t = t if t.dim() == 0 else t.reshape(())
    if t.dtype != dtype or t.device != device:
        t = t.to(device=device, dtype=dtype)
    return t


class AmaxArgs(NamedTuple):
    """What the fused amax kernels take besides x (``quantize_fp_amax``,
    ``pruning.prune_quantize_amax``): the variant and (max_normal, 2^margin, keep, ints,
    floats, keys); ``key`` and ``varying`` as ``KernelArgs``' (``varying``: keep, then the
    keys of stochastic rounding)."""

    static: dict
    tensors: tuple
    key: tuple
    varying: tuple


def amax_args(x: torch.Tensor, fmt, rounding: str, margin, keep, generator) -> AmaxArgs:
    """Check the amax kernels' arguments and build them (one seed drawn for stochastic
    rounding), as ``prepare`` does for ``quantize_fp``."""
    args = prepare(x, fmt, rounding, None, generator)
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    fmt, rounding, dtype, device, _ = args.key
    maxn, factor = _amax_constants(fmt, margin, device)
    _, ints, floats, keys = args.tensors
    keep_t = _scale_arg(keep, device)
    return AmaxArgs({**args.static, "scaled": True}, (maxn, factor, keep_t, ints, floats, keys),
                    (fmt, rounding, dtype, device, margin), (keep_t, *args.varying))


@lru_cache(maxsize=16)
def _one64(device) -> torch.Tensor:
    # cached per device, as _zero_keys
    return torch.ones((), dtype=torch.float64, device=device)


@lru_cache(maxsize=256)
def _amax_constants(fmt: FPFormat, margin: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    # cached per device: a host-to-device copy per call would synchronise
    return (torch.tensor(fmt.max_normal, dtype=torch.float64, device=device),
            torch.tensor(2.0 ** margin, dtype=torch.float64, device=device))


def quantize_fp_amax(x: torch.Tensor, fmt: FPFormat | str, rounding: str = "nearest", *,
                     margin: float = 0.0, keep: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, compile: bool | None = None,
                     counts=False, flag: bool = False):
    """``quantize_fp(x, fmt, rounding, scale=s)`` with x's own amax scale s, found in the same
    compiled call: s = fmt.max_normal / (amax * 2^margin), amax = max |x|
    (``scales.amax_scale_or_keep``); where amax is 0, inf or NaN (or s would not be a positive
    finite float64), s = ``keep`` (the caller's previous scale; None: 1). What an amax scaling
    policy does per call, without a separate min/max pass and a dozen small device ops.

    Returns ``(out, s, amax)`` (s and amax: 0-d float64 on x's device, no host sync), with
    ``counts`` ``(out, counts, s, amax)`` (``quantize_fp``'s counts of this call). Rounding,
    overflow, NaN and zeros as ``quantize_fp``; the same bits as ``quantize_fp(x, fmt,
    rounding, scale=s, generator=generator)`` with that s. Compiled: one reduction loop over x
    and the rounding loop, one dispatch; eager: ``torch.aminmax``, then the chunked rounding.
    An empty x gives amax 0 and s = ``keep``. ``flag``: a last result, 0-d float64, 1.0 when
    x held a NaN or +-inf (amax is then NaN/inf), else 0.0: from the same call (a compressor's
    non-finite flag without three more small device ops).
    """
    names = count_names(counts, COUNTS)
    args = amax_args(x, fmt, rounding, margin, keep, generator)
    maxn, factor, keep_t, ints, floats, keys = args.tensors
    dev = x.device
    flat = x.reshape(-1)
    flag = bool(flag)
    if flat.numel() == 0:
        amax = torch.zeros((), dtype=torch.float64, device=dev)
        tail = (keep_t.clone(), amax, amax.clone()) if flag else (keep_t.clone(), amax)
        if names:
            return x.clone(), torch.zeros(len(names), dtype=torch.int64, device=dev), *tail
        return x.clone(), *tail
    if use_compiled(compile):
        res = amax_kernel(*args.key, names, flag)(flat, *args.varying, compile=True)
    else:  # the reduction, then the chunked elementwise pass: the same operations
        lo, hi = torch.aminmax(flat)
        amax = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
        s = amax_scale_or_keep(amax, maxn, factor, keep_t)
        op = variant(_quantize_flat, "quantize_fp", count=names, **args.static)
        r = op(flat, s, ints, floats, keys, compile=False)
        tail = (s, amax, _nonfinite_amax(amax)) if flag else (s, amax)
        res = (*r, *tail) if names else (r, *tail)
    return (res[0].view(x.shape), *res[1:])


def amax_kernel(fmt: FPFormat, rounding: str, dtype: torch.dtype, device: torch.device,
                margin: float = 0.0, counts: tuple = (), flag: bool = False, into: bool = False):
    """``quantize_fp_amax``'s compiled kernel for a hot path that checked its arguments once
    (a compressor's layer): ``kernel(flat, keep[, keys])`` on a flat contiguous x of ``dtype``
    on ``device``, ``keep`` a 0-d float64 scale on it and, for stochastic rounding,
    ``draw_keys``' keys, returns ``quantize_fp_amax(x, ..., counts=counts, flag=flag)``'s
    results (flat). Always the fused path (``kernels.Bound``; check ``use_compiled`` first:
    called with ``compile=False`` it runs the body unchunked). Cached per argument set; the
    format, rounding and dtype are checked when first built. ``into``: the in-place variant
    (the rounded x written into x; the other results returned)."""
    return bind_kernel(_amax_flat, "quantize_fp_amax", (fmt, rounding, dtype, device,
                                                         float(margin)),
                       tuple(counts), amax=True, elementwise=False, flag=bool(flag),
                       into=bool(into))


def quantize_fp_amax_unchecked(x: torch.Tensor, fmt: FPFormat, rounding: str, margin: float,
                               keep: torch.Tensor, generator, counts: tuple = (),
                               flag: bool = False, into: bool = False):
    """``quantize_fp_amax``'s fused call after its argument checks, for a hot path that made
    them once (a compressor's layer): x a contiguous float tensor outside autograd, ``keep`` a
    0-d float64 scale on x's device, ``fmt`` an FPFormat, ``rounding`` one of ``ROUNDINGS``,
    ``counts`` a tuple of ``COUNTS`` names. Its results, the same draw from ``generator``.
    ``into``: x is overwritten with the result, which is then x itself (as
    ``quantize_fp_unchecked``)."""
    into = into and in_place_fuses(counts)
    keys = (draw_keys(generator, x.device),) if rounding == "stochastic" else ()
    res = amax_kernel(fmt, rounding, x.dtype, x.device, margin, counts, flag, into)(
        x.view(-1), keep, *keys, compile=True)
    if into:
        return (x, *res)
    return (res[0].view(x.shape), *res[1:])


class KernelArgs(NamedTuple):
    """What ``quantize_fp``'s kernel takes besides x: the variant and its tensor arguments;
    ``key``: (format, rounding, dtype, device, scaled), what the kernel's constants are cached
    by (``_plan``); ``varying``: the scale (when given) and the keys of stochastic rounding,
    the arguments that change from call to call."""

    static: MappingProxyType  # the variant: stochastic, scaled, fast, overflow_inf
    tensors: tuple  # (scale, ints, floats, keys)
    key: tuple
    varying: tuple


def prepare(x: torch.Tensor, fmt, rounding: str, scale, generator) -> KernelArgs:
    """Check ``quantize_fp``'s arguments and build its kernel arguments (one seed drawn from
    ``generator`` for stochastic rounding); shared with the fused prune + quantize kernel."""
    require_float_tensor(x, "x")
    if isinstance(fmt, str):
        fmt = FPFormat.from_name(fmt)
    elif not isinstance(fmt, FPFormat):
        raise TypeError(f"fmt must be an FPFormat or a format name, got {type(fmt).__name__}")
    static, ints, floats, one, zero_keys = _plan(fmt, rounding, x.dtype, x.device,
                                                 scale is not None)
    if scale is None:
        s = one
    else:
        fdt = one.dtype
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise ValueError(f"scale must be a number or a 0-d tensor, got shape "
                                 f"{tuple(scale.shape)}")
            s = _scale_arg(scale, x.device, fdt)
            check = scale.device.type == "cpu"
        else:
            s = torch.tensor(float(scale), dtype=fdt, device=x.device)
            check = True
        if check:
            v = float(scale)
            if not (v > 0 and np.isfinite(v)):
                raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    varying = () if scale is None else (s,)
    if zero_keys is None:  # stochastic: one seed per call
        keys = draw_keys(generator, x.device)
        varying += (keys,)
    else:
        keys = zero_keys
    return KernelArgs(static, (s, ints, floats, keys),
                      (fmt, rounding, x.dtype, x.device, scale is not None), varying)


@lru_cache(maxsize=512)
def _plan(fmt: FPFormat, rounding: str, dtype: torch.dtype, device: torch.device,
          scaled: bool):
    """What ``prepare`` builds once per format, rounding, dtype, device and scaling: the
    variant, the format's constant tensors, a scale of 1 and the keys of nearest rounding
    (cached: a call then costs no host-to-device copy and little Python)."""
    require_choice(dtype, "x.dtype", _DTYPES)
    require_choice(rounding, "rounding", ROUNDINGS)
    wide = dtype == torch.float64
    ints, floats = _constants(fmt, wide, device)
    stochastic = rounding == "stochastic"
    # CPU only: Triton contracts a*K - a into an FMA (no switch to stop it), and on a GPU
    # the integer path's reinterpretations cost nothing anyway
    fast = not stochastic and device.type == "cpu" and _float_path(fmt, wide)
    static = MappingProxyType({"stochastic": stochastic, "scaled": scaled, "fast": fast,
                               "overflow_inf": fast and fmt.overflow == "inf"})
    one = torch.ones((), dtype=torch.float64 if wide else torch.float32, device=device)
    return static, ints, floats, one, None if stochastic else _zero_keys(device)


@lru_cache(maxsize=16)
def _zero_keys(device) -> torch.Tensor:
    # cached per device: building it on a GPU each call would be a host-to-device copy
    return torch.zeros(4, dtype=torch.int32, device=device)
