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

Random bits for stochastic rounding: ONE int64 seed is drawn per call from the user's
``torch.Generator`` (a 0-d tensor on the generator's device: no host sync on CUDA), and each
element hashes (seed, element index) with the package's counter hash
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

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from gradcomp.numerics._checks import require_choice, require_float_tensor
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.kernels import compile_enabled, kernel_keys, set_compile, variant
from gradcomp.numerics.random import draw_seed, random_bits

__all__ = ["quantize_fp", "set_compile", "compile_enabled", "count_names", "prepare", "COUNTS",
           "ROUNDINGS", "KernelArgs"]

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
    floats = [inv1, inv2, st1, st2, 0.0, magic]
    return ints, floats


@lru_cache(maxsize=256)
def _constants(fmt: FPFormat, wide: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    # cached per (format, container, device): building them on a GPU is a host-to-device copy,
    # which would synchronise every call
    ints, floats = _constants_host(fmt, wide)
    fdt, idt = (_F64 if wide else _F32)[:2]
    return (torch.tensor(ints, dtype=idt, device=device),
            torch.tensor(floats, dtype=fdt, device=device))


def _quantize_flat(x, scale, ints, floats, keys, start=0, *, stochastic: bool, scaled: bool,
                   count: tuple = ()):
    """Core on a 1-d tensor (eager, or traced by torch.compile); returns x's dtype, and with
    ``count`` (names of ``COUNTS``) also their int64 counts, in that order, from the same loop."""
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
    return out, _counts(x, out, mag, ints, count)


def _counts(x, out, mag, ints, names):
    """The int64 counts ``names`` (of ``COUNTS``) of one quantization, stacked in that order."""
    inf_bits = ints[7]
    zero = out == 0
    terms = {
        "nonfinite": lambda: (~torch.isfinite(x)).sum(),
        # |x*s| > max_normal on the bits: inf counts, NaN (magnitude bits above inf's) does not
        "overflow": lambda: ((mag > ints[5]) & (mag <= inf_bits)).sum(),
        "underflow": lambda: (zero & (x != 0) & torch.isfinite(x)).sum(),
        "nan": lambda: torch.isnan(x).sum(),
        "zeros": lambda: zero.sum(),
    }
    return torch.stack([terms[n]() for n in names])


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
            generator's device); None uses torch's default generator of x's device.
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
    op = variant(_quantize_flat, "quantize_fp", stochastic=args.stochastic, scaled=args.scaled,
                 count=names)
    if names:
        out, c = op(flat, *args.tensors, compile=compile)
        return out.view(x.shape), c
    return op(flat, *args.tensors, compile=compile).view(x.shape)


class KernelArgs(NamedTuple):
    """What ``quantize_fp``'s kernel takes besides x: the variant and its tensor arguments."""

    stochastic: bool
    scaled: bool
    tensors: tuple  # (scale, ints, floats, keys)


def prepare(x: torch.Tensor, fmt, rounding: str, scale, generator) -> KernelArgs:
    """Check ``quantize_fp``'s arguments and build its kernel arguments (one seed drawn from
    ``generator`` for stochastic rounding); shared with the fused prune + quantize kernel."""
    require_float_tensor(x, "x")
    require_choice(x.dtype, "x.dtype", _DTYPES)
    if isinstance(fmt, str):
        fmt = FPFormat.from_name(fmt)
    elif not isinstance(fmt, FPFormat):
        raise TypeError(f"fmt must be an FPFormat or a format name, got {type(fmt).__name__}")
    require_choice(rounding, "rounding", ROUNDINGS)
    wide = x.dtype == torch.float64
    fdt = torch.float64 if wide else torch.float32
    if scale is None:
        s = torch.ones((), dtype=fdt, device=x.device)
    else:
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise ValueError(f"scale must be a number or a 0-d tensor, got shape "
                                 f"{tuple(scale.shape)}")
            s = scale.detach().reshape(()).to(device=x.device, dtype=fdt)
            check = scale.device.type == "cpu"
        else:
            s = torch.tensor(float(scale), dtype=fdt, device=x.device)
            check = True
        if check:
            v = float(scale)
            if not (v > 0 and np.isfinite(v)):
                raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    ints, floats = _constants(fmt, wide, torch.device(x.device))
    stochastic = rounding == "stochastic"
    if stochastic:
        keys = kernel_keys(draw_seed(generator, x.device))  # = random.stacked_keys
    else:
        keys = _zero_keys(torch.device(x.device))
    return KernelArgs(stochastic, scale is not None, (s, ints, floats, keys))


@lru_cache(maxsize=16)
def _zero_keys(device) -> torch.Tensor:
    # cached per device: building it on a GPU each call would be a host-to-device copy
    return torch.zeros(4, dtype=torch.int32, device=device)
