"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016, https://arxiv.org/abs/1605.07146).

Pre-activation blocks as in the authors' reference implementation
(https://github.com/szagoruyko/wide-residual-networks): when a block changes shape, its 1x1
shortcut conv sees the pre-activated input BN-ReLU(x); otherwise the shortcut is the raw input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .normalize import Normalize

__all__ = ["WideBasicBlock", "WideResNet", "wide_resnet"]


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3 plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = self.conv2(self.dropout(out))
        return out + identity


def _blocks_per_group(depth: int) -> int:
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4, e.g. 16, 22, 28; got {depth}")
    return (depth - 4) // 6


class WideResNet(nn.Module):
    """WRN-depth-width: 3 groups of n = (depth - 4) / 6 blocks, 16k / 32k / 64k channels.

    Args:
        depth: 6n + 4 (16, 22, 28, 40, ...).
        width: widening factor k >= 1.
        num_classes: number of output logits.
        in_channels: channels of the input images.
        mean: per-channel mean of the input normalization (pixels are in [0, 1]).
        std: per-channel std of the input normalization.
        dropout: dropout probability between the two convs of each block.
    """

    def __init__(
        self,
        depth: int,
        width: int,
        *,
        num_classes: int,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n = _blocks_per_group(depth)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"WRN width must be an integer >= 1, e.g. 4, 10; got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WRN dropout must be in [0, 1); got {dropout}")
        self.depth = depth
        self.width = width
        widths = (16 * width, 32 * width, 64 * width)
        self.normalize = Normalize(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_group(16, widths[0], n, stride=1, dropout=dropout)
        self.layer2 = self._make_group(widths[0], widths[1], n, stride=2, dropout=dropout)
        self.layer3 = self._make_group(widths[1], widths[2], n, stride=2, dropout=dropout)
        self.bn = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[2], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_group(
        in_planes: int, planes: int, blocks: int, *, stride: int, dropout: float
    ) -> nn.Sequential:
        layers = [WideBasicBlock(in_planes, planes, stride, dropout)]
        layers += [WideBasicBlock(planes, planes, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)  # [B, C, H, W], pixels in [0, 1] -> normalized
        x = self.conv1(x)  # [B, 16, H, W]
        x = self.layer1(x)  # [B, 16k, H, W]
        x = self.layer2(x)  # [B, 32k, H/2, W/2]
        x = self.layer3(x)  # [B, 64k, H/4, W/4]
        x = self.relu(self.bn(x))
        x = self.flatten(self.avgpool(x))  # [B, 64k]
        return self.fc(x)  # [B, K]


def wide_resnet(
    depth: int,
    width: int,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> WideResNet:
    """WRN-depth-width; raises ``ValueError`` unless depth = 6n+4 and width >= 1."""
    return WideResNet(
        depth,
        width,
        num_classes=num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        dropout=dropout,
        **kwargs,
    )
