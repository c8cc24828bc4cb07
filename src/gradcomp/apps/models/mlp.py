"""Multi-layer perceptron on flattened images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from gradcomp.numerics._checks import require_int_range


class MLP(nn.Sequential):
    """Flatten -> [Linear -> ReLU] per hidden size -> Linear(num_classes)."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)


def build_mlp(in_channels, num_classes, width, image_size, hidden=None) -> MLP:
    """``hidden``: sizes of the hidden layers (default ``(width, width)``, width default 256);
    ``hidden=()`` is a linear classifier. The input size is fixed: in_channels * image_size**2."""
    if hidden is None:
        hidden = (width or 256,) * 2
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise TypeError(f"hidden must be a sequence of positive ints, got {hidden!r}")
    for i, h in enumerate(hidden):
        require_int_range(h, f"hidden[{i}]", 1, 1 << 20)
    return MLP(in_channels * image_size * image_size, tuple(hidden), num_classes)
