"""report.md of a run folder (every number read from report.json's dict) and its pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ensc import rundir
from ensc.compress.baselines import baseline_lines
from ensc.compress.report import Predictions, all_rows, render_markdown
from ensc.compress.robustness import OodScores
from ensc.errors import MissingExtraError, plural
from ensc.evaluation.metrics import reliability_bins


def _precision_words(settings: dict[str, Any]) -> str:
    """How training ran, when not in float32: autocast's dtype, and whether the numbers are
    still the float32 network's (ensc.engine.runtime.Runtime.eval_amp, recorded as eval_amp), and
    in which the networks it does not ship were evaluated (reference_amp: Runtime.for_reference)."""
    amp = settings.get("amp", "off")
    if amp == "off":
        return ""
    if settings.get("eval_amp", "off") != "off":
        return f" under {amp} autocast"
    if settings.get("reference_amp", "off") != "off":
        return f" under {amp} autocast (its network evaluated in float32; the teacher and the BE members in {amp})"
    return f" under {amp} autocast (evaluated in float32)"


def render_run_report(report: dict[str, Any], run_dir: Path) -> str:
    """report.md: the metrics table with what was run, on what, and how long it took; every
    number in it read from ``report`` (report.json)."""
    settings, train = report["settings"], report["train"]
    details = {
        "teacher": f"{settings['teacher_arch']} from {settings['teacher']}",
        "student": _student_line(report["method"], settings),
        "data": f"{report['dataset']}: {report['n_train']} train / {report['n_val']} val / {report['n_test']} test",
        "validation": _validation_line(report["validation"]),
        "training": f"{plural(train['steps'], 'step')}, {train['seconds']:.0f} s on {settings['device']}{_precision_words(settings)}; run total {report['wall_seconds']:.0f} s",
        "after training": timing_line(report["timing"], report["teacher_logits_cache"]),
        "BatchNorm statistics of the single network": (
            f"{report['bn_statistics']} (kept: the lower validation NLL of the two)"
            if "student_avg_alternative" in report
            else report["bn_statistics"]
        ),
        "calibration": _calibration_line(report.get("calibration")),
    }
    return render_markdown(
        report, title=f"ensc compress: {run_dir.name}", command=settings["command"], details=details,
        sections=baseline_lines(report) if "baselines" in report else [],
    )  # fmt: skip


def _calibration_line(calibration: dict[str, Any] | None) -> str:
    if calibration is None:
        return "none (--no-calibrate): the network's own probabilities"
    t = calibration["temperature"]
    if not calibration["folded"]:
        return f"temperature {t:.3f} fitted on validation, not folded (the network's output is no Linear layer's)"
    return (
        f"temperature {t:.3f} fitted on validation, folded into the last layer (logits / {t:.3f})"
    )


def _validation_line(validation: dict[str, Any]) -> str:
    where = {"val_root": f"held-out images from {validation['path']} (--val-root)",
             "python": "the images handed over from Python (val_data, or carved from train_data)",
             "carved from train": "carved from the training images"}[validation["source"]]  # fmt: skip
    return where + (f". **Warning:** {validation['warning']}" if validation["warning"] else "")


def _student_line(method: str, settings: dict[str, Any]) -> str:
    """What was trained, as report.md's header says it."""
    arch = settings["student_arch"]
    if method == "finetune":
        return f"one {arch} fine-tuned on the labels alone (baseline: no teacher in the step)"
    kind = (
        f"KD into one {arch} (baseline: ensemble-mean targets)"
        if method == "kd-single"
        else f"BE-{settings['members']} {arch} (init {settings['init']})"
    )
    perturbation = settings["perturbation"]
    if perturbation != "none":  # a size only where there is a perturbation
        perturbation += f" (step {settings['perturbation_step']:g}/255)"
    mix = settings.get("mix", "none")  # runs from before --mix record none
    return (
        f"{kind}, perturbation {perturbation}{'' if mix == 'none' else f', mix {mix}'}, "
        f"α={settings['alpha']:g}, T={settings['temperature']:g}"
    )


def draw_pictures(
    run_dir: Path, preds: Predictions, labels: torch.Tensor, report: dict[str, Any],
    ood_scores: OodScores | None = None,
) -> str:  # fmt: skip
    """A reliability diagram (DE-M, BE-M, the single network), the DEE curve and, with
    ``--ood-data`` / ``--corruptions``, the OOD score histograms and the accuracy and cNLL against
    corruption severity into the run folder; returns report.md's section linking them, or one line
    saying why there are none."""
    from ensc.evaluation import plots

    try:
        plots.require_matplotlib()
    except MissingExtraError as err:
        return f"\n## Pictures\n\nNo pictures: {err}\n"
    probs = {"teacher": preds.teacher_test.mean(0), "student_be": preds.student_test.mean(0),
             "student_avg": preds.avg_test}  # fmt: skip
    bins = {report[k]["name"]: reliability_bins(p, labels) for k, p in probs.items()}
    points = {report[k]["name"]: report[k]["cnll"] for k in ("student_be", "student_avg")}
    plots.reliability_diagram(bins, run_dir / rundir.RELIABILITY_PNG, force=True)
    plots.dee_curve(report["de_cnll_curve"], points, run_dir / rundir.DEE_PNG, force=True)
    links = [("reliability diagram", rundir.RELIABILITY_PNG), ("DEE curve", rundir.DEE_PNG)]
    curves = report.get("curves") or {}
    if curves.get("rows"):
        plots.training_curves(curves["rows"], run_dir / rundir.CURVES_PNG,
                              lines=curves.get("lines"), force=True)  # fmt: skip
        links.insert(0, ("training curves", rundir.CURVES_PNG))
    if ood_scores is not None:
        plots.ood_histograms(ood_scores, run_dir / rundir.OOD_PNG, out_name=report["ood"]["data"],
                             force=True)  # fmt: skip
        links.append(("OOD scores", rundir.OOD_PNG))
    if "corruptions" in report:
        section = report["corruptions"]
        # severity 0 (clean) only when the corrupted images are the whole test split, as in eval
        whole = section["n_test"] == report["n_test"]
        clean = {r["name"]: r for r in all_rows(report)} if whole else None
        plots.corruption_curves(section, run_dir / rundir.CORRUPTIONS_PNG, clean=clean, force=True)
        links.append(("accuracy and cNLL under corruption", rundir.CORRUPTIONS_PNG))
    return "\n## Pictures\n\n" + "\n\n".join(f"![{alt}]({name})" for alt, name in links) + "\n"


# what the single network of a baseline run is, in report rows (--method)
SINGLE_NETWORK_NAMES = {"kd-single": "KD student", "finetune": "fine-tuned network"}


def name_single_rows(report: dict[str, Any], method: str) -> None:
    """Row names of a baseline run (kd-single, finetune): the student is one plain network, not
    a BE, so its BE row, member rows and averaged rows are that one network."""
    what = SINGLE_NETWORK_NAMES[method]
    report["student_be"]["name"] = f"{what} (one network)"
    report["student_members"] = []  # the same network again
    report["student_avg"]["name"] = f"{what}, BN {report['bn_statistics']}"
    if "student_avg_alternative" in report:
        alternative = report["student_avg_alternative"]
        alternative["name"] = alternative["name"].replace("averaged", what)


def timing_line(timing: dict[str, float], teacher_cache: str) -> str:
    """E.g. ``average 0.3 s, BN recalibration 2.3 s, evaluation 25.0 s (teacher logits cache: hit), report 0.1 s``
    (and ``corruptions 80.2 s`` with --corruptions)."""
    corruptions = (
        f", corruptions {timing['corruptions_seconds']:.1f} s"
        if "corruptions_seconds" in timing
        else ""
    )
    return (
        f"average {timing.get('average_seconds', 0):.1f} s, BN recalibration "
        f"{timing.get('bn_recal_seconds', 0):.1f} s, evaluation {timing.get('eval_seconds', 0):.1f} s "
        f"(teacher logits cache: {teacher_cache}){corruptions}, report {timing.get('report_seconds', 0):.1f} s"
    )
