"""Shared by the FP-format tests: ONE list of formats and an enumerate-the-grid reference."""

from __future__ import annotations

import numpy as np
import pytest

from gradcomp.numerics.formats import FPFormat

try:  # the bit-exact oracle for the named formats (a dev dependency)
    import ml_dtypes

    ML_DTYPES = {
        "e5m2": ml_dtypes.float8_e5m2,
        "e4m3": ml_dtypes.float8_e4m3,
        "e3m4": ml_dtypes.float8_e3m4,
        "e4m3fn": ml_dtypes.float8_e4m3fn,
        "e3m2fn": ml_dtypes.float6_e3m2fn,
        "e2m3fn": ml_dtypes.float6_e2m3fn,
        "e2m1fn": ml_dtypes.float4_e2m1fn,
    }
except ImportError:  # pragma: no cover - ml_dtypes is in the dev extra
    ML_DTYPES = {}

# Every format test is parametrised over this list: a new format gets every test.
FORMATS = [
    FPFormat.from_name("e5m2"),
    FPFormat.from_name("e5m2", overflow="inf"),
    FPFormat.from_name("e4m3fn"),
    FPFormat.from_name("e3m2fn"),
    FPFormat.from_name("e2m3fn"),
    FPFormat.from_name("e2m1fn"),
    FPFormat.from_name("e4m3"),
    FPFormat.from_name("e4m3_inf"),
    FPFormat.from_name("e3m4"),
    FPFormat.ieee(3, 0),
    FPFormat.ieee(1, 2),
    FPFormat.ieee(4, 3, subnormals=False),
    FPFormat.ieee(4, 3, bias=8),
    FPFormat.from_name("e8m7", special="ieee", overflow="inf"),  # bfloat16 exactly
    FPFormat.from_name("1-3-0"),
    FPFormat.from_name("1-4-3"),
    FPFormat.from_name("1-5-2"),
    FPFormat.from_name("1-2-1"),
]
FORMAT_IDS = [f"{f.name}{'-inf' if f.overflow == 'inf' else ''}{'' if f.subnormals else '-ftz'}"
              for f in FORMATS]


@pytest.fixture(params=FORMATS, ids=FORMAT_IDS)
def fmt(request) -> FPFormat:
    return request.param


def code_of_index(fmt: FPFormat, i: np.ndarray) -> np.ndarray:
    """The format's bit code (magnitude) of grid index i (grid = fmt.grid())."""
    if fmt.subnormals:
        return i
    first_normal = 0 if fmt.semantics == "paper" else 2**fmt.man_bits
    return i - 1 + first_normal


def reference_nearest(x: np.ndarray, fmt: FPFormat) -> np.ndarray:
    """Round-to-nearest-even by enumerating the grid (float64 math, exact for these grids)."""
    x = np.asarray(x, dtype=np.float64)
    grid = fmt.grid()
    top_step = 2.0 ** (fmt.emax - fmt.man_bits)
    # a virtual point above max: where overflow='inf' rounds to inf (IEEE); saturated otherwise
    ext = np.append(grid, grid[-1] + top_step)
    ax = np.abs(x)
    fin = np.isfinite(ax)
    a = np.where(fin, ax, 0.0)
    i = np.clip(np.searchsorted(ext, a, side="right") - 1, 0, len(ext) - 2)
    lo, hi = ext[i], ext[i + 1]
    dlo, dhi = a - lo, hi - a
    even_hi = code_of_index(fmt, i + 1) % 2 == 0
    up = (dhi < dlo) | ((dhi == dlo) & even_hi)
    r = np.where(up, hi, lo)
    r = np.where(a >= ext[-1], ext[-1], r)
    if not fmt.subnormals:
        r = np.where(a < fmt.min_normal, 0.0, r)
    over = r > fmt.max_normal
    big = np.inf if fmt.overflow == "inf" else fmt.max_normal
    r = np.where(over | np.isinf(ax), big, r)
    r = np.where(np.isnan(x), np.nan, r)
    return np.copysign(r, x)


def neighbours(x: np.ndarray, fmt: FPFormat):
    """The two grid neighbours (lower, upper) of |x| clipped to [0, max], signed like x."""
    grid = fmt.grid()
    a = np.minimum(np.abs(np.asarray(x, dtype=np.float64)), fmt.max_normal)
    i = np.clip(np.searchsorted(grid, a, side="right") - 1, 0, len(grid) - 1)
    lo = grid[i]
    hi = grid[np.minimum(i + 1, len(grid) - 1)]
    hi = np.where(lo == a, lo, hi)
    return np.copysign(lo, x), np.copysign(hi, x)


def probe_values(fmt: FPFormat) -> np.ndarray:
    """float32 probes of every class: grid values, midpoints (+-1 ulp), the subnormal boundary,
    around max, +-inf, NaN, +-0, and lognormal noise."""
    grid = fmt.grid()
    g32 = grid[grid < 3e38].astype(np.float32)
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    smallest = np.float32(fmt.min_subnormal)
    special = np.array(
        [0.0, smallest / 2, smallest / 4, smallest * 0.75, fmt.min_normal * 0.5,
         fmt.min_normal * 0.999, fmt.max_normal, fmt.max_normal * 1.0001,
         fmt.max_normal + 2.0 ** (fmt.emax - fmt.man_bits - 1), fmt.max_normal * 2, 1e38,
         np.inf, np.nan, 1e-45, 1e-40],
        dtype=np.float64,
    )
    with np.errstate(over="ignore"):
        special = special.astype(np.float32)  # beyond float32 -> inf, also a probe
    rng = np.random.default_rng(1)
    noise = np.exp(rng.normal(np.log(fmt.min_normal * 8), 6, 2000)).astype(np.float32)
    base = np.concatenate([g32, mids, special, noise])
    base = base[np.isnan(base) | (base < np.float32(3.4e38)) | np.isinf(base)]
    up = np.nextafter(base, np.float32(np.inf))
    down = np.nextafter(base, np.float32(0))
    vals = np.concatenate([base, up, down])
    return np.concatenate([vals, -vals]).astype(np.float32)
