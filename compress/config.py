"""What `ensc compress` does, as one frozen config, and the method's rules for filling it from flags.

The rules live here, not in the CLI: the perturbation's temperature is the KD temperature (as in
[DM]'s code), the fast-weight treatment follows the fast-weight init unless given, and the
combinations that cannot work are refused with one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ensc import rundir
from ensc.compress.distill import DistillConfig
from ensc.compress.names import (
    BASELINES,
    COMPRESS_METHODS,
    FAST_WEIGHT_REGIMES,
    MEMBER_BATCH_MODES,
    MIXES,
    PERTURB_CHOICES,
    SINGLE_NETWORK_METHODS,
    TARGET_MODES,
)
from ensc.compress.perturb import PerturbConfig
from ensc.engine.loop import FLOAT32_MAX, OptimConfig
from ensc.engine.runtime import Runtime
from ensc.engine.tensorboard import require_tensorboard
from ensc.errors import ConfigError
from ensc.models.batchensemble import FAST_WEIGHT_INITS
from ensc.models.registry import check_arch_kwargs

BN_RECAL_BATCHES = 20  # training batches for BN recalibration (measured: as good as all of them)

# The ranges of the numeric options, for the CLI's flags and the API's keywords alike:
# name -> (integer?, lowest, lowest allowed itself?, highest). Floats must also be finite.
VALUE_RULES: dict[str, tuple[bool, float, bool, float | None]] = {
    "epochs": (True, 1, True, None), "batch_size": (True, 1, True, None),
    "steps": (True, 1, True, None), "max_steps": (True, 1, True, None),
    "train_subset": (True, 1, True, None), "test_subset": (True, 1, True, None),
    "members": (True, 2, True, None), "seed": (True, 0, True, None),
    "workers": (True, 0, True, None), "save_every": (True, 0, True, None),
    "eval_every": (True, 1, True, None),
    "bn_recal_batches": (True, 0, True, None), "corruption_subset": (True, 1, True, None),
    "lr": (False, 0, False, None), "weight_decay": (False, 0, True, None),
    "step": (False, 0, True, None), "alpha": (False, 0, True, 1),
    "temperature": (False, 0, False, None), "max_acc_drop": (False, 0, True, None),
    "fold_tolerance": (False, 0, False, None), "ema": (False, 0, True, 1),
}  # fmt: skip

# The choices of the named options, for the CLI's flags (click.Choice) and the API's keywords alike
CHOICE_RULES: dict[str, tuple[str, ...]] = {
    "perturb": PERTURB_CHOICES, "mix": MIXES, "member_batch": MEMBER_BATCH_MODES,
    "targets": TARGET_MODES, "init": FAST_WEIGHT_INITS, "fast_weights": FAST_WEIGHT_REGIMES,
    "method": COMPRESS_METHODS,
}  # fmt: skip


def check_values(options: dict[str, Any]) -> None:
    """Refuse, with one line naming the flag and the keyword, a numeric option of the wrong type,
    out of its range, or not finite (NaN, inf), and a named option that is none of its choices;
    None means "not given"."""
    for name, value in options.items():
        if name in CHOICE_RULES and value is not None and value not in CHOICE_RULES[name]:
            raise ConfigError(
                f"--{name.replace('_', '-')} ({name}=) must be one of "
                f"{', '.join(CHOICE_RULES[name])}; got {value!r}"
            )
        if name not in VALUE_RULES or value is None:
            continue
        integer, low, low_ok, high = VALUE_RULES[name]
        if not integer and high is None:  # torch keeps them as float32 (lr 1e300 overflowed there)
            high = FLOAT32_MAX
        kind = "a whole number" if integer else "a finite number"
        bound = f"{'≥' if low_ok else '>'} {low:g}" + (
            f" and ≤ {high:g}" if high is not None else ""
        )
        wrong_type = isinstance(value, bool) or not isinstance(
            value, int if integer else (int, float)
        )
        if (
            wrong_type
            or not math.isfinite(value)
            or value < low
            or (value == low and not low_ok)
            or (high is not None and value > high)
        ):
            raise ConfigError(
                f"--{name.replace('_', '-')} ({name}=) must be {kind} {bound}; got {value!r}"
            )


@dataclass(frozen=True)
class CompressConfig:
    """Everything `ensc compress` does; defaults: docs/method.md §10."""

    teacher: (
        Path | None
    )  # teacher members: folder, ensemble.json, file or glob; None = handed over from Python
    arch: str  # student architecture
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # its arguments (--arch-kwargs)
    members: int | None = None  # BatchEns size; None = number of teachers
    data_overrides: dict[str, Any] = field(default_factory=dict)  # DataConfig fields to change
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=200))
    distill: DistillConfig = field(default_factory=DistillConfig)
    init: str = "ones"  # fast-weight init: "ones" ([WA]), "normal" ([DM]) or "spread"
    recalibrate_bn: bool = True  # re-estimate BN statistics of the averaged network on train data
    # fold the temperature fitted on validation into the single network's last layer (calibrated
    # as shipped; accuracy unchanged)
    calibrate: bool = True
    bn_recal_batches: int | None = BN_RECAL_BATCHES  # ... on this many shuffled batches; None = all
    cache_teacher_logits: bool = True  # keep the teacher's val/test logits in runs_dir/.cache
    max_acc_drop: float = 1.0  # parity gate: allowed accuracy drop (points) of averaged vs BE
    fold_tolerance: float = 1e-3  # parity gate: max |Δlogit| between averaged BE and folded network
    out: Path | None = None  # run folder; None = runs/<arch>-<perturb>-<time>
    runs_dir: Path = Path("runs")  # where default run folders and the `latest` link live
    seed: int = 0
    resume: bool = False
    force: bool = False
    save_every: int | None = None  # mid-epoch saves: every N steps, 0 never, None ~10 min
    # the averaged network on validation during training: at each epoch's end, and every N steps
    eval_every: int | None = None
    tensorboard: Path | None = None  # also write the curves as TensorBoard event files there
    # --config: what a rerun must find again (the recorded teacher files and image digests)
    expected: dict[str, Any] | None = None
    command: str = ""  # the command line, for the report
    teacher_arch: str | None = None  # architecture of weight-only teacher files (--teacher-arch)
    teacher_arch_kwargs: dict[str, Any] = field(default_factory=dict)  # its builder's arguments
    code_path: Path | None = None  # folder of user code (architectures, pickled classes) to import
    unsafe_load: bool = False  # allow full unpickling of teacher files (runs code from them)
    # start the student from teacher member K (an int), from the first member with the student's
    # architecture ("auto": the averaged network then starts as that member), or "scratch"
    student_init: int | str = "auto"
    # "batchensemble": distill into BE-M and average it (the product); "kd-single": plain KD of
    # the ensemble's mean prediction into one network of --arch; "finetune": that network on the
    # labels alone, no teacher in the step; everything else the same (the baselines a user would
    # otherwise deploy)
    method: str = "batchensemble"
    # baselines trained beside the run at its budget and seed, compared in its report (--baselines)
    baselines: tuple[str, ...] = ()
    baseline_of: str | None = None  # set on a run that --baselines trains: the method it is beside
    # extra evaluations of the finished networks, as `ensc eval` makes them (they cost time):
    corruptions: bool = False  # under the CIFAR-10-C corruptions: report["corruptions"]
    corruption_subset: int | None = None  # ... of a class-balanced subset of N test images
    ood_data: str | None = None  # OOD images, a folder or a dataset name: report["ood"]


def compress_config(
    *,
    teacher: Path | None,
    arch: str,
    dataset: str | None = None,
    data_root: Path | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    val_root: Path | None = None,
    epochs: int = 200,
    batch_size: int = 128,
    lr: float | None = None,
    weight_decay: float = 5e-4,
    max_steps: int | None = None,
    steps: int | None = None,
    ema: float = 0.0,
    perturb: str | None = None,
    step: float | None = None,
    alpha: float | None = None,
    temperature: float | None = None,
    init: str = "ones",
    fast_weights: str | None = None,
    member_batch: str = DistillConfig.member_batch,
    targets: str = DistillConfig.targets,
    mix: str = DistillConfig.mix,
    bn_recal_batches: int | None = BN_RECAL_BATCHES,
    teacher_cache: bool = True,
    data_mode: str | None = None,
    workers: int | None = None,
    image_size: tuple[int, int] | None = None,
    baselines: str | tuple[str, ...] | list[str] | None = None,
    **rest: Any,
) -> CompressConfig:
    """A :class:`CompressConfig` from flat options (the CLI's flags), with the method's rules applied.

    ``fast_weights`` None: ``dm`` for ``init="normal"`` ([DM]'s pair), else ``wa``;
    ``bn_recal_batches`` 0 or None: the whole training split. ``perturb`` None: "auto", set by
    the method, the student's start and the schedule (warmstart.start_perturbation).
    ``alpha``/``temperature`` None: set by the student's start (warmstart.loss_defaults).
    ``rest`` are CompressConfig fields.
    """
    check_values({**locals(), **rest})
    unknown = sorted(set(rest) - {f.name for f in fields(CompressConfig)})
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r}: see `ensc compress --help` for the options (flags "
            "with - written as _)"
        )
    if perturb is None:
        perturb = "auto"
    step_arg = {} if step is None else {"step": step}
    # ODS/ConfODS use the KD temperature T (docs/method.md §4, §5), as [DM]'s code does
    perturb_config = PerturbConfig(kind=perturb, temperature=temperature, **step_arg)
    data = {
        "name": dataset,
        "root": data_root,
        "train_subset": train_subset,
        "test_subset": test_subset,
    }
    if val_root is not None:  # only when given, so that runs without it keep their identity
        data["val_root"] = Path(val_root)
    # --data-mode / --workers / --image-size (DataConfig's mode, workers, image_size): only when
    # given, so that runs without them keep their identity
    streaming = {"mode": data_mode, "workers": workers, "image_size": image_size}
    data.update({k: v for k, v in streaming.items() if v is not None})
    config = CompressConfig(
        teacher=teacher,
        arch=arch,
        data_overrides=data,
        optim=OptimConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                          max_steps=max_steps, steps=steps, ema=ema),
        distill=DistillConfig(alpha=alpha, temperature=temperature, perturb=perturb_config,
                              fast_weights=fast_weights or ("dm" if init == "normal" else "wa"),
                              member_batch=member_batch, targets=targets, mix=mix),
        init=init,
        bn_recal_batches=bn_recal_batches or None,
        cache_teacher_logits=teacher_cache,
        baselines=parse_baselines(baselines),
        **rest,
    )  # fmt: skip
    check_config(config)
    return config


def check_config(config: CompressConfig) -> None:
    """Refuse, with one line, the combinations that contradict each other."""
    if config.force and config.resume:
        raise ConfigError("--force and --resume contradict each other; pass one")
    check_arch_kwargs(config.arch_kwargs)
    if config.tensorboard is not None:
        require_tensorboard()
    if config.method not in COMPRESS_METHODS:
        raise ConfigError(
            f"unknown --method {config.method!r}: choose one of {', '.join(COMPRESS_METHODS)}"
        )
    if config.method == "kd-single" and config.distill.perturb.kind == "tdiv-sdiv":
        raise ConfigError(
            "--method kd-single trains one network, and tdiv-sdiv needs at least 2 student "
            "members: use --perturb ods, confods, gaussian or none"
        )
    if config.method == "finetune" and config.distill.perturb.kind not in ("auto", "none"):
        raise ConfigError(
            f"--method finetune trains on the labels alone, and --perturb {config.distill.perturb.kind} "
            "needs the teachers: drop --perturb (or use --method kd-single)"
        )
    if config.method == "finetune" and config.distill.mix != "none":
        raise ConfigError(
            f"--method finetune trains on the labels alone, and --mix {config.distill.mix} makes "
            "images that only the teachers label: drop --mix (or use --method kd-single)"
        )
    if is_single_network(config.method) and config.init != "ones":
        raise ConfigError(
            f"--method {config.method} trains one plain network, and --init {config.init} draws "
            "member-wise fast weights for a BatchEnsemble: drop --init"
        )
    _check_baselines(config)
    if config.corruption_subset is not None and not config.corruptions:
        raise ConfigError("--corruption-subset needs --corruptions")
    if config.corruption_subset is not None and config.corruption_subset < 1:
        raise ConfigError(f"--corruption-subset must be at least 1; got {config.corruption_subset}")
    if config.bn_recal_batches is not None and config.bn_recal_batches < 1:
        raise ConfigError(
            f"bn_recal_batches must be at least 1 (or None for the whole training split); got {config.bn_recal_batches}"
        )


def _check_baselines(config: CompressConfig) -> None:
    for name in config.baselines:
        if name not in BASELINES:
            raise ConfigError(
                f"unknown baseline {name!r} in --baselines: choose from {', '.join(BASELINES)} "
                "(comma-separated)"
            )
    if config.method in config.baselines:
        raise ConfigError(
            f"--baselines {config.method} is this run's own --method: drop it from --baselines"
        )


def parse_baselines(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"finetune,kd-single"`` (the CLI's flag) or a sequence of names -> a tuple, in order,
    without repeats; ``None``/``""``/``"none"`` -> ``()``."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [] if value.strip() in ("", "none") else value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"baselines must be a comma-separated string or a list of names from "
            f"{', '.join(BASELINES)}; got {value!r}"
        )
    return tuple(dict.fromkeys(v.strip() for v in value if v.strip()))


def is_single_network(method: str) -> bool:
    """Whether ``method`` trains one plain network (a baseline) rather than a BatchEnsemble."""
    return method in SINGLE_NETWORK_METHODS


def _recorded(run_dir: Path | None) -> dict[str, Any]:
    """The run folder's config.json as the run wrote it ({} when there is none yet)."""
    try:
        record = json.loads((Path(run_dir) / rundir.CONFIG).read_text())  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError):  # none yet: nothing was trained on it
        return {}
    return record if isinstance(record, dict) else {}


def with_recorded_data_mode(config: CompressConfig, run_dir: Path | None) -> CompressConfig:
    """A ``--resume`` keeps the data mode (memory or stream) its run started with, as the run
    folder's config.json records it, unless ``--data-mode memory|stream`` is given (another than
    the run's is refused by its identity): ``auto`` would choose again from the memory available
    now, and the student would go on with other preprocessing than it started with."""
    asked = config.data_overrides.get("mode")
    if not config.resume or run_dir is None or asked not in (None, "auto"):
        return config
    recorded = (_recorded(run_dir).get("data") or {}).get("mode")
    if recorded not in ("memory", "stream"):
        return config
    return replace(config, data_overrides={**config.data_overrides, "mode": recorded})


def with_recorded_amp(runtime: Runtime, config: CompressConfig, run_dir: Path | None) -> Runtime:
    """A ``--resume`` trains on in the precision its run started with, and a ``--config`` rerun
    in the precision of the run it repeats (the ``amp`` config.json records;
    :meth:`~ensc.engine.runtime.Runtime.resumed_in`: under ``--amp auto`` only)."""
    if config.resume and run_dir is not None:
        return runtime.resumed_in(_recorded(run_dir).get("amp"))
    return runtime.resumed_in((config.expected or {}).get("amp"), "the run it repeats trained")
