"""FPFormat: named formats, constructors, derived quantities, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from tests.numerics.conftest import ML_DTYPES

from gradcomp.numerics.formats import FPFormat


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_named_formats_match_ml_dtypes(name):
    import ml_dtypes

    fmt = FPFormat.from_name(name)
    info = ml_dtypes.finfo(ML_DTYPES[name])
    assert fmt.max_normal == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.bits == info.bits
    # the grid is every finite non-negative value of the dtype
    codes = np.arange(2 ** (info.bits - 1), dtype=np.uint8).view(ML_DTYPES[name])
    vals = np.unique(codes.astype(np.float64))
    vals = vals[np.isfinite(vals)]
    assert np.array_equal(fmt.grid(), vals)


def test_specials():
    assert FPFormat.from_name("e5m2").has_inf and FPFormat.from_name("e5m2").has_nan
    e4 = FPFormat.from_name("e4m3fn")
    assert not e4.has_inf and e4.has_nan and e4.max_normal == 448
    e2 = FPFormat.from_name("e2m1fn")
    assert not e2.has_inf and not e2.has_nan and e2.max_normal == 6


def test_paper_format_eq2():
    f = FPFormat.from_name("1-4-3")
    assert f == FPFormat.paper(4, 3)
    # Eq. 2: exponents in [-Emax, Emax], Emax = 2^(n2-1) = 8, saturate to 2^Emax, no subnormals
    assert f.min_normal == 2.0**-8 and f.max_normal == 2.0**8 and f.min_subnormal == 2.0**-8
    g = f.grid()
    assert g[0] == 0 and g[1] == 2.0**-8 and g[-1] == 2.0**8
    assert len(g) == 1 + 2**4 * 2**3 + 1  # zero, 2^n2 binades of 2^n1 values, saturation point
    with pytest.raises(ValueError, match="paper"):
        FPFormat(4, 3, semantics="paper", subnormals=True)


def test_generic_names_and_ieee():
    f = FPFormat.from_name("e3m4fn")
    assert (f.exp_bits, f.man_bits, f.bias, f.subnormals, f.special) == (3, 4, 3, True, "none")
    assert f == FPFormat.ieee(3, 4)
    assert FPFormat.from_name("e4m0fn").max_normal == 2.0**8
    assert FPFormat(5, 2, special="ieee").name == "e5m2"
    assert FPFormat(5, 2, bias=10).min_normal == 2.0**-9


def test_e4m3_is_ml_dtypes_float8_e4m3():
    # IEEE-like with inf and NaN codes: max 240 (e4m3fn, with one NaN code and no inf, is 448)
    f = FPFormat.from_name("e4m3")
    assert f.has_inf and f.has_nan and f.max_normal == 240.0 and f.bias == 7
    assert FPFormat.from_name("e4m3fn").max_normal == 448.0
    assert FPFormat.from_name("e3m4").max_normal == 15.5


def test_names_of_formats_that_differ_differ():
    fs = [FPFormat(4, 3), FPFormat(4, 3, bias=8), FPFormat(4, 3, subnormals=False),
          FPFormat(4, 3, special="ieee", overflow="inf"), FPFormat(4, 3, special="ieee"),
          FPFormat(4, 3, special="fn"), FPFormat.paper(4, 3)]
    names = [f.name for f in fs]
    assert len(set(names)) == len(fs), names
    assert names[:3] == ["e4m3fn_nonan", "e4m3fn_nonan_b8", "e4m3fn_nonan_nosub"]
    assert names[3:] == ["e4m3_inf", "e4m3", "e4m3fn", "1-4-3"]
    with pytest.raises(ValueError, match="its name is 'e4m3fn_nonan_b8'"):
        FPFormat(4, 3, bias=8, name="e4m3")
    with pytest.raises(ValueError, match="unknown modifier"):
        FPFormat.from_name("e4m3_big")


def _all_formats():
    for e in range(1, 9):
        for m in (0, 1, 2, 3, 7, 23):
            for special in ("ieee", "fn", "none"):
                for sub in (True, False):
                    for overflow in ("saturate", "inf"):
                        for bias in (None, 2 ** (e - 1) + 1, -1):
                            try:
                                yield FPFormat(e, m, bias=bias, subnormals=sub,
                                               overflow=overflow, special=special)
                            except ValueError:
                                pass
        for m in (0, 2, 5):
            yield FPFormat.paper(e, m)


def test_from_name_of_name_is_the_format_for_every_format():
    n = 0
    for f in _all_formats():
        g = FPFormat.from_name(f.name)
        assert g == f and g.name == f.name, (f, g)
        n += 1
    assert n > 1000  # the sweep really covers the combinations


@pytest.mark.parametrize("kw,err", [
    (dict(exp_bits=0, man_bits=2), "exp_bits must be in \\[1, 8\\]"),
    (dict(exp_bits=9, man_bits=2), "exp_bits must be in \\[1, 8\\]"),
    (dict(exp_bits=4, man_bits=24), "man_bits must be in \\[0, 23\\]"),
    (dict(exp_bits=4, man_bits=-1), "man_bits must be in \\[0, 23\\]"),
    (dict(exp_bits=4, man_bits=3, overflow="wrap"), "overflow must be one of"),
    (dict(exp_bits=4, man_bits=3, overflow="inf"), "needs special='ieee'"),
    (dict(exp_bits=4, man_bits=3, semantics="x"), "semantics must be one of"),
])
def test_bad_widths_and_policies(kw, err):
    with pytest.raises(ValueError, match=err):
        FPFormat(**kw)


def test_bad_names_and_types():
    with pytest.raises(ValueError, match="e5m2, e4m3, e4m3fn"):
        FPFormat.from_name("fp8")
    with pytest.raises(TypeError):
        FPFormat(4.0, 3)
    with pytest.raises(ValueError, match="exp_bits"):
        FPFormat.from_name("e9m2")
