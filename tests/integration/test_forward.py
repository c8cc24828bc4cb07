"""PACT, SAWB and quantize_forward (notes section 6)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcomp.integration.forward import (
    ALPHA_NAME,
    PACT,
    SAWB_COEFFICIENTS,
    pact_quantize,
    quantize_forward,
    sawb_clip,
    sawb_coefficients,
    sawb_quantize,
)

BITS = [2, 3, 4, 5, 8]


# ------------------------------------------------------------------------------------ PACT


def _grid_index(y, step):
    """Integer grid index of each output, asserting the output is exactly index * step."""
    q = torch.round(y / step)
    assert torch.equal(q * step, y), "an output is not on the grid"
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("signed", [False, True])
def test_pact_outputs_lie_on_k_bit_grid(bits, signed):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=g) * 3
    alpha = torch.tensor(2.5)
    y = pact_quantize(x, alpha, bits, signed)
    levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    q = _grid_index(y, alpha / levels)
    lo = -levels if signed else 0
    assert q.min() >= lo and q.max() <= levels
    assert q.unique().numel() <= levels - lo + 1
    # Nearest grid point: |y - clip(x)| <= step / 2 (+ float slack for y * (levels / alpha)).
    clipped = x.clamp(-2.5 if signed else 0.0, 2.5)
    assert (y - clipped).abs().max() <= 2.5 / levels / 2 * (1 + 1e-5)


def test_pact_hand_values_and_ties_to_even():
    alpha = torch.tensor(3.0)  # 2 bits unsigned: levels 0, 1, 2, 3 (step 1)
    x = torch.tensor([-1.0, 0.0, 0.5, 1.5, 2.5, 2.4, 3.0, 7.0, float("inf"), float("-inf")])
    y = pact_quantize(x, alpha, 2)
    # 0.5 -> 0 and 2.5 -> 2 (half to even), 1.5 -> 2; inf clips to alpha, -inf to 0.
    assert y.tolist() == [0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 0.0]
    ys = pact_quantize(torch.tensor([-7.0, -0.5, 0.5, 1.5, 2.0]), torch.tensor(2.0), 3, True)
    # 3 bits signed: n = 3, step 2/3; -0.5 * 1.5 = -0.75 -> -1; 0.75 -> 1; 2.25 -> 2.
    assert torch.allclose(ys, torch.tensor([-2.0, -2 / 3, 2 / 3, 4 / 3, 2.0]))
    assert torch.isnan(pact_quantize(torch.tensor([float("nan")]), alpha, 4)).all()


def test_pact_alpha_gradient_matches_definition():
    # Hand-made inputs on both sides of alpha, including x == alpha exactly.
    x = torch.tensor([-2.0, 0.0, 0.3, 1.0, 1.99, 2.0, 2.5, 10.0], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    up = torch.tensor([0.7, -1.1, 0.2, 0.4, 1.3, -0.6, 2.0, 0.9])
    (pact_quantize(x, alpha, 4) * up).sum().backward()
    # Definition: d y_q / d alpha = 1 where x >= alpha, else 0.
    expected_alpha = sum(u for u, v in zip(up.tolist(), x.tolist()) if v >= 2.0)
    assert alpha.grad.item() == pytest.approx(expected_alpha, rel=1e-6)
    # STE: d y_q / dx = 1 on [0, alpha), 0 elsewhere.
    inside = [1.0 if 0.0 <= v < 2.0 else 0.0 for v in x.tolist()]
    assert x.grad.tolist() == pytest.approx([u * m for u, m in zip(up.tolist(), inside)])


def test_pact_signed_alpha_gradient_matches_definition():
    x = torch.tensor([-5.0, -2.0, -1.9, 0.0, 1.0, 2.0, 3.0], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    up = torch.tensor([0.5, 0.25, 1.0, 3.0, -1.0, 0.75, 2.0])
    (pact_quantize(x, alpha, 4, signed=True) * up).sum().backward()
    # d clip(x, -a, a) / da = +1 for x >= a, -1 for x <= -a.
    assert alpha.grad.item() == pytest.approx((0.75 + 2.0) - (0.5 + 0.25))
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 3.0, -1.0, 0.0, 0.0]


def test_pact_ste_gradient_inside_is_one_outside_zero():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(10000, generator=g) * 8 - 2).requires_grad_()
    alpha = torch.tensor(4.0, requires_grad=True)
    pact_quantize(x, alpha, 3).sum().backward()
    inside = (x.detach() > 0) & (x.detach() < 4.0)
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[~inside] == 0)
    assert alpha.grad.item() == (x.detach() >= 4.0).sum().item()


def test_pact_gradient_dtype_and_half_input():
    x = torch.linspace(-1, 5, 101, dtype=torch.bfloat16, requires_grad=True)
    alpha = torch.tensor(3.0, requires_grad=True)  # float32 parameter, bfloat16 activations
    y = pact_quantize(x, alpha, 4)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert alpha.grad.dtype == torch.float32
    assert alpha.grad.item() == (x.detach() >= 3.0).sum().item()


@pytest.mark.parametrize("signed", [False, True])
def test_pact_fused_equals_eager(signed):
    # the fused forward (one pass: quantized x and the region code) and backward (x's gradient
    # and the masked gradients that sum to alpha's) give the eager path's bits, NaN and +-inf
    # and values on the clip and grid boundaries included; bfloat16 stays eager
    from gradcomp.numerics import kernels

    g = torch.Generator().manual_seed(7)
    for dtype, shape in ((torch.float32, (8, 16, 9, 9)), (torch.float64, (37,)),
                         (torch.bfloat16, (5, 7))):
        x = (3 * torch.randn(shape, generator=g)).to(dtype)
        x.view(-1)[:6] = torch.tensor([math.nan, math.inf, -math.inf, 2.0, -2.0, 0.0])
        gy = torch.randn(shape, generator=g).to(dtype)
        got = []
        for compile in (False, True):
            kernels.set_compile(compile)
            res = []
            try:
                # twice: the second call of a signature takes the compiled graph directly;
                # then an expanded (stride-0) gradient, as y.sum() gives
                for grad in (gy, gy, None):
                    xx = x.clone().requires_grad_()
                    alpha = torch.tensor(2.0, requires_grad=True)
                    y = pact_quantize(xx, alpha, 4, signed)
                    y.backward(grad) if grad is not None else y.float().sum().backward()
                    res += [t.detach().double().nan_to_num(nan=7.0)
                            for t in (y, xx.grad, alpha.grad)]
            finally:
                kernels.set_compile(None)
            got.append(res)
        for i, (a, b) in enumerate(zip(*got)):
            assert torch.equal(a, b), (dtype, signed, i)


def test_pact_module_regularization_gradient():
    m = PACT(4, alpha_init=3.0)
    m.regularization(0.1).backward()
    assert m.alpha.grad.item() == pytest.approx(0.1 * 3.0)  # weight_decay convention


@pytest.mark.parametrize("bits", [1, 17, 0, -3])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits must be in \\[2, 16\\]"):
        pact_quantize(torch.ones(3), torch.tensor(1.0), bits)
    with pytest.raises(ValueError, match="bits"):
        sawb_quantize(torch.ones(3), bits)
    with pytest.raises(ValueError, match="bits"):
        PACT(bits)
    with pytest.raises(ValueError, match="weight_bits"):
        quantize_forward(nn.Linear(2, 2), weight_bits=bits)
    with pytest.raises(ValueError, match="act_bits"):
        quantize_forward(nn.Linear(2, 2), act_bits=bits)
    with pytest.raises(ValueError, match="first_last_bits"):
        quantize_forward(nn.Linear(2, 2), first_last_bits=bits)
    with pytest.raises(TypeError, match="bits"):
        pact_quantize(torch.ones(3), torch.tensor(1.0), 4.0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha_init_raises(alpha):
    with pytest.raises(ValueError, match="alpha_init"):
        PACT(4, alpha_init=alpha)
    with pytest.raises(ValueError, match="alpha_init"):
        quantize_forward(nn.Linear(2, 2), alpha_init=alpha)


# ------------------------------------------------------------------------------------ SAWB


@pytest.mark.parametrize("bits", BITS)
def test_sawb_clip_equals_formula(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 32, 3, 3, generator=g) * 0.05
    wd = w.double().numpy()
    c1, c2 = SAWB_COEFFICIENTS[bits]
    expected = c1 * np.sqrt(np.mean(wd**2)) + c2 * np.mean(np.abs(wd))
    assert expected > 0
    # float32 moments of 18432 values: relative error ~1e-6, far below 1e-5.
    assert sawb_clip(w, bits).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_sawb_fallback_to_max_when_formula_not_positive(bits):
    # |w| nearly constant: sqrt(E w^2) / E|w| ~ 1 < -c2 / c1 for 4, 5 and 8 bits.
    g = torch.Generator().manual_seed(0)
    w = torch.where(torch.rand(1000, generator=g) < 0.5, -1.0, 1.0) * 0.1
    w[0] = 0.12
    c1, c2 = SAWB_COEFFICIENTS[bits]
    wd = w.double().numpy()
    assert c1 * np.sqrt(np.mean(wd**2)) + c2 * np.mean(np.abs(wd)) <= 0
    assert sawb_clip(w, bits).item() == pytest.approx(0.12)
    # 3 bits: -c2 / c1 < 1 <= sqrt(E w^2) / E|w| (Jensen), so the formula is always used.
    c1, c2 = SAWB_COEFFICIENTS[3]
    expected3 = c1 * np.sqrt(np.mean(wd**2)) + c2 * np.mean(np.abs(wd))
    assert 0 < expected3 < 0.12
    assert sawb_clip(w, 3).item() == pytest.approx(expected3, rel=1e-5)


def test_sawb_coefficients_other_widths():
    c5, c8 = SAWB_COEFFICIENTS[5], SAWB_COEFFICIENTS[8]
    c6 = sawb_coefficients(6)
    assert c6 == pytest.approx((c5[0] + (c8[0] - c5[0]) / 3, c5[1] + (c8[1] - c5[1]) / 3))
    for bits in range(9, 17):
        assert sawb_coefficients(bits) is None
    w = torch.randn(100, generator=torch.Generator().manual_seed(1))
    assert sawb_clip(w, 12) == w.abs().max()


@pytest.mark.parametrize("bits", BITS + [6, 12])
def test_sawb_quantize_grid_and_ste(bits):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(50, 40, generator=g) * 0.1).requires_grad_()
    wq = sawb_quantize(w, bits)
    alpha = sawb_clip(w, bits)
    n = 2 ** (bits - 1) - 1
    q = _grid_index(wq.detach(), alpha / n)
    assert q.abs().max() <= n and q.unique().numel() <= 2 * n + 1
    assert (wq.detach() - w.detach().clamp(-alpha, alpha)).abs().max() <= alpha / n / 2 * (1 + 1e-5)
    up = torch.randn(50, 40, generator=g)
    (wq * up).sum().backward()
    assert torch.equal(w.grad, up)  # identity STE everywhere


def test_sawb_zero_and_nan():
    assert torch.equal(sawb_quantize(torch.zeros(5), 4), torch.zeros(5))
    assert torch.isnan(sawb_quantize(torch.tensor([1.0, float("nan")]), 4)).all()
    assert torch.isnan(sawb_quantize(torch.tensor([1.0, float("inf")]), 4)).all()
    with pytest.raises(ValueError, match="w must have at least one element"):
        sawb_clip(torch.zeros(0), 4)


# -------------------------------------------------------------------------- quantize_forward


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.pool(self.bn(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _cnn():
    torch.manual_seed(0)
    return TinyCNN()


def test_conversion_specs_and_signed_rule():
    m = _cnn()
    h = quantize_forward(m, weight_bits=4, act_bits=3, first_last_bits=8)
    assert set(h.layers) == {"conv1", "conv2", "fc1", "fc2"}
    assert (h.layers["conv1"].weight_bits, h.layers["fc2"].act_bits) == (8, 8)
    assert (h.layers["conv2"].weight_bits, h.layers["conv2"].act_bits) == (4, 3)
    # conv2 follows a registered nn.ReLU -> unsigned; first layer and fc1 (after pooling) signed.
    assert not h.layers["conv2"].signed
    assert h.layers["conv1"].signed and h.layers["fc1"].signed and h.layers["fc2"].signed
    h.remove()
    h = quantize_forward(m, first_last_bits=None, signed={"fc1": False})
    assert set(h.layers) == {"conv2", "fc1"} and not h.layers["fc1"].signed
    h.remove()
    h = quantize_forward(m, layers=["conv2"], first_last_bits=None)
    assert set(h.layers) == {"conv2"}
    h.remove()
    h = quantize_forward(m, layers=lambda n, mod: isinstance(mod, nn.Linear), first_last_bits=None)
    assert set(h.layers) == {"fc1"}
    h.remove()


def test_layer_outputs_use_quantized_weight_and_input():
    m = _cnn()
    h = quantize_forward(m, weight_bits=3, act_bits=3, first_last_bits=None)
    seen = {}
    hook = m.fc1.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0], out=out))
    m(torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)))
    hook.remove()
    # The hook sees the original input; the layer computes with PACT(x) and SAWB(w).
    xq = pact_quantize(seen["inp"], m.fc1.pact_alpha, 3, signed=True)
    ref = nn.functional.linear(xq, sawb_quantize(m.fc1.weight, 3), m.fc1.bias)
    assert torch.equal(seen["out"], ref)
    assert isinstance(m.fc1.weight, nn.Parameter)  # restored after the forward
    assert torch.equal(m.fc1(input=seen["inp"]), ref)  # keyword input is quantized too
    assert torch.equal(copy.deepcopy(m).fc1(seen["inp"]), ref)  # a deep copy stays converted
    h.remove()


def test_round_trip_restores_model_exactly():
    m = _cnn()
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    modules_before = list(m.named_modules())
    state_before = copy.deepcopy(m.state_dict())
    m.eval()
    out_before = m(x)
    h = quantize_forward(m, 4, 4)
    assert {k for k in m.state_dict() if k.endswith(ALPHA_NAME)} == {
        f"{n}.{ALPHA_NAME}" for n in h.layers
    }
    out_q = m(x)
    assert not torch.equal(out_q, out_before)
    out_q.sum().backward()
    assert all(p.grad is not None for p in h.alpha_parameters().values())
    h.remove()
    h.remove()  # no-op
    assert list(m.named_modules()) == modules_before
    assert all(type(a) is type(b) for (_, a), (_, b) in zip(m.named_modules(), modules_before))
    state_after = m.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    assert torch.equal(m(x), out_before)


def test_double_conversion_raises_naming_the_layer():
    m = _cnn()
    h = quantize_forward(m)
    with pytest.raises(ValueError, match="layer 'conv1' is already converted"):
        quantize_forward(m)
    h.remove()
    quantize_forward(m).remove()  # fine again after removal


def test_bad_layers_and_overrides_raise_without_modifying():
    m = _cnn()
    with pytest.raises(ValueError, match="unknown \\['bn'\\]"):
        quantize_forward(m, layers=["conv2", "bn"])
    with pytest.raises(ValueError, match="signed must map"):
        quantize_forward(m, signed={"nope": True})
    with pytest.raises(TypeError, match="model"):
        quantize_forward("model")
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    assert not any(k.endswith(ALPHA_NAME) for k in m.state_dict())


def test_alpha_state_dict_and_regularization():
    m = _cnn()
    h = quantize_forward(m, alpha_init=2.0, alpha_decay=0.5)
    sd = h.state_dict()
    assert set(sd) == set(h.layers) and all(v.item() == 2.0 for v in sd.values())
    # decay/2 * sum alpha^2 = 0.25 * 4 layers * 4.
    assert h.alpha_regularization().item() == pytest.approx(4.0)
    assert h.alpha_regularization(decay=0.0).item() == 0.0
    opt = torch.optim.SGD(m.parameters(), lr=0.1)  # built after conversion: trains the alphas
    h.alpha_regularization().backward()
    opt.step()
    assert m.conv2.pact_alpha.item() == pytest.approx(2.0 - 0.1 * 0.5 * 2.0)
    h.load_state_dict(sd)
    assert m.conv2.pact_alpha.item() == 2.0
    with pytest.raises(KeyError, match="missing \\['conv1'\\]"):
        h.load_state_dict({k: v for k, v in sd.items() if k != "conv1"})
    with pytest.raises(ValueError, match="must be > 0"):
        h.load_state_dict({**sd, "fc1": torch.tensor(-1.0)})
    h.remove()


class _Identity(torch.autograd.Function):
    """A stand-in for compress_gradients: identity forward, records grad_output in backward."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _Identity.seen.append(g)
        return g


def test_composes_with_output_hooks_in_either_order():
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    for hooks_first in (True, False):
        m = _cnn()
        _Identity.seen = []
        hooks, h = [], None
        if not hooks_first:
            h = quantize_forward(m)
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                hooks.append(mod.register_forward_hook(lambda _m, _i, out: _Identity.apply(out)))
        if hooks_first:
            h = quantize_forward(m)
        m(x).sum().backward()
        assert len(_Identity.seen) == 4
        h.remove()
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------- block-format forward


@pytest.fixture
def _eager():
    from gradcomp.numerics import kernels

    kernels.set_compile(False)  # the fused path is tested in tests/numerics; keep these fast
    yield
    kernels.set_compile(None)


class Block3(nn.Module):
    """conv -> conv -> linear -> linear: the middle conv and linear are neither first nor last.
    Channel and feature counts that are not multiples of the blocks (ragged last block)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 20, 3, padding=1)
        self.conv2 = nn.Conv2d(20, 24, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(24 * 16, 40)
        self.fc2 = nn.Linear(40, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _block_model():
    torch.manual_seed(3)
    return Block3()


def _qb(t, fmt, dims):
    """The reference layout, written out: reduction dims last, flattened, quantize_block."""
    from gradcomp.numerics.block import quantize_block

    if dims == "linear":
        return quantize_block(t.reshape(-1, t.shape[-1]), fmt).reshape(t.shape)
    if dims == "conv_weight":
        return quantize_block(t.reshape(t.shape[0], -1), fmt).reshape(t.shape)
    # conv input: the channels of each position (NHWC)
    return quantize_block(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]), fmt).reshape(
        t.shape[0], t.shape[2], t.shape[3], t.shape[1]).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "nvfp4_2d", "mxfp8_e4m3"])
def test_block_forward_equals_gemm_of_quantize_blocked_operands(_eager, fmt):
    m = _block_model()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    h = quantize_forward(m, weight_bits=None, act_bits=None, first_last_bits=None,
                         weight_format=fmt, act_format=fmt)
    assert set(h.layers) == {"conv2", "fc1"} and h.layers["fc1"].weight_format.name == fmt
    assert h.alpha_parameters() == {}  # no PACT clip without INT activations
    seen = {}
    hooks = [getattr(m, n).register_forward_hook(
        lambda mod, inp, out, n=n: seen.update({n: (inp[0], out)})) for n in ("conv2", "fc1")]
    m(x)
    for hk in hooks:
        hk.remove()
    c = m.conv2
    inp, out = seen["conv2"]
    ref = nn.functional.conv2d(_qb(inp, fmt, "conv_input"), _qb(c.weight, fmt, "conv_weight"),
                               c.bias, c.stride, c.padding)
    assert torch.equal(out, ref)
    assert not torch.equal(out, nn.functional.conv2d(inp, c.weight, c.bias, c.stride, c.padding))
    inp, out = seen["fc1"]
    ref = nn.functional.linear(_qb(inp, fmt, "linear"), _qb(m.fc1.weight, fmt, "linear"),
                               m.fc1.bias)
    assert torch.equal(out, ref)
    assert isinstance(m.fc1.weight, nn.Parameter)  # restored after the forward
    h.remove()
    assert "forward" not in m.fc1.__dict__


def test_block_forward_gradient_is_straight_through(_eager):
    m = _block_model()
    h = quantize_forward(m, weight_bits=None, act_bits=None, first_last_bits=None,
                         weight_format="nvfp4", act_format="nvfp4")
    g = torch.Generator().manual_seed(5)
    for name, x, kind in (("fc1", torch.randn(3, 7, 384, generator=g), "linear"),
                          ("conv2", torch.randn(4, 20, 8, 8, generator=g), "conv")):
        layer = getattr(m, name)
        x = x.requires_grad_(True)
        r = torch.randn(layer(x).shape, generator=g)
        layer.zero_grad()
        (layer(x) * r).sum().backward()
        # the same product on the quantized operands as leaves: their gradients must be the
        # ones the full-precision input and weight received (identity through the quantizer)
        xd, wd = x.detach(), layer.weight.detach()
        if kind == "linear":
            xq = _qb(xd, "nvfp4", "linear").requires_grad_(True)
            wq = _qb(wd, "nvfp4", "linear").requires_grad_(True)
            out = nn.functional.linear(xq, wq, layer.bias)
        else:
            xq = _qb(xd, "nvfp4", "conv_input").requires_grad_(True)
            wq = _qb(wd, "nvfp4", "conv_weight").requires_grad_(True)
            out = nn.functional.conv2d(xq, wq, layer.bias, layer.stride, layer.padding)
        (out * r).sum().backward()
        assert torch.equal(x.grad, xq.grad) and torch.equal(layer.weight.grad, wq.grad)
        assert not torch.equal(xq.detach(), xd)  # the quantizer did change the operand
    h.remove()


def test_block_and_int_operands_mix(_eager):
    m = _block_model()
    # NVFP4 weights with PACT 4-bit activations; first/last layer INT8
    h = quantize_forward(m, weight_bits=None, act_bits=4, first_last_bits=8,
                         weight_format="nvfp4")
    spec = h.layers["fc1"]
    assert (spec.weight_bits, spec.act_bits, spec.weight_format.name, spec.act_format) == \
        (None, 4, "nvfp4", None)
    assert h.layers["conv1"].weight_bits == 8 and h.layers["conv1"].weight_format is None
    assert set(h.alpha_parameters()) == {"conv1", "conv2", "fc1", "fc2"}
    seen = {}
    hk = m.fc1.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0], out=out))
    m(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)))
    hk.remove()
    xq = pact_quantize(seen["inp"], m.fc1.pact_alpha, 4, signed=True)
    assert torch.equal(seen["out"], nn.functional.linear(
        xq, _qb(m.fc1.weight, "nvfp4", "linear"), m.fc1.bias))
    h.remove()


def test_block_format_errors_name_the_argument_and_modify_nothing():
    from gradcomp.numerics.block import BlockFormat

    m = _block_model()
    state = copy.deepcopy(m.state_dict())
    kw = dict(weight_bits=None, act_bits=None, first_last_bits=None)
    with pytest.raises(ValueError, match=r"weight_format must be a block format name \(mxfp8"):
        quantize_forward(m, **kw, weight_format="nvfp5")
    with pytest.raises(ValueError, match=r"act_format must be a block format name.*'fp4'"):
        quantize_forward(m, **kw, act_format="fp4")
    with pytest.raises(TypeError, match="act_format must be a block format name or a "
                                        "BlockFormat, got int"):
        quantize_forward(m, **kw, act_format=4)
    with pytest.raises(ValueError, match="weight_bits and weight_format exclude each other"):
        quantize_forward(m, weight_format="nvfp4")
    with pytest.raises(ValueError, match="act_bits and act_format exclude each other"):
        quantize_forward(m, weight_bits=None, act_format="mxfp4")
    odd = BlockFormat.from_name("mxfp4").replace(dims=(0,))
    with pytest.raises(ValueError, match="weight_format: the blocks run along the GEMM's "
                                         "reduction dimension"):
        quantize_forward(m, **kw, weight_format=odd)
    assert all("forward" not in mod.__dict__ for mod in m.modules())
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert list(state) == list(m.state_dict())


def test_block_quantize_ste_layouts_and_errors(_eager):
    from gradcomp.integration.forward import block_quantize_ste
    from gradcomp.numerics.block import quantize_block

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 40, 5, generator=g, requires_grad=True)
    # blocks along dim 1: the same as moving it last by hand
    got = block_quantize_ste(x, "mxfp4", (1,))
    ref = quantize_block(x.detach().transpose(1, 2), "mxfp4").transpose(1, 2)
    assert torch.equal(got, ref) and got.is_contiguous()
    got.backward(torch.arange(600.0).reshape(3, 40, 5))
    assert torch.equal(x.grad, torch.arange(600.0).reshape(3, 40, 5))
    # two reduction dims are flattened into one (a conv weight's C_in*kh*kw)
    w = torch.randn(6, 4, 3, 3, generator=g)
    assert torch.equal(block_quantize_ste(w, "nvfp4", (1, 2, 3)),
                       quantize_block(w.reshape(6, 36), "nvfp4").reshape(w.shape))
    assert torch.equal(block_quantize_ste(torch.tensor(5.0), "nvfp4"),
                       quantize_block(torch.tensor([5.0]), "nvfp4")[0])
    with pytest.raises(ValueError, match="dims must be distinct dimensions of x"):
        block_quantize_ste(w, "nvfp4", (1, 5))
    with pytest.raises(ValueError, match="dims must be distinct dimensions of x"):
        block_quantize_ste(w, "nvfp4", (1, -3))
    with pytest.raises(TypeError, match="dims must be a non-empty tuple of ints"):
        block_quantize_ste(w, "nvfp4", 1)
    with pytest.raises(ValueError, match="fmt must be a block format name"):
        block_quantize_ste(w, "e2m1fn")
    with pytest.raises(TypeError, match="x must be"):
        block_quantize_ste(torch.arange(4), "nvfp4")


# ------------------------------------------------------------------------------ training


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def _train_mlp(quantize: bool, data) -> float:
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    # Every layer W4A4 (first/last too): the demanding setting.
    h = quantize_forward(model, 4, 4, first_last_bits=4, alpha_decay=1e-3) if quantize else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            if h is not None:
                loss = loss + h.alpha_regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


def test_w4a4_digits_accuracy_close_to_full_precision():
    data = _digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention on shared cores
    try:
        fp = _train_mlp(False, data)
        w4a4 = _train_mlp(True, data)
    finally:
        torch.set_num_threads(threads)
    n = len(data[3])  # 397 test digits
    # Accuracies near 0.97 on n = 397 have a binomial sd of sqrt(0.97 * 0.03 / n) ~ 0.0086 each;
    # the difference of two (on the same test set) has sd <= 0.0086 * sqrt(2) ~ 0.012.  Margin:
    # 0.01 expected W4A4 cost + 2.5 sd ~ 0.04.
    margin = 0.01 + 2.5 * math.sqrt(2 * 0.97 * 0.03 / n)
    print(f"digits accuracy: full precision {fp:.4f}, W4A4 {w4a4:.4f}, margin {margin:.4f}")
    assert fp >= 0.95
    assert w4a4 >= fp - margin
