"""One job mixing a real kind (the host CPU) with emulated kinds: exact, labelled per kind,
and the emulated kinds paced against the real kind's measured speed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hetrain.cli.main import app
from hetrain.cluster import load_cluster
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.planner import data_parallel_plan
from hetrain.runtime.emulation import (
    anchored_time_scale,
    emulated_kinds,
    model_seconds_per_sample,
)
from tests.conftest import EXAMPLES
from tests.helpers import assert_matches_reference, run_plan

CLUSTER = EXAMPLES / "clusters" / "cpu-and-emulated.yaml"


@pytest.fixture
def mixed():
    cluster = load_cluster(CLUSTER)
    plan = data_parallel_plan(cluster, CostModel(cluster, model_spec(model_config("tiny"), 16)),
                              14)
    return cluster, plan


def test_the_cpu_kind_is_real_and_the_others_emulated(mixed):
    cluster, plan = mixed
    assert emulated_kinds(plan, cluster) == {"half-cpu", "quarter-cpu"}


def test_emulated_kinds_keep_the_catalog_ratio_to_the_real_kinds_measured_speed(mixed):
    cluster, plan = mixed
    cost = CostModel(cluster, model_spec(model_config("tiny"), 16))
    measured_s = 0.004  # what the real cpu worker takes per sample
    scale = anchored_time_scale(plan, cost, "cpu", measured_s)
    for kind in ("half-cpu", "quarter-cpu"):
        paced_s = model_seconds_per_sample(plan, cost, kind, "fp32") * scale
        ratio = model_seconds_per_sample(plan, cost, kind, "fp32") / \
            model_seconds_per_sample(plan, cost, "cpu", "fp32")
        assert paced_s == pytest.approx(measured_s * ratio)
        assert ratio > 1  # slower than the CPU: the emulated worker can keep its pace


@pytest.mark.slow
@pytest.mark.parametrize("zero_and_clip", [False, True], ids=["plain", "zero1-clipped"])
def test_real_cpu_and_emulated_kinds_in_one_job_equal_one_process(mixed, zero_and_clip):
    """The real worker sums its buckets on its main thread (its backward ends its step), the
    emulated ones on their comm threads, paced: the collectives meet all the same. With
    ZeRO-1 and clipping the real worker's pieces wait for the norm like the others'."""
    cluster, plan = mixed
    assert len({r.samples for r in plan.routes}) == 3  # uneven shares across the kinds
    cfg = {"grad_clip": 0.05} if zero_and_clip else {}
    if zero_and_clip:
        plan = plan.model_copy(update={"sharded_optimizer": True})
    result = run_plan(cluster, plan, steps=3, **cfg)
    modes = result.summary()["modes"]
    assert modes == {"cpu": "real", "half-cpu": "emulated", "quarter-cpu": "emulated"}
    assert {g["mode"] for g in result.per_group.values()} == {"real", "emulated"}
    if zero_and_clip:
        assert any(r.clipped for r in result.records), [r.grad_norm for r in result.records]
    assert_matches_reference(result, steps=3, **cfg)


@pytest.mark.slow
def test_train_cli_writes_the_mode_of_each_kind(tmp_path):
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["train", "--cluster", str(CLUSTER), "--steps", "5",
                                      "--global-batch", "14", "--seq-len", "16",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    modes = {kind: k["mode"] for kind, k in summary["per_kind"].items()}
    assert modes == {"cpu": "real", "half-cpu": "emulated", "quarter-cpu": "emulated"}
    assert len(summary["losses"]) == 5
    assert "real: cpu" in result.output
