"""``per_layer_empirical``: the scale minimising the error measured on the refresh sample."""

from __future__ import annotations

import math

import pytest
import torch

from gradcomp.compressors.scaling import (
    SCALING_POLICIES,
    PerLayerEmpirical,
    PerLayerOptimal,
    make_scaling,
)
from gradcomp.numerics import kernels as rounding
from gradcomp.numerics.fit import LayerStats, fit_lognormal
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.fp_error import empirical_relative_error, expected_relative_error

FP4 = FPFormat.paper(3, 0)  # 8 binades of range: the optimum of the scale is sharp


@pytest.fixture(autouse=True)
def _eager():
    rounding.set_compile(False)
    yield
    rounding.set_compile(None)


def _lognormal(n, mu=-7.0, sigma=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return sign * torch.exp(mu + sigma * torch.randn(n, generator=g))


def _bimodal(n, seed=0):
    """Two clusters of ln|x| 10 apart (14 binades): far from any single lognormal."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.rand(n, generator=g) < 0.5
    return torch.exp(torch.where(lab, -10.0, 0.0) + 0.3 * torch.randn(n, generator=g))


def test_registered_and_validated():
    assert SCALING_POLICIES["per_layer_empirical"] is PerLayerEmpirical
    assert isinstance(make_scaling("per_layer_empirical"), PerLayerOptimal)
    with pytest.raises(ValueError, match="rounding"):
        make_scaling("per_layer_empirical", rounding="up")
    with pytest.raises(ValueError, match="octaves"):
        PerLayerEmpirical(octaves=17)
    with pytest.raises(ValueError, match="steps_per_octave"):
        PerLayerEmpirical(steps_per_octave=0)


def test_without_sample_is_the_lognormal_optimum():
    x = _lognormal(20_000)
    fit = fit_lognormal(x)
    emp, opt = PerLayerEmpirical(), PerLayerOptimal()
    emp.bind(FP4)
    emp.update(fit)
    opt.bind(FP4)
    opt.update(fit)
    assert torch.equal(emp.scale, opt.scale)
    assert math.isnan(float(emp.error))


def test_lognormal_sample_close_to_the_analytic_optimum():
    x = _lognormal(16_384, seed=1)
    fit = fit_lognormal(x)
    pol = make_scaling("per_layer_empirical")
    pol.bind(FP4)
    pol.update(LayerStats(fit, x))
    opt = PerLayerOptimal()
    opt.bind(FP4)
    opt.update(fit)
    # the grid includes the lognormal optimum (j = 0): in-sample it can only do better
    at_opt = float(empirical_relative_error(x, FP4, opt.scale))
    assert float(pol.error) <= at_opt + 1e-12
    # the same measurement (up to float32 rounding of Q(x s)/s there: rel 1e-6 is generous)
    assert float(pol.error) == pytest.approx(float(empirical_relative_error(x, FP4, pol.scale)),
                                             rel=1e-6)
    # on lognormal data the measured optimum sits near the analytic one (within half an
    # octave: sigma 3 over 8 binades makes the error curve sharp) ...
    assert abs(math.log2(float(pol.scale) / float(opt.scale))) <= 0.5
    # ... and its held-out error matches the exact expected error at the analytic optimum:
    # per-value errors lie in [0, 1], so the held-out mean of n = 65536 values has a standard
    # error <= 0.5/256 = 0.002; 0.01 is 5 of them
    held_out = _lognormal(65_536, seed=2)
    best = expected_relative_error(FP4, float(fit.mu), float(fit.sigma), float(opt.scale))
    assert float(empirical_relative_error(held_out, FP4, pol.scale)) == pytest.approx(best,
                                                                                     abs=0.01)


def test_beats_the_lognormal_scale_on_bimodal_gradients():
    a, b = _bimodal(20_000, seed=3), _bimodal(20_000, seed=4)
    fit = fit_lognormal(a)
    emp, opt = PerLayerEmpirical(), PerLayerOptimal()
    emp.bind(FP4)
    emp.update(LayerStats(fit, a))
    opt.bind(FP4)
    opt.update(fit)
    e_emp = float(empirical_relative_error(b, FP4, emp.scale))
    e_opt = float(empirical_relative_error(b, FP4, opt.scale))
    # the lognormal scale splits the difference and loses most of both clusters (~0.97); the
    # measured one keeps one cluster exact (~0.6); held-out standard errors are <= 0.5/141
    assert e_emp < e_opt - 0.2


def test_ties_go_to_the_lognormal_centre():
    # every value 1.0 is exact at every power-of-two scale: the j = 0, +-4, +-8... candidates
    # tie at error 0, and the first one (the centre itself) wins
    x = torch.ones(1000)
    x[::2] = -1.0
    fit = fit_lognormal(_lognormal(1000))  # any usable fit: it only sets the centre
    pol, opt = PerLayerEmpirical(), PerLayerOptimal()
    opt.bind(FP4)
    opt.update(fit)
    centre = float(opt.scale)
    x = x / centre  # scaled by the centre: exact at s = centre
    pol.bind(FP4)
    pol.update(LayerStats(fit, x))
    assert float(pol.error) == 0.0
    assert float(pol.scale) == pytest.approx(centre, rel=1e-12)


def test_unusable_sample_keeps_the_centre():
    fit = fit_lognormal(_lognormal(1000))
    pol, opt = PerLayerEmpirical(), PerLayerOptimal()
    opt.bind(FP4)
    opt.update(fit)
    pol.bind(FP4)
    pol.update(LayerStats(fit, torch.tensor([0.0, 0.0, float("nan"), float("inf"), 3.0])))
    assert torch.equal(pol.scale, opt.scale)
    assert math.isnan(float(pol.error))


def test_stochastic_rounding_scores_with_a_fixed_seed():
    x = _lognormal(4096, seed=5)
    fit = fit_lognormal(x)
    a, b = PerLayerEmpirical("stochastic"), PerLayerEmpirical("stochastic")
    a.bind(FP4)
    a.update(LayerStats(fit, x))
    b.bind(FP4)
    b.update(LayerStats(fit, x))
    assert torch.equal(a.scale, b.scale) and torch.equal(a.error, b.error)
    # stochastic rounding's expected error exceeds nearest's at the same format
    n = PerLayerEmpirical("nearest")
    n.bind(FP4)
    n.update(LayerStats(fit, x))
    assert float(a.error) > float(n.error)
