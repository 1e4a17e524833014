"""Image classifiers that take pixels in [0, 1], and a registry to build them by name."""

from .normalize import Normalize, NormalizedModel
from .registry import build_model, list_models, register_model
from .resnet import (
    BasicBlock,
    ResNet,
    resnet,
    resnet8,
    resnet14,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from .wrn import WideBasicBlock, WideResNet, wide_resnet

__all__ = [
    "BasicBlock",
    "Normalize",
    "NormalizedModel",
    "ResNet",
    "WideBasicBlock",
    "WideResNet",
    "build_model",
    "list_models",
    "register_model",
    "resnet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "wide_resnet",
]
