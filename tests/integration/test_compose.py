"""Forward quantization (PACT/SAWB) composed with compressed neural gradients."""

import torch
from torch import nn

from gradcomp.integration.forward import quantize_forward
from gradcomp.integration.wrap import CompressionConfig, QuantizeSpec, compress_gradients


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _grads(order):
    x, w = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.ones(16, 3)
    m = _model()
    cfg = CompressionConfig(quantize=QuantizeSpec(format="e2m1fn", scaling="none"), names=("2",))
    if order == "forward_only":
        fq, h = quantize_forward(m, 4, 4, first_last_bits=None), None
    elif order == "forward_first":
        fq = quantize_forward(m, 4, 4, first_last_bits=None)
        h = compress_gradients(m, cfg)
    else:
        h = compress_gradients(m, cfg)
        fq = quantize_forward(m, 4, 4, first_last_bits=None)
    for _ in range(2):  # the first step only gathers statistics
        m.zero_grad()
        (m(x) * w).sum().backward()
        if h is not None:
            h.step()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    if h is not None:
        h.remove()
    fq.remove()
    return m, grads


def test_order_does_not_matter_and_gradients_are_compressed():
    m1, g1 = _grads("forward_first")
    m2, g2 = _grads("gradients_first")
    _, g0 = _grads("forward_only")
    assert g1.keys() == g2.keys()
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    # layer 2's output gradient is quantized to FP4: layers 0 and 2 see a different gradient,
    # layer 4 (downstream of the compressed point) sees the same one
    assert not torch.equal(g1["2.weight"], g0["2.weight"])
    assert not torch.equal(g1["0.weight"], g0["0.weight"])
    assert torch.equal(g1["4.weight"], g0["4.weight"])


def test_remove_restores_the_model():
    ref = _model()
    m, _ = _grads("forward_first")
    assert m.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 6)
    assert torch.equal(m(x), ref(x))
