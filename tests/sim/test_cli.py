"""`hetrain simulate`: plan files and the data-parallel baseline; PNG, trace and JSON out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.trace import load_chrome_trace

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
THREE = str(EXAMPLES / "clusters" / "three-kinds.yaml")


def test_simulate_a_plan_file(tmp_path):
    png, trace, out = tmp_path / "g.png", tmp_path / "t.json", tmp_path / "o.json"
    result = CliRunner().invoke(app, [
        "simulate", "--cluster", THREE, "--plan", str(EXAMPLES / "plans" / "three-kinds-1f1b.yaml"),
        "--png", str(png), "--trace", str(trace), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "busy" in result.output and "br104:0" in result.output
    assert png.read_bytes().startswith(b"\x89PNG")
    events, meta = load_chrome_trace(trace)
    assert events and meta["source"] == "simulator" and meta["emulated"] is False
    figures = json.loads(out.read_text())
    assert figures["step_s"] > 0 and figures["tokens_per_s"] > 0
    assert set(figures["devices"]) == {"h100:0", "br104:0", "a100:0"}
    for dev in figures["devices"].values():
        assert abs(dev["busy_share"] + dev["idle_share"] - 1) < 1e-9
    # the chain behind the pipelines' time: its groups are the plan's, fill + bottleneck +
    # drain is the pipeline part of the step, named in the output
    path = figures["critical_path"]
    groups = {s["group"] for s in path["segments"]}
    assert groups == {"p0s0", "p0s1", "p0s2"}  # a 1F1B chain visits every stage
    assert path["fill_s"] + path["bottleneck"]["busy_s"] + path["drain_s"] == \
        pytest.approx(path["pipeline_s"])
    assert 0 < path["pipeline_s"] <= figures["step_s"]
    assert f"-> {path['bottleneck']['group']} (" in " ".join(result.output.split())


def test_simulate_the_data_parallel_baseline(tmp_path):
    out = tmp_path / "o.json"
    result = CliRunner().invoke(app, ["simulate", "--cluster", THREE, "--model", "tiny",
                                      "--global-batch", "24", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["tokens_per_s"] * figures["step_s"] == pytest.approx(24 * 256)  # seq 256
    assert figures["exposed_comm_s"] > 0  # the gradient all-reduce over the bridge


def test_bad_requests_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--cluster", THREE])
    assert result.exit_code == 2 and "--plan" in result.output
    plan = tmp_path / "gap.yaml"
    plan.write_text("model: small\nseq_len: 512\npipelines:\n  - micro_batches: 2\n"
                    "    stages: [{kind: H100, layers: [0, 4]}, {kind: BR104, layers: [5, 10]}]\n")
    result = CliRunner().invoke(app, ["simulate", "--cluster", THREE, "--plan", str(plan)])
    assert result.exit_code == 2 and "layer gap" in result.output
