"""Per-channel input normalization, the first layer of every ensc model (docs/method.md §1)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize", "NormalizedModel", "RepeatChannels"]


def _per_channel(
    values: Sequence[float] | float | Tensor | None, num_channels: int, default: float, what: str
) -> Tensor:
    if values is None:
        return torch.full((num_channels,), default, dtype=torch.float32)
    tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    if tensor.numel() == 1:
        tensor = tensor.expand(num_channels).clone()
    if tensor.numel() != num_channels:
        raise ValueError(
            f"Normalize {what} needs one value per input channel ({num_channels}) or a single "
            f"value; got {tensor.numel()} values {tensor.tolist()}"
        )
    return tensor


class Normalize(nn.Module):
    """Map pixels in [0, 1] to ``(x - mean) / std`` per channel.

    ``mean`` and ``std`` are buffers of shape ``[1, C, 1, 1]``, so they are saved in the
    state dict and exported to ONNX with the model. ``None`` means mean 0 / std 1.

    Args:
        num_channels: number of input channels C.
        mean: per-channel mean (C values, or one value for all channels).
        std: per-channel standard deviation, all > 0.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        num_channels: int = 3,
        mean: Sequence[float] | float | Tensor | None = None,
        std: Sequence[float] | float | Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"Normalize needs num_channels >= 1; got {num_channels}")
        mean_t = _per_channel(mean, num_channels, 0.0, "mean")
        std_t = _per_channel(std, num_channels, 1.0, "std")
        if not bool((std_t > 0).all()):
            raise ValueError(f"Normalize std must be > 0 for every channel; got {std_t.tolist()}")
        self.num_channels = num_channels
        self.register_buffer("mean", mean_t.view(1, num_channels, 1, 1))
        self.register_buffer("std", std_t.view(1, num_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"num_channels={self.num_channels}, mean={mean}, std={std}"


class RepeatChannels(nn.Module):
    """Repeat a one-channel image ``channels`` times: grayscale data into an RGB architecture."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, self.channels, -1, -1)  # [B, 1, H, W] -> [B, channels, H, W]

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class NormalizedModel(nn.Sequential):
    """``model(normalize(x))``: gives a model that expects normalized input a [0, 1] interface.

    Used by :func:`ensc.models.build_model` for user architectures that take no ``mean``/``std``.
    ``repeat``: channels a one-channel image is repeated to after normalizing (a
    :class:`RepeatChannels` named ``to_rgb``, no weights), for RGB-only architectures.
    """

    def __init__(self, normalize: Normalize, model: nn.Module, repeat: int | None = None) -> None:
        layers: list[tuple[str, nn.Module]] = [("normalize", normalize)]
        if repeat is not None:
            layers.append(("to_rgb", RepeatChannels(repeat)))
        super().__init__(OrderedDict([*layers, ("model", model)]))
