"""The compression report: teacher, BatchEns student and averaged network side by side, plus the parity gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ensc.errors import signed
from ensc.evaluation.corruptions import corruption_table
from ensc.evaluation.metrics import UNITS, evaluate_predictions
from ensc.evaluation.ood import TABLE_COLUMNS as OOD_COLUMNS
from ensc.evaluation.scores import Scorer
from ensc.evaluation.table import markdown_table

REPORT_COLUMNS = (
    "acc",
    "nll",
    "bs",
    "ece",
    "cnll",
    "cece",
    "dee",
    "kl_div",
    "disagreement",
    "agreement",
)

# report["units"]: the unit of every number in report.json, by key (docs/report-json.md)
REPORT_UNITS = {
    **UNITS,
    "seconds": "seconds (timing.*_seconds, train.seconds, wall_seconds)",
    "s_per_step": "seconds per optimizer step (train.s_per_step)",
    "acc_drop_vs_student_be": "accuracy points (parity: also max_acc_drop and vs_teacher.acc; "
    "vs_teacher.nll and .ece in the units of nll and ece)",
    "fold_max_abs_diff": "logits (parity: the max |Δlogit|; also fold_tolerance)",
    "gap_closed": "percent of the member → DE-M gap (gap_closed.<model>.acc and .cnll)",
    "fast_weights": "none (r and s multiply the weights; 1 changes nothing)",
    "params": "count of parameters",
    "perturbation_step": "1/255 of the pixel range (settings.perturbation_step)",
    "n_train": "images (also n_val, n_test, ood.n_in, ood.n_out, corruptions.n_test)",
    "corruptions": "each severity's metrics as corruptions.metric_units says (acc percent, nll and "
    "cnll nats per image, ece a fraction)",
}


@dataclass(frozen=True)
class Predictions:
    """Probabilities of every model on the validation and test splits (CPU tensors)."""

    teacher_val: torch.Tensor  # [Mt, Nv, K]
    teacher_test: torch.Tensor  # [Mt, N, K]
    student_val: torch.Tensor  # [Ms, Nv, K]
    student_test: torch.Tensor  # [Ms, N, K]
    avg_val: torch.Tensor  # [Nv, K]
    avg_test: torch.Tensor  # [N, K]
    # the averaged network with the other BatchNorm statistics (re-estimated or as trained), which
    # lost on validation and is reported beside the kept one; None when there was no choice
    alt_val: torch.Tensor | None = None  # [Nv, K]
    alt_test: torch.Tensor | None = None  # [N, K]
    alt_name: str = ""
    # on the out-of-distribution images of --ood-data [N' images], when given
    teacher_ood: torch.Tensor | None = None  # [Mt, N', K]
    student_ood: torch.Tensor | None = None  # [Ms, N', K]
    avg_ood: torch.Tensor | None = None  # [N', K]
    alt_ood: torch.Tensor | None = None  # [N', K]


def build_report(
    preds: Predictions, val_labels: torch.Tensor, test_labels: torch.Tensor
) -> dict[str, Any]:
    """Metrics of each teacher, DE-M, each student member, BE-M and the averaged network.

    The metrics are those of docs/method.md §9. DEE is measured against the teacher's calibrated
    prefix-ensemble curve; ``agreement`` is the top-1 agreement with DE-M in percent.
    """
    scorer = Scorer(val_labels, test_labels, preds.teacher_val, preds.teacher_test)
    row = scorer.row
    t_val, t_test, s_val, s_test = (
        preds.teacher_val,
        preds.teacher_test,
        preds.student_val,
        preds.student_test,
    )
    report = {
        "n_val": len(val_labels),
        "n_test": len(test_labels),
        "teacher": row(f"DE-{len(t_test)} teacher", t_test.mean(0), t_val.mean(0), t_test),
        "teacher_members": [row(f"teacher {k}", t_test[k], t_val[k]) for k in range(len(t_test))],
        "student_be": row(f"BE-{len(s_test)} student", s_test.mean(0), s_val.mean(0), s_test),
        "student_members": [
            row(f"student member {k}", s_test[k], s_val[k]) for k in range(len(s_test))
        ],
        "student_avg": row("averaged single network", preds.avg_test, preds.avg_val),
        "de_cnll_curve": scorer.curve,
    }
    val = {"teacher": t_val.mean(0), "student_be": s_val.mean(0), "student_avg": preds.avg_val}
    if preds.alt_test is not None and preds.alt_val is not None:
        report["student_avg_alternative"] = row(preds.alt_name, preds.alt_test, preds.alt_val)
        val["student_avg_alternative"] = preds.alt_val
    report["val"] = {name: validation_metrics(probs, val_labels) for name, probs in val.items()}
    return report


def validation_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ACC, NLL and cNLL on the validation split, for choosing settings without touching test.

    The temperature of cNLL is fitted on the same images (an in-sample fit, optimistic by the same
    small amount for every model, so it ranks models as the test cNLL would).
    """
    metrics = evaluate_predictions(probs, labels, val_probs=probs, val_labels=labels).to_dict()
    return {k: metrics[k] for k in ("acc", "nll", "cnll", "temperature")}


def parity(
    report: dict[str, Any], max_acc_drop: float, fold_diff: float, fold_tolerance: float
) -> dict[str, Any]:
    """The gate: the averaged network within ``max_acc_drop`` points of BE-M, and an exact fold."""
    avg, be, teacher = report["student_avg"], report["student_be"], report["teacher"]
    drop = be["acc"] - avg["acc"]
    return {
        "acc_drop_vs_student_be": drop,
        "max_acc_drop": max_acc_drop,
        "acc_gate_passed": drop <= max_acc_drop,
        "fold_max_abs_diff": fold_diff,
        "fold_tolerance": fold_tolerance,
        "fold_passed": fold_diff <= fold_tolerance,
        "vs_teacher": {k: avg[k] - teacher[k] for k in ("acc", "nll", "ece")},
        "passed": drop <= max_acc_drop and fold_diff <= fold_tolerance,
    }


GAP_METRICS = ("acc", "cnll")  # the gap a compressed network should close: accuracy, calibrated NLL


def gap_closed(
    value: float, start: float, target: float, higher_is_better: bool | None = None
) -> float | None:
    """Percent of the way from ``start`` (one member) to ``target`` (the ensemble) that ``value``
    covers: 100 · (value − start) / (target − start). 0 = no better than the member, 100 = as
    good as the ensemble, negative = worse than the member; the sign takes care of whether higher
    (ACC) or lower (NLL) is better. None when there is no gap: the ensemble is no better than the
    member (``higher_is_better`` says which way is better; None: only an equal ensemble)."""
    if target == start:
        return None
    if higher_is_better is not None and (target > start) != higher_is_better:
        return None  # the teacher does not beat its member: a share of a negative gap means nothing
    return 100.0 * (value - start) / (target - start)


def gaps_closed(report: dict[str, Any], init_member: int | None) -> dict[str, Any]:
    """Share of the member → DE-M gap (ACC, cNLL) each student closes, from the member it started
    from (warm start) or else the average member."""
    members = report["teacher_members"]
    if init_member is not None:
        start = {k: members[init_member][k] for k in GAP_METRICS}
    else:
        start = {k: sum(m[k] for m in members) / len(members) for k in GAP_METRICS}
    rows = ["student_avg", "student_be", "student_avg_alternative"]
    return {
        "from": f"teacher {init_member}" if init_member is not None else "the average member",
        **{
            name: {
                k: gap_closed(report[name][k], start[k], report["teacher"][k], k == "acc")
                for k in GAP_METRICS
            }
            for name in rows
            if name in report
        },
    }


def all_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        report["teacher"],
        *report["teacher_members"],
        report["student_be"],
        *report["student_members"],
        report["student_avg"],
        *([report["student_avg_alternative"]] if "student_avg_alternative" in report else []),
    ]


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """report.md's table: every model of the run, then the baselines trained beside it."""
    return [*all_rows(report), *report.get("baselines", {}).get("rows", [])]


def render_markdown(
    report: dict[str, Any], *, title: str, command: str, details: dict[str, str],
    sections: list[str] = (),  # type: ignore[assignment]
) -> str:  # fmt: skip
    """The report a user can paste: setup, the metrics table, the parity verdict, then
    ``sections`` (lines: the baselines), OOD and corruptions."""
    gate = report["parity"]
    lines = [
        f"# {title}",
        "",
        f"`{command}`" if command else "(from Python: `ensc.compress_ensemble`)",
        "",
        *(f"- {k}: {v}" for k, v in details.items()),
        f"- test images: {report['n_test']}, temperature fitted on {report['n_val']} validation images",
        "",
        markdown_table(table_rows(report), REPORT_COLUMNS),
        "",
        "ACC and agreement with the teacher ensemble (agree DE) in %; NLL, Brier (BS), ECE and the",
        "temperature-scaled cNLL/cECE raw; DEE in teacher members; KL/disagreement = member diversity.",
        "",
        "## Parity",
        "",
        f"- averaged network vs BE student: {signed(-gate['acc_drop_vs_student_be'])} accuracy points "
        f"(allowed drop {gate['max_acc_drop']:.2f}): {'ok' if gate['acc_gate_passed'] else 'FAILED'}",
        f"- fold check (averaged BE vs folded plain network): max |Δlogit| {gate['fold_max_abs_diff']:.2e} "
        f"(tolerance {gate['fold_tolerance']:.0e}): {'ok' if gate['fold_passed'] else 'FAILED'}",
        f"- averaged network vs teacher ensemble: ACC {signed(gate['vs_teacher']['acc'])}, "
        f"NLL {gate['vs_teacher']['nll']:+.4f}, ECE {gate['vs_teacher']['ece']:+.4f}",
    ]
    if "gap_closed" in report:
        gaps = report["gap_closed"]

        def share(name: str, metric: str) -> str:
            value = gaps.get(name, {}).get(metric)
            return (
                "- (the teacher ensemble does not beat the member)"
                if value is None
                else f"{value:.0f} %"
            )

        lines.append(
            f"- member → teacher ensemble gap closed (from {gaps['from']}): averaged network "
            f"{share('student_avg', 'acc')} in ACC, {share('student_avg', 'cnll')} in cNLL; "
            f"BE student {share('student_be', 'acc')} / {share('student_be', 'cnll')}"
        )
    if "fast_weights" in report:  # where the averaged network's loss comes from
        fw = report["fast_weights"]
        lines.append(
            f"- fast weights: max |r − 1| {fw['max_abs_from_one']:.2f}, max spread across members "
            f"{fw['max_member_spread']:.2f} (the farther apart the members, the more averaging loses)"
        )
    lines += [
        *sections,
        *_ood_lines(report.get("ood")),
        *_corruption_lines(report.get("corruptions")),
    ]
    return "\n".join([*lines, ""])


def _ood_lines(ood: dict[str, Any] | None) -> list[str]:
    """report.md's OOD section (`--ood-data`), as `ensc eval --ood-data` prints it."""
    if ood is None:
        return []
    return [
        "", "## Out-of-distribution detection", "",
        f"{ood['n_in']} test images (positive) against {ood['n_out']} images of {ood['data']}; "
        "AUROC and FPR@95 (fractions) of max probability (maxP), entropy (H) and, for the "
        "ensembles, the members' mutual information (MI).",
        "", markdown_table(ood["models"], OOD_COLUMNS),
    ]  # fmt: skip


def _corruption_lines(section: dict[str, Any] | None) -> list[str]:
    """report.md's corruption section (`--corruptions`), as `ensc eval --corruptions` prints it."""
    if section is None:
        return []
    return [
        "", "## Under corruption", "",
        f"{len(section['corruptions'])} corruptions of CIFAR-10-C at severities 1-5 on "
        f"{section['n_test']} test images: each severity's mean over the corruptions, and the "
        "mean over all (ACC %, NLL, cNLL with each model's clean-validation temperature, ECE).",
        "", corruption_table(section),
    ]  # fmt: skip
