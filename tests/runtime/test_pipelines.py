"""Pipelines across kinds, shared and uneven, with data and tensor parallelism per stage:
after 3 steps every parameter equals one-process training (rtol 1e-5)."""

from __future__ import annotations

import pytest

from hetrain.cluster import load_cluster
from hetrain.plan import expand_plan
from tests.conftest import EXAMPLES
from tests.helpers import assert_matches_reference, run_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


def _run(cluster, raw, model="tiny", steps=3, seq_len=16):
    plan = expand_plan({"model": model, "seq_len": seq_len, "micro_batch_size": 2, **raw},
                       cluster)
    result = run_plan(cluster, plan, steps=steps)
    assert_matches_reference(result, steps=steps)
    return result


def test_two_pipelines_two_stages_uneven_layers(cluster):
    _run(cluster, {"pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "H100", "layers": [0, 4]},
                                        {"kind": "A100-80GB", "layers": [4, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "BR104", "layers": [0, 2]},
                                        {"kind": "A100-80GB", "layers": [2, 6]}]},
    ]})


def test_two_pipelines_partitioned_differently(cluster):
    _run(cluster, {"pipelines": [
        {"micro_batches": 4, "stages": [{"kind": "H100", "layers": [0, 2]},
                                        {"kind": "BR104", "layers": [2, 4]},
                                        {"kind": "A100-80GB", "layers": [4, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 3]},
                                        {"kind": "A100-80GB", "layers": [3, 6]}]},
    ]})


def test_one_pipeline_mixing_three_kinds_with_tied_embeddings(cluster):
    _run(cluster, {"pipelines": [
        {"micro_batches": 4, "stages": [{"kind": "A100-80GB", "layers": [0, 1]},
                                        {"kind": "H100", "layers": [1, 4]},
                                        {"kind": "BR104", "layers": [4, 6]}]},
    ]}, model="tiny-tied")


def test_stage_with_tensor_parallel_two(cluster):
    _run(cluster, {"pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 3]},
                                        {"kind": "A100-80GB", "layers": [3, 6]}]},
    ]})


def test_data_parallel_two_then_four(cluster):
    result = _run(cluster, {"mesh": {"micro_batches": 8, "stages": [
        {"kind": "BR104", "dp": 2, "layers": [0, 3]},
        {"kind": "H100", "dp": 4, "layers": [3, 6]}]}})
    assert len(result.plan.stage_groups) == 6


@pytest.mark.parametrize("seq_len", [16, 14])  # sequence split 2 and 4 ways; 4 ways not
def test_tensor_parallel_two_then_four_then_two(cluster, seq_len):
    _run(cluster, seq_len=seq_len, raw={"pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 2]},
                                        {"kind": "A100-80GB", "tp": 4, "layers": [2, 4]},
                                        {"kind": "H100", "tp": 2, "layers": [4, 6]}]},
    ]})


def test_replicas_with_different_tp_degrees_share_layers(cluster):
    # Two routes hold the same blocks with TP 2 and TP 4: gradients meet on full tensors.
    _run(cluster, {"pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 6]}]},
        {"micro_batches": 3, "stages": [{"kind": "A100-80GB", "tp": 4, "layers": [0, 6]}]},
    ]})


@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])
def test_recomputed_stages_including_a_sequence_parallel_group(cluster, schedule):
    # Recomputation reruns each layer's forward (its TP collectives too) in backward: the
    # same values, so the run stays exact under either schedule.
    _run(cluster, {"schedule": schedule, "pipelines": [
        {"micro_batches": 3, "stages": [
            {"kind": "H100", "tp": 2, "layers": [0, 3], "recompute": True},
            {"kind": "A100-80GB", "layers": [3, 5]},
            {"kind": "BR104", "layers": [5, 6], "recompute": True}]},
    ]})


@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])
def test_regathering_tensor_parallel_stage_after_the_first(cluster, schedule):
    # Under zero-bubble the TP group splits its backward: the input-gradient action gets
    # uninitialised memory in the layout of the regathered inputs (their values are read
    # only for weight gradients), the weight action gathers them. Exact either way.
    _run(cluster, {"schedule": schedule, "pipelines": [
        {"micro_batches": 3, "stages": [
            {"kind": "BR104", "layers": [0, 2]},
            {"kind": "H100", "tp": 2, "layers": [2, 6], "regather": True}]},
    ]})
