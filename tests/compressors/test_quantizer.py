"""FPQuantizer: Q(g*s)/s with the policy's scale, metrics, state."""

from __future__ import annotations

import pytest
import torch

from gradcomp.compressors.quantizer import FPQuantizer
from gradcomp.compressors.scaling import DynamicLossScale, make_scaling
from gradcomp.numerics import kernels as rounding
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import quantize_fp


@pytest.fixture(autouse=True)
def _eager():
    # the fused path's compile is tested in tests/numerics/test_rounding.py; keep these fast
    rounding.set_compile(False)
    yield
    rounding.set_compile(None)


def test_applies_policy_scale():
    g = torch.exp(torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 2 - 10)
    q = FPQuantizer("1-4-3", scaling="per_layer")
    q.update(fit_lognormal(g))
    s = q.scaling.scale
    out = q(g)
    assert torch.equal(out, quantize_fp(g, "1-4-3", scale=s, compile=False))
    m = q.metrics()
    assert m["scale"] == pytest.approx(float(s))


def test_metrics_counts():
    fmt = FPFormat.from_name("e4m3fn")
    x = torch.tensor([1000.0, -500.0, 1.0, 1e-6, 0.0, float("nan"), float("inf"), 2.0])
    q = FPQuantizer(fmt)
    out = q(x)
    m = q.metrics()
    assert m["overflow"] == pytest.approx(3 / 8)  # 1000, -500 and inf exceed 448
    assert m["underflow"] == pytest.approx(1 / 8)  # 1e-6 flushed to 0
    assert m["nan"] == pytest.approx(1 / 8)
    assert torch.isnan(out[5]) and out[0] == 448
    assert isinstance(q.metrics(sync=False)["overflow"], torch.Tensor)


def test_amax_policy_in_quantizer():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-3
    q = FPQuantizer("e5m2", scaling="amax")
    out = q(x)
    s = FPFormat.from_name("e5m2").max_normal / x.abs().max().double()
    assert float(q.scaling.scale) == pytest.approx(float(s))
    assert out.abs().max() <= x.abs().max() * 1.0001
    assert q.metrics()["overflow"] == 0


def test_shared_dynamic_loss_scale_reports_overflow():
    pol = DynamicLossScale(init_scale=2.0**16, interval=2)
    a, b = FPQuantizer("e4m3fn", scaling=pol), FPQuantizer("e4m3fn", scaling=pol)
    a(torch.ones(4) * 1e-6)
    b(torch.ones(4))  # 2^16 > 448: overflow
    assert bool(pol.step()) and float(pol.scale) == 2.0**15


def test_stochastic_generator_and_state():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    q = FPQuantizer("e2m1fn", rounding="stochastic", scaling=make_scaling("static", scale=4.0))
    a = q(x, generator=torch.Generator().manual_seed(0))
    b = q(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    st = q.state_dict()
    q2 = FPQuantizer("e2m1fn", rounding="stochastic", scaling=make_scaling("static", scale=1.0))
    q2.load_state_dict(st)
    assert float(q2.scaling.scale) == 4.0
    with pytest.raises(ValueError, match="format"):
        FPQuantizer("e5m2").load_state_dict(st)


def test_bad_input():
    with pytest.raises(ValueError, match="rounding"):
        FPQuantizer("e5m2", rounding="floor")
    with pytest.raises(ValueError, match="scaling"):
        FPQuantizer("e5m2", scaling="bogus")
    with pytest.raises(TypeError):
        FPQuantizer("e5m2")(torch.ones(3, dtype=torch.int64))
