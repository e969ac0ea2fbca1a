"""`hetrain plan` and `hetrain profile`: tables, plan and summary files, errors as exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.cluster import load_cluster
from hetrain.cost import CostModel, Profile
from hetrain.model import model_config, model_spec
from hetrain.plan import load_plan
from hetrain.planner.report import checked_memory_bytes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
THREE = str(EXAMPLES / "clusters" / "three-kinds.yaml")


def test_plan_writes_a_valid_plan_and_summary(tmp_path):
    out, summary = tmp_path / "plan.json", tmp_path / "summary.json"
    result = CliRunner().invoke(app, [
        "plan", "--cluster", THREE, "--model", "llama-7b", "--seq-len", "1024",
        "--global-batch", "16", "--out", str(out), "--json", str(summary), "--compare"])
    assert result.exit_code == 0, result.output
    for word in ("H100", "BR104", "tokens/s", "MFU", "homogeneous", "H100 alone", "speedup"):
        assert word in result.output
    figures = json.loads(summary.read_text())
    assert figures["predicted_step_s"] > 0 and figures["search_s"] >= 0
    assert figures["tokens_per_s"] == 16 * 1024 / figures["predicted_step_s"]
    assert set(figures["baselines"]) == {"homogeneous", "H100 alone", "BR104 alone",
                                         "A100-80GB alone"}
    assert figures["exhaustive"] is True
    cluster = load_cluster(THREE)
    plan = load_plan(out, cluster)
    assert plan.predicted["step_s"] == figures["predicted_step_s"]
    assert figures["half_layers"] == plan.half_layers
    checked_memory_bytes(plan, CostModel(cluster, model_spec(model_config("llama-7b"), 1024)))


def test_stage_layers_read_in_half_layers():
    """The plan table names a stage's first and last layer; in half layers with the block's
    half (a: attention, b: MLP), layers counted as in whole layers (0: embedding)."""
    from types import SimpleNamespace

    from hetrain.cli.plan import _layer_range

    whole, halves = SimpleNamespace(half_layers=False), SimpleNamespace(half_layers=True)
    assert _layer_range(whole, (5, 15)) == "5-14"
    # units: 0 embedding, 2i + 1 / 2i + 2 block i's halves (layer i + 1), 2n + 1 the head
    assert _layer_range(halves, (0, 4)) == "0-2a"
    assert _layer_range(halves, (4, 9)) == "2b-4b"
    assert _layer_range(halves, (9, 10)) == "5a"


def test_plan_refuses_what_cannot_fit():
    result = CliRunner().invoke(app, ["plan", "--cluster", THREE, "--model", "llama-405b"])
    assert result.exit_code == 2
    assert "GiB for weights and optimizer states" in result.output
    result = CliRunner().invoke(app, ["plan", "--cluster", THREE, "--model", "tiny",
                                      "--seq-len", "100000"])
    assert result.exit_code == 2 and "max_seq_len" in result.output
    result = CliRunner().invoke(app, ["plan", "--cluster", THREE, "--model", "tiny",
                                      "--dtype", "fp16", "--global-batch", "8"])
    assert result.exit_code == 0, result.output  # all three compute in fp16


def test_profile_then_plan_with_it(tmp_path):
    prof = tmp_path / "profile.json"
    result = CliRunner().invoke(app, ["profile", "--model", "tiny", "--seq-len", "32",
                                      "--repeats", "1", "--out", str(prof)])
    assert result.exit_code == 0, result.output
    assert "cpu" in result.output and Profile.load(prof).has("cpu")
    cpus = tmp_path / "cpus.yaml"
    cpus.write_text("nodes:\n  - {name: c, kind: cpu, count: 2}\n")
    result = CliRunner().invoke(app, ["plan", "--cluster", str(cpus), "--model", "tiny",
                                      "--seq-len", "32", "--global-batch", "8",
                                      "--profile", str(prof)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["plan", "--cluster", str(cpus), "--model", "small",
                                      "--global-batch", "8", "--profile", str(prof)])
    assert result.exit_code == 2 and "hetrain profile --model small" in result.output
    result = CliRunner().invoke(app, ["profile", "--model", "tiny", "--kinds", "H100"])
    assert result.exit_code == 2 and "not present here" in result.output
