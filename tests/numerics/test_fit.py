import math

import pytest
import torch

from gradcomp.numerics.fit import fit_lognormal


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (-9.0, 2.5), (3.0, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_recovers_parameters(mu, sigma, dtype):
    n = 200_000
    g = torch.Generator().manual_seed(1)
    ln = mu + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    x = (sign * ln.exp()).to(dtype)
    f = fit_lognormal(x)
    # standard errors: se(mu) = sigma/sqrt(n), se(sigma) = sigma/sqrt(2n); 5 se is a ~1e-6 miss rate
    assert abs(float(f.mu) - mu) < 5 * sigma / math.sqrt(n) + 1e-6 * abs(mu)
    assert abs(float(f.sigma) - sigma) < 5 * sigma / math.sqrt(2 * n)
    assert int(f.count) == n and float(f.zero_fraction) == 0.0


def test_zeros_and_nonfinite_are_counted_not_fitted():
    x = torch.tensor([0.0, 0.0, math.e, math.e**3, float("nan"), float("inf"), -float("inf")])
    f = fit_lognormal(x)
    assert int(f.count) == 2 and int(f.nonfinite) == 3 and int(f.numel) == 7
    assert float(f.mu) == pytest.approx(2.0) and float(f.sigma) == pytest.approx(1.0)
    assert float(f.zero_fraction) == pytest.approx(2 / 4)  # zeros among the finite values
    assert float(f.amax) == pytest.approx(math.e**3)


@pytest.mark.parametrize(
    "x", [torch.tensor([]), torch.zeros(10), torch.full((4,), float("nan"))], ids=str
)
def test_nothing_to_fit_is_reported(x):
    f = fit_lognormal(x)
    assert int(f.count) == 0 and not bool(f.ok)
    assert math.isnan(float(f.mu))  # NaN, flagged by count == 0 (documented), never raises


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(dtype):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).exp().to(dtype)
    f = fit_lognormal(x)
    assert abs(float(f.mu)) < 0.2 and abs(float(f.sigma) - 1) < 0.1


def test_rowwise_fit_matches_separate_fits():
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)).exp()
    x[1, :100] = 0
    f = fit_lognormal(x, dim=1)
    for i in range(3):
        fi = fit_lognormal(x[i])
        assert torch.allclose(f.mu[i], fi.mu) and torch.allclose(f.sigma[i], fi.sigma)
        assert f.zero_fraction[i] == fi.zero_fraction


def test_integer_tensor_raises():
    with pytest.raises(TypeError, match="floating"):
        fit_lognormal(torch.arange(5))
