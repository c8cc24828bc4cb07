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


def test_block_quantizer_blocks_conv_gradients_along_channels_and_counts():
    from gradcomp.compressors.quantizer import BlockQuantizer, QuantizerGroup
    from gradcomp.numerics.block import BlockFormat, quantize_block, quantize_block_metrics

    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.randn(4, 48, 3, 3, generator=g) * 3) * torch.randn(4, 48, 3, 3,
                                                                            generator=g).sign()
    x[0, 0, 0, 0] = 0.0
    q = BlockQuantizer("mxfp4", "stochastic")
    out = q(x, torch.Generator().manual_seed(5))
    ref, m = quantize_block_metrics(x.movedim(1, -1), "mxfp4", "stochastic",
                                    torch.Generator().manual_seed(5))
    assert torch.equal(out, ref.movedim(-1, 1))  # blocks of 32 along the 48 channels
    c = q.counts()
    assert c["elements"] == x.numel()
    assert float(c["underflow"]) == float(m.underflow) > 0  # sigma 3: many flushed to 0
    assert float(c["overflow"]) == float(m.saturated) > 0  # the floor rule saturates maxima
    assert float(c["zeros"]) == float((out == 0).sum())
    met = q.metrics()
    assert met["bits_per_element"] == 4.25 and met["underflow"] == float(m.underflow) / x.numel()
    # 2-D tensors (linear outputs) and dims="format" are blocked as they are
    y = torch.randn(8, 40, generator=g)
    assert torch.equal(BlockQuantizer("nvfp4")(y), quantize_block(y, "nvfp4"))
    assert torch.equal(BlockQuantizer("nvfp4", dims="format")(x), quantize_block(x, "nvfp4"))
    # a group of block quantizers: no per-layer scaling, bits from the format
    grp = QuantizerGroup(2, BlockFormat.from_name("nvfp4"), "nearest", make_scaling=None)
    grp.update([None, None])
    assert grp.bits_per_element == 4.5 and all(isinstance(b, BlockQuantizer)
                                               for b in grp.quantizers)
    state = grp.state_dict()
    grp2 = QuantizerGroup(2, BlockFormat.from_name("nvfp4"), "nearest", make_scaling=None)
    grp2.load_state_dict(state)
    assert grp2.format == grp.format and torch.equal(grp2.quantizers[0](y), grp.quantizers[0](y))
    with pytest.raises(ValueError, match="shared_scaling must be False"):
        QuantizerGroup(1, BlockFormat.from_name("nvfp4"), "nearest", None, shared_scaling=True)
    with pytest.raises(TypeError, match="BlockFormat or a block format name"):
        BlockQuantizer(FPFormat.from_name("e2m1fn"))
