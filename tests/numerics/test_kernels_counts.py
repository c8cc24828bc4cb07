"""Counts from the kernels' own pass (``counts=True``)."""

from __future__ import annotations

import pytest
import torch

from gradcomp.numerics import kernels
from gradcomp.numerics.pruning import stochastic_prune
from gradcomp.numerics.rounding import COUNTS, quantize_fp


def _awkward(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Lognormal-ish magnitudes over many octaves, exact zeros, NaN and +-inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(
        3 * torch.randn(n, generator=g, dtype=torch.float64))
    x[::37] = 0.0
    x[5::101] = float("nan")
    x[7::211] = float("inf")
    x[11::307] = float("-inf")
    return x.to(dtype)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_prune_counts_are_the_separate_reductions(compile, dtype):
    x = _awkward(5003, dtype)
    thr = 0.7
    plain = stochastic_prune(x, thr, torch.Generator().manual_seed(1), compile=compile)
    out, c = stochastic_prune(x, thr, torch.Generator().manual_seed(1), compile=compile,
                              counts=True)
    assert torch.equal(out.view(-1).view(torch.uint8), plain.view(-1).view(torch.uint8))
    a = torch.tensor(thr, dtype=torch.float64).to(dtype)
    want = [(~torch.isfinite(x)).sum(), (out == 0).sum(), (out.abs() == a).sum()]
    assert c.dtype == torch.int64 and c.tolist() == [int(w) for w in want]
    assert c[0] > 0 and c[1] > 0 and c[2] > 0  # the test data exercises every count


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_quantize_counts_are_the_separate_reductions(compile, rounding, dtype):
    x = _awkward(4099, dtype, seed=2)
    s = torch.tensor(2.0**-3, dtype=torch.float64)

    def gen():
        return torch.Generator().manual_seed(5)

    plain = quantize_fp(x, "1-4-1", rounding, scale=s, generator=gen(), compile=compile)
    q, c = quantize_fp(x, "1-4-1", rounding, scale=s, generator=gen(), compile=compile,
                       counts=True)
    assert torch.equal(q.view(-1).view(torch.uint8), plain.view(-1).view(torch.uint8))
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    y = x.to(cdt) * s.to(cdt)
    fin, zero = torch.isfinite(x), q == 0
    from gradcomp.numerics.formats import FPFormat
    want = {"nonfinite": (~fin).sum(), "overflow": (y.abs() > FPFormat.from_name("1-4-1")
                                                    .max_normal).sum(),
            "underflow": (zero & (x != 0) & fin).sum(), "nan": torch.isnan(x).sum(),
            "zeros": zero.sum()}
    assert c.dtype == torch.int64 and c.tolist() == [int(want[k]) for k in COUNTS]
    assert all(v > 0 for v in c.tolist())  # every count exercised


def test_eager_chunks_add_their_counts(monkeypatch):
    x = _awkward(10_007, torch.float32, seed=4)
    s = torch.tensor(4.0, dtype=torch.float64)

    def run():
        g = torch.Generator().manual_seed(9)
        return (quantize_fp(x, "e4m3", "stochastic", scale=s, generator=g, compile=False,
                            counts=True),
                stochastic_prune(x, 0.5, g, compile=False, counts=True))

    whole = run()
    monkeypatch.setattr(kernels, "EAGER_CHUNK", 1000)
    chunked = run()
    for (o1, c1), (o2, c2) in zip(whole, chunked):
        assert torch.equal(o1.view(torch.int32), o2.view(torch.int32))
        assert c1.tolist() == c2.tolist()


def test_empty_tensors_give_zero_counts():
    x = torch.empty(0)
    q, c = quantize_fp(x, "e5m2", counts=True)
    assert q.numel() == 0 and c.tolist() == [0] * len(COUNTS)
    p, c = stochastic_prune(x, 0.5, torch.Generator().manual_seed(0), counts=True)
    assert p.numel() == 0 and c.tolist() == [0, 0, 0]


@pytest.mark.parametrize("compile", [False, True])
def test_a_subset_of_counts_is_those_counts_in_the_order_asked(compile):
    x = _awkward(3001, torch.float32, seed=4)
    _, full = quantize_fp(x, "e3m2", scale=4.0, compile=compile, counts=True)
    want = dict(zip(COUNTS, full.tolist()))
    for names in [("nonfinite",), ("zeros", "nonfinite"), ("nan", "overflow", "underflow")]:
        out, c = quantize_fp(x, "e3m2", scale=4.0, compile=compile, counts=names)
        assert c.tolist() == [want[n] for n in names]
    g = torch.Generator().manual_seed(0)
    _, pfull = stochastic_prune(x, 0.3, g, compile=compile, counts=True)
    _, sub = stochastic_prune(x, 0.3, torch.Generator().manual_seed(0), compile=compile,
                              counts=("at_threshold", "nonfinite"))
    assert sub.tolist() == [pfull[2].item(), pfull[0].item()]


def test_counts_names_outside_the_list_are_refused():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="counts entry must be one of"):
        quantize_fp(x, "e4m3", counts=("zeros", "at_threshold"))
    with pytest.raises(ValueError, match="counts entry must be one of"):
        stochastic_prune(x, 0.5, counts=("overflow",))
    with pytest.raises(TypeError, match="counts must be True, False or a sequence"):
        quantize_fp(x, "e4m3", counts="zeros")
    with pytest.raises(ValueError, match="counts must name at least one"):
        quantize_fp(x, "e4m3", counts=())


def test_counts_sum_in_int32_below_2_31_elements_and_in_int64_above(monkeypatch):
    from gradcomp.numerics import rounding
    from gradcomp.numerics.rounding import stack_counts
    small = torch.tensor([True, False, True])
    c = stack_counts([small, ~small])
    assert c.dtype == torch.int64 and c.tolist() == [2, 1]
    assert rounding.INT32_COUNT_LIMIT == kernels.INT32_LIMIT == 2**31
    # a mask at the limit sums in int64 (here the limit lowered to 3: an int32 sum of 2^31
    # elements would wrap to -2^31, and summing that many takes too long for a test)
    sums = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda t, *a, **k: sums.append(k["dtype"])
                        or real_sum(t, *a, **k))
    monkeypatch.setattr(rounding, "INT32_COUNT_LIMIT", 3)
    assert stack_counts([small, small[:2]]).tolist() == [2, 1]
    assert sums == [torch.int64, torch.int32]
    # the compiled kernels' direct calls are told apart by the same size test (a graph built
    # for smaller tensors must not take such a tensor without dynamo's guard)
    huge = torch.ones((), dtype=torch.bool).expand(1 << 31)  # stride 0: no memory
    sig = kernels._signature
    assert sig((small,)) != sig((huge,)) and sig((small,)) == sig((~small,))
