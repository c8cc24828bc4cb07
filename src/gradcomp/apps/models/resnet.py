"""CIFAR-style ResNets (He et al. 2016): 6n+2 (ResNet-8/14/20/...) and ResNet-18 with a 3x3 stem."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with an identity shortcut, or a 1x1 conv-BN projection when the stride or
    width changes (option B of He et al.: keeps every shortcut a Conv2d the capture can see)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)  # separate module so hooks can tell the two apart
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stem conv-BN-ReLU, stages of BasicBlocks (stage i: width * 2**i channels, stride 1 for
    the first stage and 2 after), global average pool, linear classifier."""

    def __init__(self, blocks: Sequence[int], in_channels: int, num_classes: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            layers = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            layers += [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size (8x8 digits to 32x32 CIFAR)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def build_cifar_resnet(depth: int):
    """Builder for the 6n+2 family: three stages of n = (depth - 2) / 6 blocks, width default 16."""
    n = (depth - 2) // 6

    def build(in_channels, num_classes, width, image_size) -> ResNet:
        return ResNet((n, n, n), in_channels, num_classes, width or 16)

    build.__doc__ = f"ResNet-{depth} (CIFAR, 3 stages x {n} BasicBlocks), base width default 16."
    return build


def build_resnet18(in_channels, num_classes, width, image_size) -> ResNet:
    """ResNet-18, CIFAR variant: 3x3 stride-1 stem and no max-pool, BasicBlocks [2, 2, 2, 2],
    base width default 64 (about 11.2M parameters for 10 classes)."""
    return ResNet((2, 2, 2, 2), in_channels, num_classes, width or 64)
