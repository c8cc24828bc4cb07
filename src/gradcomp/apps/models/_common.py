"""Helpers shared by the model builders: weight init and argument checks."""

from __future__ import annotations

from torch import nn

from gradcomp.numerics._checks import require_int_range

_MAX = 1 << 20


def check_dims(in_channels, num_classes, width, image_size) -> None:
    """Raise naming the argument unless every size is a positive int (``width`` may be None)."""
    require_int_range(in_channels, "in_channels", 1, _MAX)
    require_int_range(num_classes, "num_classes", 1, _MAX)
    require_int_range(image_size, "image_size", 1, _MAX)
    if width is not None:
        require_int_range(width, "width", 1, _MAX)


def kaiming_init(model: nn.Module) -> nn.Module:
    """He et al. (2015) init: conv and linear weights ~ N(0, 2 / fan) for ReLU nets (fan_out for
    conv, as in torchvision's ResNet; fan_in for linear), zero biases, BatchNorm gamma 1 beta 0.
    Draws from torch's global RNG, so ``torch.manual_seed`` makes a build repeat exactly.
    A model whose class sets ``self_initialised = True`` (the transformers: GPT-2's init) is
    returned unchanged."""
    if getattr(model, "self_initialised", False):
        return model
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (no bias: BatchNorm's beta replaces it) + BatchNorm + ReLU."""
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
