"""Image classifiers that take pixels in [0, 1], and a registry to build them by name."""

from .batchensemble import BatchEnsemble, BEConv2d, BELinear, to_batchensemble
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
    "BEConv2d",
    "BELinear",
    "BasicBlock",
    "BatchEnsemble",
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
    "to_batchensemble",
    "wide_resnet",
]
