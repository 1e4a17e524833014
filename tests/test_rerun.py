"""--config RUN: a run rerun from the settings it recorded, overrides one by one, and the teacher
files and images checked against the record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import ensc
from ensc.errors import ConfigError
from tests.conftest import TINY_COMPRESS, png_folder_teacher, rewrite_pngs, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # the same arithmetic run after run

# what differs between two runs of the same settings: times (amp_reason holds the speed-up that
# --amp auto's probe measured on a CPU with native bf16), and how the command was spelled
TIMES = ("seconds", "s_per_step", "phase_seconds", "wall_seconds", "timing", "eval_seconds",
         "eval_share", "first_step_seconds", "amp_reason", "command", "teacher",
         "teacher_logits_cache")  # fmt: skip


def flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k not in TIMES:
                out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list):
        return {
            k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()
        }
    return {prefix[:-1]: value}


@pytest.fixture(scope="module")
def original(tiny_teacher: Path, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("rerun")
    teacher = cwd / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    result = run_cli("compress", "--teacher", str(teacher), *TINY_COMPRESS, "--out",
                     str(cwd / "a"), cwd=cwd)  # fmt: skip
    assert result.exit_code == 0, result.output
    return cwd / "a"


def test_a_rerun_reproduces_the_report_and_an_override_changes_only_itself(original, tmp_path):
    result = run_cli("compress", "--config", str(original), "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    want = json.loads((original / "report.json").read_text())
    got = json.loads((tmp_path / "b" / "report.json").read_text())
    assert flat(got) == flat(want)  # every number of the report, bit for bit
    # an override: the record says what changed, and nothing else did
    result = run_cli("compress", "--config", str(original / "config.json"), "--lr", "0.02",
                     "--out", str(tmp_path / "c"))  # fmt: skip
    assert result.exit_code == 0, result.output
    a, c = (json.loads((f / "config.json").read_text()) for f in (original, tmp_path / "c"))
    changed = {k for k in flat(a).keys() | flat(c).keys() if flat(a).get(k) != flat(c).get(k)}
    assert "optim.lr" in changed and flat(c)["optim.lr"] == 0.02
    assert changed <= {"optim.lr", "out", "expected.from"} | {
        k for k in changed if k.startswith("expected.")
    }
    # the Python API reruns the same way
    again = ensc.compress_ensemble(config=original, out=tmp_path / "d")
    assert flat(again.report) == flat(want)


def test_a_rerun_refuses_other_teacher_files_and_other_images(original, tmp_path):
    teacher = Path(json.loads((original / "config.json").read_text())["teacher_path"])
    saved = (teacher / "member1.pt").read_bytes()
    shutil.copy(teacher / "member0.pt", teacher / "member1.pt")  # same name, other weights
    try:
        result = run_cli("compress", "--config", str(original), "--out", str(tmp_path / "e"))
    finally:
        (teacher / "member1.pt").write_bytes(saved)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the teacher's files differ from the recorded run's (member1.pt)" in result.output
    assert not (tmp_path / "e").exists()


def test_a_rerun_refuses_images_that_changed_under_the_same_names(tmp_path: Path):
    data, teacher = png_folder_teacher(tmp_path)
    run = tmp_path / "run"
    result = run_cli("compress", "--teacher", str(teacher), "--arch", "resnet8", "--batch-size",
                     "16", "--max-steps", "1", "--max-acc-drop", "100", "--out", str(run))  # fmt: skip
    assert result.exit_code == 0, result.output
    rewrite_pngs(data / "test" / "b")  # same names, other pixels
    with pytest.raises(ConfigError, match="the test images differ from the recorded run's"):
        ensc.compress_ensemble(config=run, out=tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_bad_config_is_one_line(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    for target, message in ((tmp_path / "x.json", "not the config.json of an `ensc compress` run"),
                            (tmp_path / "nope", "cannot read it")):  # fmt: skip
        result = run_cli("compress", "--config", str(target))
        assert result.exit_code != 0 and message in result.output, result.output
