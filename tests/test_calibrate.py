"""The single network ships calibrated: the validation temperature folded into its last layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ensc.compress.calibrate import fold_temperature
from tests.conftest import TINY_COMPRESS, run_cli


def _net(tail: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)]
    return nn.Sequential(*layers, *([tail] if tail is not None else [])).eval()


def test_folding_divides_the_logits_and_keeps_the_argmax():
    net, x = _net(), torch.rand(8, 3, 8, 8)
    before = net(x).detach()
    assert fold_temperature(net, 2.5, x)
    torch.testing.assert_close(net(x).detach(), before / 2.5)
    assert torch.equal(net(x).argmax(-1), before.argmax(-1))


def test_a_network_whose_output_is_not_its_last_linear_is_left_alone():
    net, x = _net(nn.Tanh()), torch.rand(8, 3, 8, 8)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert not fold_temperature(net, 2.5, x)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert not fold_temperature(nn.Sequential(nn.Flatten()), 2.5, x)  # no Linear at all


def test_the_shipped_network_is_calibrated_on_validation(tiny_teacher: Path, tmp_path: Path):
    """Its own fitted temperature is then about 1, its NLL its cNLL; --no-calibrate ships it as
    trained with the same accuracy."""
    reports = {}
    for flag in ("--calibrate", "--no-calibrate"):
        run = tmp_path / flag
        result = run_cli("compress", "--teacher", str(tiny_teacher), *TINY_COMPRESS, flag,
                         "--out", str(run), cwd=tmp_path)  # fmt: skip
        assert result.exit_code == 0, result.output
        reports[flag] = json.loads((run / "report.json").read_text())
    on, off = reports["--calibrate"], reports["--no-calibrate"]
    assert off["calibration"] is None and on["calibration"]["folded"] is True
    assert on["calibration"]["temperature"] == pytest.approx(
        off["student_avg"]["temperature"], rel=1e-4
    )
    assert on["student_avg"]["temperature"] == pytest.approx(1.0, abs=0.01)
    assert on["student_avg"]["acc"] == off["student_avg"]["acc"]
    assert on["student_avg"]["cnll"] == pytest.approx(off["student_avg"]["cnll"], rel=1e-4)
    assert on["val"]["student_avg"]["nll"] == pytest.approx(
        on["val"]["student_avg"]["cnll"], rel=1e-4
    )
    md = (tmp_path / "--calibrate" / "report.md").read_text()
    assert "- calibration: temperature" in md and "folded into the last layer" in md
