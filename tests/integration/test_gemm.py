import math

import pytest
import torch
from torch import nn

from gradcomp.integration.forward import quantize_forward
from gradcomp.integration.gemm import (
    BackwardQuantConfig,
    BackwardSpec,
    OperandSpec,
    RHTSpec,
    backward_products,
    quantize_backward,
    quantize_operand,
)
from gradcomp.integration.wrap import CompressionConfig, QuantizeSpec, compress_gradients

LUQ = OperandSpec("luq", 4)
FP4 = OperandSpec("fp", "e2m1fn", "stochastic")
FP8 = OperandSpec("fp", "e4m3fn", "stochastic")
INT4 = OperandSpec("int", 4, "stochastic")
# MXFP4 elements with the round-up (rceil) E8M0 scale: no element can saturate, so SR is unbiased
MXR = OperandSpec("block", "e2m1fn:32:e8m0:rceil", "stochastic")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False)
        self.fc = nn.Linear(8 * 3 * 3, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.fc(x.flatten(1)))
        return self.head(x.unsqueeze(1).expand(-1, 3, -1))  # a 3-d Linear input


def _data(seed=0, n=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 7, 7, generator=g), torch.randn(n, 3, 4, generator=g)


def _grads(model, x, t):
    model.zero_grad()
    xr = x.clone().requires_grad_(True)
    ((model(xr) - t) ** 2).sum().backward()
    return [p.grad.clone() for p in model.parameters()] + [xr.grad.clone()]


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_none_specs_are_bit_exact():
    m = _net()
    x, t = _data()
    ref = _grads(m, x, t)
    with quantize_backward(m, BackwardSpec()) as h:
        assert set(h.layers) == {"conv", "grouped", "fc", "head"}
        got = _grads(m, x, t)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_conv_padding_modes_and_no_bias_bit_exact():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same", bias=False),
                      nn.Conv2d(4, 4, 3, padding="valid", dilation=2),
                      nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"),
                      nn.Flatten(), nn.Linear(2 * 3 * 3, 3, bias=False))
    x = torch.randn(4, 2, 7, 7)
    t = torch.randn(4, 3)
    ref = _grads(m, x, t)
    with quantize_backward(m, BackwardSpec()):
        got = _grads(m, x, t)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_conv_channels_last_and_bfloat16_bit_exact():
    # the conv backward's stand-in for the operand it does not read (the saved input or
    # weight, or an empty contiguous tensor of the gradient's dtype) gives autograd's bits for
    # channels-last activations and weights and for bfloat16 layers
    cl, cont = torch.channels_last, torch.contiguous_format
    for wfmt, xfmt, dtype in ((cl, cl, torch.float32), (cont, cl, torch.float32),
                              (cont, cont, torch.bfloat16)):
        torch.manual_seed(5)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, stride=2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype, memory_format=wfmt)
        x = torch.randn(4, 3, 9, 9).to(dtype, memory_format=xfmt)
        t = torch.randn(4, 3).to(dtype)
        ref = _grads(m, x, t)
        with quantize_backward(m, BackwardSpec()):
            got = _grads(m, x, t)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), (wfmt, xfmt, dtype)


def test_no_grad_forward_is_untouched():
    m = _net()
    x, _ = _data()
    with quantize_backward(m, BackwardSpec.uniform(LUQ)) as h, torch.no_grad():
        y = m(x)
        assert h.state_dict()["calls"]["fc"] == 0
    assert torch.equal(y, m(x).detach())


def test_remove_restores_and_state_dict_unchanged():
    m = _net()
    keys = list(m.state_dict())
    x, t = _data()
    ref = _grads(m, x, t)
    h = quantize_backward(m, BackwardSpec.uniform(LUQ, FP8, FP8))
    assert list(m.state_dict()) == keys
    noisy = _grads(m, x, t)
    assert not torch.equal(noisy[0], ref[0])
    h.remove()
    h.remove()
    assert all(torch.equal(a, b) for a, b in zip(ref, _grads(m, x, t)))
    assert not any(m._forward_hooks for m in m.modules())
    assert not any(m._forward_pre_hooks for m in m.modules())
    quantize_backward(m, BackwardSpec()).remove()  # can be converted again


def test_double_conversion_refused():
    m = _net()
    h = quantize_backward(m, BackwardSpec())
    with pytest.raises(ValueError, match="already converted"):
        quantize_backward(m, BackwardSpec())
    h.remove()


def test_rht_without_quantization_is_exact_up_to_rounding():
    m = _net().double()
    x, t = _data(n=10)  # 10 samples, 30 head rows: both padded to the block
    x, t = x.double(), t.double()
    ref = _grads(m, x, t)
    for signs in ("fixed", "per_step"):
        with quantize_backward(m, BackwardSpec(rht=RHTSpec(16, signs, seed=3))):
            got = _grads(m, x, t)
        for a, b in zip(ref, got):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _mean_se(draws):
    d = torch.stack(draws).double()
    return d.mean(0), d.std(0) / math.sqrt(len(draws))


@pytest.mark.parametrize("kind", ["linear", pytest.param("conv2d", marks=pytest.mark.slow)])
@pytest.mark.parametrize("grad,other,rht", [
    (LUQ, OperandSpec(), None),
    (FP4, FP8, None),
    (INT4, INT4, RHTSpec(16, "per_step")),
    (MXR, MXR, None),
    (MXR, MXR, RHTSpec(16, "fixed")),
])
def test_unbiased_dgrad_wgrad(kind, grad, other, rht):
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        x = torch.randn(24, 12, generator=g)
        w = torch.randn(6, 12, generator=g)
        gout = torch.randn(24, 6, generator=g) * torch.exp(torch.randn(24, 6, generator=g))
        conv = None
    else:
        x = torch.randn(5, 2, 6, 6, generator=g)
        w = torch.randn(3, 2, 3, 3, generator=g)
        gout = torch.randn(5, 3, 4, 4, generator=g) * torch.exp(torch.randn(5, 3, 4, 4,
                                                                            generator=g))
        conv = (1, 0, 1, 1)
    spec = BackwardSpec(grad, other, grad, other, rht)
    exact = backward_products(kind, gout.double(), x.double(), w.double(), BackwardSpec(),
                              conv=conv)
    gen = torch.Generator().manual_seed(2)
    reps = 300 if kind == "linear" else 120  # CPU conv backward is slow (~40 ms per call)
    draws = [backward_products(kind, gout, x, w, spec, gen, conv=conv, call=i)
             for i in range(reps)]
    for j, name in enumerate(("dgrad", "wgrad")):
        mean, se = _mean_se([d[j] for d in draws])
        z = (mean - exact[j]) / se.clamp_min(1e-12)
        # every output element within 5 standard errors; the noise is real (se > 0)
        assert z.abs().max() < 5.5, name
        assert (se > 0).float().mean() > 0.9, name
    # the aggregate z over all elements (sum of errors) as well
    for j in (0, 1):
        tot = torch.stack([(d[j].double() - exact[j]).sum() for d in draws])
        assert abs(float(tot.mean())) < 5 * float(tot.std()) / math.sqrt(reps)


def test_selection_by_name_type_and_first_last():
    m = _net()
    cfg = BackwardQuantConfig(default=BackwardSpec.uniform(LUQ),
                              rules=(("fc", None), (nn.Conv2d, BackwardSpec.uniform(FP4))))
    h = quantize_backward(m, cfg)
    assert set(h.layers) == {"conv", "grouped", "head"}
    assert h.layers["conv"].dgrad_grad == FP4 and h.layers["head"].wgrad_grad == LUQ
    h.remove()
    h = quantize_backward(m, BackwardQuantConfig(default=BackwardSpec(), keep_first_last=True))
    assert set(h.layers) == {"grouped", "fc"}
    h.remove()
    with pytest.raises(ValueError, match="matches no"):
        quantize_backward(m, BackwardQuantConfig(rules=(("nope*", None),)))


def test_per_layer_per_gemm_only_the_chosen_gradient_changes():
    m = _net()
    x, t = _data()
    ref = _grads(m, x, t)
    # wgrad only, and only in fc: fc.weight changes; dgrad (so every earlier layer) exact
    spec = BackwardSpec(wgrad_grad=LUQ, wgrad_input=FP8)
    with quantize_backward(m, BackwardQuantConfig(default=None, rules=(("fc", spec),))):
        got = _grads(m, x, t)
    names = [n for n, _ in m.named_parameters()] + ["input"]
    for n, a, b in zip(names, ref, got):
        assert torch.equal(a, b) == (n != "fc.weight"), n


def test_state_dict_reproduces_the_stream():
    m = _net()
    x, t = _data()
    spec = BackwardSpec.uniform(LUQ, INT4, INT4, RHTSpec(16, "per_step"))
    h = quantize_backward(m, BackwardQuantConfig(default=spec, seed=5))
    _grads(m, x, t)
    state = h.state_dict()
    assert state["calls"]["fc"] == 1
    a = _grads(m, x, t)
    h.load_state_dict(state)
    b = _grads(m, x, t)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = _grads(m, x, t)  # a new step: new rounding, new signs
    assert not torch.equal(a[0], c[0])
    h.remove()


@pytest.mark.parametrize("order", ["forward_first", "backward_first"])
def test_composes_with_quantize_forward(order):
    x, t = _data()
    m = _net()
    f = quantize_forward(m, 4, 4, first_last_bits=8)
    ref = _grads(m, x, t)  # forward quantized, exact backward
    f.remove()
    if order == "forward_first":
        f = quantize_forward(m, 4, 4, first_last_bits=8)
        b = quantize_backward(m, BackwardSpec())
    else:
        b = quantize_backward(m, BackwardSpec())
        f = quantize_forward(m, 4, 4, first_last_bits=8)
    got = _grads(m, x, t)
    assert len(got) == len(ref) and all(torch.equal(u, v) for u, v in zip(ref, got))
    # and a quantized backward on top changes the weight gradients but keeps them finite
    b.remove()
    b = quantize_backward(m, BackwardSpec.uniform(LUQ, FP8, FP8))
    noisy = _grads(m, x, t)
    assert all(torch.isfinite(v).all() for v in noisy)
    assert not torch.equal(noisy[0], ref[0])
    b.remove()
    f.remove()


def test_composes_with_compress_gradients():
    x, t = _data()
    cfg = CompressionConfig(quantize=QuantizeSpec(format="e4m3fn", scaling="static",
                                                  scaling_options={"scale": 1024.0}))

    def run(with_backward):
        m = _net()
        c = compress_gradients(m, cfg, seed=0)
        b = quantize_backward(m, BackwardSpec()) if with_backward else None
        out = []
        for _ in range(3):
            out.append(_grads(m, x, t))
            c.step(None)
        c.remove()
        if b is not None:
            b.remove()
        return out

    plain, both = run(False), run(True)
    for a, b in zip(plain, both):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    # the compressed gradient really reached the layers (differs from uncompressed grads)
    m = _net()
    assert not torch.equal(_grads(m, x, t)[0], plain[-1][0])


def test_operand_spec_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        OperandSpec("blok")
    with pytest.raises(ValueError, match="kind 'block' needs format"):
        OperandSpec("block")
    with pytest.raises(ValueError, match="name must be one of"):
        OperandSpec("block", "e2m1fn")
    with pytest.raises(ValueError, match="scaling must be 'amax'"):
        OperandSpec("block", "nvfp4", scaling="none")
    with pytest.raises(ValueError, match="format.dims must be the default"):
        OperandSpec("block", "e2m1fn:32:e8m0:floor:dims=0")
    assert MXR.unbiased and not OperandSpec("block", "mxfp4").unbiased  # floor can saturate
    assert OperandSpec("block", "nvfp4", "nearest").name == "nvfp4-rn"
    with pytest.raises(ValueError, match="format"):
        OperandSpec("fp")
    with pytest.raises(ValueError, match="stochastic"):
        OperandSpec("luq", 4, "nearest")
    with pytest.raises(ValueError, match="samples"):
        OperandSpec("fp", "e4m3fn", samples=2)
    with pytest.raises(ValueError, match="block"):
        RHTSpec(24)
    with pytest.raises(TypeError):
        quantize_backward(nn.Linear(2, 2), "luq")
    assert OperandSpec("luq", 4, samples=2).name == "luq4x2"
    assert FP4.name == "e2m1fn-sr" and INT4.unbiased and not OperandSpec(
        "fp", "e4m3fn", "nearest").unbiased


class _RowMax:
    """A stand-in block quantizer: divides each row (last dim) by its max |value|."""

    per_tensor = False

    def __init__(self):
        self.seen = []

    def __call__(self, x, generator=None, dims=None):
        self.seen.append((tuple(x.shape), dims))
        return x / x.abs().amax(-1, keepdim=True)


def test_block_quantizers_get_the_reduction_dims_last():
    q = _RowMax()
    x = torch.randn(2, 3, 4, 5)
    y = quantize_operand(q, x, None, (0, 2, 3))
    assert q.seen == [((3, 40), (-1,))]
    # each channel (dim 1) normalised over the reduction dims (0, 2, 3), layout restored
    assert y.shape == x.shape
    assert torch.allclose(y, x / x.abs().amax((0, 2, 3), keepdim=True))
    assert quantize_operand(OperandSpec().build(), x, None, (1,)) is x


def test_block_kind_equals_quantize_block_along_the_reduction_dim():
    from gradcomp.numerics.block import quantize_block

    g = torch.Generator().manual_seed(3)
    gout = torch.randn(40, 24, generator=g) * torch.exp(2 * torch.randn(40, 24, generator=g))
    for rounding in ("nearest", "stochastic"):
        q = OperandSpec("block", "nvfp4", rounding).build()
        assert not q.per_tensor
        # wgrad: G reduces over rows (dim 0): blocks of 16 run down each column
        got = quantize_operand(q, gout, torch.Generator().manual_seed(9), (0,))
        want = quantize_block(gout.t(), "nvfp4", rounding,
                              torch.Generator().manual_seed(9)).t()
        assert torch.equal(got, want), rounding
    # 2-D 16x16 tiles: a conv gradient (N, C, H, W) reduced over C (dgrad) becomes the
    # (N*H*W, C) matrix, tiled over both of its dims
    g4 = torch.randn(2, 20, 5, 5, generator=g)
    q2 = OperandSpec("block", "nvfp4_2d", "nearest").build()
    got = quantize_operand(q2, g4, None, (1,))
    mat = g4.permute(0, 2, 3, 1).reshape(-1, 20)
    want = quantize_block(mat, "nvfp4_2d").reshape(2, 5, 5, 20).permute(0, 3, 1, 2)
    assert torch.equal(got, want)
    # a weight (out, in) reduced over out (dgrad): tiles over (in, out)
    w = torch.randn(24, 40, generator=g)
    assert torch.equal(quantize_operand(q2, w, None, (0,)), quantize_block(w.t(), "nvfp4_2d").t())


def test_backward_config_plain_data_round_trip():
    import json

    from gradcomp.integration.gemm import backward_config_from_dict

    spec = BackwardSpec(MXR, OperandSpec("block", "nvfp4_2d", "nearest"), LUQ, INT4,
                        RHTSpec(32, "per_step", seed=5))
    cfg = BackwardQuantConfig(spec, rules=(("head", None), ("fc", BackwardSpec.uniform(FP4))),
                              keep_last=1, seed=7)
    back = backward_config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="module type"):
        BackwardQuantConfig(rules=((nn.Linear, None),)).to_dict()
    with pytest.raises(ValueError, match=r"backward\.rules\[0\] must be a \[pattern, spec"):
        backward_config_from_dict({"rules": [["fc"]]})
    # keep_last: the last N layers stay in full precision
    assert list(BackwardQuantConfig(spec, keep_last=2).select(_net())) == ["conv", "grouped"]


class _Three(nn.Module):
    """first -> middle (Conv2d or Linear) -> last: the middle layer is the one converted."""

    def __init__(self, conv: bool):
        super().__init__()
        if conv:
            self.first = nn.Conv2d(3, 20, 1)
            self.mid = nn.Conv2d(20, 24, 3, stride=2, padding=1)
        else:
            self.first = nn.Linear(8, 40)
            self.mid = nn.Linear(40, 36)
        self.last = nn.Linear(4, 2)


@pytest.fixture
def _eager():
    from gradcomp.numerics import kernels

    kernels.set_compile(False)  # the fused path is tested in tests/numerics; keep these fast
    yield
    kernels.set_compile(None)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("order", ["forward_first", "backward_first"])
def test_block_forward_composes_with_backward_spec(_eager, conv, order):
    """NVFP4 forward + per-GEMM NVFP4 SR backward on one layer: the input and weight gradients
    are ``backward_products`` of the forward-quantized operands (which the layer multiplied),
    passed unchanged to the full-precision ones (STE)."""
    from gradcomp.numerics.block import quantize_block

    torch.manual_seed(1)
    m = _Three(conv)
    nv = OperandSpec("block", "nvfp4")
    spec = BackwardSpec(nv, OperandSpec("block", "nvfp4_2d", "nearest"), nv,
                        OperandSpec("block", "nvfp4", "nearest"), RHTSpec(16, "fixed", seed=3))
    cfg = BackwardQuantConfig(spec, keep_first_last=True, seed=11)
    fq = dict(weight_bits=None, act_bits=None, first_last_bits=None, weight_format="nvfp4",
              act_format="nvfp4")
    if order == "forward_first":
        f = quantize_forward(m, **fq)
        b = quantize_backward(m, cfg)
    else:
        b = quantize_backward(m, cfg)
        f = quantize_forward(m, **fq)
    assert set(f.layers) == set(b.layers) == {"mid"}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*((5, 20, 6, 6) if conv else (4, 3, 40)), generator=g, requires_grad=True)
    y = m.mid(x)
    gout = torch.randn(y.shape, generator=g)
    y.backward(gout)
    w = m.mid.weight.detach()
    if conv:
        xq = quantize_block(x.detach().permute(0, 2, 3, 1).reshape(-1, 20), "nvfp4").reshape(
            5, 6, 6, 20).permute(0, 3, 1, 2).contiguous()
        wq = quantize_block(w.reshape(24, -1), "nvfp4").reshape(w.shape)
        extra = dict(conv=(m.mid.stride, m.mid.padding, m.mid.dilation, m.mid.groups))
    else:
        xq = quantize_block(x.detach(), "nvfp4")
        wq = quantize_block(w, "nvfp4")
        extra = {}
    dx, dw = backward_products("conv2d" if conv else "linear", gout, xq, wq, spec,
                               torch.Generator().manual_seed(11), **extra)
    assert torch.equal(x.grad, dx) and torch.equal(m.mid.weight.grad, dw)
    # against the full-precision backward: the quantization really happened
    ref_x = x.detach().clone().requires_grad_(True)
    f.remove()
    b.remove()
    m.mid.zero_grad()
    m.mid(ref_x).backward(gout)
    assert not torch.equal(ref_x.grad, dx) and not torch.equal(m.mid.weight.grad, dw)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_one_reduction_dim_is_blocked_in_place(fmt):
    # a block operand reduced over one dimension that is not the last (a conv's channels, a
    # weight's rows) is quantized where it lies: the values and random bits of moving that
    # dimension last (the 2-D permuted path), in x's own layout
    from gradcomp.numerics.block import quantize_block

    q = OperandSpec("block", fmt, "stochastic").build()
    for shape, d in (((4, 64, 5, 3), 1), ((64, 24), 0), ((3, 16, 7), 1)):
        x = torch.randn(shape) * torch.exp(2 * torch.randn(shape))
        got = quantize_operand(q, x, torch.Generator().manual_seed(2), (d,))
        ref = quantize_block(x.movedim(d, -1).contiguous(), fmt, "stochastic",
                             torch.Generator().manual_seed(2)).movedim(-1, d)
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), (shape, d)
        assert got.is_contiguous()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_conv_wgrad_operands_are_blocked_in_place(fmt):
    # a conv wgrad operand reduces over batch and pixels (0, 2, 3): with H * W a multiple of
    # the block every block is a run of the NCHW tensor, quantized where it lies (contiguous,
    # so convolution_backward copies nothing); the values and bits are those of moving the
    # channels first and flattening (the permuted path), for those shapes and the others
    from gradcomp.numerics.block import quantize_block

    q = OperandSpec("block", fmt, "stochastic").build()
    b = q.spec.format.block[0]
    for shape in ((4, 3, 8, 8), (2, 5, 4, 8), (3, 2, 7, 7), (3, 2, 6, 8)):
        x = torch.randn(shape) * torch.exp(2 * torch.randn(shape))
        got = quantize_operand(q, x, torch.Generator().manual_seed(4), (0, 2, 3))
        moved = x.permute(1, 0, 2, 3)
        ref = quantize_block(moved.reshape(shape[1], -1), fmt, "stochastic",
                             torch.Generator().manual_seed(4))
        ref = ref.reshape(moved.shape).permute(1, 0, 2, 3)
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), shape
        # in place (contiguous) where the pixels share runs of >= 16 with the block (48 pixels
        # under 32-element blocks: runs of 16), else moved and back (a permuted view)
        assert got.is_contiguous() == (math.gcd(shape[2] * shape[3], b) >= 16), shape


def test_quantized_weight_keeps_the_input_gradients_layout():
    # a 1x1 weight quantized in 2-D tiles over (C_in, C_out) comes back from the quantizer as a
    # permuted view with channels-last strides; the dgrad gets it in the weight's own layout, so
    # the input gradient has autograd's (contiguous) layout, which the element-wise backward
    # ops after it read at full speed, and the bits the permuted view gives
    torch.manual_seed(6)
    m = nn.Conv2d(16, 32, 1, stride=2, bias=False)
    x = torch.randn(4, 16, 8, 8)
    tiles = OperandSpec("block", "nvfp4_2d", "nearest")

    def input_grad():
        leaf = x.clone().requires_grad_(True)
        h = leaf * 1.0  # not a leaf: its gradient is passed on as the conv returned it
        got = []
        h.register_hook(got.append)
        m(h).square().sum().backward()
        return got[0]

    ref = input_grad()
    assert ref.is_contiguous()
    with quantize_backward(m, BackwardSpec(dgrad_weight=tiles)):
        got = input_grad()
    assert got.stride() == ref.stride()
    wq = quantize_operand(tiles.build(), m.weight.detach(), None, (0, 2, 3))
    assert wq.stride() != m.weight.stride()  # the case this test is about
    g = 2 * nn.functional.conv2d(x, m.weight.detach(), stride=2)
    want = torch.nn.grad.conv2d_input(x.shape, wq, g, stride=2)  # the permuted view, as before
    assert not want.is_contiguous()  # the channels-last gradient the copy avoids
    assert torch.equal(got, want)  # the same bits
