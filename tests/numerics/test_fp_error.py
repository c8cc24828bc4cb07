"""Expected relative error: exact integral vs Monte Carlo, closed form limits, optima."""

from __future__ import annotations

import math

import pytest
import torch

from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.fp_error import (
    empirical_optimal_format,
    empirical_relative_error,
    expected_relative_error,
    monte_carlo_relative_error,
    optimal_format,
    optimal_scale,
    split_formats,
)
from gradcomp.numerics.rounding import quantize_fp

SIGMAS = (1.0, 3.5, 6.0)  # spans sigma 1 to 6


def _mc_powered(fmt, sigma, s, ex, generator, n=20_000, **kw):
    """Monte Carlo with a sample large enough that 2% of ``ex`` is >= 4 standard errors.

    A pilot of n samples estimates the per-sample std; the sample size is then scaled by
    (se / (0.005 ex))^2, capped at 2M (and the cap is asserted not to bind).
    """
    mc, se = monte_carlo_relative_error(fmt, 0.0, sigma, s, n=n, generator=generator, **kw)
    if se > 0.005 * ex:
        n = min(int(n * (se / (0.005 * ex)) ** 2 * 1.3) + 1, 2_000_000)
        mc, se = monte_carlo_relative_error(fmt, 0.0, sigma, s, n=n, generator=generator, **kw)
    assert se <= 0.005 * ex, (fmt.name, sigma, se, ex)
    return mc


def _centre_scale(fmt: FPFormat) -> float:
    # put ln|x| = 0 at the middle of the format's log range (cheap stand-in for the optimum)
    return 1.0 / math.sqrt(fmt.min_subnormal * fmt.max_normal)


@pytest.mark.parametrize("semantics", ["paper", "ieee"])
@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_exact_matches_monte_carlo(bits, semantics):
    g = torch.Generator().manual_seed(bits)
    for fmt in split_formats(bits, semantics):
        s = _centre_scale(fmt)
        for sigma in SIGMAS:
            ex = expected_relative_error(fmt, 0.0, sigma, s)
            mc = _mc_powered(fmt, sigma, s, ex, g)
            assert abs(mc - ex) <= 0.02 * ex, (fmt.name, sigma, mc, ex)


@pytest.mark.parametrize("semantics", ["paper", "ieee"])
def test_exact_matches_monte_carlo_stochastic(semantics):
    g = torch.Generator().manual_seed(11)
    # stochastic rounding of y far below the smallest grid value h gives rare relative errors
    # ~h/y (heavy-tailed, infinite variance): keep the underflow mass small so that the Monte
    # Carlo standard error is meaningful (n2 >= 3, sigma <= 1)
    for fmt in split_formats(6, semantics)[2:]:
        for sigma in (0.5, 1.0):
            s = _centre_scale(fmt)
            ex = expected_relative_error(fmt, 0.0, sigma, s, rounding="stochastic")
            mc = _mc_powered(fmt, sigma, s, ex, g, rounding="stochastic")
            assert abs(mc - ex) <= 0.02 * ex, (fmt.name, sigma, mc, ex)


def test_normal_distribution_matches_monte_carlo():
    g = torch.Generator().manual_seed(5)
    for fmt in split_formats(6, "paper"):
        ex = expected_relative_error(fmt, 0.0, 1.0, 3.0, distribution="normal")
        mc = _mc_powered(fmt, 1.0, 3.0, ex, g, distribution="normal")
        assert abs(mc - ex) <= 0.02 * ex, (fmt.name, mc, ex)


def test_closed_form_limits():
    # Eq. 4's tails are exact; its log-uniform mantissa term is off by ~5% for n1 = 0 only
    for n2, n1 in [(3, 0), (4, 0), (5, 0), (4, 1), (4, 3), (5, 2), (2, 5)]:
        fmt = FPFormat.paper(n2, n1)
        for sigma in (1.0, 3.0, 5.0):
            cf = expected_relative_error(fmt, 0.0, sigma, method="closed_form")
            ex = expected_relative_error(fmt, 0.0, sigma)
            assert abs(cf - ex) <= (0.07 if n1 == 0 else 0.03) * ex, (fmt.name, sigma, cf, ex)
    with pytest.raises(ValueError, match="paper"):
        expected_relative_error(FPFormat.ieee(4, 3), 0.0, 2.0, method="closed_form")


def test_scale_and_mu_are_one_shift():
    fmt = FPFormat.from_name("e4m3fn")
    a = expected_relative_error(fmt, 1.5, 2.0, scale=math.exp(-0.5))
    b = expected_relative_error(fmt, 1.0, 2.0)
    assert a == pytest.approx(b, rel=1e-12)


def test_overflow_inf_is_infinite():
    assert expected_relative_error(FPFormat.from_name("e5m2", overflow="inf"), 0, 2) == math.inf


def test_optimal_scale_is_a_minimum():
    fmt = FPFormat.paper(4, 1)
    for mu, sigma in [(0.0, 3.0), (-7.0, 2.0)]:
        s = optimal_scale(fmt, mu, sigma)
        e = expected_relative_error(fmt, mu, sigma, s)
        for f in (2**-0.5, 2**-0.1, 2**0.1, 2**0.5, math.exp(-mu) / s):
            assert e <= expected_relative_error(fmt, mu, sigma, s * f) + 1e-12


def test_optimal_format_is_argmin_and_table2_cells():
    r = optimal_format(6, 3.0)
    assert r.error == min(row[3] for row in r.table)
    assert len(r.table) == 5 and r.fmt.name == min(r.table, key=lambda t: t[3])[0]
    # cells of the paper's Table 2 that hold for every sigma of both rows (ln convention)
    for sigma in (3.0, 4.5):
        assert optimal_format(4, sigma).fmt.name == "1-3-0"
        assert optimal_format(5, sigma).fmt.name == "1-4-0"
        assert optimal_format(8, sigma).fmt.name == "1-5-2"


def test_normal_assumption_does_not_move_with_sigma():
    a = optimal_format(6, 0.5, distribution="normal")
    b = optimal_format(6, 5.0, distribution="normal")
    assert a.fmt == b.fmt and a.error == pytest.approx(b.error, rel=1e-6)
    assert a.scale * 0.5 == pytest.approx(b.scale * 5.0, rel=1e-4)


def test_empirical_error_and_choice():
    g = torch.Generator().manual_seed(2)
    x = torch.exp(torch.randn(100_000, generator=g, dtype=torch.float64) * 3.0 - 4.0)
    x = x * torch.sign(torch.randn(100_000, generator=g, dtype=torch.float64))
    fmt = FPFormat.paper(4, 3)
    s = optimal_scale(fmt, -4.0, 3.0)
    emp = float(empirical_relative_error(x, fmt, s))
    ex = expected_relative_error(fmt, -4.0, 3.0, s)
    rel = (quantize_fp(x, fmt, scale=s, compile=False) - x).abs() / x.abs()
    se = float(rel.std()) / math.sqrt(x.numel())
    assert abs(emp - ex) <= 4 * se  # 4 standard errors of the sample mean
    res = empirical_optimal_format(x[:10000].float(), 5, steps_per_octave=2)
    best = optimal_format(5, 3.0)
    assert res.fmt == best.fmt
    assert res.error <= 1.05 * best.error
    assert math.isnan(float(empirical_relative_error(torch.zeros(4), fmt)))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_sigma(bad):
    with pytest.raises(ValueError, match="sigma"):
        expected_relative_error("e5m2", 0.0, bad)
    with pytest.raises(ValueError, match="sigma"):
        optimal_format(6, bad)


def test_bad_bits_and_choices():
    with pytest.raises(ValueError, match="bits"):
        optimal_format(2, 1.0)
    with pytest.raises(ValueError, match="method"):
        expected_relative_error("e5m2", 0.0, 1.0, method="approx")
    with pytest.raises(ValueError, match="semantics"):
        optimal_format(6, 1.0, semantics="ocp")
