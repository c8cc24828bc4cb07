"""Models by name: ``build_model(name, in_channels=, num_classes=, width=, image_size=)``.

    mlp                    Flatten + Linear/ReLU; ``hidden`` sizes, default (width, width), 256
    cnn                    3 conv-BN-ReLU + 2 max-pools + linear, width 32
    resnet8/14/20/32       CIFAR ResNet 6n+2, BasicBlocks, width 16 (resnet20: ~0.27M parameters)
    resnet18               CIFAR ResNet-18 (3x3 stem, [2,2,2,2]), width 64 (~11.2M parameters)
    vgg                    VGG-11 with BatchNorm, width 32
    gpt, gpt-tiny          decoder-only LM on token ids -> (B, T, num_classes) next-token logits;
                           num_classes is the vocabulary (256 bytes); width/depth/heads/context
                           128/4/4/128 (~0.83M parameters) and 64/2/4/64 (~0.12M)
    bert, bert-tiny        encoder classifier on token ids -> (B, num_classes); same sizes, pool
                           ``mean`` or ``cls``, ``vocab_size`` 256

The sequence models (``transformer.py``) take (B, T) int64 token ids with T <= ``context``;
in_channels and image_size do not apply to them, their options are ``context, depth, heads,
mlp_ratio, dropout`` and ``tie_head`` (gpt) / ``pool, vocab_size`` (bert); they use GPT-2's
initialisation instead of Kaiming's.

Every conv model ends in adaptive average pooling, so 8x8 (digits), 28x28 and 32x32 inputs work.
Weights use Kaiming init drawn from torch's global RNG: ``torch.manual_seed`` makes builds repeat.
Written here because torchvision does not import beside the CPU torch on these machines.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ._common import check_dims, kaiming_init
from .cnn import SmallCNN, build_cnn
from .mlp import MLP, build_mlp
from .resnet import BasicBlock, ResNet, build_cifar_resnet, build_resnet18
from .transformer import GPT, BertClassifier, build_bert, build_gpt
from .vgg import VGG, build_vgg

__all__ = ["GPT", "MLP", "VGG", "BasicBlock", "BertClassifier", "ResNet", "SmallCNN",
           "build_model", "list_models"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resnet8": build_cifar_resnet(8),
    "resnet14": build_cifar_resnet(14),
    "resnet20": build_cifar_resnet(20),
    "resnet32": build_cifar_resnet(32),
    "resnet18": build_resnet18,
    "vgg": build_vgg,
    "gpt": build_gpt(width=128, depth=4, heads=4, context=128),
    "gpt-tiny": build_gpt(width=64, depth=2, heads=4, context=64),
    "bert": build_bert(width=128, depth=4, heads=4, context=128),
    "bert-tiny": build_bert(width=64, depth=2, heads=4, context=64),
}

_COMMON = ("in_channels", "num_classes", "width", "image_size")


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, in registry order."""
    return list(_REGISTRY)


def build_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    width: int | None = None,
    image_size: int = 28,
    **kw,
) -> nn.Module:
    """Build model ``name`` for ``in_channels`` x ``image_size`` x ``image_size`` inputs and
    ``num_classes`` logits (no softmax). ``width`` is the base width (None: the model's default);
    ``kw`` are model-specific (``mlp``: ``hidden``). Unknown names or options raise ValueError
    listing the valid ones; sizes that are not positive ints raise naming the argument."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(_REGISTRY)}")
    check_dims(in_channels, num_classes, width, image_size)
    fn = _REGISTRY[name]
    extra = [p for p in inspect.signature(fn).parameters if p not in _COMMON]
    unknown = sorted(set(kw) - set(extra))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; allowed: "
            f"{', '.join(_COMMON + tuple(extra))}"
        )
    return kaiming_init(fn(in_channels, num_classes, width, image_size, **kw))
