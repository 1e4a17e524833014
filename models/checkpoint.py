"""ensc's one checkpoint format: weights plus everything needed to rebuild and use the model.

A checkpoint is a plain dict of tensors, strings, numbers and lists, so it loads with
``torch.load(weights_only=True)``. It records the architecture, the input contract (channels,
image size, the mean/std the model normalizes with) and where the model came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ensc import __version__, faults
from ensc.errors import CheckpointError, ConfigError, one_line
from ensc.fileio import atomic_write, torch_load
from ensc.models.modes import eval_mode

if TYPE_CHECKING:
    from ensc.data.splits import ImageDataset
    from ensc.models.batchensemble import BatchEnsemble

FORMAT = "ensc-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """What a model is and what inputs it takes; enough to rebuild it with ``build_model``."""

    arch: str  # registry name or "package.module:callable"
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]  # (H, W) the model was trained on
    mean: tuple[float, ...]  # normalization applied inside the model (pixels in [0, 1])
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    dataset: str = ""  # dataset name (see ensc.data.catalog.DATASETS)
    data_root: str = ""  # --data-root it was trained from, "" for the default location
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "model"  # "model" (a plain network) or "batchensemble"
    members: int = 1  # ensemble size for kind="batchensemble"

    @classmethod
    def for_data(
        cls,
        arch: str,
        data: ImageDataset,
        *,
        class_names: tuple[str, ...] = (),
        data_root: str = "",
        arch_kwargs: Mapping[str, Any] | None = None,
    ) -> ModelSpec:
        """The spec of an ``arch`` network trained on ``data``: its classes, input shape, normalization."""
        return cls(
            arch=arch,
            num_classes=data.num_classes,
            in_channels=data.channels,
            image_size=data.image_size,
            mean=data.mean,
            std=data.std,
            class_names=class_names or data.class_names,
            dataset=data.name,
            data_root=data_root,
            arch_kwargs=dict(arch_kwargs or {}),
        )

    def build(self) -> nn.Module:
        """A freshly initialized model of this spec (weights not loaded); user code is checked to
        return ``[B, num_classes]`` logits on a test batch of this spec's images."""
        from ensc.models import build_model
        from ensc.models.registry import is_library_arch

        model = build_model(
            self.arch,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            mean=self.mean,
            std=self.std,
            **self.arch_kwargs,
        )
        if ":" in self.arch and not is_library_arch(self.arch):
            self._check_logits(model)
        return model

    @torch.no_grad()
    def _check_logits(self, model: nn.Module) -> None:
        """A ConfigError unless ``model`` maps a [2, C, H, W] batch to logits [2, num_classes]."""
        x = torch.rand(2, self.in_channels, *self.image_size, generator=torch.Generator())
        shape = f"[2, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}]"
        with eval_mode(model):
            try:
                out = model(x)
            except Exception as err:  # whatever the user's code raises
                raise ConfigError(
                    f"{self.arch} fails on a test batch {shape}: {one_line(err, join=True)}"
                ) from err
        want = [2, self.num_classes]
        if not isinstance(out, torch.Tensor) or list(out.shape) != want:
            got = (
                f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            )
            raise ConfigError(
                f"{self.arch} returns {got} for a batch {shape}, not logits {want}; make it "
                "build num_classes outputs (take a num_classes argument)"
            )


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the spec, the weights and the provenance record."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    info: dict[str, Any]  # seed, ensc version, config used, ...
    path: Path | None = None

    def build_model(self) -> nn.Module:
        """The plain network with these weights, in eval mode."""
        if self.spec.kind != "model":
            raise CheckpointError(
                f"{self.path} holds a {self.spec.kind} model, not a plain network"
            )
        model = self._build()
        model.load_state_dict(self.state_dict)
        return model.eval()

    def _build(self) -> nn.Module:
        try:
            return self.spec.build()
        except ConfigError as err:  # a user architecture that may not be built here
            raise ConfigError(f"{self.path}: {err}") from err

    def build_batchensemble(self) -> BatchEnsemble:
        """The BatchEns student with these weights (``kind="batchensemble"``), in eval mode."""
        from ensc.models.batchensemble import to_batchensemble

        if self.spec.kind != "batchensemble":
            raise CheckpointError(
                f"{self.path} holds a {self.spec.kind} model, not a BatchEnsemble student"
            )
        model = to_batchensemble(self._build(), members=self.spec.members)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(
    path: Path,
    model: nn.Module,
    spec: ModelSpec,
    *,
    metrics: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    fault_point: str | None = None,
) -> None:
    """Write ``model``'s weights with ``spec`` atomically (temp file + rename).

    ``fault_point``: an :mod:`ensc.faults` point reached once the temp file is written, before
    the rename (for the fault-injection tests).
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ensc_version": __version__,
        "spec": _spec_to_dict(spec),
        "metrics": metrics or {},
        "info": info or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }

    def write(f: Any) -> None:
        torch.save(payload, f)
        if fault_point is not None:
            faults.point(fault_point)

    atomic_write(path, write)


def read_payload(path: Path) -> dict[str, Any]:
    """The file's contents (:func:`~ensc.fileio.torch_load`: weights only, one-line errors)."""
    return torch_load(path)


def is_ensc_payload(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_checkpoint(path: Path) -> Checkpoint:
    """Load an ensc checkpoint saved by :func:`save_checkpoint`."""
    return checkpoint_from_payload(read_payload(path), path)


def checkpoint_from_payload(payload: Any, path: Path) -> Checkpoint:
    """The :class:`Checkpoint` in a payload already read from ``path`` by :func:`read_payload`."""
    if not is_ensc_payload(payload):
        raise CheckpointError(f"{path} is not an ensc checkpoint (no '{FORMAT}' record)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer ensc ({payload.get('ensc_version')}); upgrade ensc to read it"
        )
    check_finite(payload["state_dict"], path)
    return Checkpoint(
        spec=_spec_from_dict(payload["spec"]),
        state_dict=payload["state_dict"],
        metrics=payload.get("metrics", {}),
        info={**payload.get("info", {}), "ensc_version": payload.get("ensc_version")},
        path=Path(path),
    )


def non_finite(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity."""
    return [
        name
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())
    ]


def check_finite(tensors: Mapping[str, Any], path: Path) -> None:
    """Refuse weights or buffers with NaN/inf (a diverged training), naming the file."""
    bad = non_finite(tensors)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{path} holds non-finite values (NaN or inf) in {bad[0]}{more}: the training that wrote "
            "it diverged; train it again with a lower --lr"
        )


def load_model(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the plain model stored in an ensc checkpoint, in eval mode."""
    ckpt = load_checkpoint(path)
    return ckpt.build_model(), ckpt.spec


def _spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    d = asdict(spec)
    d["image_size"] = list(spec.image_size)
    d["mean"], d["std"], d["class_names"] = list(spec.mean), list(spec.std), list(spec.class_names)
    return d


def _spec_from_dict(d: dict[str, Any]) -> ModelSpec:
    d = dict(d)
    for key in ("image_size", "mean", "std", "class_names"):
        d[key] = tuple(d.get(key, ()))
    return ModelSpec(**d)
