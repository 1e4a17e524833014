"""Where and how tensors run: device, mixed precision, memory layout and data parallelism, decided once.

Data parallelism: launched with `torchrun --nproc_per_node N -m ensc.cli ...`, every process
joins one process group (NCCL on CUDA, gloo on CPU), models are wrapped in
DistributedDataParallel and each process takes its share of every global batch.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from ensc.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Device plus the speed options that go with it (AMP, channels_last)."""

    device: torch.device
    amp: bool = False  # autocast: float16 + GradScaler on CUDA, bfloat16 on CPU
    channels_last: bool = False  # NHWC memory layout; pays off on CUDA tensor cores
    rank: int = 0  # this process in a data-parallel group (torchrun sets RANK / WORLD_SIZE)
    world_size: int = 1
    amp_reason: str = ""  # why autocast is on or off (--amp auto decides: engine/precision.py)
    reference: bool = False  # evaluates networks a run reports but does not ship (for_reference)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and reports (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself, or a DistributedDataParallel wrapper when running data-parallel."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of a global batch (every process saw the same global batch)."""
        if not self.distributed:
            return images, labels
        return images[self.rank :: self.world_size], labels[self.rank :: self.world_size]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every process (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16

    def autocast(self) -> contextlib.AbstractContextManager:
        return self._autocast(self.amp)

    def precision(self, enabled: bool) -> str:
        """The autocast dtype's name when ``enabled`` ("bfloat16", "float16"), else "off"
        (report.json and config.json: ``precision(amp)``, ``precision(eval_amp)``)."""
        return str(self.amp_dtype).removeprefix("torch.") if enabled else "off"

    @property
    def eval_amp(self) -> bool:
        """Whether evaluation and prediction run under autocast: with ``amp`` on CUDA; on a CPU
        only for the networks a run does not ship (:meth:`for_reference`), so that the numbers
        it reports for its network are those of the float32 file users get (docs/bench-amp.md)."""
        return self.amp and (self.device.type == "cuda" or self.reference)

    def for_reference(self) -> Runtime:
        """This runtime for the networks a run reports beside its own but does not ship (the
        teacher's members, the BatchEnsemble student's members): they are evaluated under
        autocast wherever training ran under it, bf16 on a CPU too (2.2× float32's speed on an
        AVX512-BF16 CPU; docs/eval-overhead.md)."""
        return replace(self, reference=True)

    def resumed_in(self, recorded: str | None, why: str = "the resumed run started") -> Runtime:
        """This runtime for a ``--resume`` of a run that trained in precision ``recorded`` (its
        :meth:`precision` then): under ``--amp auto``, training goes on in that precision,
        whatever auto, probing the machine as it is now, decided; ``--amp on|off`` is obeyed,
        and ``recorded`` None (an older run) or another device's autocast changes nothing."""
        if not self.amp_reason.startswith("auto") or recorded not in ("off", self.precision(True)):
            return self
        on = recorded != "off"
        if on == self.amp:
            return self
        reason = f"auto: {'on' if on else 'off'} as {why}"
        log.info("autocast %s, as %s (--amp on|off to choose)", recorded, why)
        return replace(self, amp=on, amp_reason=reason)

    def eval_autocast(self) -> contextlib.AbstractContextManager:
        """:meth:`autocast` for evaluation and prediction (see :attr:`eval_amp`)."""
        return self._autocast(self.eval_amp)

    def _autocast(self, enabled: bool) -> contextlib.AbstractContextManager:
        if not enabled:
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
    device: str = "auto",
    amp: bool | str | None = None,
    channels_last: bool | None = None,
    threads: str | int | None = None,
) -> Runtime:
    """``device`` is auto | cpu | cuda | cuda:N; ``amp`` auto | on | off (None/True/False too:
    engine/precision.py decides auto); channels_last defaults to on for CUDA only. ``threads``
    (auto | N, engine/threads.py) sets torch's intra-op threads; None leaves them as they are.

    Under torchrun (WORLD_SIZE > 1) this also joins the process group, and each process on CUDA
    takes the GPU of its LOCAL_RANK.
    """
    import os

    from ensc.engine.precision import choose_amp, parse_amp
    from ensc.engine.threads import apply_threads

    parse_amp(amp)  # a bad value fails before any process group is joined
    if threads is not None:
        apply_threads(threads)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
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
    rank = 0
    if world_size > 1:
        rank = int(os.environ["RANK"])
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    on_cuda = dev.type == "cuda"
    amp_choice = choose_amp(amp, dev)
    if parse_amp(amp) == "auto" and dev.type == "cpu":  # quiet on CPUs without native bf16
        say = log.info if amp_choice.probed else log.debug
        say("amp %s (%s)", "on" if amp_choice.on else "off", amp_choice.reason)
    return Runtime(
        device=dev,
        amp=amp_choice.on,
        amp_reason=amp_choice.reason,
        channels_last=on_cuda if channels_last is None else channels_last,
        rank=rank,
        world_size=world_size,
    )
