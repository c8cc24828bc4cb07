"""``prune_quantize``: Eq. 5 then ``quantize_fp`` in one kernel, the same bits as the two calls."""

from __future__ import annotations

import pytest
import torch

from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.pruning import (
    PRUNE_COUNTS,
    PRUNE_QUANTIZE_COUNTS,
    prune_quantize,
    prune_quantize_amax,
    prune_quantize_amax_unchecked,
    prune_unchecked,
    stochastic_prune,
    threshold_step,
    track_written,
)
from gradcomp.numerics.rounding import (
    quantize_fp,
    quantize_fp_amax,
    quantize_fp_amax_unchecked,
    quantize_fp_unchecked,
)
from gradcomp.numerics.scales import amax_scale_or_keep, amax_to_scale


def _grad(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Lognormal magnitudes (sigma 2), exact zeros, NaN and +-inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64).sign() * torch.exp(
        -7 + 2 * torch.randn(n, generator=g, dtype=torch.float64))
    x[::41] = 0.0
    x[3::997] = float("nan")
    x[5::1499] = float("inf")
    x[9::1999] = float("-inf")
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype,
                                                                               torch.int16))


# every variant eagerly; two compiled (each compiled variant costs seconds to build)
CASES = [(False, r, s, d) for r in ("nearest", "stochastic") for s in (False, True)
         for d in (torch.float32, torch.float64, torch.bfloat16)]
CASES += [(True, "nearest", True, torch.float32), (True, "stochastic", False, torch.float32)]


@pytest.mark.parametrize("compile,rounding,scaled,dtype", CASES)
def test_one_pass_equals_prune_then_quantize_bit_for_bit(compile, rounding, scaled, dtype):
    x = _grad(20_009, dtype).reshape(11, 1819)
    thr = 2e-3
    s = torch.tensor(2.0**9) if scaled else None
    g = torch.Generator().manual_seed(5)
    p, pc = stochastic_prune(x, thr, g, compile=compile, counts=True)
    q, qc = quantize_fp(p, "e3m2", rounding, scale=s, generator=g, compile=compile,
                        counts=True)
    h = torch.Generator().manual_seed(5)
    out, c = prune_quantize(x, thr, "e3m2", rounding, s, h, compile=compile, counts=True)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(_bits(out), _bits(q))
    # nonfinite, pruned zeros, +-a symbols (the pruner's), then the quantizer's counts
    assert c.tolist() == pc.tolist() + qc[1:].tolist()
    assert len(PRUNE_QUANTIZE_COUNTS) == len(c)
    assert all(v > 0 for v in c[:3].tolist())  # the data exercises the pruning counts
    # both generators were advanced alike: the next draws agree
    assert torch.equal(torch.randint(0, 99, (3,), generator=g),
                       torch.randint(0, 99, (3,), generator=h))
    plain = prune_quantize(x, thr, "e3m2", rounding, s, torch.Generator().manual_seed(5),
                           compile=compile)
    assert torch.equal(_bits(plain), _bits(out))


def test_counts_subsets_empty_tensor_and_bad_names():
    x = _grad(5000, torch.float32, seed=1)
    _, full = prune_quantize(x, 1e-3, "e2m1", "stochastic", 2.0**10,
                             torch.Generator().manual_seed(0), counts=True)
    want = dict(zip(PRUNE_QUANTIZE_COUNTS, full.tolist()))
    names = ("zeros", "at_threshold", "nonfinite", "pruned_zeros")
    _, sub = prune_quantize(x, 1e-3, "e2m1", "stochastic", 2.0**10,
                            torch.Generator().manual_seed(0), counts=names)
    assert sub.tolist() == [want[n] for n in names]
    e, ce = prune_quantize(torch.empty(0, 3), 1e-3, "e2m1", counts=("zeros",))
    assert e.shape == (0, 3) and ce.tolist() == [0]
    with pytest.raises(ValueError, match="counts entry must be one of"):
        prune_quantize(x, 1e-3, "e2m1", counts=("sparsity",))
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        prune_quantize(x, -1.0, "e2m1")
    with pytest.raises(ValueError, match="rounding must be one of"):
        prune_quantize(x, 1e-3, "e2m1", "up")


def test_unbiased_like_its_parts():
    # E[Q(P(x))] = x for stochastic pruning then stochastic rounding (no saturation): the mean
    # over R independent draws is within 5 standard errors of x for every element
    R = 4000
    x = torch.tensor([3e-4, -7e-4, 1.1e-3, 2.5e-3, -4e-3, 9e-5])
    g = torch.Generator().manual_seed(11)
    draws = torch.stack([prune_quantize(x, 2e-3, "e2m1", "stochastic", 2.0**9, g)
                         for _ in range(R)])
    mean, se = draws.mean(0), draws.std(0) / R**0.5
    assert torch.all((mean - x).abs() <= 5 * se + 1e-12), (mean, x, se)


# ---- the current amax scale found in the same call ----------------------------------------

def _amax_reference(p: torch.Tensor, fmt: str, keep: float):
    """The policy's rule on the pruned values, written out: amax, then s (or keep)."""
    amax = p.detach().abs().max().double() if p.numel() else torch.zeros((), dtype=torch.float64)
    s = amax_scale_or_keep(amax, FPFormat.from_name(fmt).max_normal, 2.0**-1.5,
                           torch.tensor(keep, dtype=torch.float64))
    return s, amax


def _threshold_cases(x: torch.Tensor):
    """(threshold, what it exercises): amax(x) >= a, every |x| < a (survivors: amax(P) = a),
    every |x| < a with no survivor (amax 0: the scale kept), no pruning (a = 0)."""
    finite = x[torch.isfinite(x)]
    top = float(finite.abs().max())
    return [(2e-3, "above"), (4 * top, "all-below"), (1e30, "none-survive"), (0.0, "a=0")]


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_prune_quantize_amax_equals_the_two_calls(compile, rounding):
    x = _grad(20_009, torch.float32, seed=4)
    clean = x.clone()
    clean[~torch.isfinite(clean)] = 0.0
    for data in (clean, x):  # finite, then NaN/inf (amax NaN: the scale is kept)
        for thr, case in _threshold_cases(data):
            g, h = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
            keep = torch.tensor(3.0, dtype=torch.float64)
            p = stochastic_prune(data, thr, g, compile=False)
            s_ref, amax_ref = _amax_reference(p, "e3m2", 3.0)
            q_ref = quantize_fp(p, "e3m2", rounding, scale=s_ref, generator=g, compile=False)
            out, c, s, amax = prune_quantize_amax(data, thr, "e3m2", rounding, margin=-1.5,
                                                  keep=keep, generator=h, compile=compile,
                                                  counts=True)
            assert torch.equal(_bits(out), _bits(q_ref)), case
            assert torch.equal(s, s_ref) and (torch.equal(amax, amax_ref) or bool(
                torch.isnan(amax) & torch.isnan(amax_ref))), (case, s, s_ref, amax, amax_ref)
            if data is x:  # NaN passes the pruning: amax NaN, the scale kept
                assert bool(torch.isnan(amax)) and float(s) == 3.0, case
            elif case == "none-survive":
                assert float(s) == 3.0 and float(amax) == 0.0 and not out.any()
            elif case == "all-below":
                assert float(amax) == float(torch.tensor(thr, dtype=torch.float32))
            _, pc = stochastic_prune(data, thr, torch.Generator().manual_seed(8), compile=False,
                                     counts=True)
            assert c[:3].tolist() == pc.tolist()
            assert torch.equal(torch.randint(0, 99, (3,), generator=g),
                               torch.randint(0, 99, (3,), generator=h))


@pytest.mark.parametrize("compile", [False, True])
def test_quantize_fp_amax_is_quantize_fp_at_the_amax_scale(compile):
    fmt = FPFormat.from_name("e2m1fn")
    for dtype in (torch.float32, torch.bfloat16):
        x = _grad(30_011, dtype, seed=6)
        clean = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        for data, margin in ((clean, 0.0), (clean, 2.0), (x, 0.0), (torch.zeros(7, dtype=dtype),
                                                                      0.0)):
            keep = torch.tensor(5.0, dtype=torch.float64)
            out, c, s, amax = quantize_fp_amax(data, fmt, "stochastic", margin=margin, keep=keep,
                                               generator=torch.Generator().manual_seed(1),
                                               compile=compile, counts=True)
            amax_ref = data.abs().max().double()
            s_ref = amax_to_scale(amax_ref, fmt, margin=margin)
            if not bool(torch.isfinite(amax_ref)) or float(amax_ref) == 0:
                s_ref = keep  # unusable amax: the previous scale
            ref, cr = quantize_fp(data, fmt, "stochastic", scale=s_ref, counts=True,
                                  generator=torch.Generator().manual_seed(1), compile=False)
            assert torch.equal(_bits(out), _bits(ref))
            assert torch.equal(s, s_ref.double()), (dtype, margin, s, s_ref, amax_ref)
            assert c.tolist() == cr.tolist()
            assert torch.equal(amax, amax_ref) or bool(torch.isnan(amax) & torch.isnan(amax_ref))
    e, se, ae = quantize_fp_amax(torch.empty(0), fmt, keep=torch.tensor(2.0))
    assert e.numel() == 0 and float(se) == 2.0 and float(ae) == 0.0
    with pytest.raises(ValueError, match="margin must be a finite number"):
        quantize_fp_amax(torch.ones(3), fmt, margin=float("inf"))


def _into_case(kind, x, g):
    """(in-place hot-path call on x, the public eager call on a copy) for ``kind``."""
    fmt = FPFormat.from_name("e3m2")
    keep = torch.tensor(2.0, dtype=torch.float64)
    thr = torch.tensor(2e-3, dtype=torch.float32)
    s = torch.tensor(512.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(g)
    ref = torch.Generator().manual_seed(g)
    e = x.clone()
    if kind == "quantize":
        return (quantize_fp_unchecked(x, fmt, "stochastic", s, gen, ("nonfinite",), into=True),
                quantize_fp(e, fmt, "stochastic", scale=s, generator=ref, counts=("nonfinite",),
                            compile=False))
    if kind == "amax":
        got = quantize_fp_amax_unchecked(x, fmt, "nearest", 0.0, keep, gen, (), True, into=True)
        return got, quantize_fp_amax(e, fmt, "nearest", keep=keep, flag=True, compile=False)
    if kind == "prune":
        return (prune_unchecked(x, thr, gen, ("nonfinite",), into=True),
                stochastic_prune(e, thr, ref, counts=("nonfinite",), compile=False))
    if kind == "prune_flag":  # the flag: 1.0 where the count is positive
        want, c = stochastic_prune(e, thr, ref, counts=("nonfinite",), compile=False)
        return prune_unchecked(x, thr, gen, into=True, flag=True), (want, (c[0] > 0).double())
    flag = kind == "prune_amax_flag"  # x's non-finite flag from the kernel's amax
    got = prune_quantize_amax_unchecked(x, thr, fmt, "nearest", 0.0, keep, gen, (), into=True,
                                        flag=flag)
    want = prune_quantize_amax(e, thr, fmt, "nearest", keep=keep, generator=ref,
                               compile=False)
    return got, (*want, (~torch.isfinite(e.abs().amax())).double()) if flag else want


@pytest.mark.parametrize("kind", ["quantize", "amax", "prune", "prune_flag", "prune_amax",
                                  "prune_amax_flag"])
def test_the_hot_paths_in_place_write_the_public_functions_bits_into_x(kind):
    # into=True (a compressor that owns x): x itself is the result, bit for bit what the
    # public function returns (eager, the same draws), and so are the counts / scale / amax /
    # flag, which read x before the write (a NaN, an inf, a zero and values that underflow)
    x0 = torch.randn(64, 100, generator=torch.Generator().manual_seed(5)) * 1e-3
    x0[3, 7] = 0.0
    x0[5, :10] = 1e-9
    for g, bad in ((1, False), (2, False), (3, True)):  # later calls take the direct path
        x = x0.clone()
        if bad:
            x[0, 0], x[1, 1] = float("nan"), float("inf")
        got, want = _into_case(kind, x, g)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert got[0] is x and len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a,
                               b.view(torch.int32) if b.dtype == torch.float32 else b) \
                or (a.dtype == torch.float64 and a.isnan().all() and b.isnan().all())


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_the_hot_path_takes_a_float64_scale_as_quantize_fp_rounds_it(rounding):
    # a compressor's scale is float64: the hot path passes it as it is and the kernel rounds
    # it to float32 itself, the same conversion as the public function's (1/3 and 1e3/7 are
    # not float32 numbers: the rounding of the scale shows in the bits)
    fmt = FPFormat.from_name("e3m2")
    x = torch.randn(64, 100, generator=torch.Generator().manual_seed(8)) * 1e-3
    for v in (1.0 / 3.0, 1e3 / 7.0):
        s = torch.tensor(v, dtype=torch.float64)
        for g in (1, 2):  # the second call takes the direct path
            got = quantize_fp_unchecked(x, fmt, rounding, s, torch.Generator().manual_seed(g))
            want = quantize_fp(x, fmt, rounding, scale=s, compile=False,
                               generator=torch.Generator().manual_seed(g))
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_a_count_of_the_result_keeps_the_input_as_it_was():
    # the rounding's in-place write is declined where the kernel counts its own result (the
    # write would split the loop: ``in_place_fuses``): a new tensor, x untouched
    fmt = FPFormat.from_name("e3m2")
    x0 = torch.randn(4096, generator=torch.Generator().manual_seed(6)) * 1e-3
    x = x0.clone()
    s = torch.tensor(512.0, dtype=torch.float64)
    out, c = quantize_fp_unchecked(x, fmt, "stochastic", s, torch.Generator().manual_seed(7),
                                   ("nonfinite", "zeros"), into=True)
    assert out is not x and torch.equal(x, x0)
    want, wc = quantize_fp(x0, fmt, "stochastic", scale=s, counts=("nonfinite", "zeros"),
                           generator=torch.Generator().manual_seed(7), compile=False)
    assert torch.equal(out, want) and torch.equal(c, wc)


@pytest.mark.parametrize("threshold", [2e-3, 0.0, float("inf"), float("nan")])
def test_pruning_in_place_counts_its_result_in_a_pass_of_its_own(threshold):
    # pruning with counts of its result writes x in place, then counts the written x: the
    # counts of the one-pass kernel (non-finite included: Eq. 5 keeps NaN and inf, and maps
    # finite values to finite ones whatever the threshold, NaN and inf included)
    names = PRUNE_COUNTS
    x0 = torch.randn(64, 100, generator=torch.Generator().manual_seed(5)) * 1e-3
    x0[0, 0], x0[1, 1], x0[2, 2], x0[3, 3] = float("nan"), float("inf"), -float("inf"), 0.0
    thr = torch.tensor(threshold, dtype=torch.float64)
    for g in (1, 2):  # the second call takes the direct path
        x = x0.clone()
        out, c = prune_unchecked(x, thr, torch.Generator().manual_seed(g), names, into=True)
        want, wc = stochastic_prune(x0, thr, torch.Generator().manual_seed(g), counts=names,
                                    compile=False)
        assert out is x and torch.equal(x.view(torch.int32), want.view(torch.int32))
        assert c.tolist() == wc.tolist() and int(c[0]) == 3
        for sub in (("zeros",), ("nonfinite", "zeros")):  # the tracking's counts
            y = x0.clone()
            _, cs = prune_unchecked(y, thr, torch.Generator().manual_seed(g), sub, into=True)
            assert cs.tolist() == [wc[names.index(n)].item() for n in sub]


@pytest.mark.parametrize("into", [False, True])
def test_pruning_with_the_non_finite_flag_alone_gives_the_counted_calls_bits(into):
    # ``flag``: the hot path's non-finite check as a 0-d float64 from the pruning's loop (a max
    # of |x|, not a count): > 0 exactly when x holds a NaN or +-inf, the same pruned bits, in
    # place or not, compiled (the 2-D layout, then the direct call) or eager (chunked: the
    # chunks' flags add up, one NaN in each of two chunks)
    thr = torch.tensor(2e-3, dtype=torch.float64)
    x0 = torch.randn(64, 100, generator=torch.Generator().manual_seed(5)) * 1e-3
    big = torch.randn(1 << 21, generator=torch.Generator().manual_seed(6)) * 1e-3
    for x1, compiled in ((x0, True), (x0, False), (big, False)):
        for g, bad in ((1, None), (2, "nan"), (3, "inf"), (4, None)):
            x = x1.clone()
            if bad:
                x.view(-1)[[7, x.numel() - 3]] = float(bad)
            want, wc = stochastic_prune(x.clone(), thr, torch.Generator().manual_seed(g),
                                        counts=("nonfinite",), compile=False)
            out, flag = prune_unchecked(x, thr, torch.Generator().manual_seed(g),
                                        compiled=compiled, into=into, flag=True)
            assert (out is x) == into and out.shape == x1.shape
            assert torch.equal(out.view(torch.int32), want.view(torch.int32))
            assert flag.dtype == torch.float64 and flag.dim() == 0
            assert (flag.item() > 0) == (wc.item() > 0) == (bad is not None)


@pytest.mark.parametrize("bad", [None, "nan", "inf"])
def test_track_written_is_the_count_then_the_step(bad):
    # one call: the zeros of a written pruning result, its non-finite flag and the Newton step
    # from them, compiled (then the direct call) and eager alike, with the bits of the counts
    # pass followed by ``threshold_step``; a NaN/inf holds the threshold
    consts = torch.tensor([6400.0, 0.8, 0.7, 1e-2], dtype=torch.float64)
    slope = torch.tensor(0.05, dtype=torch.float64)
    for g in (1, 2, 3):
        x = torch.randn(6400, generator=torch.Generator().manual_seed(g)) * 1e-3
        if bad:
            x[[5, 77]] = float(bad)
        a = torch.tensor(2e-3 * g / 2, dtype=torch.float64)
        out, c = stochastic_prune(x, a, torch.Generator().manual_seed(g),
                                  counts=("nonfinite", "zeros"), compile=False)
        want = threshold_step(a, c[1], c[0], slope, consts, compile=False)
        for compiled in (True, False):
            new, flag = track_written(out, a, slope, consts, compile=compiled)
            assert torch.equal(new, want) and flag.dtype == torch.float64
            assert (flag.item() > 0) == (bad is not None) and torch.equal(new, a) == bool(bad)


def test_threshold_step_is_the_newton_step_compiled_and_eager_alike():
    # ln a <- ln a + clip(gain * (target - zeros / n) / max(slope, min_slope), -1, 1); held
    # where a <= 0 or the call saw a NaN/inf; the compiled call gives eager's bits
    import math

    gen = torch.Generator().manual_seed(11)
    n, target, gain, min_slope = 1000, 0.8, 0.7, 1e-2
    consts = torch.tensor([n, target, gain, min_slope], dtype=torch.float64)
    for i in range(40):
        a = torch.rand((), generator=gen, dtype=torch.float64) * 3 - (0.5 if i % 7 == 0 else 0)
        z = int(torch.randint(0, n + 1, (), generator=gen))
        slope = torch.rand((), generator=gen, dtype=torch.float64) * (0.02 if i % 3 else 0.5)
        bad = [torch.tensor(0), torch.tensor(2), torch.tensor(False), torch.tensor(True)][i % 4]
        for zeros in (torch.tensor(z), torch.tensor(float(z), dtype=torch.float64)):
            got = [threshold_step(a, zeros, bad, slope, consts, compile=c) for c in (True, False)]
            assert torch.equal(got[0], got[1]) and got[0].dtype == a.dtype
            step = max(-1.0, min(1.0, gain * (target - z / n) / max(float(slope), min_slope)))
            held = float(a) <= 0 or bool(bad)
            want = float(a) if held else float(a) * math.exp(step)
            assert math.isclose(float(got[0]), want, rel_tol=1e-15, abs_tol=0.0)


def _step_as_eager_ops(a, zeros, n, slope, target, gain, min_slope, finite):
    """The tracking step as the compressor computed it before ``threshold_step``: eager ops
    with Python scalars, in that order."""
    achieved = zeros.to(torch.float64) / n
    step = (gain * (target - achieved) / slope.clamp_min(min_slope)).clamp(-1.0, 1.0)
    keep = a <= 0
    if finite is not True:
        keep = keep | ~torch.as_tensor(finite)
    return torch.where(keep, a, a * torch.exp(step).to(a.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_step_gives_the_eager_scalar_ops_bits(dtype):
    # the same operations in the same order as Python-scalar eager ops: every bit equal, a
    # float32 threshold included (its exp factor rounded to float32 before the product)
    gen = torch.Generator().manual_seed(12)
    for i in range(200):
        n = int(torch.randint(1, 10**6, (), generator=gen))
        target, gain = float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen))
        consts = torch.tensor([n, target, gain, 1e-2], dtype=torch.float64)
        a = (torch.rand((), generator=gen, dtype=torch.float64) * 2 - 0.2).to(dtype)
        zeros = torch.randint(0, n + 1, (), generator=gen)
        slope = torch.rand((), generator=gen, dtype=torch.float64) * 0.1
        finite = bool(i % 5)
        want = _step_as_eager_ops(a, zeros, n, slope, target, gain, 1e-2,
                                  torch.tensor(finite))
        for c in (True, False):
            got = threshold_step(a, zeros, torch.tensor(not finite), slope, consts, compile=c)
            assert got.dtype == dtype and torch.equal(got, want), (i, c)
