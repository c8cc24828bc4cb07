"""Block-scaled formats: one scale per block of elements (OCP MX, NVFP4, FP8 blockwise).

A :class:`BlockFormat` is an element :class:`FPFormat`, a block shape (1-D: ``n`` consecutive
elements along one dimension; 2-D: ``r x c`` tiles over two dimensions), a *scale format* and
the rule that turns a block's amax (largest magnitude) into its scale, plus optionally a second,
per-tensor FP32 scale. :func:`quantize_block` returns the dequantized tensor ``Q(x / s) * s``
per block (x's shape and dtype).

Scale formats and rules (``s`` is the value a block is divided by; ``max`` = the element
format's largest finite value, ``emax`` = the exponent of its top binade, floor(log2 max)):

``"e8m0"`` (OCP MX): a power of two 2^k, k in [-127, 127], stored as the byte k + 127; the byte
    0xFF is NaN; there is no zero, no sign, no inf.

    * rule ``"floor"`` (OCP MX spec 1.0, section 6.3): k = floor(log2 amax) - emax, clamped to
      [-127, 127]. floor(log2 amax) is read from the bits of amax (exact; a subnormal or zero
      float32 amax reads as -127, like the exponent field). The largest block element can
      exceed ``max`` (its scaled value lies in [2^emax, 2^(emax+1))) and then saturates.
    * rule ``"rceil"`` (NVIDIA's round-up rule, ``cvt.rp.satfinite.ue8m0``; torchao's RCEIL):
      d = amax / max rounded to the container float, k = ceil(log2 d) computed exactly from the
      bits of d, clamped to [-127, 127]. So amax / s <= max up to the rounding of d.
``"e4m3"`` (NVFP4): s = RNE_e4m3(clamp(amax / max / t, 2^-6, 448)) * t, where t is the
    per-tensor FP32 scale (1 without one), rule ``"nearest"``. As in NVIDIA's recipe and torchao,
    subnormal E4M3 scales are not used (the clamp at 2^-6) and RNE may round the scale down, so
    the block maximum can saturate. Quantize multiplies by fp32(fp32(1/t) / s_e4m3) (by
    fp32(1/s_e4m3) without a tensor scale); dequantize multiplies by fp32(t * s_e4m3):
    the same float32 operations as torchao's ``nvfp4_quantize`` and ``NVFP4Tensor.dequantize``
    (for float64 input the same operations in float64; t is still an FP32 number).
``"fp32"`` (FP8 blockwise, DeepSeek-V3): s = amax / max rounded to float32, clamped to
    [2^-126, float32 max], rule ``"nearest"``; elements are Q(x / s) (a correctly rounded
    division), dequantized as q * s.

Per-tensor scale (``tensor_scale=True``, NVFP4; only with ``scale="e4m3"``, ValueError
otherwise: E8M0 and FP32 scales already span float32's exponent range):
t = fp32(amax_t / (448 * max)) with amax_t the largest *finite* magnitude of the whole tensor,
clamped to [2^-126, float32 max] (so an all-zero
tensor gives t = 2^-126, not torchao's 0 that turns the tensor into NaN; an inf or NaN element
spoils only its own block).

Elements: y = x * (1 / s) (the E8M0 reciprocal is an exact power of two, built from bits), then
rounded onto the element grid with saturation: ``"nearest"`` = round half to even (bit for bit
``quantize_fp(y, elem, "nearest")`` for every finite y: tested), ``"stochastic"`` = up with
probability equal to the distance fraction to the lower neighbour (unbiased inside
[-max, max]; the random bits come from the counter-based hash of :mod:`gradcomp.numerics.random`,
one seed drawn per call from ``generator``, the fused and eager paths give identical bits;
probability resolution 2^-24). Values beyond ``max`` saturate to +-max. Signed zeros keep their
sign. The result is q * s computed in the container (float32 for float32/bfloat16/float16 input,
float64 for float64), cast to x's dtype.

Edge cases, exactly:

* a block of zeros: amax 0 gives the smallest scale of the rule (E8M0 2^-127: byte 0 for floor
  and rceil; E4M3 2^-6 * t; FP32 2^-126); the block stays zero (signs kept).
* a block holding NaN: amax is NaN, so the scale is NaN (E8M0 byte 0xFF, E4M3 NaN, FP32 NaN)
  and every element of that block is NaN (sign and payload unspecified: which NaN operand an
  operation passes on depends on the compiled code). torchao's dequantized blocks are NaN too
  (its scale is NaN); its stored element codes are finite.
* a block holding +-inf (no NaN): amax is inf. E8M0 floor reads log2(inf) as 128: k = 128 -
  emax; rceil gives k = 127 (byte 254); E4M3 clamps to 448 * t; FP32 clamps to float32 max. The
  inf elements saturate to +-max * s, which overflows to +-inf in a float32/half result for
  the E8M0 and FP32 rules (not for float64 output), and is +-6 * 448 * t for NVFP4; the finite
  elements of the block are divided by that huge scale (mostly 0). Same as torchao.
* subnormal scales: E8M0 k = -127 (byte 0, the only subnormal float32 power of two) is used as
  2^-127 both ways: elements are Q(x * 2^127), dequantized with 2^-127 (rounded to the float32
  subnormal grid). torchao differs here: its floor path divides by 2^-126 but dequantizes with
  2^-127 (half the value), its rceil path divides by 1. Only blocks with amax < 2^(emax-126)
  (floor) or amax <= max * 2^-127 (rceil) are affected.
* amax at a power of two: floor: amax = 2^j gives k = j - emax, so the block max maps to 2^emax
  exactly; rceil: d = 2^j exactly gives k = j (no round-up), the max maps to ``max``.
* rceil against torchao's CPU fallback: torchao computes ceil(log2(d)) with a float log2 that
  returns exactly j for d slightly above 2^j (within about j * 2^-24 relative); there its scale
  is half of ours and the block maximum saturates. We follow the exact rule (the hardware
  instruction).

Block layout: 1-D blocks along ``dims[0]`` (default the last dimension), or along the
flattening of several ``dims`` in their order (moved last and merged into one dimension), 2-D
tiles over ``dims`` (default the last two). A ragged last block is padded with zeros logically
(zeros do not change an amax); the result has x's shape. Tensors with fewer dimensions than the
tile get leading dimensions of size 1; 0-d tensors are one block. Stochastic rounding draws
element i's random bits at i's index in the layout with the blocked dimension(s) moved last
(and merged) and padded.
1-D blocks along a dimension that is not the last, of a contiguous x whose size there is a
multiple of the block or shorter than one block, are reduced where they lie (``_strided``: no
copy, the result in x's layout, the same values and bits). So are 1-D blocks over several
dims ``(d0, d1, .., dk)`` whose ``d1..dk`` are x's last dimensions in order and whose product
(a conv operand's pixels) shares runs of at least ``MIN_RUN`` elements with the block
(``gcd(H * W, block) >= 16``, or the whole block): each block is then made of contiguous runs
of x (``_flat``: one run per block when ``H * W`` is a multiple of the block, else the "runs"
layout), and stochastic rounding draws each element's bits at its index in the moved layout.
The other layouts are moved.

How (CPU): inductor's CPU code reinterprets float <-> int element by element, so where a loop
is vectorised the float32 container rounds elements and computes E8M0/E4M3 scales on float
operations (``_round_elems_float``, ``_e8m0_scale_float``: the same bits as the bit rules,
tested on every float32 exponent); CUDA and float64 use the bit rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gradcomp.numerics._checks import require_choice, require_float_tensor
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.kernels import variant
from gradcomp.numerics.random import draw_keys, uniform_at, uniform_from_keys
from gradcomp.numerics.rounding import (
    _float_path,
    nearest_on_floats,
    nonfinite_flag,
    signed_like,
    veltkamp,
)

__all__ = [
    "BLOCK_DTYPES",
    "BlockFormat",
    "BlockMetrics",
    "NAMED_BLOCK_FORMATS",
    "SCALE_FORMATS",
    "SCALE_RULES",
    "block_scales",
    "e8m0_decode",
    "e8m0_encode",
    "quantize_block",
    "quantize_block_checked",
    "quantize_block_metrics",
    "quantize_block_unchecked",
]

SCALE_FORMATS = ("e8m0", "e4m3", "fp32")
SCALE_RULES = ("floor", "rceil", "nearest")
_RULES_FOR = {"e8m0": ("floor", "rceil"), "e4m3": ("nearest",), "fp32": ("nearest",)}
_SCALE_BITS = {"e8m0": 8, "e4m3": 8, "fp32": 32}
_ROUNDINGS = ("nearest", "stochastic")
BLOCK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what x may be
_E4M3 = FPFormat.from_name("e4m3fn")
_F32_MAX = float(torch.finfo(torch.float32).max)

# name -> (element format name, block, scale format, rule, tensor scale)
NAMED_BLOCK_FORMATS = {
    "mxfp8_e4m3": ("e4m3fn", (32,), "e8m0", "floor", False),
    "mxfp8_e5m2": ("e5m2", (32,), "e8m0", "floor", False),
    "mxfp6_e3m2": ("e3m2fn", (32,), "e8m0", "floor", False),
    "mxfp6_e2m3": ("e2m3fn", (32,), "e8m0", "floor", False),
    "mxfp4": ("e2m1fn", (32,), "e8m0", "floor", False),
    "nvfp4": ("e2m1fn", (16,), "e4m3", "nearest", True),
    "nvfp4_2d": ("e2m1fn", (16, 16), "e4m3", "nearest", True),
    "fp8_block128": ("e4m3fn", (128,), "fp32", "nearest", False),
    "fp8_block128x128": ("e4m3fn", (128, 128), "fp32", "nearest", False),
}


@dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format; see the module docstring for the exact semantics.

    Attributes:
        elem: element :class:`FPFormat` (IEEE semantics with subnormals, saturating, its name
            round-trips through ``FPFormat.from_name``, grid inside float32's normal range).
        block: block shape, ``(n,)`` or ``(r, c)``; each side 1..2^20.
        scale: ``"e8m0"``, ``"e4m3"`` or ``"fp32"``.
        rule: scale rounding: ``"floor"`` or ``"rceil"`` (e8m0), ``"nearest"`` (e4m3, fp32).
        tensor_scale: second-level per-tensor FP32 scale (NVFP4); only with ``scale="e4m3"``
            (ValueError for ``"e8m0"`` / ``"fp32"``, whose range needs no second level).
        dims: the dimensions the block spans (``(-1,)`` / ``(-2, -1)`` by default). 1-D blocks
            may span several dimensions, flattened in the order given (``(0, 2, 3)``: the
            reduction of a conv weight gradient over batch and pixels, ``n * H * W + h * W +
            w``), as if those dimensions were moved last and merged into one.
        name: the standard name when the fields match one, else ``elem:block:scale:rule[:ts]
            [:dims=...]`` (e.g. ``e4m3fn:32:e8m0:rceil``); ``from_name(f.name) == f``.
    """

    elem: FPFormat
    block: tuple = (32,)
    scale: str = "e8m0"
    rule: str = "floor"
    tensor_scale: bool = False
    dims: tuple | None = None
    name: str = ""

    def __post_init__(self):
        if isinstance(self.elem, str):
            object.__setattr__(self, "elem", FPFormat.from_name(self.elem))
        if not isinstance(self.elem, FPFormat):
            raise TypeError(f"elem must be an FPFormat or a format name, got "
                            f"{type(self.elem).__name__}")
        e = self.elem
        if e.semantics != "ieee" or not e.subnormals or e.overflow != "saturate":
            raise ValueError(
                f"elem must be an IEEE-semantics format with subnormals and overflow='saturate' "
                f"(block elements saturate, as the OCP MX spec says); got {e!r}")
        if FPFormat.from_name(e.name) != e:
            raise ValueError(f"elem {e.name!r} must be rebuilt exactly by FPFormat.from_name")
        if e.emin - e.man_bits < -126 or e.emax > 126:
            raise ValueError(f"elem {e.name} must have its grid inside float32's normal range "
                             f"(min subnormal >= 2^-126, top binade <= 2^126)")
        block = self.block
        if isinstance(block, int) and not isinstance(block, bool):
            block = (block,)
        if (not isinstance(block, tuple) or len(block) not in (1, 2)
                or any(isinstance(b, bool) or not isinstance(b, int) for b in block)):
            raise TypeError(f"block must be an int or a tuple of 1 or 2 ints, got {self.block!r}")
        if any(not 1 <= b <= 1 << 20 for b in block):
            raise ValueError(f"block sides must be in [1, 2^20], got {block}")
        object.__setattr__(self, "block", block)
        require_choice(self.scale, "scale", SCALE_FORMATS)
        require_choice(self.rule, "rule", _RULES_FOR[self.scale])
        if not isinstance(self.tensor_scale, bool):
            raise TypeError(f"tensor_scale must be a bool, got {self.tensor_scale!r}")
        if self.tensor_scale and self.scale != "e4m3":
            # the per-tensor FP32 scale exists to bring the block scales amax / max into the
            # narrow E4M3 range [2^-9, 448] (NVFP4); E8M0 (2^-127..2^127) and FP32 scales cover
            # every float32 amax without it, so it would only add a rounding step
            raise ValueError(f"tensor_scale=True requires scale='e4m3' (allowed with "
                             f"tensor_scale: 'e4m3'; 'e8m0' and 'fp32' need none), got "
                             f"scale={self.scale!r}")
        dims = self.dims
        if dims is None:
            dims = (-1,) if len(block) == 1 else (-2, -1)
        if isinstance(dims, int) and not isinstance(dims, bool):
            dims = (dims,)
        if (not isinstance(dims, tuple) or not dims
                or (len(block) == 2 and len(dims) != 2)
                or any(isinstance(d, bool) or not isinstance(d, int) for d in dims)):
            want = "2 ints" if len(block) == 2 else "1 or more ints (flattened in that order)"
            raise TypeError(f"dims must be a tuple of {want}, got {self.dims!r}")
        if len(set(dims)) != len(dims):
            raise ValueError(f"dims must be different dimensions, got {dims}")
        object.__setattr__(self, "dims", dims)
        if not self.name:
            object.__setattr__(self, "name", self._default_name())

    # ---- names ---------------------------------------------------------------------------
    def _default_name(self) -> str:
        for key, (el, bl, sc, ru, ts) in NAMED_BLOCK_FORMATS.items():
            if (self.elem == FPFormat.from_name(el) and self.block == bl and self.scale == sc
                    and self.rule == ru and self.tensor_scale == ts
                    and self.dims == ((-1,) if len(bl) == 1 else (-2, -1))):
                return key
        parts = [self.elem.name, "x".join(str(b) for b in self.block), self.scale, self.rule]
        if self.tensor_scale:
            parts.append("ts")
        default = (-1,) if len(self.block) == 1 else (-2, -1)
        if self.dims != default:
            parts.append("dims=" + ",".join(str(d) for d in self.dims))
        return ":".join(parts)

    @classmethod
    def from_name(cls, name: str) -> BlockFormat:
        """A standard name (``NAMED_BLOCK_FORMATS``) or
        ``elem:block:scale:rule[:ts][:dims=a,b]`` (block ``32`` or ``16x16``), e.g.
        ``e4m3fn:32:e8m0:rceil`` or ``e2m1fn:16:e4m3:nearest:ts``."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        key = name.strip().lower()
        if key in NAMED_BLOCK_FORMATS:
            el, bl, sc, ru, ts = NAMED_BLOCK_FORMATS[key]
            return cls(FPFormat.from_name(el), bl, sc, ru, ts)
        parts = key.split(":")
        ok = len(parts) >= 4 and re.fullmatch(r"\d+(x\d+)?", parts[1] if len(parts) > 1 else "")
        if ok:
            rest, ts, dims = parts[4:], False, None
            if rest and rest[0] == "ts":
                ts, rest = True, rest[1:]
            if rest and rest[0].startswith("dims="):
                try:
                    dims = tuple(int(v) for v in rest[0][5:].split(","))
                except ValueError:
                    ok = False
                rest = rest[1:]
            ok = ok and not rest
        if not ok:
            allowed = ", ".join(NAMED_BLOCK_FORMATS)
            raise ValueError(f"name must be one of {allowed} or 'elem:block:scale:rule[:ts]"
                             f"[:dims=a,b]' (e.g. 'e4m3fn:32:e8m0:rceil'); got {name!r}")
        block = tuple(int(v) for v in parts[1].split("x"))
        return cls(FPFormat.from_name(parts[0]), block, parts[2], parts[3], ts, dims)

    # ---- derived ---------------------------------------------------------------------------
    @property
    def block_numel(self) -> int:
        return math.prod(self.block)

    @property
    def bits_per_element(self) -> float:
        """Element bits plus the block scale's bits amortised over the block (the per-tensor
        FP32 scale, 32 bits per tensor, is left out: it depends on the tensor's size)."""
        return self.elem.bits + _SCALE_BITS[self.scale] / self.block_numel

    def replace(self, **changes) -> BlockFormat:
        """A copy with some fields changed (the name is re-derived unless given)."""
        from dataclasses import replace as _replace

        changes.setdefault("name", "")
        return _replace(self, **changes)

    def __str__(self) -> str:
        return self.name


def _as_block_format(bf) -> BlockFormat:
    if isinstance(bf, str):
        return BlockFormat.from_name(bf)
    if not isinstance(bf, BlockFormat):
        raise TypeError(f"bf must be a BlockFormat or a block format name, got "
                        f"{type(bf).__name__}")
    return bf


# ---- E8M0 as a number type ------------------------------------------------------------------
def e8m0_encode(v: torch.Tensor, rounding: str = "floor") -> torch.Tensor:
    """E8M0 bytes (uint8) of a float tensor: 2^k stored as k + 127, 0xFF = NaN.

    For a positive finite v: k = floor(log2 v) (``"floor"``), ceil(log2 v) (``"ceil"``), or the
    nearest power of two (``"nearest"``: midpoint 1.5 * 2^j, ties upward, as ml_dtypes'
    float8_e8m0fnu), computed exactly from v's bits, then clamped to [-127, 127] (saturating:
    v > 2^127 gives 254, v < 2^-127 gives 0). NaN and negative values give 0xFF (no sign).
    Differences from ml_dtypes: 0 gives byte 0 here (ml_dtypes: NaN); +inf, and with
    ``"nearest"`` every v >= 1.5 * 2^127, give 254 (the largest scale, saturating; ml_dtypes:
    NaN). Everything else agrees bit for bit (tested). Accepts float32/bfloat16/float16/float64.
    """
    require_float_tensor(v, "v")
    require_choice(v.dtype, "v.dtype", BLOCK_DTYPES)
    require_choice(rounding, "rounding", ("floor", "ceil", "nearest"))
    wide = v.dtype == torch.float64
    c = _container(wide)
    a = v.to(c.fdt).abs()
    k = _log2_int(a, c, {"floor": 0, "ceil": 1, "nearest": 2}[rounding])
    k = torch.where(torch.isinf(a), 127, k)
    code = (torch.clamp(k, -127, 127) + 127).to(torch.int32)
    code = torch.where(torch.isnan(v) | (v < 0), 255, code)
    return code.to(torch.uint8)


def e8m0_decode(code: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of E8M0 bytes: 2^(code - 127) (exact, 2^-127 is a float32 subnormal); 0xFF NaN."""
    if not isinstance(code, torch.Tensor) or code.dtype != torch.uint8:
        raise TypeError("code must be a torch.uint8 tensor")
    require_choice(dtype, "dtype", (torch.float32, torch.float64))
    c = _container(dtype == torch.float64)
    k = code.to(c.idt) - 127
    out = _pow2(k, c)
    return torch.where(code == 255, float("nan"), out)


# ---- containers and exact bit helpers ----------------------------------------------------------
class _C(NamedTuple):
    fdt: torch.dtype
    idt: torch.dtype
    T: int  # mantissa bits
    bias: int
    emask: int


_C32 = _C(torch.float32, torch.int32, 23, 127, 0xFF)
_C64 = _C(torch.float64, torch.int64, 52, 1023, 0x7FF)


def _container(wide: bool) -> _C:
    return _C64 if wide else _C32


def _pow2(k: torch.Tensor, c: _C) -> torch.Tensor:
    """2^k exactly (k an integer tensor of c.idt), subnormals included, built from bits."""
    normal = (k + c.bias) << c.T
    sub_shift = torch.clamp(k + c.bias - 1 + c.T, 0, c.T - 1)
    sub = torch.ones_like(k) << sub_shift
    return torch.where(k >= 1 - c.bias, normal, sub).view(c.fdt)


def _log2_int(a: torch.Tensor, c: _C, mode: int) -> torch.Tensor:
    """floor (mode 0), ceil (1) or nearest-ties-up (2) of log2(a) for a >= 0 finite (exact).

    Zero and subnormals: floor reads the exponent field (-bias: as torchao's MX floor path);
    ceil/nearest are exact on subnormals (a = B * 2^(1 - bias - T), B the bit pattern).
    """
    bits = a.view(c.idt)
    ef = (bits >> c.T) & c.emask
    mant = bits & ((1 << c.T) - 1)
    e = ef - c.bias
    if mode == 0:
        return e
    if mode == 1:
        up = (mant != 0).to(c.idt)
        # subnormal a = B * 2^(1-bias-T): ceil(log2 a) = ceil(log2 B) + 1 - bias - T;
        # any a <= 2^(-bias) reads as <= -bias, which every caller clamps to -127 or lower
        sub = (mant > (1 << (c.T - 1))).to(c.idt) - c.bias
        return torch.where(ef == 0, sub, e + up)
    up = (mant >= (1 << (c.T - 1))).to(c.idt)  # 1.5 * 2^e and above round up (ties up)
    sub = (mant >= (3 << (c.T - 2))).to(c.idt) - c.bias
    return torch.where(ef == 0, sub, e + up)


@lru_cache(maxsize=256)
def _elem_consts(elem: FPFormat, wide: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Element constants as tensors (so a new format reuses a compiled graph): ints [emin, emax,
    man_bits]; floats [max_normal, then the float paths' constants (``_round_elems_float``,
    ``_e8m0_scale_float``): Veltkamp's 2^(T - m) + 1, the subnormal-grid addend
    2^(emin - m + T), 2^emin (min normal), 2^emax, 2^-m, 2^T + 1 (Veltkamp's constant of one
    significant bit), 2^-emax and the E8M0 floor scale of an inf amax, 2^clamp(128 - emax)]."""
    c = _container(wide)
    m, emax = elem.man_bits, elem.emax
    ints = torch.tensor([elem.emin, emax, m], dtype=c.idt, device=device)
    flts = torch.tensor([elem.max_normal, 2.0 ** (c.T - m) + 1, 2.0 ** (elem.emin - m + c.T),
                         2.0 ** elem.emin, 2.0 ** emax, 2.0 ** -m, 2.0 ** c.T + 1,
                         2.0 ** -emax, 2.0 ** min(max(128 - emax, -127), 127)],
                        dtype=c.fdt, device=device)
    return ints, flts


def _float_elems(elem: FPFormat, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether elements of x (``dtype`` on ``device``) round onto ``elem`` on float operations
    (``_round_elems_float``): a float32 container (float32 and half inputs) on the CPU, and an
    element format inside the exact range of Veltkamp's splitting (``rounding._float_path``).
    CUDA keeps the bit path: Triton contracts a*K - a into an FMA, which skips the rounding the
    splitting needs (the CPU kernels are compiled without contraction,
    ``kernels.COMPILE_OPTIONS``)."""
    return dtype != torch.float64 and device.type == "cpu" and _float_path(elem, wide=False)


def _round_elems_float(y, flts, u):
    """``_round_elems`` on float operations only, for a float32 container on the CPU
    (``_float_elems``): the same bits, but no float <-> int reinterpretation, which inductor's
    CPU code does element by element (a scalar loop: the bit path made every block kernel
    several times slower than the FP kernels, measured). Saturation comes first (rounding is
    monotone and max_normal is on the grid, so clamping |y| before rounding equals clamping
    after; +-inf become max_normal, NaN stays NaN).

    Nearest: Veltkamp's splitting c = a (2^(T-m) + 1), c - (c - a) rounds a to m + 1
    significant bits, half to even; below min_normal (a + C) - C with C = 2^(emin - m + T)
    rounds to the subnormal step in one round-half-to-even add (as ``rounding``'s float path).
    Stochastic: 2^floor(log2 a) from the same splitting to one significant bit (p = a rounded
    to one bit is 2^e or 2^(e+1); halved when above a), clamped to [2^emin, 2^emax] as the
    bit path clamps the exponent; then k = a / ulp (exact: ulp is a power of two) and
    floor(k) + (u < frac(k)), the bit path's formula. Signs by selects (``copysign`` is a
    library call per vector in inductor's CPU code): y < 0 -> -r, +-0 and NaN -> y itself.
    """
    a = torch.minimum(y.abs(), flts[0])
    if u is None:
        r = nearest_on_floats(a, flts[1], flts[2], flts[3])
    else:
        p = veltkamp(a, flts[6])
        p = torch.where(p > a, p * 0.5, p)
        ulp = torch.minimum(torch.maximum(p, flts[3]), flts[4]) * flts[5]
        k = a / ulp
        fl = torch.floor(k)
        r = (fl + (u < (k - fl)).to(y.dtype)) * ulp
    return signed_like(y, r)


def _round_elems(y, ints, flts, u, c: _C, fast: bool = False):
    """Round y onto the element grid (saturating); u = None: nearest-even, else stochastic.
    ``fast``: on float operations (``_round_elems_float``, where ``_float_elems`` holds).

    |y| = k * ulp with ulp = 2^(e - m), e = clamp(exponent(|y|), emin, emax): y / ulp and
    r * ulp are exact power-of-two products, ``torch.round`` is half to even, and a carry
    into the next binade is just r = 2^(m+1). Signs are put back with copysign (-0 stays -0).
    """
    if fast:
        return _round_elems_float(y, flts, u)
    a = y.abs()
    e = (a.view(c.idt) >> c.T) & c.emask
    e = torch.minimum(torch.maximum(e - c.bias, ints[0]), ints[1])
    # ulp = 2^(e - m) and 1/ulp are normal numbers of the container for every element format
    # BlockFormat accepts (grid inside float32's normal range: e - m >= -126, e <= 126), so both
    # are built from bits without _pow2's subnormal branch, and y / ulp is computed as the
    # product a * (1/ulp): the same correctly rounded value (division by a power of two), one
    # vector multiply instead of a divide
    em = e - ints[2]
    ulp = ((em + c.bias) << c.T).view(c.fdt)
    k = a * ((c.bias - em) << c.T).view(c.fdt)
    if u is None:
        r = torch.round(k)
    else:
        fl = torch.floor(k)
        r = fl + (u < (k - fl)).to(c.fdt)
    q = torch.minimum(r * ulp, flts[0])  # saturate (+inf too); NaN propagates
    return torch.copysign(q, y)


# ---- the block kernels -----------------------------------------------------------------------
def _e8m0_scale(amax, ints, flts, sc, c: _C, rceil: bool):
    """(multiplier for quantize, multiplier for dequantize) of E8M0 blocks."""
    if rceil:
        d = amax / flts[0]
        k = _log2_int(d, c, 1)
        k = torch.where(torch.isinf(d), 127, k)
    else:
        k = _log2_int(amax, c, 0)
        k = torch.where(torch.isinf(amax), 128, k) - ints[1]
    k = torch.clamp(k, -127, 127)
    inv, scale = _pow2(-k, c), _pow2(k, c)
    nan = torch.isnan(amax)
    return torch.where(nan, amax, inv), torch.where(nan, amax, scale)


def _pow2_floor(a, flts):
    """2^floor(log2 a) for a normal positive finite float32 a, on float operations: Veltkamp's
    splitting with 2^23 + 1 rounds a to one significant bit (2^e or 2^(e+1)), halved when it
    rounded up. Magnitudes of 2^64 and above are split at a * 2^-64 (exact), so a * (2^23 + 1)
    cannot overflow. Subnormals, zero, inf and NaN give no meaningful value (callers select)."""
    big = a >= 2.0**64
    a = torch.where(big, a * 2.0**-64, a)
    p = veltkamp(a, flts[6])
    p = torch.where(p > a, p * 0.5, p)
    return torch.where(big, p * 2.0**64, p)


def _e8m0_scale_float(amax, flts, rceil: bool):
    """``_e8m0_scale`` on float operations (a float32 container on the CPU, where inductor
    reinterprets float <-> int element by element): the same powers of two, bit for bit.

    floor: 2^(floor(log2 amax) - emax) = ``_pow2_floor(amax) * 2^-emax`` (a subnormal or zero
    amax reads as 2^-127, as its exponent field); rceil: d = amax / max, 2^ceil(log2 d) =
    ``_pow2_floor(d)``, doubled unless d is a power of two (a subnormal d: 2^-126 above 2^-127,
    else 2^-127, the bit path's exact ceiling after the clamp). inf: 2^clamp(128 - emax)
    (floor), 2^127 (rceil). Then the clamp to [2^-127, 2^127] and the exact reciprocal."""
    tiny = 2.0**-126  # float32's smallest normal
    if rceil:
        d = amax / flts[0]
        f = _pow2_floor(d, flts)
        s = torch.where(f == d, f, f * 2.0)
        s = torch.where(d < tiny, torch.where(d > 2.0**-127, tiny, 2.0**-127), s)
        s = torch.where(d == math.inf, 2.0**127, s)
    else:
        s = torch.where(amax < tiny, 2.0**-127, _pow2_floor(amax, flts)) * flts[7]
        s = torch.where(amax == math.inf, flts[8], s)
    s = torch.clamp(s, 2.0**-127, 2.0**127)
    # amax >= 0 or NaN: comparisons, because inductor's CPU code calls std::isinf / isnan
    # element by element (no vector form)
    nan = amax != amax
    return torch.where(nan, amax, 1.0 / s), torch.where(nan, amax, s)


def _e4m3_scale(amax, ints, flts, sc, c: _C, t, fast: bool = False):
    """NVFP4 scales: the float32 operation order of torchao's nvfp4_quantize / dequantize.
    ``fast``: the E4M3 rounding of the scale on float operations (``_round_elems_float``)."""
    s = amax / flts[0]
    if t is not None:
        s = s / t
    s = torch.clamp(s, 2.0**-6, 448.0)  # NaN stays NaN
    s8 = _round_elems(s, sc[0], sc[1], None, c, fast)
    if t is None:
        return 1.0 / s8, s8
    return (1.0 / t) / s8, t * s8


def _fp32_scale(amax, flts, wide: bool):
    s = amax / flts[0]
    if wide:
        s = s.to(torch.float32).to(torch.float64)  # the scale is an FP32 number
    return torch.clamp(s, 2.0**-126, _F32_MAX)


def _tensor_scale(x, flts, c: _C, red: tuple | None = None):
    """t from the largest finite magnitude; with ``red`` (the block dimensions) computed as the
    max of per-block finite maxima, which inductor fuses with the block amax into one pass
    over x (the same number: max is exact in any order)."""
    a = x.abs()
    fa = torch.where(torch.isfinite(a), a, 0)
    return _tensor_scale_of(fa.amax() if red is None else fa.amax(dim=red).amax(), flts, c)


def _tensor_scale_of(amax, flts, c: _C):
    """t from the largest finite magnitude ``amax`` (``_tensor_scale``)."""
    t = amax / (448.0 * flts[0])
    if c.fdt == torch.float64:
        t = t.to(torch.float32).to(torch.float64)
    return torch.clamp(t, 2.0**-126, _F32_MAX)


def _block_scales(x, ints, flts, sc, red: tuple, kind: str, tensor_scale: bool, amax=None,
                  vec: bool = False, t=None):
    """(a, deq) per block: elements are y = x * a (E8M0, E4M3) or y = x / a (FP32), and the
    result is Q(y) * deq. ``amax``: the blocks' amax when the caller has it; ``t``: the
    per-tensor scale when the caller has it (``tensor_scale``: else from x). ``vec``: the
    scales are computed in a loop vectorised across blocks (the strided layout), so a float32
    container on the CPU computes them on float operations (E8M0: ``_e8m0_scale_float``, E4M3:
    ``_round_elems_float``; the same bits). A block per row (``_canonical``) computes its
    scale in the scalar epilogue of the row's reduction, where the bit operations are the
    cheaper ones (measured: the float path made 16M-element MXFP8/NVFP4 nearest slower)."""
    wide = x.dtype == torch.float64
    c = _container(wide)
    xf = x.to(c.fdt)
    if amax is None:
        amax = xf.abs().amax(dim=red, keepdim=True)
    fast = vec and c.fdt == torch.float32 and x.device.type == "cpu"
    if kind == "fp32":
        s = _fp32_scale(amax, flts, wide)
        return s, s
    if kind == "e4m3":
        if t is None and tensor_scale:
            t = _tensor_scale(xf, flts, c, red)
        return _e4m3_scale(amax, ints, flts, sc, c, t, fast)
    if fast:
        return _e8m0_scale_float(amax, flts, kind == "e8m0_rceil")
    return _e8m0_scale(amax, ints, flts, sc, c, kind == "e8m0_rceil")


def _block_elements(x, a, deq, ints, flts, k1, k2, div: bool, stochastic: bool, metrics: bool,
                    pad_to: int | None = None, fast: bool = False, counter: tuple | None = None):
    """Round the scaled elements and dequantize (elementwise given the block scales): y = x / a
    (``div``, FP32 scales) or x * a. ``pad_to``: x is (rows, s) rows shorter than one block of
    ``pad_to`` elements, unpadded (``_canonical``); element (r, j) draws the random bits of
    element r * pad_to + j of the padded layout, so the result is the padded pass's.
    ``counter``: int32 tensors that broadcast to x and sum to each element's counter (the
    strided layout, ``_strided_counter``). ``fast``: elements rounded on float operations
    (``_float_elems``)."""
    wide = x.dtype == torch.float64
    c = _container(wide)
    xf = x.to(c.fdt)
    y = xf / a if div else xf * a
    u = None
    if stochastic and counter is not None:
        lc, cc, tc = counter
        u = uniform_at(k1, k2, lc + (cc + tc), c.fdt)
    elif stochastic and pad_to is None:
        u = uniform_from_keys(k1, k2, y.numel(), y.device, c.fdt).view(y.shape)
    elif stochastic:
        rows = torch.arange(y.shape[0], dtype=torch.int32, device=y.device) * pad_to
        cols = torch.arange(y.shape[1], dtype=torch.int32, device=y.device)
        u = uniform_at(k1, k2, rows[:, None] + cols[None, :], c.fdt)
    q = _round_elems(y, ints, flts, u, c, fast)
    out = (q * deq).to(x.dtype)
    if not metrics:
        return out
    fin = torch.isfinite(xf)
    underflow = (fin & (xf != 0) & (q == 0)).sum()
    saturated = (fin & (y.abs() > flts[0])).sum()
    nonfinite = (~fin).sum()
    return out, underflow, saturated, nonfinite


@lru_cache(maxsize=64)
def _strided_counter(lead: int, nb: int, b: int, trail: int, short: int | None,
                     device: torch.device) -> tuple:
    """int32 tensors that broadcast to the strided view (lead, nb blocks, b, trail) and sum to
    element (l, c, t)'s counter (l * trail + t) * P + c (``_strided``): P = nb * b, or
    ``short`` (the block size) for a dimension shorter than one block. Passed to the kernel
    (loaded, broadcast: measured 3-7x faster on the CPU than the same iota computed inside the
    compiled loop, whose index arithmetic inductor did not vectorise) and kept per shape (a
    layer's gradient has the same shape every step).

    Split as the element loop is: (lead, nb) together, one value per block (l * trail * P +
    block * b), then the position in the block and the trailing index, the dims that the
    block scales (one per (lead, block, trail)) keep apart. A counter split otherwise ((lead),
    (nb * b), (trail)) made inductor hash in a loop of its own and write a full-size int32
    intermediate for the element loop to read back."""
    P = nb * b if short is None else short
    i32 = dict(dtype=torch.int32, device=device)
    base = (torch.arange(lead, **i32).view(lead, 1, 1, 1) * (trail * P)
            + torch.arange(nb, **i32).view(1, nb, 1, 1) * b)
    return (base, torch.arange(b, **i32).view(1, 1, b, 1),
            (torch.arange(trail, **i32) * P).view(1, 1, 1, trail))


# ---- the kernels: each a FusedOp variant (``kernels.variant``) of one body, its Python-valued
# arguments bound per variant, its tensors passed (a new format or size reuses the graph) ----
# (the E4M3 scale constants come as two tensors si, sf: a graph input must be an argument)
# (``tile``: 2-D blocks, reduced over dims (2, 4) of the canonical tensor, else (1,); a bool,
# not the tuple: dynamo would make a tuple's ints graph inputs that a direct call cannot name)
def _one_pass(x, ints, flts, si, sf, k1, k2, *, tile, kind, stochastic, ts, metrics, pad_to,
              fast):
    """The whole block quantization on the canonical (padded, split) tensor x."""
    a, deq = _block_scales(x, ints, flts, (si, sf), _red(tile), kind, ts)
    return _block_elements(x, a, deq, ints, flts, k1, k2, kind == "fp32", stochastic, metrics,
                           pad_to, fast)


# stochastic rounding runs as two fused kernels, block scales then elements: measured on the
# CPU, inductor's single reduction-plus-hash kernel was about 3x slower than the two (the
# extra traffic is the scale tensor, 1/n of x)
def _scales(x, ints, flts, si, sf, *, tile, kind, ts):
    return _block_scales(x, ints, flts, (si, sf), _red(tile), kind, ts)


def _red(tile: bool) -> tuple:
    """The block dimensions of ``_canonical``'s tensor: (lead, r, b0, c, b1) or (rows, b)."""
    return (2, 4) if tile else (1,)


def _elements(x, a, deq, ints, flts, k1, k2, *, div, metrics, pad_to, fast):
    return _block_elements(x, a, deq, ints, flts, k1, k2, div, True, metrics, pad_to, fast)


# the strided layout (``_strided``): block scales, then the elements of every rounding (two
# kernels: measured faster than one fused kernel on the CPU, whose scale epilogue inductor runs
# per block row)
def _scales_at(x, ints, flts, si, sf, *, kind, ts):
    """(a, deq, blocks holding a NaN or inf): the count from the blocks' amax in the same
    reduction (>= inf, or NaN: ``~(amax < inf)``), so that a caller checking for non-finite
    values needs no pass of its own."""
    amax = x.to(_container(x.dtype == torch.float64).fdt).abs().amax(dim=(2,), keepdim=True)
    a, deq = _block_scales(x, ints, flts, (si, sf), (2,), kind, ts, amax, vec=True)
    return a, deq, (~(amax < math.inf)).sum(dtype=torch.int64)


def _elements_at(x, a, deq, ints, flts, k1, k2, lc=None, cc=None, tc=None, *, div, stochastic,
                 metrics, fast):
    return _block_elements(x, a, deq, ints, flts, k1, k2, div, stochastic, metrics, None, fast,
                           (lc, cc, tc) if stochastic else None)


# blocks over several dims whose runs in x are shorter than a block (``_flat`` with ``per`` > 1
# runs per block): the runs' amax in one pass over x (a kernel); the moved layout's block amax
# from those (``_runs_blocks``: small eager ops on 1/s of x); the block scales (a kernel); the
# scales handed back to the runs (``_runs_back``: a small copy, then a strided view in x's
# order); the elements kernel on x's runs. (The block amax inside the scale kernel was
# measured 40x slower on the CPU: inductor recomputed the gathered amax, with a division and
# a modulo per load, at each of its uses in the scale arithmetic.)
def _runs_amax(x, *, ts):
    """The amax of each run of x viewed as (lead, n, mid, runs, s); with ``ts``, and the
    largest finite magnitude of x."""
    a = x.to(_container(x.dtype == torch.float64).fdt).abs()
    if not ts:
        return a.amax(dim=4)
    return a.amax(dim=4), torch.where(torch.isfinite(a), a, 0).amax()


def _runs_blocks(sub: torch.Tensor, per: int) -> torch.Tensor:
    """The moved layout's block amax (rows, blocks, 1) from the runs' amax ``sub`` (lead, n,
    mid, runs): block ``j`` of row ``l * mid + m`` (the row padded to whole blocks) holds the
    runs ``i * runs + r`` in [j * per, (j + 1) * per)."""
    lead, n, mid, runs = sub.shape
    moved = sub.permute(0, 2, 1, 3).reshape(lead * mid, n * runs)
    moved = F.pad(moved, (0, (-(n * runs)) % per))  # zeros: no block's amax changes
    return moved.view(lead * mid, -1, per).amax(dim=2, keepdim=True)


def _scales_of(amax, fin, ints, flts, si, sf, *, kind, ts):
    """(a, deq) of blocks from their amax; ``fin``: x's largest finite magnitude (read with
    ``ts`` only, for the per-tensor scale as ``_tensor_scale``)."""
    t = _tensor_scale_of(fin, flts, _container(amax.dtype == torch.float64)) if ts else None
    return _block_scales(amax, ints, flts, (si, sf), (2,), kind, ts, amax, vec=True, t=t)


def _runs_back(v: torch.Tensor, shape: tuple, per: int) -> torch.Tensor:
    """A block tensor of ``_scales_of`` as one value per run of x viewed as ``shape`` (lead,
    n, mid, runs, s): (lead, n, mid, runs, 1) in x's order, 1/s of x's size (contiguous: the
    element kernel read a strided one 3x slower, measured on the CPU)."""
    lead, n, mid, runs, _ = shape
    v = v.view(v.shape[0], -1).repeat_interleave(per, dim=1)[:, :n * runs]
    return v.view(lead, mid, n, runs).permute(0, 2, 1, 3).contiguous().unsqueeze(-1)


_KINDS = {("e8m0", "floor"): "e8m0_floor", ("e8m0", "rceil"): "e8m0_rceil",
          ("e4m3", "nearest"): "e4m3", ("fp32", "nearest"): "fp32"}


class _Plan(NamedTuple):
    """A layout's kernels for one format, rounding, metrics, dtype and device, with the
    constant tensors bound (``kernels.Bound``): ``scales`` (None: one pass) takes x, ``elements``
    takes x, (a, deq,) k1, k2 (and the strided, flat or runs layout's counter tensors when
    stochastic)."""

    scales: object
    elements: object
    zero_keys: tuple


@lru_cache(maxsize=512)
def _plan(bf: BlockFormat, stochastic: bool, metrics: bool, dtype: torch.dtype,
          device: torch.device, layout: tuple, into: bool = False) -> _Plan:
    """The kernels of one call shape: ``layout`` is ("strided", short), ("canonical", red,
    pad_to), ("flat",) (stochastic rounding on ``_flat``'s whole-block runs: the row scale
    kernel, elements on the (lead, n, mid, runs, s) view; nearest takes the canonical one-pass
    kernel there) or ("runs", per) (``_flat``'s runs, ``per`` to a block). ``into``: the
    element kernel writes its result into x (``kernels.variant``).
    Multiply-by-reciprocal kinds share one element kernel (the kind only selects x * a against
    x / a)."""
    wide = dtype == torch.float64
    ints, flts = _elem_consts(bf.elem, wide, device)
    sc = _elem_consts(_E4M3, wide, device)
    if sc[0] is ints:  # E4M3 elements: the same cached tensors, which dynamo would merge into
        sc = tuple(t.clone() for t in sc)  # one graph input that other formats' calls reuse
    kind = _KINDS[(bf.scale, bf.rule)]
    div = kind == "fp32"
    fast = _float_elems(bf.elem, dtype, device)
    # nearest rounding's keys, unused: two tensors (one passed twice is merged by dynamo)
    zero = tuple(torch.zeros((), dtype=torch.int32, device=device) for _ in range(2))
    split = (dtype, device.type)  # a code object each (dynamo's budget: 8 graphs per object)
    counters = ()
    if layout[0] in ("runs", "flat"):  # ``_flat``'s (lead, n, mid, runs, s) view
        # (a split of their own: these graphs do not spend the strided layout's recompile
        # budget, whose element kernel is the same function)
        own = split + (layout[0],)
        if layout[0] == "runs":  # runs shorter than a block: two scale kernels
            ts = bf.tensor_scale
            runs = variant(_runs_amax, "quantize_block", False, own, ts=ts)
            per = layout[1]
            of = variant(_scales_of, "quantize_block", False, own, kind=kind,
                         ts=ts).bind(None, None if ts else zero[0].clone(), ints, flts, *sc)

            def scales(x, compile=None):
                got = runs(x, compile=compile)
                sub, fin = got if ts else (got, None)
                blocks = _runs_blocks(sub, per)
                a, deq = of(blocks, fin, compile=compile) if ts else of(blocks, compile=compile)
                back = _runs_back(a, x.shape, per)
                return back, (back if deq is a else _runs_back(deq, x.shape, per))
        else:  # whole blocks as runs: the canonical block-per-row scale kernel
            rows = variant(_scales, "quantize_block", False, split, tile=False, kind=kind,
                           ts=bf.tensor_scale).bind(None, ints, flts, *sc)

            def scales(x, compile=None):
                a, deq = rows(x.view(-1, x.shape[-1]), compile=compile)
                shape = x.shape[:-1] + (1,)
                return a.view(shape), deq.view(shape)
        elements = variant(_elements_at, "quantize_block", False, own, into=into, div=div,
                           stochastic=stochastic, metrics=metrics, fast=fast)
        counters = (None,) * 3 if stochastic else ()
        return _Plan(scales, elements.bind(None, None, None, ints, flts, None, None, *counters),
                     zero)
    elif layout[0] == "strided":
        scales = variant(_scales_at, "quantize_block", False, split, kind=kind, ts=bf.tensor_scale)
        elements = variant(_elements_at, "quantize_block", False, split, into=into, div=div,
                           stochastic=stochastic, metrics=metrics, fast=fast)
        counters = (None,) * 3 if stochastic else ()
    else:
        _, red, pad_to = layout
        tile = red == (2, 4)
        if not stochastic:
            # (never in place: inductor failed to compile the one-pass kernel's write into x
            # for the E8M0 kinds, KeyError in its scheduler; nearest on a canonical layout
            # writes a new tensor)
            one = variant(_one_pass, "quantize_block", False, split, tile=tile, kind=kind,
                          stochastic=False, ts=bf.tensor_scale, metrics=metrics, pad_to=pad_to,
                          fast=fast)
            return _Plan(None, one.bind(None, ints, flts, *sc, None, None), zero)
        scales = variant(_scales, "quantize_block", False, split, tile=tile, kind=kind,
                         ts=bf.tensor_scale)
        elements = variant(_elements, "quantize_block", False, split, into=into, div=div,
                           metrics=metrics, pad_to=pad_to, fast=fast)
    return _Plan(scales.bind(None, ints, flts, *sc),
                 elements.bind(None, None, None, ints, flts, None, None, *counters), zero)


def _resolve_dims(bf: BlockFormat, ndim: int, shape) -> tuple:
    """``bf.dims`` as non-negative dimensions of an ``ndim``-d tensor (ValueError naming the
    shape when one is out of range or two name the same dimension)."""
    dims = tuple(d % ndim if -ndim <= d < ndim else None for d in bf.dims)
    if any(d is None for d in dims):
        raise ValueError(f"dims {bf.dims} out of range for a tensor of shape {tuple(shape)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims {bf.dims} name one dimension twice for a tensor of shape "
                         f"{tuple(shape)}")
    return dims


def _canonical(x: torch.Tensor, bf: BlockFormat):
    """(canonical padded tensor, reduce dims, restore(out) -> x-shaped tensor).

    A 1-D blocked extent shorter than one block (a conv output with 16 channels under
    32-element blocks) is not padded: each row is its block as it is. Zero
    padding never changes a block's amax, scale or rounded elements, nor the counts (a zero
    neither underflows nor saturates), so quantization gives the same values on half the
    elements (a NaN block is NaN either way, its payload may differ); stochastic rounding
    draws each element's bits at its padded index (``_block_elements``' ``pad_to``)."""
    shape = x.shape
    nd, k = len(bf.block), len(bf.dims)  # k > nd: 1-D blocks over k flattened dims
    y = x
    while y.dim() < nd:
        y = y.unsqueeze(0)
    dims = _resolve_dims(bf, y.dim(), shape)
    target = tuple(range(y.dim() - k, y.dim()))
    moved = dims != target
    if moved:
        y = torch.movedim(y, dims, target)
    mshape = y.shape
    lead = math.prod(mshape[: y.dim() - k])
    sizes = mshape[y.dim() - nd:] if k == nd else (math.prod(mshape[y.dim() - k:]),)
    y = y.reshape(lead, *sizes)
    pads = [(-s) % b for s, b in zip(sizes, bf.block)]
    short = nd == 1 and 0 < sizes[0] < bf.block[0]
    if short:
        pads = [0]
    if any(pads):
        spec = []
        for p in reversed(pads):
            spec += [0, p]
        y = F.pad(y, spec)
    if nd == 1:
        b = sizes[0] if short else bf.block[0]
        y = y.reshape(-1, b)
        red = (1,)
    else:
        (b0, b1), (s0, s1) = bf.block, y.shape[1:]
        y = y.reshape(lead, s0 // b0, b0, s1 // b1, b1)
        red = (2, 4)

    def restore(out: torch.Tensor) -> torch.Tensor:
        o = out.reshape(lead, *[s + p for s, p in zip(sizes, pads)])
        if any(pads):
            o = o[(slice(None),) + tuple(slice(0, s) for s in sizes)]
        o = o.reshape(mshape)
        if moved:
            o = torch.movedim(o, target, dims)
        return o.reshape(shape)

    return y, red, restore


def _strided(x: torch.Tensor, bf: BlockFormat):
    """``(view, short)`` for 1-D blocks along a dimension d that is not the last: x (contiguous)
    viewed as (lead, blocks, block, trail) with the block dimension reduced in place, so no
    copy moves d last and the result comes out in x's own layout (a conv output's channel
    blocks: amax over channel groups, vectorised along the pixels). Only where x's size along d
    is a multiple of the block (``short`` None) or shorter than one block (one short block per
    position, as ``_canonical``'s unpadded short rows; ``short`` the block size); else None
    (``_canonical`` moves d last and pads). Stochastic rounding draws element (l, c, t) at
    counter (l * trail + t) * P + c (P: x's size along d, or the block for a short one): its
    index in ``_canonical``'s padded layout, so both layouts give the same bits."""
    if len(bf.block) != 1 or len(bf.dims) != 1 or x.dim() < 2 or not x.is_contiguous():
        return None
    d = bf.dims[0]
    if not -x.dim() <= d < x.dim():
        return None  # _canonical says what is wrong
    d %= x.dim()
    n, b = x.shape[d], bf.block[0]
    lead, trail = math.prod(x.shape[:d]), math.prod(x.shape[d + 1:])
    if trail <= 1 or n == 0:
        return None
    if n < b:
        return x.view(lead, 1, n, trail), b
    if n % b == 0:
        return x.view(lead, n // b, b, trail), None
    return None


# runs shorter than this many elements are not worth the runs layout (measured on the CPU:
# with runs of 4, a conv operand's 14x14 pixels under 16-element blocks, its kernels took 3x
# the moving path's time; runs of 16, 28x28 pixels under 32-element blocks, 0.7x); those dims
# are moved
MIN_RUN = 16


def _flat(x: torch.Tensor, bf: BlockFormat):
    """``(runs, lead, n, mid, trail)`` for 1-D blocks over several dims ``(d0, d1, .., dk)``
    whose ``d1..dk`` are the last dimensions of a contiguous x, in order: x is (lead, n, mid,
    trail) with n its size along d0, mid the dimensions between d0 and d1, trail the product
    of d1..dk, and a block of the moved layout (``_canonical``: the dims moved last and merged,
    index ``i * trail + t`` in row ``l * mid + m``, padded to whole blocks) is made of runs of
    s = gcd(trail, block) consecutive elements of x. ``runs`` is x viewed as (runs, s): with
    s the block (trail a multiple of it) every block is one run (the canonical block-per-row
    kernels, stochastic elements on the (lead, n, mid, runs, s) view); else each block gathers
    block / s runs (``_runs_blocks``). None when
    the dims are laid out otherwise or s < ``MIN_RUN`` (``_canonical`` moves them)."""
    dims = bf.dims
    if len(bf.block) != 1 or len(dims) < 2 or not x.is_contiguous() or x.numel() == 0:
        return None
    nd = x.dim()
    if not all(-nd <= d < nd for d in dims):
        return None  # _canonical says what is wrong
    d0, *rest = (d % nd for d in dims)
    k = len(rest)
    if tuple(rest) != tuple(range(nd - k, nd)) or d0 >= nd - k:
        return None
    trail = math.prod(x.shape[nd - k:])
    s = math.gcd(trail, bf.block[0])
    if s < min(MIN_RUN, bf.block[0]):
        return None
    lead, n, mid = math.prod(x.shape[:d0]), x.shape[d0], math.prod(x.shape[d0 + 1:nd - k])
    return x.view(-1, s), lead, n, mid, trail


@lru_cache(maxsize=64)
def _flat_counter(lead: int, n: int, mid: int, trail: int, b: int, s: int,
                  device: torch.device) -> tuple:
    """int32 tensors that broadcast to ``_flat``'s (lead, n, mid, trail / s, s) view of x and
    sum to each element's index in the moved, padded layout: element (l, i, m, t) of x viewed
    as (lead, n, mid, trail) sits at row l * mid + m, column i * trail + t of ``_canonical``'s
    rows, each padded to whole blocks of b (``pad_to`` for a row shorter than one block: the
    same length). Kept per shape.

    On the CPU (base, cols, zero): ``base`` one value per run of s elements, ``cols`` the
    position in the run, the split of the element loop, whose block scales are one per run (a
    counter split into (lead, mid), (n) and (trail) made inductor hash in a loop of its own and
    write a full-size int32 intermediate); ``base`` holds 1/s of x's elements (int32: 1/16 of
    a float32 x's bytes for 16-element blocks). Elsewhere the separable (lead, mid), (n),
    (trail) terms, lead * mid + n + trail elements (a GPU kernel fuses them whatever their
    split)."""
    row = -(-(n * trail) // b) * b
    i32 = dict(dtype=torch.int32, device=device)
    lc = (torch.arange(lead, **i32).view(-1, 1, 1, 1, 1) * (mid * row)
          + torch.arange(mid, **i32).view(1, 1, -1, 1, 1) * row)
    cc = torch.arange(n, **i32).view(1, -1, 1, 1, 1) * trail
    if device.type != "cpu":
        return lc, cc, torch.arange(trail, **i32).view(1, 1, 1, trail // s, s)
    base = lc + cc + (torch.arange(trail // s, **i32) * s).view(1, 1, 1, -1, 1)
    return (base, torch.arange(s, **i32).view(1, 1, 1, 1, s),
            torch.zeros((1, 1, 1, 1, 1), **i32))


def _run_strided(x, v, short, plan, k1, k2, stochastic, compile, metrics, into=False):
    """``quantize_block_unchecked`` on the strided layout: a block-scale kernel, then the
    element kernel (``into``: written into x, which is returned)."""
    lead, nb, b, trail = v.shape
    counted = lead * trail * (nb * b if short is None else short)
    if counted >= 1 << 31:
        raise ValueError(f"x has too many elements for the int32 counter: {counted}")
    counter = _strided_counter(lead, nb, b, trail, short, v.device) if stochastic else ()
    a, deq, bad = plan.scales(v, compile=compile)
    res = plan.elements(v, a, deq, k1, k2, *counter, compile=compile)
    if into:
        return x, bad
    if not metrics:
        return res.view(x.shape), bad
    return _with_metrics(res, lambda out: out.view(x.shape))


def _run(x, bf, rounding, generator, compile, metrics, flag=False):
    """``quantize_block`` (``metrics``: with ``BlockMetrics``; ``flag``: with the 0-d int64
    number of blocks holding a NaN or inf, from the scale kernel on the strided layout, from
    one min/max pass otherwise)."""
    require_float_tensor(x, "x")
    require_choice(x.dtype, "x.dtype", BLOCK_DTYPES)
    bf = _as_block_format(bf)
    require_choice(rounding, "rounding", _ROUNDINGS)
    return quantize_block_unchecked(x, bf, rounding == "stochastic", generator, metrics, flag,
                                    compile)


def quantize_block_unchecked(x: torch.Tensor, bf: BlockFormat, stochastic: bool,
                             generator=None, metrics: bool = False, flag: bool = False,
                             compile: bool | None = None, into: bool = False):
    """:func:`quantize_block` (``metrics``: :func:`quantize_block_metrics`, ``flag``:
    :func:`quantize_block_checked`) after their checks: x a tensor of a block dtype (float32,
    float16, bfloat16, float64), ``bf`` a :class:`BlockFormat`, ``stochastic`` a bool. What a
    compressor that checked its format and rounding once calls per layer and step.
    ``into``: x (outside autograd) is overwritten with the result, which is x itself, where
    the element kernel runs on x as it lies (a view of it: blocks along one dimension, a conv
    output's channels among them; with stochastic rounding also the contiguous last dimension
    or 2-D tiles of x, unpadded, and several dims made of whole runs of x), without counts
    (``metrics``' counts of the result would split its loop, ``rounding.in_place_fuses``);
    otherwise a new tensor."""
    dev = x.device
    src, x = x, x.detach()
    strided = _strided(x, bf)
    if strided is not None:
        v, short = strided
        into = into and not metrics
        plan = _plan(bf, stochastic, metrics, x.dtype, dev, ("strided", short), into)
        k1, k2 = draw_keys(generator, dev)[:2].unbind() if stochastic else plan.zero_keys
        res = _run_strided(x, v, short, plan, k1, k2, stochastic, compile, metrics, into)
        if into:
            res = (src, res[1])
        return res if metrics or flag else res[0]
    flat = _flat(x, bf)
    counter = ()
    if flat is not None:  # blocks over several dims made of runs of x: in place
        xc, lead, n, mid, trail = flat
        b, run = bf.block[0], xc.shape[1]
        counted = lead * mid * (-(-(n * trail) // b) * b)

        def restore(out):
            return out.view(x.shape)
        if run < b or stochastic:  # the (lead, n, mid, runs, s) view: separable counters
            layout = ("runs", b // run) if run < b else ("flat",)
            xc = xc.view(lead, n, mid, trail // run, run)
        else:  # nearest on whole blocks: the canonical one-pass kernel on the rows
            layout = ("canonical", (1,), None)
        if stochastic and counted < 1 << 31:
            counter = _flat_counter(lead, n, mid, trail, b, run, dev)
    else:
        xc, red, restore = _canonical(x, bf)
        # rows shorter than one block stay unpadded; stochastic rounding then draws each
        # element's bits at its index in the padded layout (the counter of the padded pass)
        pad_to = None
        if stochastic and len(bf.block) == 1 and xc.dim() == 2 and xc.shape[1] != bf.block[0]:
            pad_to = bf.block[0]
        counted = xc.numel() if pad_to is None else xc.shape[0] * pad_to
        layout = ("canonical", red, pad_to)
    if counted >= 1 << 31:
        raise ValueError(f"x has too many elements for the int32 counter: {counted}")
    # in place where xc is x's own memory (a view: not moved into a copy, not padded)
    into = (into and not metrics and xc.numel() == x.numel() > 0
            and xc.data_ptr() == x.data_ptr() and (stochastic or layout[0] != "canonical"))
    plan = _plan(bf, stochastic, metrics, x.dtype, dev, layout, into)
    k1, k2 = draw_keys(generator, dev)[:2].unbind() if stochastic else plan.zero_keys
    if xc.numel() == 0:
        compile = False
    bad = nonfinite_flag(xc).to(torch.int64) if flag and not metrics else None  # before a write
    if plan.scales is None:
        res = plan.elements(xc, k1, k2, compile=compile)
    else:
        a, deq = plan.scales(xc, compile=compile)
        res = plan.elements(xc, a, deq, k1, k2, *counter, compile=compile)
    if into:
        return (src, bad) if flag else src
    if not metrics and flag:
        return restore(res), bad
    if not metrics:
        return restore(res)
    return _with_metrics(res, restore)


def _with_metrics(res, restore):
    """(restore(out), BlockMetrics) from a metrics kernel's (out, underflow, saturated,
    nonfinite)."""
    out, under, sat, nonfin = res
    return restore(out), BlockMetrics(under, sat, nonfin)


class BlockMetrics(NamedTuple):
    """Per-call counts as 0-d int64 device tensors (no host sync): ``underflow`` = finite
    non-zero inputs that became 0; ``saturated`` = finite inputs whose scaled magnitude
    exceeded the element maximum (clipped); ``nonfinite`` = NaN/inf inputs."""

    underflow: torch.Tensor
    saturated: torch.Tensor
    nonfinite: torch.Tensor


def quantize_block(x: torch.Tensor, bf, rounding: str = "nearest",
                   generator: torch.Generator | None = None,
                   compile: bool | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` in the block format ``bf``; a new tensor of x's shape and dtype.

    Args:
        x: float32, float16, bfloat16 or float64 tensor, any shape (integers raise TypeError).
        bf: a :class:`BlockFormat` or a name accepted by ``BlockFormat.from_name``.
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased) for the elements;
            scales always follow the format's rule.
        generator: torch.Generator for stochastic rounding (one seed per call); None uses
            torch's default generator of x's device; or a ``random.Stream`` (its next draw).
        compile: True = the fused torch.compile kernels (one, or a block-scale kernel then an
            element kernel), False = eager, None = the switch of
            :mod:`gradcomp.numerics.kernels` (``GRADCOMP_COMPILE``). Identical bits.

    Semantics (zeros, NaN, inf, subnormal scales, power-of-two amax): see the module docstring.
    """
    return _run(x, bf, rounding, generator, compile, False)


def quantize_block_checked(x: torch.Tensor, bf, rounding: str = "nearest",
                           generator: torch.Generator | None = None,
                           compile: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_block` plus a 0-d int64 device tensor that is > 0 exactly when x holds a
    NaN or inf (no host sync): for blocks along a dimension that is not the last
    (``_strided``) the number of blocks holding one, counted in the scale kernel's own
    reduction; otherwise 1 or 0 from one min/max pass. The compressors' non-finite check
    (skip a step that saw a NaN) without a pass of its own where the layout allows."""
    return _run(x, bf, rounding, generator, compile, False, flag=True)


def quantize_block_metrics(x: torch.Tensor, bf, rounding: str = "nearest",
                           generator: torch.Generator | None = None,
                           compile: bool | None = None) -> tuple[torch.Tensor, BlockMetrics]:
    """:func:`quantize_block` plus :class:`BlockMetrics` computed in the same pass."""
    return _run(x, bf, rounding, generator, compile, True)


def block_scales(x: torch.Tensor, bf) -> torch.Tensor:
    """The dequantization scale of every block (float32; float64 for float64 x), shaped
    ``(leading, blocks...)``: ``(numel / n,)``-like rows for 1-D blocks, ``(lead, r, c)``
    tile grids for 2-D. Values of E8M0 blocks are powers of two (NaN for a NaN block)."""
    require_float_tensor(x, "x")
    require_choice(x.dtype, "x.dtype", BLOCK_DTYPES)
    bf = _as_block_format(bf)
    wide = x.dtype == torch.float64
    c = _container(wide)
    dev = torch.device(x.device)
    ints, flts = _elem_consts(bf.elem, wide, dev)
    sc = _elem_consts(_E4M3, wide, dev)
    xc, red, _ = _canonical(x.detach(), bf)
    xf = xc.to(c.fdt)
    amax = xf.abs().amax(dim=red, keepdim=True)
    if bf.scale == "fp32":
        s = _fp32_scale(amax, flts, wide)
    elif bf.scale == "e4m3":
        t = _tensor_scale(xf, flts, c) if bf.tensor_scale else None
        s = _e4m3_scale(amax, ints, flts, sc, c, t)[1]
    else:
        s = _e8m0_scale(amax, ints, flts, sc, c, bf.rule == "rceil")[1]
    return s.squeeze(red)
