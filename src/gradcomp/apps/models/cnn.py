"""A small CNN: three conv-BN-ReLU stages, two max-pools, global average pool, one linear."""

from __future__ import annotations

from torch import nn

from ._common import conv_bn_relu


class SmallCNN(nn.Sequential):
    """conv(w) pool conv(2w) pool conv(4w) -> adaptive avg pool -> linear. A pool is skipped when
    the feature map is already 1 pixel, so any image size >= 1 works."""

    def __init__(self, in_channels: int, num_classes: int, width: int, image_size: int):
        layers: list[nn.Module] = []
        size = image_size
        for i, (cin, cout) in enumerate(
            ((in_channels, width), (width, 2 * width), (2 * width, 4 * width))
        ):
            layers += conv_bn_relu(cin, cout)
            if i < 2 and size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes)]
        super().__init__(*layers)


def build_cnn(in_channels, num_classes, width, image_size) -> SmallCNN:
    """Small CNN with base width ``width`` (default 32)."""
    return SmallCNN(in_channels, num_classes, width or 32, image_size)
