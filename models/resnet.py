"""CIFAR-style ResNet of depth 6n+2 (He et al. 2016, https://arxiv.org/abs/1512.03385, §4.2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .normalize import Normalize

__all__ = [
    "BasicBlock",
    "ResNet",
    "resnet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

    The shortcut is a 1x1 conv + BN projection when the shape changes (option B of the paper),
    the identity otherwise.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(conv1x1(in_planes, planes, stride), norm_layer(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


def _blocks_per_stage(depth: int) -> int:
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"ResNet depth must be 6n+2, e.g. 20, 32, 56; got {depth}")
    return (depth - 2) // 6


class ResNet(nn.Module):
    """CIFAR ResNet: 3 stages of 16/32/64 channels, n BasicBlocks each, depth = 6n + 2.

    Args:
        depth: 6n + 2 (20, 32, 56, 110, ...).
        num_classes: number of output logits.
        in_channels: channels of the input images.
        mean: per-channel mean of the input normalization (pixels are in [0, 1]).
        std: per-channel std of the input normalization.
        norm_layer: normalization layer after each conv, called with the channel count.
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        n = _blocks_per_stage(depth)
        self.depth = depth
        self.normalize = Normalize(in_channels, mean, std)
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(16, 16, n, stride=1, norm_layer=norm_layer)
        self.layer2 = self._make_stage(16, 32, n, stride=2, norm_layer=norm_layer)
        self.layer3 = self._make_stage(32, 64, n, stride=2, norm_layer=norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(
        in_planes: int,
        planes: int,
        blocks: int,
        *,
        stride: int,
        norm_layer: Callable[[int], nn.Module],
    ) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride, norm_layer)]
        layers += [BasicBlock(planes, planes, 1, norm_layer) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)  # [B, C, H, W], pixels in [0, 1] -> normalized
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)  # [B, 16, H, W]
        x = self.layer2(x)  # [B, 32, H/2, W/2]
        x = self.layer3(x)  # [B, 64, H/4, W/4]
        x = self.flatten(self.avgpool(x))  # [B, 64]
        return self.fc(x)  # [B, K]


def resnet(
    depth: int,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ResNet:
    """CIFAR ResNet of any depth 6n+2; raises ``ValueError`` for other depths."""
    return ResNet(
        depth, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs
    )


def resnet8(
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ResNet:
    """ResNet-8 (n=1), 0.078M parameters with 10 classes."""
    return resnet(8, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs)


def resnet14(
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ResNet:
    """ResNet-14 (n=2), 0.18M parameters with 10 classes."""
    return resnet(
        14, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs
    )


def resnet20(
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ResNet:
    """ResNet-20 (n=3), 0.27M parameters with 10 classes."""
    return resnet(
        20, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs
    )


def resnet32(
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ResNet:
    """ResNet-32 (n=5), 0.47M parameters with 10 classes."""
    return resnet(
        32, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs
    )


def resnet44(
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ResNet:
    """ResNet-44 (n=7), 0.66M parameters with 10 classes."""
    return resnet(
        44, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs
    )


def resnet56(
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ResNet:
    """ResNet-56 (n=9), 0.86M parameters with 10 classes."""
    return resnet(
        56, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs
    )


def resnet110(
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ResNet:
    """ResNet-110 (n=18), 1.73M parameters with 10 classes."""
    return resnet(
        110, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs
    )
