import math

import torch

from gradcomp import FPFormat
from gradcomp.numerics.scales import amax_to_scale, mean_log2_to_scale

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
