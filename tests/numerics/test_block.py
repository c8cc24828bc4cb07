"""Block formats: names, E8M0, the spec reference (every layout, dtype and edge case), stochastic
rounding, metrics. torchao/ml_dtypes oracles: test_block_oracles.py."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from tests.numerics.conftest import neighbours, reference_nearest

from gradcomp.numerics.block import (
    NAMED_BLOCK_FORMATS,
    BlockFormat,
    block_scales,
    e8m0_decode,
    e8m0_encode,
    quantize_block,
    quantize_block_checked,
    quantize_block_metrics,
)
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import quantize_fp

NONSTANDARD = [
    "e4m3fn:32:e8m0:rceil", "e5m2:32:e8m0:rceil", "e2m1fn:32:e8m0:rceil",
    "e2m1fn:16:e4m3:nearest", "e4m3fn:8x4:e8m0:floor", "e3m2fn:64:fp32:nearest",
    "e2m1fn:16:e4m3:nearest:ts:dims=0", "e4m3fn:32:e8m0:floor:dims=-2", "e3m4:16:e8m0:floor",
    "e4m3fn:4x8:fp32:nearest:dims=0,2",
]
# 1-D blocks over several dims, flattened (a conv operand's batch and pixels)
FLATTENED = ["e2m1fn:16:e4m3:nearest:ts:dims=0,2,3", "e4m3fn:32:e8m0:floor:dims=1,-1"]
ALL = list(NAMED_BLOCK_FORMATS) + NONSTANDARD


# ---- the spec reference: numpy float64, per block, written from the rules -------------------
def _scale_ref(amax: np.ndarray, bf: BlockFormat, t: float | None, ft=np.float32):
    """(quantize multiplier or None, divisor or None, dequantize multiplier) per block, with
    the scale arithmetic in ``ft`` (the container: float32, or float64 for float64 input)."""
    mx = bf.elem.max_normal
    if bf.scale == "e8m0":
        k = np.empty(amax.shape)
        for i, a in enumerate(amax.ravel()):
            if math.isnan(a):
                k.flat[i] = np.nan
                continue
            if bf.rule == "floor":
                # floor(log2 amax) from frexp; a float32 subnormal or zero amax reads as -127
                e = 128 if math.isinf(a) else (-127 if a < 2.0**-126 else math.frexp(a)[1] - 1)
                k.flat[i] = min(max(e - bf.elem.emax, -127), 127)
            else:
                d = float(ft(a) / ft(mx))
                if math.isinf(d):
                    k.flat[i] = 127
                    continue
                m, e = math.frexp(d) if d > 0 else (0.5, -200)
                k.flat[i] = min(max(e - 1 if m == 0.5 else e, -127), 127)
        return np.exp2(-k), None, np.exp2(k)
    if bf.scale == "fp32":
        s = (ft(amax) / ft(mx)).astype(np.float32)  # an FP32 number
        s = np.clip(s, np.float32(2.0**-126), np.finfo(np.float32).max).astype(np.float64)
        return None, s, s
    s = (ft(amax) / ft(mx)).astype(ft)
    if t is not None:
        s = (s / ft(t)).astype(ft)
    s = np.clip(s, ft(2.0**-6), ft(448.0))
    s8 = reference_nearest(s, FPFormat.from_name("e4m3fn")).astype(ft)
    if t is None:
        return (ft(1.0) / s8).astype(np.float64), None, s8.astype(np.float64)
    inv = ((ft(1.0) / ft(t)) / s8).astype(ft)
    return inv.astype(np.float64), None, (ft(t) * s8).astype(ft).astype(np.float64)


def spec_reference(x: torch.Tensor, bf: BlockFormat) -> np.ndarray:
    """Block quantization by the rules of the module docstring, block by block (slow, exact)."""
    xs = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).numpy()
    nd, k = len(bf.block), len(bf.dims)  # k > nd: 1-D blocks over k dims, flattened
    a = xs.reshape((1,) * max(0, nd - xs.ndim) + xs.shape)
    dims = tuple(d % a.ndim for d in bf.dims)
    a = np.moveaxis(a, dims, tuple(range(a.ndim - k, a.ndim)))
    moved_shape = a.shape
    a = a.reshape((-1,) + (a.shape[a.ndim - nd:] if k == nd
                           else (math.prod(a.shape[a.ndim - k:]),)))
    t = None
    if bf.tensor_scale:
        fin = np.abs(xs[np.isfinite(xs)])
        amax_t = fin.max() if fin.size else 0.0
        ft = np.float64 if x.dtype == torch.float64 else np.float32
        t = float(np.clip(np.float32(ft(amax_t) / ft(448.0 * bf.elem.max_normal)),
                          np.float32(2.0**-126), np.finfo(np.float32).max))
    out = np.empty_like(a, dtype=np.float64)
    sizes = a.shape[1:]
    starts = [range(0, s, b) for s, b in zip(sizes, bf.block)]
    ftype = np.float64 if x.dtype == torch.float64 else np.float32
    for lead in range(a.shape[0]):
        for corner in np.array(np.meshgrid(*starts, indexing="ij")).reshape(nd, -1).T:
            sl = (lead,) + tuple(slice(c, c + b) for c, b in zip(corner, bf.block))
            blk = a[sl].astype(np.float64)
            amax = np.array([np.max(np.abs(blk))])
            mul, div, deq = _scale_ref(amax, bf, t, ftype)
            if mul is not None:
                y = (blk.astype(ftype) * ftype(mul[0])).astype(np.float64)
            else:
                y = (blk.astype(ftype) / ftype(div[0])).astype(np.float64)
            q = reference_nearest(y, bf.elem)
            out[sl] = (q.astype(ftype) * ftype(deq[0])).astype(np.float64)
    out = out.reshape(moved_shape)
    out = np.moveaxis(out, tuple(range(out.ndim - k, out.ndim)), dims)
    return out.reshape(xs.shape)


def _same(a: torch.Tensor, b: np.ndarray) -> bool:
    a = a.double().numpy()
    both_nan = np.isnan(a) & np.isnan(b)
    return bool(np.all(both_nan | ((a == b) & (np.signbit(a) == np.signbit(b)))))


def _lognormal(shape, sigma=2.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(sigma * torch.randn(shape, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    return (mag * sign).float()


# ---- names and construction -----------------------------------------------------------------
@pytest.mark.parametrize("name", ALL + FLATTENED)
def test_name_round_trip(name):
    f = BlockFormat.from_name(name)
    assert BlockFormat.from_name(f.name) == f
    assert f.name == name


def test_named_fields_and_bits():
    f = BlockFormat.from_name("mxfp8_e4m3")
    assert (f.elem.name, f.block, f.scale, f.rule, f.tensor_scale) == (
        "e4m3fn", (32,), "e8m0", "floor", False)
    assert BlockFormat.from_name("mxfp8_e4m3").bits_per_element == 8.25
    assert BlockFormat.from_name("mxfp4").bits_per_element == 4.25
    assert BlockFormat.from_name("nvfp4").bits_per_element == 4.5
    assert BlockFormat.from_name("nvfp4_2d").block == (16, 16)
    assert BlockFormat.from_name("fp8_block128").bits_per_element == 8.25
    assert BlockFormat.from_name("fp8_block128x128").bits_per_element == 8 + 32 / 128**2
    assert f.replace(rule="rceil").name == "e4m3fn:32:e8m0:rceil"
    assert BlockFormat("e2m1fn", 16, "e4m3", "nearest", True).name == "nvfp4"


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(elem="e4m3fn", scale="e4m3", rule="floor"), ValueError, "rule"),
    (dict(elem="e4m3fn", scale="int8"), ValueError, "scale"),
    (dict(elem="e4m3fn", block=(0,)), ValueError, "block"),
    (dict(elem="e4m3fn", block=(2, 2, 2)), TypeError, "block"),
    (dict(elem="e4m3fn", block=(8,), dims=()), TypeError, "dims"),
    (dict(elem="e4m3fn", block=(8,), dims=(0, 1.0)), TypeError, "dims"),
    (dict(elem="e4m3fn", block=(8, 8), dims=(0, 1, 2)), TypeError, "dims"),
    (dict(elem="e4m3fn", block=(8,), dims=(0, 2, 0)), ValueError, "dims"),
    (dict(elem="e4m3fn", block=(8, 8), dims=(1, 1)), ValueError, "dims"),
    (dict(elem=FPFormat.from_name("e5m2", overflow="inf")), ValueError, "saturate"),
    (dict(elem=FPFormat.from_name("1-4-3")), ValueError, "subnormals"),
    (dict(elem="e4m3fn", tensor_scale=1), TypeError, "tensor_scale"),
    # a per-tensor scale only makes sense for E4M3 block scales (their range is 2^-9..448)
    (dict(elem="e4m3fn", scale="e8m0", rule="floor", tensor_scale=True), ValueError,
     "tensor_scale=True requires scale='e4m3'"),
    (dict(elem="e4m3fn", scale="e8m0", rule="rceil", tensor_scale=True), ValueError,
     "tensor_scale"),
    (dict(elem="e4m3fn", scale="fp32", rule="nearest", tensor_scale=True), ValueError,
     "'e8m0' and 'fp32' need none"),
])
def test_bad_construction(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        BlockFormat(**kwargs)


def test_tensor_scale_only_with_e4m3_scales():
    assert BlockFormat("e2m1fn", 16, "e4m3", "nearest", True).tensor_scale
    assert not BlockFormat("e2m1fn", 16, "e4m3", "nearest", False).tensor_scale
    for name in ("e4m3fn:32:e8m0:floor:ts", "e4m3fn:128:fp32:nearest:ts"):
        with pytest.raises(ValueError, match="tensor_scale"):
            BlockFormat.from_name(name)
    with pytest.raises(ValueError, match="tensor_scale"):
        BlockFormat.from_name("nvfp4").replace(scale="fp32")
    # every standard format rebuilds itself from its name
    for name in NAMED_BLOCK_FORMATS:
        f = BlockFormat.from_name(name)
        assert f.name == name and BlockFormat.from_name(f.name) == f


def test_bad_calls():
    with pytest.raises(ValueError, match="name must be one of"):
        BlockFormat.from_name("mxfp7")
    with pytest.raises(ValueError, match="name must be one of"):
        BlockFormat.from_name("e4m3fn:32:e8m0:floor:junk")
    with pytest.raises(TypeError, match="x must be"):
        quantize_block(torch.arange(4), "mxfp4")
    with pytest.raises(ValueError, match="rounding"):
        quantize_block(torch.ones(4), "mxfp4", rounding="up")
    with pytest.raises(TypeError, match="bf must be"):
        quantize_block(torch.ones(4), 3)
    with pytest.raises(ValueError, match="dims"):
        quantize_block(torch.ones(4, 4), "e4m3fn:4:e8m0:floor:dims=3")


# ---- E8M0 ------------------------------------------------------------------------------------
def _e8m0_probes() -> np.ndarray:
    k = np.arange(-140, 128, dtype=np.float64)
    p = np.exp2(k)
    vals = np.concatenate([p, p * 1.5, p * 1.25, p * 1.75, p * 1.4999999, p * 1.5000001,
                           np.exp(np.random.default_rng(0).uniform(-95, 88, 20000))])
    vals = vals[(vals > 0) & (vals < 2.0**127.9)].astype(np.float32)
    up, down = np.nextafter(vals, np.float32(np.inf)), np.nextafter(vals, np.float32(0))
    vals = np.concatenate([vals, up, down])
    return vals[(vals > 0) & np.isfinite(vals)]


def test_e8m0_nearest_matches_ml_dtypes():
    v = _e8m0_probes()
    v = v[v < 1.5 * 2.0**127]  # above, nearest rounds past 2^127: ml_dtypes NaN, ours 254
    with np.errstate(over="ignore"):
        ref = v.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    ours = e8m0_encode(torch.from_numpy(v), "nearest").numpy()
    assert np.array_equal(ours, ref), int((ours != ref).sum())
    # NaN and negatives agree (NaN); 0 and +inf are documented differences
    special = torch.tensor([float("nan"), -1.0, -2.0**-130, 0.0, float("inf"), 1.5 * 2.0**127])
    assert e8m0_encode(special, "nearest").tolist() == [255, 255, 255, 0, 254, 254]


def test_e8m0_floor_ceil_exact_and_decode():
    v = _e8m0_probes().astype(np.float64)
    fl = e8m0_encode(torch.from_numpy(v), "floor").numpy().astype(int)
    ce = e8m0_encode(torch.from_numpy(v), "ceil").numpy().astype(int)
    m, e = np.frexp(v)
    ref_fl = np.clip(e - 1, -127, 127) + 127
    ref_ce = np.clip(np.where(m == 0.5, e - 1, e), -127, 127) + 127
    assert np.array_equal(fl, ref_fl) and np.array_equal(ce, ref_ce)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = codes.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    dec = e8m0_decode(codes).numpy()
    assert np.array_equal(dec.view(np.int32)[:255], ref.view(np.int32)[:255])
    assert np.isnan(dec[255]) and np.isnan(ref[255])
    assert e8m0_decode(codes, torch.float64)[0].item() == 2.0**-127


# ---- the spec reference, every layout ------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_spec_reference_random(name):
    bf = BlockFormat.from_name(name)
    shape = (3, 40, 37) if len(bf.block) == 1 else (2, 40, 37)  # ragged everywhere
    if bf.block_numel > 2000:
        shape = (1, 150, 140)
    x = _lognormal(shape, 2.5, seed=len(name))
    out = quantize_block(x, bf, compile=False)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert _same(out, spec_reference(x, bf))


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "e2m1fn:32:e8m0:rceil", "nvfp4", "fp8_block128"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_spec_reference_dtypes(name, dtype):
    bf = BlockFormat.from_name(name)
    x = _lognormal((5, 48), 1.5, seed=3).to(dtype)
    out = quantize_block(x, bf, compile=False)
    assert out.dtype == dtype
    ref = spec_reference(x, bf)
    if dtype == torch.float64:
        assert _same(out, ref)
    else:  # computed in float32, cast back once
        assert _same(out, torch.from_numpy(ref).float().to(dtype).double().numpy())


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
                                  "e4m3fn:32:e8m0:rceil", "e2m1fn:32:e8m0:rceil"])
def test_elements_are_quantize_fp_of_scaled_block(name):
    bf = BlockFormat.from_name(name)
    x = _lognormal((64, 96), 3.0, seed=7)
    s = block_scales(x, bf)  # powers of two, shape (64 * 3,)
    sb = s.reshape(64, 3, 1)
    y = (x.reshape(64, 3, 32) / sb).reshape(-1)
    ref = (quantize_fp(y, bf.elem, compile=False).reshape(64, 3, 32) * sb).reshape(64, 96)
    assert torch.equal(quantize_block(x, bf, compile=False), ref)


# ---- adversarial blocks ----------------------------------------------------------------------
def _adversarial(bf: BlockFormat) -> torch.Tensor:
    n = bf.block[-1]
    emax, mx = bf.elem.emax, bf.elem.max_normal
    rows = [
        torch.zeros(n),
        -torch.zeros(n),
        torch.cat([torch.tensor([1e30]), torch.full((n - 1,), 1e-3)]),
        torch.full((n,), 2.0**-140),  # subnormal float32 amax
        torch.linspace(-1, 1, n) * 2.0 ** (emax - 127),  # E8M0 byte 0 under floor
        torch.linspace(-1, 1, n) * mx * 2.0**-127,  # byte 0 / 1 under rceil
        torch.linspace(-1, 1, n) * 2.0**-120,
        torch.linspace(-1, 1, n) * 2.0**100,
    ]
    for j in (-3, 0, 5):
        for f in (1.0, 1 + 2**-23, 1 - 2**-24, 1.5):
            rows.append(torch.linspace(-1, 1, n) * (2.0**j * f))
            rows.append(torch.linspace(-1, 1, n) * (mx * 2.0**j * f))
    return torch.stack(rows).float()


ROWS_1D = [n for n in ALL if len(BlockFormat.from_name(n).block) == 1
           and BlockFormat.from_name(n).dims == (-1,)]


@pytest.mark.parametrize("name", ROWS_1D)
def test_spec_reference_adversarial(name):
    bf = BlockFormat.from_name(name)
    x = _adversarial(bf)
    assert _same(quantize_block(x, bf, compile=False), spec_reference(x, bf))


@pytest.mark.parametrize("name", list(NAMED_BLOCK_FORMATS) + ["e4m3fn:32:e8m0:rceil"])
def test_zero_nan_inf_blocks(name):
    bf = BlockFormat.from_name(name)
    nb = bf.block_numel
    base = _lognormal((4 * nb,), 1.0, seed=1).reshape(4, *bf.block) if len(bf.block) == 2 \
        else _lognormal((4 * nb,), 1.0, seed=1)
    x = base.clone().reshape(4, -1)
    x[0] = 0.0
    x[0, ::2] = -0.0
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[2, 6] = -float("inf")
    x = x.reshape(base.shape) if len(bf.block) == 1 else x.reshape(4, *bf.block)
    if len(bf.block) == 2:  # tiles: one tile per leading index
        x = x.reshape(4 * bf.block[0], bf.block[1])
    out = quantize_block(x, bf, compile=False).reshape(4, -1)
    flat = x.reshape(4, -1)
    assert torch.equal(out[0], flat[0]) and torch.equal(out[0].signbit(), flat[0].signbit())
    assert torch.isnan(out[1]).all()  # a NaN block is NaN throughout
    assert not torch.isnan(out[[0, 2, 3]]).any()
    mx = bf.elem.max_normal
    if bf.scale == "e4m3":  # saturates at 6 * scale, the block's own scale of 448 * t
        t = max(float(flat[torch.isfinite(flat)].abs().max()) / (448 * mx), 2.0**-126)
        s = float(np.float32(448.0) * np.float32(t))
        assert out[2, 5].item() == np.float32(mx * s) and out[2, 6].item() == -out[2, 5].item()
    else:  # the inf block's scale overflows +-max * s to +-inf in float32
        assert out[2, 5].item() == math.inf and out[2, 6].item() == -math.inf
    if bf.tensor_scale:  # the per-tensor scale depends on the whole tensor
        return
    assert torch.equal(out[3], quantize_block(flat[3:4].reshape(
        (1, -1) if len(bf.block) == 1 else (bf.block[0], bf.block[1])), bf,
        compile=False).reshape(-1))


def test_power_of_two_amax():
    # floor: amax = 2^j maps to 2^emax exactly; rceil: amax = max * 2^j maps to max exactly
    for j in (-20, 0, 13):
        x = torch.zeros(32)
        x[0] = 2.0**j
        x[1] = 2.0**j * 0.3
        f = BlockFormat.from_name("mxfp8_e4m3")
        assert block_scales(x, f).item() == 2.0 ** (j - 8)
        assert quantize_block(x, f, compile=False)[0].item() == 2.0**j
        r = f.replace(rule="rceil")
        x[0] = 448 * 2.0**j
        assert block_scales(x, r).item() == 2.0**j
        assert quantize_block(x, r, compile=False)[0].item() == 448 * 2.0**j
        # floor saturates the block max above 448 * 2^(k): 480 * 2^j -> 448 * 2^j
        x[0] = 480 * 2.0**j
        assert quantize_block(x, f, compile=False)[0].item() == 448 * 2.0**j
        assert quantize_block(x, r, compile=False)[0].item() == 480 * 2.0**j


def test_scalar_and_empty_and_dims():
    f = BlockFormat.from_name("mxfp4")
    assert quantize_block(torch.tensor(3.3), f, compile=False).item() == 3.0
    assert quantize_block(torch.empty(0, 5), f, compile=False).shape == (0, 5)
    x = _lognormal((32, 5), 2.0, seed=4)
    along0 = quantize_block(x, f.replace(dims=(0,)), compile=False)
    assert torch.equal(along0, quantize_block(x.t().contiguous(), f, compile=False).t())


# ---- stochastic rounding ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4", "nvfp4", "fp8_block128"])
def test_stochastic_unbiased_and_neighbours(name):
    bf = BlockFormat.from_name(name)
    x = _lognormal((8, 128), 1.5, seed=11)
    near = quantize_block(x, bf, compile=False)
    g = torch.Generator().manual_seed(0)
    reps = 400
    draws = torch.stack([quantize_block(x, bf, "stochastic", generator=g, compile=False)
                         for _ in range(reps)]).double()
    s = block_scales(x, bf).double()
    per = s.repeat_interleave(bf.block_numel).reshape(x.shape)
    inside = x.double().abs() < per * bf.elem.max_normal  # not saturated
    if bf.scale == "e8m0":  # x / s is exact: check each element's up-count (binomial)
        y = (x.double() / per).numpy()
        lo, hi = neighbours(y, bf.elem)
        q = (draws / per).numpy()
        assert np.all((q == lo) | (q == hi))
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(hi != lo, (y - lo) / (hi - lo), 0.0)
        ups = (q == hi).sum(0) * (hi != lo)
        bound = 6 * np.sqrt(reps * p * (1 - p)) + 3
        assert np.all(np.abs(ups - reps * p)[inside.numpy()] <= bound[inside.numpy()])
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(reps)
    # the bias summed over the unsaturated elements is noise-sized (k = 5 standard errors)
    used = inside & (se > 0)
    z = (mean - x.double())[used].sum() / (se[used] ** 2).sum().sqrt()
    assert abs(z) < 5
    assert (mean - near.double()).abs().sum() > 0  # it is not nearest


def test_stochastic_reproducible():
    x = _lognormal((4, 64), 2.0, seed=2)
    a = quantize_block(x, "mxfp4", "stochastic", generator=torch.Generator().manual_seed(5),
                       compile=False)
    b = quantize_block(x, "mxfp4", "stochastic", generator=torch.Generator().manual_seed(5),
                       compile=False)
    c = quantize_block(x, "mxfp4", "stochastic", generator=torch.Generator().manual_seed(6),
                       compile=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- metrics ---------------------------------------------------------------------------------
def test_metrics_counts():
    f = BlockFormat.from_name("mxfp4")
    x = torch.ones(96)
    x[0] = 1000.0  # block 0: scale 2^(9-2): 1000/128 = 7.8 > 6 clipped; the 31 ones underflow
    x[32] = 7.9  # block 1: floor(log2 7.9) - 2 = 0: 7.9 > 6 is clipped
    x[70] = float("nan")  # block 2: non-finite inputs
    x[71] = float("inf")
    out, m = quantize_block_metrics(x, f, compile=False)
    torch.testing.assert_close(out, quantize_block(x, f, compile=False), rtol=0, atol=0,
                               equal_nan=True)
    assert (m.underflow.item(), m.saturated.item(), m.nonfinite.item()) == (31, 2, 2)
    assert m.saturated.dtype == torch.int64 and m.saturated.dim() == 0


@pytest.mark.slow
def test_fused_equals_eager():
    x = _lognormal((33, 70), 2.5, seed=9)
    for name in ("mxfp8_e4m3", "nvfp4", "fp8_block128"):
        for rounding in ("nearest", "stochastic"):
            a = quantize_block(x, name, rounding, generator=torch.Generator().manual_seed(1),
                               compile=True)
            b = quantize_block(x, name, rounding, generator=torch.Generator().manual_seed(1),
                               compile=False)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (name, rounding)


@pytest.mark.parametrize("name", ROWS_1D)
def test_rows_shorter_than_a_block_need_no_padding(name):
    # a row shorter than one block is quantized as its own block (no padded copy): the same
    # values and counts as the zero-padded block (the spec reference pads), with stochastic
    # rounding too (each element draws the bits of its padded index); a NaN block stays NaN
    # (its payload is not specified and may differ)
    bf = BlockFormat.from_name(name)
    b = bf.block[0]

    def bits(t):
        return torch.where(torch.isnan(t), torch.full_like(t, math.nan), t).view(torch.int32)

    def gen():
        return torch.Generator().manual_seed(5)

    for n in sorted({1, 5, b // 2, b - 1}):
        x = _lognormal((7, n), 2.5, seed=n)
        x[0, 0], x[1, -1], x[2, :] = float("nan"), float("inf"), 0.0
        padded = torch.cat([x, torch.zeros(7, b - n)], dim=1)
        for compile in ((False, True) if name in ("mxfp8_e4m3", "nvfp4") else (False,)):
            for rounding in ("nearest", "stochastic"):
                out, m = quantize_block_metrics(x, bf, rounding, gen(), compile=compile)
                ref, mref = quantize_block_metrics(padded, bf, rounding, gen(), compile=compile)
                what = (name, n, compile, rounding)
                assert torch.equal(bits(out), bits(ref[:, :n].contiguous())), what
                assert all(int(u) == int(v) for u, v in zip(m, mref)), what
                assert torch.equal(bits(quantize_block(x, bf, rounding, gen(), compile=compile)),
                                   bits(out)), what
        assert _same(quantize_block(x, bf, compile=False), spec_reference(x, bf))


# ---- every E8M0 scale exponent; blocks along a middle dimension ------------------------------
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4", "mxfp8_e5m2", "e4m3fn:32:e8m0:rceil",
                                  "e2m1fn:32:e8m0:rceil"])
def test_every_amax_exponent_against_the_reference(name):
    # the CPU kernels compute E8M0 scales on float operations (no bit reinterpretation, which
    # inductor's CPU code does element by element): one block per float32 exponent field
    # (subnormals, the normal binades, inf) and mantissa, plus a NaN block, against the spec
    # reference's frexp-based rule, fused and eager
    bf = BlockFormat.from_name(name)
    mants = [0, 1, 0x400000, 0x400001, 0x7FFFFF]
    amax = torch.tensor([(e << 23) | m for e in range(255) for m in mants],
                        dtype=torch.int32).view(torch.float32)
    amax = torch.cat([amax, torch.tensor([math.inf, math.nan])])
    fill = torch.linspace(-1.0, 1.0, 31)
    x = torch.cat([amax[:, None], amax[:, None] * fill[None, :]], dim=1)
    x[amax == math.inf, 1:] = fill  # an inf block with finite neighbours
    ref = spec_reference(x, bf)
    for compile in (False, True) if name in ("mxfp8_e4m3", "e4m3fn:32:e8m0:rceil") else (False,):
        assert _same(quantize_block(x, bf, compile=compile), ref), compile
    assert _same(quantize_block(x[:, :16].contiguous(), bf, compile=False),
                 spec_reference(x[:, :16].contiguous(), bf))


ONE_D = ["mxfp8_e4m3", "mxfp4", "nvfp4", "fp8_block128", "e4m3fn:32:e8m0:rceil"]


@pytest.mark.parametrize("name", ONE_D)
def test_blocks_along_a_middle_dimension_equal_the_moved_layout(name):
    # 1-D blocks along dim 1 of an (N, C, H, W) tensor are reduced in place (no copy that
    # moves C last); values, counts and stochastic bits are those of the moved layout, for C a
    # multiple of the block, shorter than one block, and ragged (that one moves and pads)
    bf = BlockFormat.from_name(name)
    b = bf.block[0]
    along = bf.replace(dims=(1,))
    for c in sorted({max(1, b // 2), b, 2 * b, b + b // 2}):
        x = _lognormal((3, c, 5, 7), 2.5, seed=c)
        x[0, 0, 0, 0], x[1, -1, 2, 3], x[2, :, 1, 1] = float("nan"), -float("inf"), 0.0
        moved = x.movedim(1, -1).contiguous()
        for compile in (False, True) if name in ("mxfp8_e4m3", "nvfp4") else (False,):
            for rounding in ("nearest", "stochastic"):
                g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
                out, m = quantize_block_metrics(x, along, rounding, g1, compile=compile)
                ref, mref = quantize_block_metrics(moved, bf, rounding, g2, compile=compile)
                what = (name, c, compile, rounding)
                ref = ref.movedim(-1, 1)
                # a NaN/inf block's NaN payloads are not specified: values compared
                assert torch.equal(torch.isnan(out), torch.isnan(ref)), what
                assert torch.equal(torch.nan_to_num(out, nan=0.0).view(torch.int32),
                                   torch.nan_to_num(ref, nan=0.0).view(torch.int32)), what
                assert [int(v) for v in m] == [int(v) for v in mref], what
                if c <= b or c % b == 0:  # reduced in place: x's own layout
                    assert out.is_contiguous(), what
        assert _same(quantize_block(x, along, compile=False), spec_reference(x, along))


@pytest.mark.parametrize("name", ONE_D + ["e2m1fn:32:e4m3:nearest:ts"])
def test_blocks_over_flattened_dims_equal_the_moved_layout(name):
    # 1-D blocks over several dims (a conv weight gradient's operands reduce over batch and
    # pixels) are the blocks of those dims moved last and merged into one: values, counts and
    # stochastic bits; where every block is made of runs of x (the dims after the first are
    # x's last ones, their product a multiple of the block or of 16) they are reduced in place
    bf = BlockFormat.from_name(name)
    b = bf.block[0]
    cases = [((6, 3, 4, b // 4), (0, 2, 3)),  # pixels a multiple of the block: in place
             ((3, 2, 2, 5, b), (1, 3, 4)),  # leading dims before d0, mid dims: in place
             ((5, 3, 3, 16), (0, 2, 3)),  # 48 pixels: runs of 16 (in place) for b >= 32
             ((3, 4, 3, 16), (1, 3)),  # leading and mid dims around runs of 16
             ((1, 3, 4, 4), (0, 2, 3)),  # rows shorter than a 32-block, made of one run
             ((5, 3, 7, 7), (0, 2, 3)),  # 49 pixels, blocks straddle samples: moved
             ((4, 3, b), (0, 2)), ((3, 2, b), (2, 0)),  # in place / another order: moved
             ((2, 3, 4, 4), (3, 0))]  # shorter than one block: moved, unpadded rows
    for shape, dims in cases:
        fmt = bf.replace(dims=dims)
        assert BlockFormat.from_name(fmt.name) == fmt
        x = _lognormal(shape, 2.5, seed=len(shape) + dims[0])
        x.view(-1)[5], x.view(-1)[-3], x.view(-1)[9:13] = float("nan"), -float("inf"), 0.0
        nd = x.dim()
        keep = [d for d in range(nd) if d not in [d % nd for d in dims]]
        moved = x.permute(*keep, *[d % nd for d in dims])
        flat = moved.reshape(*moved.shape[:len(keep)], -1).contiguous()
        inv = np.argsort(keep + [d % nd for d in dims]).tolist()
        # in place where the blocks are made of runs of x of at least 16 elements (or whole
        # blocks): gcd(pixels, block) >= min(16, block) (``numerics.block.MIN_RUN``)
        in_place = (dims[0] % nd < nd - len(dims) + 1 and [d % nd for d in dims[1:]]
                    == list(range(nd - len(dims) + 1, nd))
                    and math.gcd(math.prod(shape[nd - len(dims) + 1:]), b) >= min(16, b))
        compiled = name in ("mxfp8_e4m3", "nvfp4", "e2m1fn:32:e4m3:nearest:ts")
        for compile in (False, True) if compiled else (False,):
            for rounding in ("nearest", "stochastic"):
                g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
                out, m = quantize_block_metrics(x, fmt, rounding, g1, compile=compile)
                ref, mref = quantize_block_metrics(flat, bf, rounding, g2, compile=compile)
                ref = ref.reshape(moved.shape).permute(*inv)
                what = (name, shape, dims, compile, rounding)
                assert torch.equal(torch.isnan(out), torch.isnan(ref)), what
                assert torch.equal(torch.nan_to_num(out, nan=0.0).view(torch.int32),
                                   torch.nan_to_num(ref, nan=0.0).view(torch.int32)), what
                assert [int(v) for v in m] == [int(v) for v in mref], what
                assert out.is_contiguous() == in_place, what
        assert _same(quantize_block(x, fmt, compile=False), spec_reference(x, fmt))
        g1, g2 = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
        q, bad = quantize_block_checked(x, fmt, "stochastic", g1)
        assert int(bad) > 0 and torch.equal(
            torch.nan_to_num(q, nan=0.0),
            torch.nan_to_num(quantize_block(x, fmt, "stochastic", g2), nan=0.0))
    assert BlockFormat.from_name(bf.replace(dims=(0, 2, 3)).name).dims == (0, 2, 3)


def test_flattened_dims_errors_name_the_shape():
    x = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"out of range.*\(4, 4\)"):
        quantize_block(x, "e4m3fn:4:e8m0:floor:dims=0,2")
    with pytest.raises(ValueError, match=r"twice.*\(4, 4\)"):
        quantize_block(x, "e4m3fn:4:e8m0:floor:dims=0,-2")
    with pytest.raises(TypeError, match="dims must be a tuple of 2 ints"):
        BlockFormat.from_name("e4m3fn:4x4:e8m0:floor:dims=0,1,2")


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "nvfp4"])
def test_checked_flags_exactly_the_nonfinite_tensors(name):
    # quantize_block_checked: the quantized tensor and a count > 0 exactly when x holds a
    # NaN/inf, for the strided layout (from the scale kernel) and the moved one (min/max)
    bf = BlockFormat.from_name(name)
    for fmt, shape in ((bf.replace(dims=(1,)), (2, 64, 3, 3)), (bf, (6, 64))):
        for compile in (False, True):
            x = _lognormal(shape, 2.0, seed=4)
            q, bad = quantize_block_checked(x, fmt, "stochastic",
                                            torch.Generator().manual_seed(0), compile=compile)
            ref = quantize_block(x, fmt, "stochastic", torch.Generator().manual_seed(0),
                                 compile=compile)
            assert torch.equal(q.view(torch.int32), ref.view(torch.int32))
            assert bad.dtype == torch.int64 and int(bad) == 0
            for v in (math.nan, math.inf, -math.inf):
                y = x.clone()
                y.view(-1)[17] = v
                assert int(quantize_block_checked(y, fmt, compile=compile)[1]) > 0, (fmt, v)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("name, rounding", [("mxfp4", "stochastic"), ("nvfp4", "stochastic"),
                                            ("nvfp4", "nearest"), ("mxfp8_e4m3", "nearest")])
def test_in_place_block_quantization_writes_the_new_tensors_bits_into_x(name, rounding,
                                                                        compile):
    # into=True on blocks along the channels of a conv output (the strided layout): x itself
    # is the result, bit for bit the new tensor of an out-of-place call (the same draw), and
    # so is the flag of blocks holding a NaN/inf (read before the write); with 16 channels
    # under 32-element blocks, one short block per position
    from gradcomp.numerics.block import quantize_block_unchecked

    bf = BlockFormat.from_name(name).replace(dims=(1,))
    for c in (32, 16):
        x0 = torch.randn(3, c, 5, 7, generator=torch.Generator().manual_seed(c)) * 1e-3
        x0[0, 2, 1, 1], x0[1, 0, 0, 3], x0[2, 5, 4, 6] = float("nan"), float("inf"), 0.0
        for g in (1, 2):  # the second call takes the direct path
            x = x0.clone()
            got, bad = quantize_block_unchecked(x, bf, rounding == "stochastic",
                                                torch.Generator().manual_seed(g), flag=True,
                                                compile=compile, into=True)
            want, wbad = quantize_block_unchecked(x0, bf, rounding == "stochastic",
                                                  torch.Generator().manual_seed(g), flag=True,
                                                  compile=compile)
            assert got is x and torch.equal(x.view(torch.int32), want.view(torch.int32))
            assert int(bad) == int(wbad) == 2


@pytest.mark.parametrize("name, shape, nearest_too", [
    ("nvfp4", (6, 64), False),  # a linear output's features: rows of x
    ("nvfp4_2d", (32, 48), False),  # 16x16 tiles of x as it lies
    ("mxfp4", (4, 3, 96), False),
    ("e2m1fn:16:e4m3:nearest:ts:dims=0,2,3", (3, 2, 4, 8), False),  # whole runs of 32
    ("e2m1fn:32:e8m0:floor:dims=0,2,3", (4, 3, 4, 4), True),  # two runs of 16 per block
])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_in_place_block_quantization_of_views_of_x(name, shape, nearest_too, rounding):
    # the canonical and flattened layouts are views of a contiguous, unpadded x: stochastic
    # rounding's element kernel writes in place, the out-of-place bits, and so does nearest
    # rounding's on runs shorter than a block (its own element kernel); nearest rounding's
    # one-pass kernel elsewhere, and a padded or moved layout, write a new tensor
    from gradcomp.numerics.block import quantize_block_unchecked

    bf = BlockFormat.from_name(name)
    sr = rounding == "stochastic"
    x0 = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 1e-3
    x0.view(-1)[5] = float("nan")
    for g in (1, 2):
        x = x0.clone()
        got, bad = quantize_block_unchecked(x, bf, sr, torch.Generator().manual_seed(g),
                                            flag=True, compile=True, into=True)
        want, wbad = quantize_block_unchecked(x0, bf, sr, torch.Generator().manual_seed(g),
                                              flag=True, compile=True)
        written = sr or nearest_too
        assert (got is x) == written
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert written or torch.equal(x.view(torch.int32), x0.view(torch.int32))
        assert int(bad) > 0 and int(bad) == int(wbad)
    x0 = torch.randn(5, 40, generator=torch.Generator().manual_seed(5))  # padded to 48
    x = x0.clone()
    got = quantize_block_unchecked(x, bf.replace(dims=(-1,)) if len(bf.block) == 1 else bf,
                                   sr, torch.Generator().manual_seed(1), compile=True, into=True)
    assert got is not x and torch.equal(x, x0)
