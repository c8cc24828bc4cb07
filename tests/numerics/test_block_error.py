"""The block-format error theory against Monte Carlo with quantize_block (within 2%)."""

from __future__ import annotations

import math

import pytest
import torch

from gradcomp.numerics.block import quantize_block
from gradcomp.numerics.block_error import (
    expected_block_error,
    monte_carlo_block_error,
    optimal_block_element,
)

CASES = [
    ("mxfp8_e4m3", 1.0, "nearest"), ("mxfp8_e4m3", 3.0, "nearest"),
    ("mxfp8_e5m2", 3.0, "nearest"), ("mxfp6_e3m2", 2.0, "nearest"),
    ("mxfp6_e2m3", 1.0, "stochastic"), ("mxfp4", 1.0, "nearest"), ("mxfp4", 3.0, "nearest"),
    ("e2m1fn:32:e8m0:rceil", 2.0, "nearest"), ("nvfp4", 1.0, "nearest"),
    ("nvfp4", 2.0, "nearest"), ("fp8_block128", 2.0, "nearest"),
    ("e4m3fn:8:e8m0:floor", 2.5, "nearest"), ("mxfp8_e4m3", 2.0, "stochastic"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, sigma, rounding", CASES)
def test_relative_error_matches_monte_carlo(name, sigma, rounding):
    th = expected_block_error(name, sigma, mu=0.3, rounding=rounding)
    g = torch.Generator().manual_seed(int(sigma * 100) + len(name))
    mc, se = monte_carlo_block_error(name, sigma, mu=0.3, rounding=rounding, blocks=40000,
                                     generator=g)
    assert 4 * se.relative < 0.02 * mc.relative  # the check below can resolve 2%
    assert abs(th.relative / mc.relative - 1) < 0.02


@pytest.mark.parametrize("name, rounding", [("mxfp8_e4m3", "nearest"), ("mxfp4", "stochastic"),
                                            ("fp8_block128", "nearest")])
def test_nmse_matches_monte_carlo(name, rounding):
    # sigma 1: E x^2 = e^(2 sigma^2) is estimable from a sample (for sigma >~ 2 it is not)
    th = expected_block_error(name, 1.0, rounding=rounding)
    mc, se = monte_carlo_block_error(name, 1.0, rounding=rounding, blocks=6000,
                                     generator=torch.Generator().manual_seed(3))
    assert abs(th.nmse - mc.nmse) < max(0.02 * mc.nmse, 4 * se.nmse)


@pytest.mark.slow
def test_structure():
    # stochastic rounding costs more than nearest; a bigger block underflows more
    a = expected_block_error("mxfp8_e4m3", 3.0)
    assert expected_block_error("mxfp8_e4m3", 3.0, rounding="stochastic").relative > a.relative
    assert expected_block_error("e4m3fn:128:e8m0:floor", 3.0).relative > a.relative
    # E5M2's 32 binades cover a sigma-3 block that E4M3's 17 do not
    best, rows = optimal_block_element(8, 4.0, block=32)
    assert best == "e5m2" and len(rows) == 2
    best, _ = optimal_block_element(8, 0.5, block=32)
    assert best == "e4m3fn"


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        expected_block_error("mxfp4", 0.0)
    with pytest.raises(ValueError, match="rounding"):
        expected_block_error("mxfp4", 1.0, rounding="up")
    with pytest.raises(ValueError, match="at least 2"):
        expected_block_error("e4m3fn:1:e8m0:floor", 1.0)
    with pytest.raises(ValueError, match="bits"):
        optimal_block_element(5, 1.0)


@pytest.mark.parametrize("name, sigma, zero_fraction, rounding", [
    ("mxfp8_e4m3", 2.0, 0.5, "nearest"), ("mxfp4", 1.0, 0.3, "stochastic"),
    ("nvfp4", 1.5, 0.6, "nearest"), ("e2m1fn:32:e8m0:rceil", 1.0, 0.9, "nearest"),
])
def test_zero_fraction_matches_monte_carlo(name, sigma, zero_fraction, rounding):
    # iid zeros: a non-zero element shares its block with K - 1 ~ Binomial(n - 1, 1 - z) others
    th = expected_block_error(name, sigma, mu=-0.4, rounding=rounding,
                              zero_fraction=zero_fraction)
    mc, se = monte_carlo_block_error(name, sigma, mu=-0.4, rounding=rounding, blocks=12000,
                                     generator=torch.Generator().manual_seed(7),
                                     zero_fraction=zero_fraction)
    assert abs(th.relative - mc.relative) < 4 * se.relative + 1e-3 * mc.relative


def test_zero_fraction_limits_and_tensor_amax():
    full = expected_block_error("mxfp6_e3m2", 1.5)
    assert expected_block_error("mxfp6_e3m2", 1.5, zero_fraction=1e-9).relative == \
        pytest.approx(full.relative, rel=1e-6)
    # a block of one non-zero: E8M0 floor puts that value in the top binade: error of one
    # rounding there (< half an ulp of 2^emax relative), tiny next to a full block's underflow
    lone = expected_block_error("mxfp6_e3m2", 1.5, zero_fraction=1 - 1e-12)
    assert lone.relative < 2.0**-3 / 2 < full.relative
    # NVFP4: the tensor amax given explicitly sets t = amax / (448 * 6), as quantize_block
    # does, and truncates the lognormal there: at the median maximum of 2^16 values the
    # truncated mass is ln 2 / 2^16, so the relative error barely moves
    from scipy import special

    sigma, numel = 1.5, 1 << 16
    ref = expected_block_error("nvfp4", sigma, tensor_numel=numel)
    amax = math.exp(-sigma * special.ndtri(-math.expm1(math.log(0.5) / numel)))
    same = expected_block_error("nvfp4", sigma, tensor_amax=amax)
    assert same.relative == pytest.approx(ref.relative, rel=1e-3)
    # ... but at sigma 2.5 the untruncated E x^2 lives beyond any seen maximum: its nMSE is
    # the saturation of values the tensor does not hold; truncated, it matches a sample
    sigma = 2.5
    g = torch.Generator().manual_seed(11)
    x = torch.exp(sigma * torch.randn(numel, generator=g, dtype=torch.float64))
    a = float(x.max())
    q = quantize_block(x, "nvfp4", compile=False)
    meas = float(((q - x) ** 2).sum() / (x * x).sum())
    trunc = expected_block_error("nvfp4", sigma, tensor_amax=a).nmse
    assert expected_block_error("nvfp4", sigma, tensor_numel=numel).nmse > 20 * meas
    # the sample nMSE rests on its few largest values (no standard error to speak of at
    # sigma 2.5): within a factor 2, against the untruncated factor of hundreds
    assert 0.5 < trunc / meas < 2
    with pytest.raises(ValueError, match="zero_fraction"):
        expected_block_error("mxfp4", 1.0, zero_fraction=1.0)
    with pytest.raises(ValueError, match="tensor_amax"):
        expected_block_error("nvfp4", 1.0, tensor_amax=float("inf"))
