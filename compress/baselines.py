"""``--baselines``: the networks a user would deploy without ensc, trained beside a run at its budget
and seed, and the run's verdict against them.

- ``finetune``: the student architecture, from the same start, on the labels alone (no teacher in
  the step);
- ``kd-single``: plain KD of the teacher ensemble's mean prediction into that one network (the
  run's α, T and perturbation; tdiv-sdiv, which needs student members, becomes none).

Each baseline is a whole `ensc compress` run of its own, in ``RUN/baselines/<method>/`` (resumable,
exportable like any run); a resumed run reuses a finished baseline folder and resumes an
unfinished one. The report gets their rows, one verdict per baseline (how far the run's single
network is above or below it in accuracy and cNLL), and a warning when a baseline beats the
teacher ensemble on test: the teacher is then probably out of its domain for this data (or
under-trained), and distilling it makes a student worse than training on the labels alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ensc import rundir
from ensc.compress.config import CompressConfig, is_single_network
from ensc.compress.perturb import PerturbConfig
from ensc.errors import ConfigError, signed

log = logging.getLogger(__name__)

LABELS = {"finetune": "fine-tune on the labels", "kd-single": "KD into one network"}
NOT_RUN = (
    "not run: pass --baselines finetune,kd-single (compress_ensemble(baselines=...)) to train "
    "fine-tuning on the labels and KD into one network at this run's budget and seed, and "
    "compare the single network with them here"
)


def baseline_config(
    config: CompressConfig, method: str, run_dir: Path | None, data_mode: str | None = None
) -> CompressConfig:
    """The run's config turned into baseline ``method``'s, in ``run_dir/baselines/<method>``:
    one plain network (fast weights ``ones``/``wa``, which fold to exactly that network), the
    run's data read the way the run read it (``data_mode``: "memory" or "stream")."""
    kind = config.distill.perturb.kind
    distill = replace(config.distill, fast_weights="wa")
    if method == "finetune" or (method == "kd-single" and kind == "tdiv-sdiv"):
        distill = replace(
            distill, perturb=PerturbConfig(kind="none", temperature=distill.temperature)
        )
    if method == "finetune":  # the labels alone: no mixed images (kd-single keeps the run's mix)
        distill = replace(distill, mix="none")
    overrides = (
        config.data_overrides if data_mode is None else {**config.data_overrides, "mode": data_mode}
    )
    config = replace(config, distill=distill, init="ones", data_overrides=overrides)
    folder = run_dir / rundir.BASELINES / method if run_dir is not None else None
    resume = folder is not None and rundir.state_of(folder) == "unfinished"  # run_baselines agrees
    return replace(
        config, method=method, baselines=(), baseline_of=config.method, out=folder, resume=resume,
        force=False,
        corruptions=False, corruption_subset=None, ood_data=None,
        command=f"{config.command} (baseline {method})",
    )  # fmt: skip


def run_baselines(
    config: CompressConfig,
    run_dir: Path | None,
    run: Callable[[CompressConfig], dict[str, Any] | None],
    data_mode: str | None = None,
    agree: Callable[[Any], Any] = lambda value: value,
) -> dict[str, dict[str, Any]]:
    """Each baseline's report.json dict, by method: read from its finished folder, else trained
    by ``run(baseline_config)`` (which returns its report; None on non-main processes).
    ``agree`` makes every process take the main process's view of a folder (DDP: a broadcast)."""
    reports: dict[str, dict[str, Any]] = {}
    for method in config.baselines:
        sub = baseline_config(config, method, run_dir, data_mode)
        state = agree(rundir.state_of(sub.out) if sub.out is not None else None)
        sub = replace(sub, resume=state == "unfinished")
        if state == "finished":
            log.info("baseline %s: reusing the finished run in %s", method, sub.out)
            reports[method] = _finished_report(sub.out, method)
            continue
        where = f" in {sub.out}" if sub.out is not None else ""
        log.info(
            "baseline %s (%s): training it at this run's budget%s", method, LABELS[method], where
        )
        try:
            report = run(sub)
        except ConfigError as err:  # its folder's hints would restart the whole run: reword them
            if sub.out is None or rundir.RESTART_HINT not in str(err):
                raise
            again = (
                f"delete {sub.out} to train the {method} baseline again (the run itself is kept)"
            )
            raise ConfigError(str(err).replace(rundir.RESTART_HINT, again)) from err
        if report is not None:
            reports[method] = report
    return reports


def _finished_report(folder: Path, method: str) -> dict[str, Any]:
    """A finished baseline's report.json, or one line saying how to train it again."""
    path = folder / rundir.REPORT_JSON
    try:
        report = json.loads(path.read_text())
        if isinstance(report, dict) and all(k in report for k in ("student_avg", "train")):
            return report
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    raise ConfigError(
        f"{path} is missing or damaged, so the finished {method} baseline cannot be reused: "
        f"delete {folder} to train it again (the run itself is kept)"
    )


def baseline_section(
    report: dict[str, Any], method: str, baselines: dict[str, dict[str, Any]], written: bool = True,
    baseline_of: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """report["baselines"]: the baselines' rows and the verdict of the run's single network
    (``report["student_avg"]``) against each; ``methods`` empty and ``note`` set when none ran
    (for a run that is itself a baseline, ``baseline_of``, where it is compared)."""
    if not baselines:
        note = NOT_RUN if baseline_of is None else (
            f"this run is the {LABELS[method]} baseline of a {baseline_of} run, whose report "
            "compares the two (../../report.md)"
        )  # fmt: skip
        return {"methods": [], "rows": [], "verdict": [], "note": note}
    mine = report["student_avg"]
    rows, verdict = [], []
    for name, other in baselines.items():
        row = {**other["student_avg"], "name": f"{LABELS[name]} (baseline)", "method": name,
               "folder": f"{rundir.BASELINES}/{name}" if written else None, "train": other["train"]}  # fmt: skip
        rows.append(row)
        acc, cnll = mine["acc"] - row["acc"], mine["cnll"] - row["cnll"]
        verdict.append({"baseline": name, "acc_diff": acc, "cnll_diff": cnll,
                        "better_acc": acc > 0, "better_cnll": cnll < 0})  # fmt: skip
    return {"methods": list(baselines), "rows": rows, "verdict": verdict,
            "note": verdict_line(_this_network(method), verdict)}  # fmt: skip


def teacher_warning(report: dict[str, Any], method: str) -> str | None:
    """One plain sentence when a network trained without the teacher's help (a finetune baseline,
    or this run with ``--method finetune``) beats the teacher ensemble on test; else None."""
    teacher = report["teacher"]
    rows = [
        (f"the {LABELS['finetune']} baseline", r["acc"])
        for r in report["baselines"]["rows"]
        if r["method"] == "finetune"
    ]
    if method == "finetune":
        rows.append(("this fine-tuned network", report["student_avg"]["acc"]))
    better = [(who, acc) for who, acc in rows if acc > teacher["acc"]]
    if not better:
        return None
    who, acc = max(better, key=lambda r: r[1])
    return (
        f"{who} ({acc:.2f} %) beats the {teacher['name']} ({teacher['acc']:.2f} %) on test "
        "without any teacher: the teacher is probably out of its "
        "domain for this data (trained on other images) or under-trained, and distilling it makes "
        "a student worse than training on the labels alone; fine-tune instead, or retrain the "
        "teacher on this data (ensc train)"
    )


def verdict_line(this: str, verdict: list[dict[str, Any]]) -> str:
    """E.g. ``the averaged network is above fine-tune on the labels (+1.20 points, cNLL -0.0150)
    and below KD into one network (-0.10 points, cNLL +0.0020)``."""
    parts = []
    for v in verdict:
        if v["better_acc"] and v["better_cnll"]:
            where = "above"
        elif not v["better_acc"] and not v["better_cnll"]:
            where = "below"
        else:
            where = "mixed against"
        parts.append(
            f"{where} {LABELS[v['baseline']]} ({signed(v['acc_diff'])} points, cNLL {signed(v['cnll_diff'], 4)})"
        )
    return f"{this} is " + " and ".join(parts)


def baseline_lines(report: dict[str, Any]) -> list[str]:
    """report.md's section on the baselines: each one's cost, the verdict, the teacher warning."""
    section = report["baselines"]
    lines = ["", "## Against the baselines", ""]
    if not section["methods"]:
        lines.append(section["note"][0].upper() + section["note"][1:] + ".")
    for row in section["rows"]:
        train = row["train"]
        where = f" (`{row['folder']}/`)" if row["folder"] else ""
        lines.append(
            f"- {row['name']}: {train['steps']} steps, {train['seconds']:.0f} s of training{where}"
        )
    if section["methods"]:
        lines += ["", f"**Verdict:** {section['note']}."]
    if report.get("teacher_warning"):
        lines += ["", f"**Warning:** {report['teacher_warning']}."]
    return lines


def _this_network(method: str) -> str:
    return "this network" if is_single_network(method) else "the averaged network"
