import math

import torch

from gradcomp import FPFormat
from gradcomp.numerics.scales import amax_scale_or_keep, amax_to_scale, mean_log2_to_scale

E4M3 = FPFormat.from_name("e4m3fn")


def test_amax_scale_puts_amax_at_max_normal():
    amax = torch.tensor([0.5, 3.0, 1e-20], dtype=torch.float64)
    s = amax_to_scale(amax, E4M3)
    torch.testing.assert_close(amax * s, torch.full_like(amax, E4M3.max_normal))


def test_amax_scale_power_of_two_never_overflows():
    amax = torch.logspace(-30, 30, 997, dtype=torch.float64)
    s = amax_to_scale(amax, E4M3, power_of_two=True)
    e = torch.log2(s)
    assert torch.equal(e, torch.round(e))  # exact powers of two
    assert bool((amax * s <= E4M3.max_normal).all())
    assert bool((amax * s * 2 > E4M3.max_normal).all())  # the largest such power


def test_unusable_statistics_give_the_fallback():
    bad = torch.tensor([0.0, math.inf, math.nan, -1.0], dtype=torch.float64)
    assert torch.equal(amax_to_scale(bad, E4M3), torch.ones(4, dtype=torch.float64))
    assert torch.equal(amax_to_scale(bad, E4M3, fallback=7.0), torch.full((4,), 7.0,
                                                                        dtype=torch.float64))
    m = torch.tensor([math.nan, math.inf, -2.5])
    s = mean_log2_to_scale(m, power_of_two=True)
    assert s.tolist() == [1.0, 1.0, 2.0 ** math.floor(2.5 - 3)]


def test_authors_rule():
    m = torch.tensor([-10.0, 4.25], dtype=torch.float64)
    torch.testing.assert_close(mean_log2_to_scale(m), torch.exp2(-m - 3))


def test_amax_scale_or_keep_is_amax_to_scale_or_the_previous_scale():
    # the policies' rule, whether max_normal comes as a Python float (the policy) or as a
    # float64 tensor (inside the fused amax-quantize kernels): the same bits as amax_to_scale
    fmt = FPFormat.from_name("e4m3fn")
    g = torch.Generator().manual_seed(0)
    amax = torch.exp(20 * torch.randn(2000, generator=g, dtype=torch.float64))
    amax = torch.cat([amax, torch.tensor([0.0, float("inf"), float("nan"), 1e-320])])
    keep = torch.tensor(7.0, dtype=torch.float64)
    for margin in (0.0, 1.0, -2.5):
        ref = amax_to_scale(amax, fmt, margin=margin)
        usable = torch.isfinite(amax) & (amax > 0) & torch.isfinite(ref)
        ref = torch.where(usable, ref, keep)
        for maxn, factor in ((fmt.max_normal, 2.0**margin),
                             (torch.tensor(fmt.max_normal, dtype=torch.float64),
                              torch.tensor(2.0**margin, dtype=torch.float64))):
            got = amax_scale_or_keep(amax, maxn, factor, keep)
            assert torch.equal(got, ref)
    assert float(amax_scale_or_keep(torch.tensor(1e-320, dtype=torch.float64), 448.0, 1.0,
                                    keep)) == 7.0  # s = inf: kept
