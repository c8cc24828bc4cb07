"""Models: shapes on 8x8/28x28/32x32, parameter counts, backward, determinism, bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcomp.apps.models import build_model, list_models

# Small widths keep the shape sweep fast on 2 shared cores; the default widths are covered by the
# parameter-count tests below.
SMALL = {"mlp": 16, "cnn": 4, "resnet8": 4, "resnet14": 4, "resnet20": 4, "resnet32": 2,
         "resnet18": 4, "vgg": 4}  # fmt: skip


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry():
    # The sequence models (token-id input) are tested in test_transformer.py.
    assert set(SMALL) | {"gpt", "gpt-tiny", "bert", "bert-tiny"} == set(list_models())
    for required in ("mlp", "cnn", "resnet8", "resnet14", "resnet20", "resnet18", "vgg"):
        assert required in list_models()


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("size, channels, classes", [(8, 1, 10), (28, 1, 7), (32, 3, 100)])
def test_output_shape_and_backward(name, size, channels, classes):
    torch.manual_seed(0)
    m = build_model(
        name, in_channels=channels, num_classes=classes, width=SMALL[name], image_size=size
    )
    x = torch.randn(3, channels, size, size)
    out = m(x)
    assert out.shape == (3, classes) and out.dtype == torch.float32
    out.logsumexp(1).sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # Some gradient reaches the first layer (the graph is connected end to end).
    first = next(p for p in m.parameters() if p.dim() > 1)
    assert first.grad.abs().sum() > 0


def test_parameter_counts():
    # ResNet-20 (He et al. 2016, Table 6): 0.27M. Exact here: 16-wide stem + 3 stages of 3 blocks
    # with 1x1 projection shortcuts at the two stage transitions, 10-way classifier.
    r20 = _params(build_model("resnet20", in_channels=3))
    assert abs(r20 - 0.27e6) < 0.01e6
    # ResNet-18 (CIFAR variant) is 11.17M in the usual references.
    r18 = _params(build_model("resnet18", in_channels=3))
    assert abs(r18 - 11.17e6) < 0.05e6
    # Width scales a ResNet's conv weights quadratically: width 8 has ~1/4 the parameters.
    r20_8 = _params(build_model("resnet20", in_channels=3, width=8))
    assert 0.2 < r20_8 / r20 < 0.3
    # Depth 6n+2: each extra block pair adds parameters.
    counts = [_params(build_model(f"resnet{d}")) for d in (8, 14, 20, 32)]
    assert counts == sorted(counts) and len(set(counts)) == 4


def test_conv_models_are_size_agnostic():
    # Adaptive pooling before the classifier: the same weights serve 8x8 and 32x32 inputs. (VGG is
    # not in the list: its number of max-pools is fixed by image_size at build time.)
    for name in ("cnn", "resnet20"):
        m = build_model(name, width=4, image_size=32).eval()
        assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mlp_hidden_sizes():
    m = build_model("mlp", image_size=8, hidden=(32, 16, 8))
    linears = [layer for layer in m.modules() if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (64, 32),
        (32, 16),
        (16, 8),
        (8, 10),
    ]
    assert len([layer for layer in m.modules() if isinstance(layer, nn.Linear)]) == 4
    assert isinstance(build_model("mlp", image_size=8, hidden=())[-1], nn.Linear)


def test_deterministic_under_manual_seed():
    def run(seed):
        torch.manual_seed(seed)
        m = build_model("resnet8", width=4, image_size=8)
        x = torch.randn(4, 1, 8, 8)
        m(x).sum().backward()
        return torch.cat([p.detach().flatten() for p in m.parameters()]), torch.cat(
            [p.grad.flatten() for p in m.parameters()]
        )

    (w1, g1), (w2, g2), (w3, _) = run(1), run(1), run(2)
    assert torch.equal(w1, w2) and torch.equal(g1, g2)
    assert not torch.equal(w1, w3)


def test_kaiming_init_scale():
    # Kaiming normal, fan_out for conv: std = sqrt(2 / (cout * k * k)). With n = 32*16*9 = 4608
    # weights the sample std has relative error ~ 1/sqrt(2n) = 1.04%; allow 5% (about 4.8 sigma).
    torch.manual_seed(0)
    m = build_model("cnn", width=16)
    conv = [c for c in m.modules() if isinstance(c, nn.Conv2d)][1]  # 16 -> 32 channels, 3x3
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected - 1) < 0.05
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid models: mlp, cnn, resnet8"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="in_channels"):
        build_model("cnn", in_channels=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", num_classes=0)
    with pytest.raises(TypeError, match="width"):
        build_model("cnn", width=2.5)
    with pytest.raises(ValueError, match="image_size"):
        build_model("mlp", image_size=-1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) depth for model 'cnn'"):
        build_model("cnn", depth=3)
    with pytest.raises(ValueError, match="hidden"):
        build_model("mlp", hidden=(8, 0))
    with pytest.raises(TypeError, match="hidden"):
        build_model("mlp", hidden=8)
