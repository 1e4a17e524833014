"""Where and how tensors run: device choice, mixed precision and memory layout, decided once."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ensc.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """Device plus the speed options that go with it (AMP, channels_last)."""

    device: torch.device
    amp: bool = False  # autocast: float16 + GradScaler on CUDA, bfloat16 on CPU
    channels_last: bool = False  # NHWC memory layout; pays off on CUDA tensor cores

    @property
    def amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler that is active only for float16 autocast (CUDA)."""
        return torch.amp.GradScaler(
            self.device.type, enabled=self.amp and self.device.type == "cuda"
        )

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )


def resolve_runtime(
    device: str = "auto", amp: bool | None = None, channels_last: bool | None = None
) -> Runtime:
    """``device`` is auto | cpu | cuda | cuda:N; AMP and channels_last default to on for CUDA only."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ConfigError(
                f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N"
            ) from err
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    "--device cuda asked for, but no CUDA GPU is visible: use --device cpu"
                )
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(
                    f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible"
                )
        elif dev.type != "cpu":
            raise ConfigError(f"unsupported --device {device!r}: use auto, cpu, cuda or cuda:N")
    on_cuda = dev.type == "cuda"
    return Runtime(
        device=dev,
        amp=on_cuda if amp is None else amp,
        channels_last=on_cuda if channels_last is None else channels_last,
    )
