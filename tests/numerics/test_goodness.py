import math

import pytest
import torch

from gradcomp.numerics.goodness import DISTRIBUTIONS, ks_table


def _ranked(t):
    res = ks_table(t, sample_size=20_000, seed=0)
    return sorted(res, key=lambda r: r.statistic)


def test_lognormal_data_ranks_lognormal_first():
    g = torch.Generator().manual_seed(0)
    x = (1.5 + 2.0 * torch.randn(50_000, generator=g)).exp() * torch.sign(torch.randn(50_000))
    ranked = _ranked(x)
    assert ranked[0].distribution == "lognormal"
    # with n = 20000 the KS D of the true family is ~ 1/sqrt(n) = 0.007 (estimated parameters)
    assert ranked[0].statistic < 3 / math.sqrt(20_000)
    normal = next(r for r in ranked if r.distribution == "normal")
    assert normal.statistic > 0.3


def test_normal_data_ranks_normal_first():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * 0.01
    assert _ranked(x)[0].distribution == "normal"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype(dtype):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2)).exp().to(dtype)
    res = ks_table(x, ["lognormal", "normal"])
    assert [r.distribution for r in res] == ["lognormal", "normal"]
    assert res[0].statistic < res[1].statistic


def test_degenerate_inputs_report_nan_not_raise():
    for x in (torch.zeros(100), torch.tensor([]), torch.tensor([1.0, float("nan")])):
        res = ks_table(x)
        assert len(res) == len(DISTRIBUTIONS)
        assert all(math.isnan(r.statistic) for r in res)


def test_bad_input():
    with pytest.raises(ValueError, match="distribution must be one of"):
        ks_table(torch.ones(10), ["gamma"])
    with pytest.raises(TypeError):
        ks_table(torch.ones(10, dtype=torch.int32))
