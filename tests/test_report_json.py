"""report.json (issue 14): `ensc compress --corruptions --ood-data` measures what `ensc eval` measures,
with the same numbers, into report.json, report.md and pictures; and docs/report-json.md lists
exactly the keys of a real run's report.json and of a real `ensc eval --json` file.

One tiny real run with every optional section (module fixture), one `ensc eval` of its models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ensc import rundir
from ensc.compress.config import compress_config
from ensc.compress.warmstart import WARM_START_LOSS
from ensc.errors import ConfigError
from ensc.evaluation.corruptions import CORRUPTIONS, SEVERITIES
from tests.conftest import REPO, run_cli
from tests.test_ood import _photo_crops
from tests.test_plots import assert_png

DOC = REPO / "docs" / "report-json.md"
# the tiny run's flags; 600 training images as the tiny teacher was trained on, so that `ensc eval`
# of its models (which reads the teacher's data record) carves the same validation split
FLAGS = ("--arch", "resnet8", "--epochs", "1", "--batch-size", "32", "--train-subset", "600",
         "--test-subset", "200", "--max-steps", "2", "--max-acc-drop", "100")  # fmt: skip
ALT = "averaged, BN re-estimated (not kept)", "averaged, BN as trained (not kept)"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _photo_crops(tmp_path_factory.mktemp("ood") / "photos")  # 30 images; needs matplotlib


@pytest.fixture(scope="module")
def full_run(tiny_teacher: Path, photos: Path, tmp_path_factory) -> Path:
    """A finished run with every optional section: --corruptions on 100 images, --ood-data."""
    cwd = tmp_path_factory.mktemp("full_run")
    run = cwd / "runs" / "full"
    result = run_cli(
        "compress", "--teacher", str(tiny_teacher), *FLAGS, "--corruptions",
        "--corruption-subset", "100", "--ood-data", str(photos), "--out", str(run), cwd=cwd,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def eval_json(full_run: Path, tiny_teacher: Path, photos: Path) -> dict:
    """`ensc eval --json` of the run's teacher and student.pt, with every optional section."""
    out = full_run.parent / "eval.json"
    result = run_cli(
        "eval", "--teacher", str(tiny_teacher), "--student", str(full_run / "student.pt"),
        "--test-subset", "200", "--corruptions", "--corruption-subset", "100",
        "--ood-data", str(photos), "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def report_of(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def md_line(md: str, start: str, contains: str = "") -> str:
    """The one line of ``md`` starting with ``start`` (and holding ``contains``)."""
    found = [line for line in md.splitlines() if line.startswith(start) and contains in line]
    assert len(found) == 1, (start, contains, found)
    return found[0]


def md_section(md: str, heading: str) -> str:
    """The text of report.md's ``## heading`` section, up to the next one."""
    assert f"\n## {heading}\n" in md, heading
    return md.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_compress_writes_ood_and_corruption_sections_and_pictures(full_run: Path, photos: Path):
    report, md = report_of(full_run), (full_run / "report.md").read_text()
    names = ["teacher 0", "teacher 1", "DE-2 teacher", "BE-2 student", "averaged single network"]
    alt = report["student_avg_alternative"]["name"]
    assert alt in ALT

    ood = report["ood"]
    assert (ood["data"], ood["n_in"], ood["n_out"], ood["positive"]) == (
        str(photos), 200, 30, "in-distribution"
    )  # fmt: skip
    assert [r["name"] for r in ood["models"]] == [*names, alt]
    base = {"name", "max_prob_auroc", "max_prob_fpr95", "entropy_auroc", "entropy_fpr95"}
    text = md_section(md, "Out-of-distribution detection")
    assert f"200 test images (positive) against 30 images of {photos};" in text
    for row in ood["models"]:  # mutual information for the two ensembles only
        mi = ("mutual_info_auroc", "mutual_info_fpr95")
        ensemble = row["name"] in ("DE-2 teacher", "BE-2 student")
        assert set(row) == base | (set(mi) if ensemble else set())
        assert all(0 <= v <= 1 for k, v in row.items() if k != "name"), row
        cells = [c.strip() for c in md_line(text, f"| {row['name']} ").split("|")[2:-1]]
        keys = ("max_prob_auroc", "max_prob_fpr95", "entropy_auroc", "entropy_fpr95", *mi)
        assert cells == [f"{row[k]:.3f}" if k in row else "-" for k in keys]

    section = report["corruptions"]
    assert section["n_test"] == 100 and section["corruptions"] == list(CORRUPTIONS)
    assert section["severities"] == list(SEVERITIES) and section["seed"] == 0
    assert [m["name"] for m in section["models"]] == [*names, alt]
    rows = {r["name"]: r for r in [report["teacher"], *report["teacher_members"],
                                   report["student_be"], report["student_avg"], report["student_avg_alternative"]]}  # fmt: skip
    for model in section["models"]:
        # cNLL with the clean-validation temperature of the report's table
        assert model["temperature"] == rows[model["name"]]["temperature"]
        assert set(model["per_corruption"]) == set(CORRUPTIONS)
        cells = [model["per_corruption"][c][str(s)] for c in CORRUPTIONS for s in SEVERITIES]
        assert all(0 <= c["acc"] <= 100 and c["nll"] > 0 and 0 <= c["ece"] <= 1 for c in cells)
        assert model["mean"]["acc"] == pytest.approx(sum(c["acc"] for c in cells) / len(cells))
        text = md_section(md, "Under corruption")
        for metric, label, fmt in (("acc", "| ACC %", "{:.2f}"), ("cnll", "| cNLL", "{:.4f}")):
            cells = [
                c.strip() for c in md_line(text, f"| {model['name']} ", label).split("|")[3:-1]
            ]
            want = [model["by_severity"][str(s)][metric] for s in SEVERITIES] + [
                model["mean"][metric]
            ]
            assert cells == [fmt.format(v) for v in want], (model["name"], metric)
    assert "10 corruptions of CIFAR-10-C at severities 1-5 on 100 test images" in md
    # the time they took, in report.json and in report.md's line
    seconds = report["timing"]["corruptions_seconds"]
    assert seconds > 0 and f"corruptions {seconds:.1f} s" in md_line(md, "- after training:")

    for name, size in (
        ("ood_scores.png", (3.3 * 3, 2.3 * 6 + 0.3)),
        ("corruptions.png", (9.5, 3.8)),
    ):
        assert_png(full_run / name, *size)
        assert name in rundir.RUN_FILES
    assert "![OOD scores](ood_scores.png)" in md
    assert "![accuracy and cNLL under corruption](corruptions.png)" in md
    assert sorted(p.name for p in full_run.iterdir()) == sorted(
        ["config.json", "log.txt", "report.json", "report.md", "student.pt", "student_be.pt",
         "reliability.png", "dee.png", "ood_scores.png", "corruptions.png", "curves.csv",
         "curves.png"]
    )  # fmt: skip


def test_report_md_header_is_read_from_report_json(full_run: Path):
    """The numbers of report.md's header come from report.json (data counts, settings, steps)."""
    report, md = report_of(full_run), (full_run / "report.md").read_text()
    s, train = report["settings"], report["train"]
    assert (report["n_train"], report["n_val"], report["n_test"]) == (540, 60, 200)
    assert md_line(md, "- data:") == "- data: fashion-mnist: 540 train / 60 val / 200 test"
    # the defaults of a warm-started BatchEnsemble
    assert (s["members"], s["perturbation"], s["perturbation_step"], s["alpha"], s["temperature"]) == (
        2, "tdiv-sdiv", 1.0, WARM_START_LOSS["alpha"], WARM_START_LOSS["temperature"]
    )  # fmt: skip
    assert md_line(md, "- student:") == (
        f"- student: BE-2 resnet8 (init ones), perturbation tdiv-sdiv (step 1/255), "
        f"α={s['alpha']:g}, T={s['temperature']:g}"
    )
    assert md_line(md, "- teacher:") == f"- teacher: 2 × resnet8 from {s['teacher']}"
    assert train["steps"] == 2 and s["device"] == "cpu"
    amp = (
        ""
        if s["amp"] == "off"
        else (
            f" under {s['amp']} autocast (its network evaluated in float32; the teacher and the BE "
            f"members in {s['amp']})"
        )
    )
    assert s["eval_amp"] == "off"  # on a CPU the numbers are the float32 network's
    # config.json records the precision it trained in (a --resume under auto keeps it)
    assert json.loads((full_run / "config.json").read_text())["amp"] == s["amp"]
    assert s["amp"] in ("off", "bfloat16")  # --amp auto: bf16 only on a CPU with native bf16
    assert md_line(md, "- training:") == (
        f"- training: 2 steps, {train['seconds']:.0f} s on cpu{amp}; run total {report['wall_seconds']:.0f} s"
    )
    assert md.splitlines()[2] == f"`{s['command']}`" and "--ood-data" in s["command"]


def test_compress_numbers_are_those_of_ensc_eval(full_run: Path, eval_json: dict):
    """The same models on the same images: every metric of the report's teacher rows and averaged
    network, under corruption and against the OOD images too, is `ensc eval`'s."""
    report = report_of(full_run)
    student = str(full_run / "student.pt")
    pairs = {"teacher 0": "member 0", "teacher 1": "member 1", "DE-2 teacher": "DE-2",
             "averaged single network": student}  # fmt: skip
    rows = {
        r["name"]: r for r in eval_json["members"] + eval_json["ensembles"] + eval_json["students"]
    }
    mine = {
        r["name"]: r for r in [report["teacher"], *report["teacher_members"], report["student_avg"]]
    }
    # under CPU autocast the run evaluates the teacher in bf16 (Runtime.for_reference), `ensc
    # eval` in float32: the teacher's numbers then agree to bf16's precision only
    bf16 = report["settings"]["reference_amp"] != "off"
    for ours, theirs in pairs.items():
        got, want = mine[ours], rows[theirs]
        check = assert_close if bf16 and ours != "averaged single network" else assert_same
        check(got, want, ours)  # ACC ... DEE, diversity
    for part in ("ood", "corruptions"):
        got = {m["name"]: m for m in report[part]["models"]}
        want = {m["name"]: m for m in eval_json[part]["models"]}
        for ours, theirs in pairs.items():
            check = (
                assert_close
                if bf16 and part == "ood" and ours != "averaged single network"
                else assert_same
            )
            check(got[ours], want[theirs], f"{part}: {ours}")
        head = {k: v for k, v in report[part].items() if k != "models"}
        assert head == {k: v for k, v in eval_json[part].items() if k != "models"}, part


def flat(row: dict, prefix: str = "") -> dict:
    """The values of a (nested) row by dotted key, but its name and what `ensc eval` leaves out of
    a teacher row (``agreement``, ``path``)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif k not in ("name", "agreement", "path"):
            out[prefix + k] = v
    return out


def assert_same(got: dict, want: dict, where: str) -> None:
    """The same keys and values: numbers within float round-off, the rest ("<1", null) equal."""
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), where
    for k, v in want.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=1e-6), (where, k)
        else:
            assert got[k] == v, (where, k)


def assert_close(got: dict, want: dict, where: str) -> None:
    """The same keys; accuracy within 1.5 points (3 of the 200 test images) and NLL within 5 %:
    the same network's numbers from bf16 and from float32 logits."""
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), where
    for k in ("acc", "nll"):
        if k in want:
            tolerance = {"abs": 1.5} if k == "acc" else {"rel": 0.05}
            assert got[k] == pytest.approx(want[k], **tolerance), (where, k)


# --------------------------------------------------------------------------- docs/report-json.md


def documented() -> dict[str, list[str]]:
    """``{heading: keys}``: the `` `key` `` first cells of the tables under each ``## `` heading."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None and (m := re.match(r"\| `([a-z0-9_]+)` \|", line)):
            current.append(m.group(1))
    return sections


def test_report_json_has_exactly_the_documented_keys(full_run: Path, eval_json: dict):
    docs = documented()
    top, rows, eval_top = (docs["report.json: top-level keys"], docs["Model rows"],
                           docs["`ensc eval --json`: top-level keys"])  # fmt: skip
    for keys in (top, rows, eval_top):
        assert keys and len(keys) == len(set(keys)), keys
    report = report_of(full_run)
    assert set(report) == set(top), (
        f"undocumented: {sorted(set(report) - set(top))}; missing: {sorted(set(top) - set(report))}"
    )
    model_rows = [report["teacher"], *report["teacher_members"], report["student_be"],
                  *report["student_members"], report["student_avg"], report["student_avg_alternative"]]  # fmt: skip
    for row in model_rows:
        assert set(row) == set(rows), row["name"]
    assert set(rows) - {"name"} <= set(report["units"])  # every metric has its unit
    assert {"seconds", "s_per_step", "gap_closed", "perturbation_step"} <= set(report["units"])

    assert set(eval_json) == set(eval_top), (
        f"undocumented: {sorted(set(eval_json) - set(eval_top))}; "
        f"missing: {sorted(set(eval_top) - set(eval_json))}"
    )
    assert all(set(r) == set(rows) - {"agreement"} | {"path"} for r in eval_json["members"])
    assert all(set(r) == set(rows) - {"agreement"} for r in eval_json["ensembles"])
    assert all(set(r) == set(rows) for r in eval_json["students"])
    assert set(rows) - {"name"} <= set(eval_json["units"])


# --------------------------------------------------------------------------- refusals


def test_corruption_subset_needs_corruptions(tiny_teacher: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="--corruption-subset needs --corruptions"):
        compress_config(teacher=tiny_teacher, arch="resnet8", corruption_subset=100)
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--corruption-subset", "100",
                     "--out", str(tmp_path / "r"))  # fmt: skip
    assert (
        result.exit_code == 1 and "Error: --corruption-subset needs --corruptions" in result.output
    )
    assert not (tmp_path / "r").exists()


def test_wrong_ood_data_fails_before_training_and_leaves_no_folder(
    tiny_teacher: Path, tmp_path: Path
):
    run = tmp_path / "runs" / "r"
    result = run_cli("compress", "--teacher", str(tiny_teacher), *FLAGS, "--ood-data",
                     str(tmp_path / "nowhere"), "--out", str(run), cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Error: --ood-data" in result.output and "nowhere does not exist" in result.output
    assert not run.exists()  # refused before training: nothing resumable, no folder
