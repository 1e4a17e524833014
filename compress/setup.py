"""A compress run set up: the teacher and data loaded (or handed over from Python), the student
built (warm-started from a matching teacher member when there is one), and the settings that
depend on that start filled in."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ensc.compress.config import (
    CompressConfig,
    is_single_network,
)
from ensc.compress.warmstart import (
    init_from_member,
    loss_defaults,
    matching_member,
    start_perturbation,
    warm_start_lr,
)
from ensc.data.datasets import load_dataset
from ensc.data.source import check_compatible, data_config_for, ood_split
from ensc.data.splits import DataConfig, ImageDataset, Split
from ensc.engine.runtime import Runtime
from ensc.engine.seeding import seeded
from ensc.models.batchensemble import BatchEnsemble, to_batchensemble
from ensc.models.checkpoint import ModelSpec
from ensc.teachers.ensemble import Teacher, load_teacher, sanity_check, user_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """What the Python API hands over in place of paths (:func:`ensc.compress_ensemble`): teacher
    networks already loaded, data already made, and a student builder; None = from the config."""

    teacher: Teacher | None = None
    data: ImageDataset | None = None
    data_config: DataConfig | None = None  # what ``data`` records itself as
    # instead of spec.build(): the network and the spec that describes it
    build_student: Callable[[ModelSpec], tuple[torch.nn.Module, ModelSpec]] | None = None


@dataclass(frozen=True)
class Run:
    """What a run works on, once set up: teacher, data, student, and the config as resolved."""

    config: CompressConfig  # with the warm-start learning rate filled in
    teacher: Teacher
    data_config: DataConfig
    data: ImageDataset
    members: int  # the student's M (1 for kd-single and finetune)
    student: BatchEnsemble
    spec: ModelSpec  # of one student network
    init_member: int | None  # the teacher member the student starts from
    ood: Split | None = None  # the --ood-data images, shaped as the models take them
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)  # report.json by method
    baseline_seconds: float = 0.0  # what training (or reading) them took
    baselines_written: bool = False  # each in its folder RUN/baselines/<method> (write=True)


def set_up(config: CompressConfig, runtime: Runtime, sources: Sources) -> Run:
    """Load teacher and data (or take them from ``sources``) and build the student."""
    teacher = sources.teacher or load_teacher(
        config.teacher, arch=config.teacher_arch, arch_kwargs=config.teacher_arch_kwargs,
        code_path=config.code_path, unsafe_load=config.unsafe_load,
        dataset=config.data_overrides.get("name"),
    )  # fmt: skip
    if sources.data is not None:
        data, data_config = sources.data, sources.data_config or DataConfig(name=sources.data.name)
    else:
        data_config = data_config_for(teacher.spec, teacher.data_record, **config.data_overrides)
        data = load_dataset(data_config)
    data_config = data.config or data_config  # with the mode --data-mode auto chose
    check_compatible(teacher.spec, data)
    members = 1 if is_single_network(config.method) else config.members or len(teacher)
    with user_code(config.code_path, unsafe=config.unsafe_load):  # the student may be user code
        student, spec, init_member = build_student(
            config, teacher, data, members, runtime, sources.build_student
        )
    config = with_start_defaults(config, init_member is not None, len(data.train))
    teacher.to(runtime.device)
    ood = None
    if runtime.is_main and config.ood_data is not None:  # before training: a wrong path fails now
        ood = ood_split(config.ood_data, data.channels, data.image_size,
                        subset=data_config.test_subset, seed=data_config.seed)  # fmt: skip
        log.info("--ood-data %s: %d images", config.ood_data, len(ood))
    if runtime.is_main:  # validation, not test: test labels stay unseen until the report
        sanity_check(teacher, data.val, runtime)
    return Run(config, teacher, data_config, data, members, student, spec, init_member, ood)


def with_start_defaults(config: CompressConfig, warm: bool, n_train: int) -> CompressConfig:
    """The settings that depend on the student's start and on the length of its schedule over
    ``n_train`` images: α and T unless given (loss_defaults), the perturbation of ``--perturb
    auto`` (:func:`~ensc.compress.warmstart.start_perturbation`), and the peak learning rate: a
    warm-started student fine-tunes at :func:`~ensc.compress.warmstart.warm_start_lr` unless
    ``--lr`` was given (from scratch: the papers' 0.1 × batch/128)."""
    optim = config.optim
    scheduled = replace(optim, max_steps=None).total_steps(n_train)  # the schedule, not a smoke cut
    start = "warm" if warm else "scratch"
    distill = loss_defaults(config.distill, warm)
    if distill != config.distill:
        log.info("%s start: alpha %g, temperature %g (--alpha/--temperature to change them)",
                 start, distill.alpha, distill.temperature)  # fmt: skip
    if distill.perturb.kind == "auto":
        kind = start_perturbation(config.method, warm, scheduled)
        distill = replace(distill, perturb=replace(distill.perturb, kind=kind))
        log.info("%s start: perturbation %s over a %d-step schedule (--perturb to change it)",
                 start, kind, scheduled)  # fmt: skip
    config = replace(config, distill=distill)
    if not warm or optim.lr is not None:
        return config
    lr = warm_start_lr(
        config.method, distill.alpha, distill.temperature, optim.batch_size, scheduled
    )
    log.info("warm start: peak learning rate %g over a %d-step schedule (--lr to change it)",
             lr, scheduled)  # fmt: skip
    return replace(config, optim=replace(optim, lr=lr))


def build_student(
    config: CompressConfig, teacher: Teacher, data: ImageDataset, members: int, runtime: Runtime,
    build: Callable[[ModelSpec], tuple[torch.nn.Module, ModelSpec]] | None = None,
) -> tuple[BatchEnsemble, ModelSpec, int | None]:  # fmt: skip
    """The student (BatchEns of ``members``), its spec, and the teacher member it starts from;
    ``build(spec)`` makes the network when the student was handed over from Python."""
    spec = ModelSpec.for_data(
        config.arch,
        data,
        class_names=teacher.spec.class_names,
        data_root=teacher.spec.data_root,
        arch_kwargs=config.arch_kwargs,
    )
    with seeded(config.seed):  # weight init (and fast weights' random init) from the run's seed
        net, spec = (spec.build(), spec) if build is None else build(spec)
        k = config.student_init
        if k == "auto":
            k = matching_member(net, teacher)
            if k is not None:
                log.info(
                    "student starts from teacher member %d (%s), which has its architecture; "
                    "--student-init scratch starts from random weights", k, teacher.paths[k].name,
                )  # fmt: skip
        if isinstance(k, int):
            spec = init_from_member(net, spec, teacher, k)
        probe = data.val.take(torch.arange(min(2, len(data.val)))).images.float().div(255)
        # layers the network never calls (their weight used directly) stay shared
        student = to_batchensemble(net, members=members, init=config.init, example=probe)
    if is_single_network(config.method):  # one member, r = s = 1 frozen: the plain network itself
        for p in student.fast_weight_parameters():
            p.requires_grad_(False)
    return runtime.prepare_model(student), spec, k if isinstance(k, int) else None
