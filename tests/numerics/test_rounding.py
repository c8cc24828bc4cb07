"""quantize_fp: bit-exact against ml_dtypes / torch casts / the grid reference; properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.numerics.conftest import (
    FORMATS,
    ML_DTYPES,
    neighbours,
    probe_values,
    reference_nearest,
)

from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import quantize_fp


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns, except that any NaN equals any NaN."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    nan = np.isnan(a) & np.isnan(b)
    same = a.view(np.int32) == b.view(np.int32)
    bad = ~(nan | same)
    if bad.any():
        i = np.flatnonzero(bad)[:5]
        print("mismatch", a[i], b[i])
    return not bad.any()


def test_against_grid_reference(fmt):
    x = probe_values(fmt)
    q = quantize_fp(torch.from_numpy(x), fmt, compile=False).numpy()
    assert _bits_equal(q, reference_nearest(x, fmt))


def test_float64_path_matches_reference(fmt):
    x = probe_values(fmt).astype(np.float64)
    q = quantize_fp(torch.from_numpy(x), fmt, compile=False).numpy()
    ref = reference_nearest(x, fmt)
    assert np.array_equal(np.isnan(q), np.isnan(ref))
    assert np.array_equal(q[~np.isnan(q)], ref[~np.isnan(ref)])
    assert np.array_equal(np.signbit(q), np.signbit(ref))


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
@pytest.mark.parametrize("overflow", ["saturate", "inf"])
def test_bit_exact_ml_dtypes(name, overflow):
    if overflow == "inf" and FPFormat.from_name(name).special != "ieee":
        with pytest.raises(ValueError, match="overflow"):
            FPFormat.from_name(name, overflow=overflow)
        return
    fmt = FPFormat.from_name(name, overflow=overflow)
    x = probe_values(fmt)
    q = quantize_fp(torch.from_numpy(x), fmt, compile=False).numpy()
    finite = np.isfinite(x)
    # ml_dtypes does not saturate (e4m3fn overflows to NaN, e5m2 and e4m3 to inf): clip first
    # where our policy saturates; inf in -> our policy, checked separately below
    xin = np.clip(x, -fmt.max_normal, fmt.max_normal) if overflow == "saturate" else x
    ref = xin[finite].astype(ML_DTYPES[name]).astype(np.float32)
    assert _bits_equal(q[finite], ref)
    assert np.isnan(q[np.isnan(x)]).all()
    big = np.inf if overflow == "inf" else fmt.max_normal
    assert (q[np.isposinf(x)] == big).all() and (q[np.isneginf(x)] == -big).all()


def _binades(lo: int, hi: int) -> np.ndarray:
    """Every float32 in [2^lo, 2^(hi+1)) (all 2^23 patterns of each binade)."""
    return np.arange((lo + 127) << 23, (hi + 128) << 23, dtype=np.int64).astype(
        np.int32).view(np.float32)


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_every_float32_of_the_boundary_binades_matches_ml_dtypes(name):
    # nearest rounding of float32 runs on float operations on the CPU (Veltkamp's splitting);
    # every value of the binades where its logic switches: from half the smallest subnormal
    # through the first normal binade, and the top binade with the one above it (saturation),
    # both signs (the full 2^32 sweep: benchmarks/rounding_exactness.py)
    fmt = FPFormat.from_name(name)
    top = math.floor(math.log2(fmt.max_normal))
    for lo, hi in ((fmt.emin - fmt.man_bits - 2, fmt.emin), (top, top + 1)):
        x = _binades(lo, hi)
        x = np.concatenate([x, -x[::7]])
        q = quantize_fp(torch.from_numpy(x), fmt).numpy()
        ref = np.clip(x, -fmt.max_normal, fmt.max_normal).astype(ML_DTYPES[name])
        assert _bits_equal(q, ref.astype(np.float32)), (name, lo, hi)


@pytest.mark.parametrize("name,dtype", [("e5m2", torch.float8_e5m2),
                                        ("e4m3fn", torch.float8_e4m3fn)])
def test_bit_exact_torch_float8(name, dtype):
    fmt = FPFormat.from_name(name)
    x = torch.from_numpy(probe_values(fmt))
    x = x[torch.isfinite(x)].clamp(-fmt.max_normal, fmt.max_normal)  # torch: RNE, no saturation
    assert torch.equal(quantize_fp(x, fmt, compile=False).view(torch.int32),
                       x.to(dtype).float().view(torch.int32))


def test_bfloat16_grid_matches_torch_cast():
    fmt = FPFormat.from_name("e8m7", special="ieee", overflow="inf")
    x = torch.from_numpy(probe_values(FPFormat.from_name("e5m2")))
    x = torch.cat([x, torch.randn(10000, generator=_gen()) * 1e30,
                   torch.randn(10000, generator=_gen()) * 1e-38])
    q = quantize_fp(x, fmt, compile=False)
    ref = x.to(torch.bfloat16).float()
    nan = torch.isnan(x)
    assert torch.equal(q[~nan].view(torch.int32), ref[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_round_trip(dtype):
    fmt = FPFormat.from_name("e4m3fn")  # fits every dtype: results are exact in each
    x = torch.randn(4096, dtype=torch.float64, generator=_gen()).to(dtype)
    q = quantize_fp(x, fmt, compile=False)
    assert q.dtype == dtype and q.shape == x.shape
    ref = reference_nearest(x.double().numpy(), fmt)
    assert np.array_equal(q.double().numpy(), ref)


def test_format_not_fitting_float32_needs_float64():
    fmt = FPFormat.paper(8, 2)  # max 2^128 is beyond float32
    with pytest.raises(ValueError, match="float64"):
        quantize_fp(torch.ones(3), fmt)
    q = quantize_fp(torch.tensor([1e300, 1.0, 1e-300], dtype=torch.float64), fmt, compile=False)
    assert q.tolist() == [2.0**128, 1.0, 0.0]


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_fp(torch.ones(3, dtype=torch.int32), "e5m2")
    with pytest.raises(ValueError, match="rounding"):
        quantize_fp(torch.ones(3), "e5m2", rounding="up")
    for bad in (0.0, float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="scale"):
            quantize_fp(torch.ones(3), "e5m2", scale=bad)
    with pytest.raises(ValueError, match="scale"):
        quantize_fp(torch.ones(3), "e5m2", scale=torch.tensor(0.0))
    with pytest.raises(ValueError, match="name"):
        quantize_fp(torch.ones(3), "e9m9x")


def test_scale_is_q_of_xs_over_s(fmt):
    x = torch.from_numpy(probe_values(fmt))
    x = x[torch.isfinite(x)]
    s = 2.0**-5
    q = quantize_fp(x, fmt, scale=s, compile=False)
    ref = quantize_fp(x * s, fmt, compile=False) / s
    assert torch.equal(q, ref)


def test_nan_inf_zero_policy(fmt):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                      -fmt.min_subnormal / 4])
    q = quantize_fp(x, fmt, compile=False)
    assert math.isnan(q[0])  # NaN propagates whatever the format
    big = math.inf if fmt.overflow == "inf" else fmt.max_normal
    assert q[1] == big and q[2] == -big
    assert q[3] == 0 and not torch.signbit(q[3])
    assert q[4] == 0 and torch.signbit(q[4]) and torch.signbit(q[5]) and q[5] == 0


# ---- hypothesis properties (eager path; fused == eager is tested below) -------------------
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
fmt_st = st.sampled_from([f for f in FORMATS])


@settings(max_examples=60, deadline=None)
@given(fmt=fmt_st, xs=st.lists(finite32, min_size=1, max_size=64))
def test_properties_nearest(fmt, xs):
    x = torch.tensor(xs, dtype=torch.float32)
    q = quantize_fp(x, fmt, compile=False)
    finite_q = torch.isfinite(q)
    # idempotence
    assert torch.equal(quantize_fp(q[finite_q], fmt, compile=False), q[finite_q])
    # sign symmetry
    assert torch.equal(quantize_fp(-x, fmt, compile=False), -q)
    # monotonicity
    order = torch.argsort(x)
    qs = q[order].double()
    assert bool((qs[1:] >= qs[:-1]).all())
    # one of the two grid neighbours (saturating formats; inf formats may overflow to inf)
    lo, hi = neighbours(x.numpy(), fmt)
    qn = q.numpy()
    ok = (qn == lo) | (qn == hi) | (np.isinf(qn) & (fmt.overflow == "inf"))
    assert ok.all()


@settings(max_examples=40, deadline=None)
@given(fmt=fmt_st, xs=st.lists(finite32, min_size=1, max_size=64), seed=st.integers(0, 2**31))
def test_properties_stochastic(fmt, xs, seed):
    x = torch.tensor(xs, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    q = quantize_fp(x, fmt, "stochastic", generator=g, compile=False)
    lo, hi = neighbours(x.numpy(), fmt)
    qn = q.numpy()
    assert ((qn == lo) | (qn == hi) | (np.isinf(qn) & (fmt.overflow == "inf"))).all()
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(q, quantize_fp(x, fmt, "stochastic", generator=g, compile=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_is_unbiased(fmt, dtype):
    # points inside a binade, in the subnormal range (or the flush range) and near the top
    grid = fmt.grid()
    pts = [0.3 * grid[1], grid[2] * 0.61 + grid[3] * 0.39, 1.3 * fmt.min_normal,
           0.97 * fmt.max_normal, 0.7]
    n = 40_000
    g = torch.Generator().manual_seed(7)
    for v in pts:
        x = torch.full((n,), v, dtype=dtype)
        q = quantize_fp(x, fmt, "stochastic", generator=g, compile=False).double()
        lo, hi = neighbours(np.array([float(x[0])]), fmt)
        # Q takes 2 values h apart: std <= h/2, so the mean's std <= h/(2 sqrt(n)); 5 of those
        # is a false-alarm rate below 1e-6 per point
        tol = 5 * (hi[0] - lo[0]) / (2 * math.sqrt(n)) + 1e-30
        assert abs(float(q.mean()) - float(x[0])) <= tol, (v, float(q.mean()))


def test_stochastic_reproducible_and_seed_dependent():
    x = torch.randn(10_000, generator=_gen())
    a = quantize_fp(x, "e4m3fn", "stochastic", generator=torch.Generator().manual_seed(3),
                    compile=False)
    b = quantize_fp(x, "e4m3fn", "stochastic", generator=torch.Generator().manual_seed(3),
                    compile=False)
    c = quantize_fp(x, "e4m3fn", "stochastic", generator=torch.Generator().manual_seed(4),
                    compile=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = quantize_fp(x, "e4m3fn", "stochastic", compile=False)
    torch.manual_seed(5)
    assert torch.equal(d, quantize_fp(x, "e4m3fn", "stochastic", compile=False))


@pytest.mark.slow
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fused_equals_eager(rounding):
    # one compile per rounding mode; the format constants are tensors, so all formats reuse it
    for fmt in (FPFormat.from_name("e5m2", overflow="inf"), FPFormat.from_name("1-4-3"),
                FPFormat.from_name("e2m1fn")):
        x = torch.from_numpy(probe_values(fmt))
        x = torch.cat([x, torch.randn(5000, generator=_gen()) * 3])
        kw = dict(scale=0.75)
        a = quantize_fp(x, fmt, rounding, generator=torch.Generator().manual_seed(1),
                        compile=False, **kw)
        b = quantize_fp(x, fmt, rounding, generator=torch.Generator().manual_seed(1),
                        compile=True, **kw)
        assert _bits_equal(a.numpy(), b.numpy())
