"""Scaling policies: rules, keeping the previous scale on bad statistics, loss scaling."""

from __future__ import annotations

import math

import pytest
import torch

from gradcomp.compressors.scaling import (
    SCALING_POLICIES,
    AmaxDelayed,
    DynamicLossScale,
    make_scaling,
)
from gradcomp.numerics import kernels as rounding
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.fp_error import optimal_scale

FMT = FPFormat.paper(4, 3)


def _sample(mu=-6.0, sigma=2.0, n=50_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))



@pytest.fixture(autouse=True)
def _eager():
    # the fused path's compile is tested in tests/numerics/test_rounding.py; keep these fast
    rounding.set_compile(False)
    yield
    rounding.set_compile(None)


def test_authors_rule():
    x = _sample()
    pol = make_scaling("per_layer")
    fit = fit_lognormal(x)
    pol.bind(FMT)
    pol.update(fit)
    expected = 2.0 ** (-float(torch.log2(x).mean()) - 3)
    assert float(pol.scale) == pytest.approx(expected, rel=1e-9)
    # no usable statistics (all zeros): keep the previous scale
    pol.bind(FMT)
    pol.update(fit_lognormal(torch.zeros(10)))
    assert float(pol.scale) == pytest.approx(expected, rel=1e-9)


def test_per_layer_optimal_matches_optimal_scale():
    x = _sample(mu=-9.0, sigma=2.6)
    fit = fit_lognormal(x)
    pol = make_scaling("per_layer_optimal")
    pol.bind(FMT)
    pol.update(fit)
    direct = optimal_scale(FMT, float(fit.mu), float(fit.sigma))
    # interpolation of the tabulated optimal centre (sigma step 0.25): within 2% in scale
    assert float(pol.scale) == pytest.approx(direct, rel=0.02)
    before = pol.scale.clone()
    pol.bind(FMT)
    pol.update(fit_lognormal(torch.tensor([0.0, float("nan")])))
    assert torch.equal(pol.scale, before)


def test_amax_current_and_bad_amax():
    pol = make_scaling("amax")
    pol.bind(FMT)
    pol.observe(amax=torch.tensor(8.0))
    assert float(pol.scale) == FMT.max_normal / 8.0
    for bad in (0.0, float("inf"), float("nan")):
        pol.observe(amax=torch.tensor(bad))
        assert float(pol.scale) == FMT.max_normal / 8.0


def test_amax_delayed_history():
    pol = AmaxDelayed(history=3)
    pol.bind(FMT)
    assert float(pol.scale) == 1.0
    for a, expect in [(2.0, 2.0), (8.0, 8.0), (1.0, 8.0), (1.0, 8.0), (1.0, 1.0)]:
        pol.observe(amax=torch.tensor(a))
        assert float(pol.scale) == FMT.max_normal / expect
    pol.observe(amax=torch.tensor(float("nan")))  # not recorded: previous scale kept
    assert float(pol.scale) == FMT.max_normal / 1.0
    state = pol.state_dict()
    other = AmaxDelayed(history=3)
    other.bind(FMT)
    other.load_state_dict(state)
    other.observe(amax=torch.tensor(4.0))
    pol.observe(amax=torch.tensor(4.0))
    assert torch.equal(other.scale, pol.scale)


def test_static_and_none():
    assert float(make_scaling("static", scale=2.0**13).scale) == 2.0**13
    assert float(make_scaling("none").scale) == 1.0
    with pytest.raises(ValueError, match="scale"):
        make_scaling("static", scale=0.0)


def test_dynamic_loss_scale():
    pol = DynamicLossScale(init_scale=2.0**10, interval=3)
    for _ in range(3):
        pol.observe(overflow=torch.tensor(False))
        assert not bool(pol.step())
    assert float(pol.scale) == 2.0**11  # grew after 3 clean steps
    pol.observe(overflow=torch.tensor(False))
    pol.observe(overflow=torch.tensor(True))  # any layer overflowing skips the step
    assert bool(pol.step())
    assert float(pol.scale) == 2.0**10
    assert not bool(pol.step())  # the flag was reset
    state = pol.state_dict()
    other = DynamicLossScale(interval=3)
    other.load_state_dict(state)
    assert float(other.scale) == 2.0**10
    assert other.state_dict()["clean"] == pol.state_dict()["clean"]


def test_registry_lists_names():
    with pytest.raises(ValueError) as exc:
        make_scaling("global")
    for name in SCALING_POLICIES:
        assert repr(name) in str(exc.value)
    assert math.isfinite(float(make_scaling("dynamic").scale))
