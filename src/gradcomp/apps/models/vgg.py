"""A small VGG-11 with BatchNorm and a configurable width."""

from __future__ import annotations

from torch import nn

from ._common import conv_bn_relu

# VGG-11 (Simonyan & Zisserman, config "A") in units of the base width; "M" is a 2x2 max-pool.
VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")


class VGG(nn.Sequential):
    """conv-BN-ReLU stacks with max-pools, global average pool, one linear classifier. A pool is
    skipped once the feature map is 1 pixel, so 8x8 to 32x32 inputs all work."""

    def __init__(self, in_channels: int, num_classes: int, width: int, image_size: int, cfg=VGG11):
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            layers += conv_bn_relu(cin, v * width)
            cin = v * width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        super().__init__(*layers)


def build_vgg(in_channels, num_classes, width, image_size) -> VGG:
    """VGG-11-BN with base width ``width`` (default 32: half the original, ~2.3M parameters)."""
    return VGG(in_channels, num_classes, width or 32, image_size)
