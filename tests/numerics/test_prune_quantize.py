"""``prune_quantize``: Eq. 5 then ``quantize_fp`` in one kernel, the same bits as the two calls."""

from __future__ import annotations

import pytest
import torch

from gradcomp.numerics.pruning import PRUNE_QUANTIZE_COUNTS, prune_quantize, stochastic_prune
from gradcomp.numerics.rounding import quantize_fp


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
