"""``FPFormat``: the one source of truth for a low-precision floating-point format.

A format is 1 sign bit, ``exp_bits`` exponent bits and ``man_bits`` mantissa bits (the paper's
1-n2-n1 notation, section 4), with one of two *semantics*:

``"ieee"`` (IEEE-754-like, what the authors' code and ml_dtypes use)
    value = 2^(e - bias) * 1.m for exponent codes e >= 1, and 2^(1 - bias) * 0.m for e = 0
    (subnormals) when ``subnormals`` is on. ``special`` says which codes are not finite:

    * ``"ieee"``: the all-ones exponent is reserved (mantissa 0 = inf, else NaN), e.g. e5m2;
    * ``"fn"``: finite only, the single all-ones bit pattern is NaN, e.g. e4m3fn (max 448);
    * ``"none"``: every code is a finite number, no inf and no NaN, e.g. e3m2fn, e2m3fn, e2m1fn.

``"paper"`` (the idealised format of the paper's Eq. 2)
    exponent range symmetric around 0: normal values 2^E * 1.m for E in [-Emax, Emax - 1],
    Emax = 2^(n2-1) (that is 2^n2 binades, one per exponent code), plus the saturation value
    2^Emax; no subnormals (|x| < 2^-Emax is flushed to 0 by nearest rounding); no inf/NaN codes.

Policies shared by every format (and implemented by :func:`gradcomp.numerics.rounding.quantize_fp`):

* overflow: ``"saturate"`` maps every value whose rounding exceeds ``max_normal`` (and +-inf) to
  +-``max_normal``; ``"inf"`` (only with ``special="ieee"``) maps them to +-inf, as IEEE does.
* NaN: a NaN input stays NaN in the output dtype, whatever the format (a format without a NaN
  code has no better answer, and hiding it would hide a diverging run); quantizers count them.
* zeros keep their sign (-0 stays -0; a negative value flushed to zero becomes -0).

Names identify formats: ``FPFormat.from_name(f.name) == f`` for every format. Grammar::

    1-X-Y                       the paper's Eq. 2 format (nothing else to say: Eq. 2 fixes it)
    eXmY                        IEEE-like, special="ieee" (inf and NaN codes), as ml_dtypes'
                                float8_e5m2, float8_e4m3 (max 240), float8_e3m4
    eXmYfn                      IEEE-like without inf, as ml_dtypes' "fn" names: special="fn"
                                (one NaN code) for e4m3fn (max 448), special="none" (no NaN
                                either) for every other width (float6_e3m2fn, float4_e2m1fn...)
    then, in this order, only where the field differs from that default:
    _nan / _nonan               special "fn" / "none" where the fn-default is the other one
    _b<bias>                    exponent bias other than 2^(X-1) - 1
    _nosub                      no subnormals (flush to zero)
    _inf                        overflow to inf instead of saturating (special "ieee" only)

e.g. ``FPFormat(4, 3)`` (special "none") is ``e4m3fn_nonan``, ``FPFormat(4, 3, bias=8)``
``e4m3fn_nonan_b8``, ``FPFormat.from_name("e5m2", overflow="inf")`` ``e5m2_inf``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np

from gradcomp.numerics._checks import require_choice, require_int_range

__all__ = ["FPFormat", "NAMED_FORMATS", "EXP_BITS_RANGE", "MAN_BITS_RANGE"]

EXP_BITS_RANGE = (1, 8)
MAN_BITS_RANGE = (0, 23)
_SEMANTICS = ("ieee", "paper")
_SPECIAL = ("ieee", "fn", "none")
_OVERFLOW = ("saturate", "inf")

# Named formats, bit-exact with ml_dtypes (float8_e5m2, float8_e4m3, float8_e4m3fn,
# float6_e3m2fn, float6_e2m3fn, float4_e2m1fn) and torch.float8_* where those exist.
NAMED_FORMATS = {
    "e5m2": dict(exp_bits=5, man_bits=2, special="ieee"),
    "e4m3": dict(exp_bits=4, man_bits=3, special="ieee"),
    "e4m3fn": dict(exp_bits=4, man_bits=3, special="fn"),
    "e3m2fn": dict(exp_bits=3, man_bits=2, special="none"),
    "e2m3fn": dict(exp_bits=2, man_bits=3, special="none"),
    "e2m1fn": dict(exp_bits=2, man_bits=1, special="none"),
}


def _fn_special(exp_bits: int, man_bits: int) -> str:
    """What the "fn" suffix means at this width, as in ml_dtypes: float8_e4m3fn keeps one NaN
    code ("fn"); the other fn formats (float6_e3m2fn, float6_e2m3fn, float4_e2m1fn) have none."""
    return "fn" if (exp_bits, man_bits) == (4, 3) else "none"


@dataclass(frozen=True)
class FPFormat:
    """A sign/exponent/mantissa format; see the module docstring for the exact semantics.

    Attributes:
        exp_bits: exponent bits n2, 1..8.
        man_bits: mantissa bits n1, 0..23 (0 allowed: a pure power-of-two grid).
        bias: exponent bias (IEEE semantics; ``2^(exp_bits-1) - 1`` by default). The paper
            semantics fixes its range by Eq. 2 and ignores ``bias`` (stored as ``2^(n2-1)``).
        subnormals: IEEE semantics only: gradual underflow below ``min_normal``. When off,
            nearest rounding flushes ``|x| < min_normal`` to 0.
        overflow: ``"saturate"`` or ``"inf"`` (the latter needs ``special="ieee"``).
        special: ``"ieee"`` | ``"fn"`` | ``"none"``: which codes are inf/NaN (IEEE semantics).
        semantics: ``"ieee"`` or ``"paper"``.
        name: the format's name, always derived from the fields (module docstring); passing
            another name raises ValueError.
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    subnormals: bool = True
    overflow: str = "saturate"
    special: str = "none"
    semantics: str = "ieee"
    name: str = field(default="", compare=False)

    def __post_init__(self):
        require_int_range(self.exp_bits, "exp_bits", *EXP_BITS_RANGE)
        require_int_range(self.man_bits, "man_bits", *MAN_BITS_RANGE)
        require_choice(self.semantics, "semantics", _SEMANTICS)
        require_choice(self.special, "special", _SPECIAL)
        require_choice(self.overflow, "overflow", _OVERFLOW)
        if not isinstance(self.subnormals, bool):
            raise TypeError(f"subnormals must be a bool, got {self.subnormals!r}")
        if self.semantics == "paper":
            # Eq. 2: no subnormals, no specials, saturation; the range is fixed by n2.
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1))
            if self.subnormals or self.special != "none" or self.overflow != "saturate":
                raise ValueError(
                    "semantics 'paper' (Eq. 2) requires subnormals=False, special='none', "
                    "overflow='saturate'"
                )
        elif self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)
        elif isinstance(self.bias, bool) or not isinstance(self.bias, int):
            raise TypeError(f"bias must be an int, got {self.bias!r}")
        if self.overflow == "inf" and self.special != "ieee":
            raise ValueError(
                f"overflow='inf' needs special='ieee' (a format with an inf code); "
                f"got special={self.special!r}"
            )
        if self.special == "ieee" and self.exp_bits < 2:
            raise ValueError("special='ieee' needs exp_bits >= 2 (one exponent code is reserved)")
        if self.special == "fn" and self.exp_bits + self.man_bits < 2:
            raise ValueError("special='fn' needs at least 2 exponent+mantissa bits")
        derived = self._default_name()
        if self.name and self.name.strip().lower() != derived:
            raise ValueError(f"name {self.name!r} does not describe this format: its name is "
                             f"{derived!r}")
        object.__setattr__(self, "name", derived)
        if self.max_normal <= 0:
            raise ValueError(f"format {self.name} has no positive finite value")

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> FPFormat:
        """Build a format from a name.

        The grammar is in the module docstring: ``"e5m2"``, ``"e4m3"`` (IEEE-like with inf,
        max 240), ``"e4m3fn"`` (max 448), ``"e3m2fn"``, ``"e2m3fn"``, ``"e2m1fn"`` are the
        ml_dtypes formats (saturating by default: ``"e5m2_inf"`` or ``overflow="inf"`` for IEEE
        overflow); ``"eXmY"`` / ``"eXmYfn"`` the same rules at any width, with the modifiers
        ``_nan``, ``_nonan``, ``_b<bias>``, ``_nosub``, ``_inf``; ``"1-X-Y"`` the paper's
        idealised Eq. 2 format (``FPFormat.paper``). Keyword overrides replace fields (e.g.
        ``subnormals=False``); the result's name then says so.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        key = name.strip().lower()
        m = re.fullmatch(r"1-(\d+)-(\d+)", key)
        if m:
            return cls.paper(int(m.group(1)), int(m.group(2)), **overrides)
        m = re.fullmatch(r"e(\d+)m(\d+)(fn)?((?:_[a-z0-9-]+)*)", key)
        if not m:
            allowed = ", ".join(NAMED_FORMATS)
            raise ValueError(f"name must be one of {allowed}, 'eXmY[fn][_nan|_nonan][_b<bias>]"
                             f"[_nosub][_inf]' or '1-X-Y'; got {name!r}")
        e, mb = int(m.group(1)), int(m.group(2))
        kw: dict = {"special": _fn_special(e, mb) if m.group(3) else "ieee"}
        for tag in m.group(4).split("_")[1:]:
            if tag in ("nan", "nonan") and m.group(3):
                kw["special"] = "fn" if tag == "nan" else "none"
            elif re.fullmatch(r"b-?\d+", tag):
                kw["bias"] = int(tag[1:])
            elif tag == "nosub":
                kw["subnormals"] = False
            elif tag == "inf":
                kw["overflow"] = "inf"
            else:
                raise ValueError(f"unknown modifier {'_' + tag!r} in format name {name!r}; "
                                 "allowed: _nan, _nonan (after fn), _b<bias>, _nosub, _inf")
        return cls(e, mb, **{**kw, **overrides})

    @classmethod
    def ieee(cls, exp_bits: int, man_bits: int, **kw) -> FPFormat:
        """IEEE-like eXmY (bias 2^(X-1)-1, subnormals, saturating, no inf/NaN codes by default)."""
        return cls(exp_bits, man_bits, **kw)

    @classmethod
    def paper(cls, exp_bits: int, man_bits: int, **kw) -> FPFormat:
        """The paper's idealised format 1-n2-n1 (Eq. 2): range [2^-Emax, 2^Emax], Emax=2^(n2-1)."""
        kw.setdefault("name", f"1-{exp_bits}-{man_bits}")
        return cls(exp_bits, man_bits, subnormals=False, semantics="paper", **kw)

    def replace(self, **changes) -> FPFormat:
        """A copy with some fields changed (the name is re-derived unless given)."""
        changes.setdefault("name", "")
        if self.semantics == "paper" and "bias" not in changes:
            changes["bias"] = None
        return replace(self, **changes)

    def _default_name(self) -> str:
        e, m = self.exp_bits, self.man_bits
        if self.semantics == "paper":
            return f"1-{e}-{m}"
        name = f"e{e}m{m}"
        if self.special != "ieee":
            name += "fn"
            if self.special != _fn_special(e, m):
                name += "_nan" if self.special == "fn" else "_nonan"
        if self.bias != 2 ** (e - 1) - 1:
            name += f"_b{self.bias}"
        if not self.subnormals:
            name += "_nosub"
        if self.overflow == "inf":
            name += "_inf"
        return name

    # ---- derived quantities ----------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total bits, sign included."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        if self.semantics == "paper":
            return -(2 ** (self.exp_bits - 1))
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest binade holding a finite value."""
        if self.semantics == "paper":
            return 2 ** (self.exp_bits - 1)  # the saturation value 2^Emax
        top = 2**self.exp_bits - 1 - self.bias
        if self.special == "ieee":
            return top - 1
        if self.special == "fn" and self.man_bits == 0:
            return top - 1  # the only code of the top binade is NaN
        return top

    @property
    def max_normal(self) -> float:
        """Largest finite value."""
        if self.semantics == "paper":
            return 2.0**self.emax
        frac = 2.0 - 2.0 ** (-self.man_bits)
        if self.special == "fn" and self.man_bits > 0:
            frac = 2.0 - 2.0 ** (1 - self.man_bits)  # all-ones mantissa of the top binade is NaN
        if self.special == "fn" and self.man_bits == 0:
            frac = 1.0
        return math.ldexp(frac, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (``min_normal`` when there are no subnormals)."""
        if self.subnormals and self.man_bits > 0:
            return math.ldexp(1.0, self.emin - self.man_bits)
        return self.min_normal

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.special in ("ieee", "fn")

    def fits(self, container_exp_bits: int, container_man_bits: int) -> bool:
        """True when every value of the format is exactly representable in a wider IEEE type."""
        cbias = 2 ** (container_exp_bits - 1) - 1
        return (
            self.man_bits <= container_man_bits
            and self.emin >= 1 - cbias
            and self.emax <= cbias
            and not (self.semantics == "paper" and self.emax > cbias)
        )

    def grid(self) -> np.ndarray:
        """All non-negative finite values, ascending, as float64 (0 first; max_normal last)."""
        m = self.man_bits
        if self.subnormals:
            sub = np.arange(0, 2**m, dtype=np.float64) * 2.0 ** (self.emin - m)
        else:
            sub = np.zeros(1)
        steps = np.arange(2**m, 2 ** (m + 1), dtype=np.float64)
        binades = [steps * 2.0 ** (e - m) for e in range(self.emin, self.emax + 1)]
        vals = np.concatenate([sub, *binades, [2.0**self.emax * 2.0]])
        vals = vals[vals <= self.max_normal]
        return np.unique(vals)

    def __str__(self) -> str:
        return self.name
