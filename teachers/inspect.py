"""`ensc teachers inspect`: what ensc found in a teacher, member by member, and a quick accuracy check."""

from __future__ import annotations

from pathlib import Path

from ensc.data.datasets import load_dataset
from ensc.data.source import check_compatible
from ensc.data.splits import DataConfig
from ensc.engine.runtime import Runtime
from ensc.teachers.ensemble import Teacher, sanity_check

SPOT_CHECK_IMAGES = 256  # test images of the accuracy check


def member_rows(teacher: Teacher) -> list[dict[str, str]]:
    """Per member: file, format, architecture, parameters, classes, input, normalization, notes."""
    rows = []
    for k, (model, spec, info, file) in enumerate(
        zip(teacher.members, teacher.specs, teacher.infos, teacher.paths, strict=True)
    ):
        norm = info.get("normalization", "")
        norm = (
            "none added"
            if norm == "none"
            else f"{norm}: mean {_short(spec.mean)} std {_short(spec.std)}"
        )
        rows.append({
            "#": str(k), "file": file.name, "format": info["format"], "arch": spec.arch,
            "params": f"{sum(p.numel() for p in model.parameters()):,}",
            "classes": str(spec.num_classes), "input": f"{spec.in_channels}×{spec.image_size[0]}×{spec.image_size[1]}",
            "normalization": norm, "notes": "; ".join(info.get("notes", [])) or "-",
        })  # fmt: skip
    return rows


def spot_check(
    teacher: Teacher, dataset: str, data_root: Path | None, runtime: Runtime
) -> list[float]:
    """Each member's accuracy (%) on 256 test images of ``dataset``; warns when near chance."""
    # a small train subset keeps image folders fast to read (only the test images are used)
    data = load_dataset(
        DataConfig(name=dataset, root=data_root, train_subset=1000, test_subset=SPOT_CHECK_IMAGES)
    )
    check_compatible(teacher.spec, data)
    teacher.to(runtime.device)
    return sanity_check(teacher, data.test, runtime, n=SPOT_CHECK_IMAGES)


def _short(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"
