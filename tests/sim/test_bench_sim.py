"""`hetrain bench sim` end to end on one small plan: run, fit the measured cost, simulate,
write the figures. Behaviour only: timing accuracy depends on the machine, never asserted."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from hetrain.cli.main import app

pytestmark = pytest.mark.slow


def test_bench_sim_writes_measured_and_predicted_steps(tmp_path):
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(app, [
        "bench", "sim", "--plans", "pipeline-3-kinds", "--steps", "3", "--time-scale", "1e-6",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "pipeline-3-kinds" in result.output and "emulated" in result.output
    figures = json.loads(out.read_text())
    for key in ("plans", "max_abs_error_pct", "mean_abs_error_pct", "emulated", "time_scale",
                "profile"):
        assert key in figures
    assert figures["emulated"] is True
    (row,) = figures["plans"]
    assert row["name"] == "pipeline-3-kinds"
    assert row["measured_step_s"] > 0 and row["predicted_step_s"] > 0
    assert math.isfinite(row["error_pct"]) and math.isfinite(figures["max_abs_error_pct"])
    assert figures["max_abs_error_pct"] == pytest.approx(abs(row["error_pct"]))
    assert len(row["measured_steps_s"]) == 3


def test_bench_sim_refuses_an_unknown_plan():
    result = CliRunner().invoke(app, ["bench", "sim", "--plans", "nope"])
    assert result.exit_code == 2
    assert "unknown plan" in result.output
