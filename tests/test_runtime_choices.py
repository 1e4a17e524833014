"""--threads auto|N (the cores other processes leave free) and --amp auto|on|off."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ensc.engine import precision, threads
from ensc.errors import ConfigError
from tests.conftest import TINY_COMPRESS, run_cli

BUSY = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "2x"])
def test_bad_thread_counts_are_refused_with_the_fix(value: str):
    with pytest.raises(ConfigError, match="--threads must be auto or a whole number >= 1"):
        threads.parse_threads(value)


def test_explicit_counts_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads("2").threads == 2
    chosen = threads.choose_threads("auto")
    assert (chosen.threads, chosen.reason) == (3, "OMP_NUM_THREADS")


def test_auto_leaves_the_core_a_busy_process_holds(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = threads.usable_cores()
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.5)
        chosen = threads.choose_threads("auto")
    finally:
        busy.kill()
    assert chosen.busy is not None and chosen.busy >= 0.7  # the busy loop, at least
    assert chosen.threads == max(1, min(cores, round(cores - chosen.busy)))
    assert chosen.threads <= max(1, cores - 1)
    assert "busy with other work" in chosen.describe()


def test_cli_threads_reach_torch_and_the_report(tiny_teacher: Path, tmp_path: Path):
    before = torch.get_num_threads()
    try:
        result = run_cli("compress", "--teacher", str(tiny_teacher), *TINY_COMPRESS,
                         "--threads", "1", "--amp", "off", "--ema", "0.9",
                         "--out", str(tmp_path / "run"))  # fmt: skip
        assert result.exit_code == 0, result.output
        settings = json.loads((tmp_path / "run" / "report.json").read_text())["settings"]
        assert (settings["threads"], settings["amp"], settings["ema"]) == (1, "off", 0.9)
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        assert config["optim"]["ema"] == 0.9
        assert settings["amp_reason"] == "--amp off"
    finally:
        torch.set_num_threads(before)


def test_bad_threads_on_the_command_line_is_one_line(tiny_teacher: Path, tmp_path: Path):
    result = run_cli("compress", "--teacher", str(tiny_teacher), *TINY_COMPRESS,
                     "--threads", "0", "--out", str(tmp_path / "run"))  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: --threads must be auto or a whole number >= 1; got '0'"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, "auto"), (True, "on"), (False, "off"), ("auto", "auto"), ("on", "on")],
)
def test_amp_spellings(value, mode: str):
    assert precision.parse_amp(value) == mode


def test_bad_amp_is_refused():
    with pytest.raises(ConfigError, match="--amp must be one of auto, on, off"):
        precision.parse_amp("bf16")


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    assert precision.native_bf16(precision.cpu_flags(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert not precision.native_bf16(precision.cpu_flags(cpuinfo))


def test_auto_amp_on_this_cpu_follows_native_bf16_and_says_why():
    chosen = precision.choose_amp("auto", torch.device("cpu"))
    assert chosen.reason.startswith("auto: ")
    if not precision.native_bf16():
        assert not chosen.on and "no native bf16" in chosen.reason and not chosen.probed
    else:  # on only where the real probe measured bf16 faster (its ratio is in the reason)
        assert chosen.probed and chosen.on == chosen.reason.startswith("auto: native bf16, ")
    assert precision.choose_amp("on", torch.device("cpu")).on
    assert not precision.choose_amp("off", torch.device("cpu")).on
    assert precision.choose_amp("auto", torch.device("cuda")).on


@pytest.mark.parametrize(
    "flags, speedup, on",
    [({"avx2"}, 3.0, False), ({"avx512_bf16"}, 1.0, False), ({"avx512_bf16"}, 2.0, True),
     ({"amx_bf16"}, 1.2, True)],
)  # fmt: skip
def test_auto_amp_needs_native_bf16_and_a_faster_probe(monkeypatch, flags, speedup, on):
    # other CPUs' answers: their /proc/cpuinfo flags and what their probe would measure
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(precision, "bf16_speedup", lambda: speedup)
    chosen = precision.choose_amp("auto", torch.device("cpu"))
    assert chosen.on is on and chosen.probed is (flags != {"avx2"})
    assert (f"{speedup:.2f}x" in chosen.reason) is chosen.probed


@pytest.mark.parametrize("recorded", ["bfloat16", "off"])
def test_a_resumed_run_trains_on_in_the_precision_it_started_with(tmp_path: Path, recorded: str):
    """--resume under --amp auto takes the precision config.json records, whatever a probe of
    the machine as it is now would say; --amp on/off and a fresh run decide for themselves."""
    from dataclasses import replace

    from ensc import rundir
    from ensc.compress.config import compress_config, with_recorded_amp
    from ensc.engine.runtime import Runtime

    (tmp_path / rundir.CONFIG).write_text(json.dumps({"amp": recorded}))
    config = compress_config(teacher=tmp_path, arch="resnet8", resume=True)
    auto = Runtime(torch.device("cpu"), amp=recorded == "off", amp_reason="auto: probed now")
    resumed = with_recorded_amp(auto, config, tmp_path)
    assert resumed.amp is (recorded != "off") and "as the resumed run started" in resumed.amp_reason
    assert resumed.precision(resumed.amp) == recorded
    asked = replace(auto, amp_reason="--amp on" if auto.amp else "--amp off")
    assert with_recorded_amp(asked, config, tmp_path) == asked
    assert with_recorded_amp(auto, replace(config, resume=False), tmp_path) == auto
    assert with_recorded_amp(auto, config, tmp_path / "none") == auto  # no config.json yet


def test_the_probe_times_both_precisions():
    speedup = precision.bf16_speedup()
    assert 0.01 < speedup < 100  # a ratio of two real timings


def test_auto_keeps_a_thread_count_the_program_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = threads.usable_cores()
    if cores < 2:
        pytest.skip("needs 2 cores to tell a program's choice from one thread per core")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores + 1)  # neither one per core nor an auto choice
        chosen = threads.apply_threads("auto")
        assert (chosen.threads, torch.get_num_threads()) == (cores + 1, cores + 1)
        assert chosen.reason.startswith("set by the program")
    finally:
        torch.set_num_threads(before)


def test_a_resumed_teacher_trains_on_in_the_precision_it_started_with(tmp_path: Path):
    """`ensc train --resume` under --amp auto: the precision of the interrupted member's state,
    else that of the members trained so far; --amp on/off is obeyed."""
    from dataclasses import replace

    from ensc.data.splits import DataConfig
    from ensc.engine.loop import OptimConfig
    from ensc.engine.runtime import Runtime, resolve_runtime
    from ensc.models.checkpoint import load_checkpoint
    from ensc.teachers.train import (
        TeacherTrainConfig,
        _resumed_amp,
        _state_path,
        member_path,
        train_teacher,
    )

    data = DataConfig("fashion-mnist", train_subset=64, test_subset=32)
    config = TeacherTrainConfig(arch="resnet8", data=data, out=tmp_path / "t", members=1,
                                optim=OptimConfig(epochs=1, batch_size=16, max_steps=1))  # fmt: skip
    train_teacher(config, resolve_runtime("cpu", amp="on"))
    assert load_checkpoint(member_path(config.out, 0)).info["amp"] == "bfloat16"
    resumed = replace(config, members=2, resume=True)
    auto_off = Runtime(torch.device("cpu"), amp=False, amp_reason="auto: probed now")
    assert _resumed_amp(resumed, auto_off).amp  # as member 0 trained
    asked = replace(auto_off, amp_reason="--amp off")
    assert _resumed_amp(resumed, asked) == asked
    # an interrupted member 1 that trained in float32 wins over the finished member 0
    torch.save({"amp": "off"}, _state_path(config.out, 1))
    auto_on = Runtime(torch.device("cpu"), amp=True, amp_reason="auto: probed now")
    assert not _resumed_amp(resumed, auto_on).amp
