"""Sequence chunks (Plan.seq_chunks): each micro-batch passes the pipeline as consecutive
pieces of its sequence, the later pieces attending to the earlier ones' keys and values.
Training stays exact: after a few steps every parameter equals one-process training
(rtol 1e-5, float64)."""

from __future__ import annotations

import pytest

from hetrain.cluster import load_cluster
from hetrain.plan import expand_plan
from hetrain.plan.schedule import build_schedule
from tests.conftest import EXAMPLES
from tests.helpers import assert_matches_reference, run_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


def _run(cluster, raw, chunks, schedule="1f1b", model="tiny", steps=2, **cfg):
    plan = expand_plan({"model": model, "seq_len": 16, "micro_batch_size": 2,
                        "schedule": schedule, "seq_chunks": chunks, **raw}, cluster)
    result = run_plan(cluster, plan, steps=steps, **cfg)
    assert_matches_reference(result, steps=steps)
    return result


def test_three_kinds_uneven_stages_1f1b(cluster):
    """Two pieces of each sequence; every stage runs each piece's forward and backward,
    a piece's backward after the later piece's at the same stage."""
    result = _run(cluster, {"pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "A100-80GB", "layers": [0, 1]},
                                        {"kind": "H100", "layers": [1, 4]},
                                        {"kind": "BR104", "layers": [4, 6]}]},
    ]}, chunks=2, model="tiny-tied")
    for acts in build_schedule(result.plan).actions.values():
        assert len(acts) == 2 * 3 * 2
        backward = [(a.micro_batch, a.chunk) for a in acts if a.op != "forward"]
        for mb in range(3):
            assert backward.index((mb, 1)) < backward.index((mb, 0))


def test_zero_bubble_with_tensor_parallel_and_two_pipelines(cluster):
    """Four pieces under split backwards (the earlier pieces' key and value gradients
    reach them through the input-gradient action), a TP-2 stage, two pipelines summing
    the gradients of the layers both hold."""
    _run(cluster, {"pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 3]},
                                        {"kind": "A100-80GB", "layers": [3, 6]}]},
        {"micro_batches": 1, "stages": [{"kind": "BR104", "layers": [0, 2]},
                                        {"kind": "A100-80GB", "layers": [2, 6]}]},
    ]}, chunks=4, schedule="zero_bubble")


def test_recomputing_stage(cluster):
    """A recomputing stage runs each piece's forward again in its backward: the same keys
    and values of the earlier pieces are read."""
    _run(cluster, {"pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 2]},
                                        {"kind": "A100-80GB", "layers": [2, 4],
                                         "recompute": True},
                                        {"kind": "BR104", "layers": [4, 6]}]},
    ]}, chunks=2, schedule="zero_bubble")


def test_regathering_tensor_parallel_stage_with_a_sharded_optimizer(cluster):
    """Pieces through a TP-2 stage that keeps sequence parallelism's gathered input as
    shards (gathered again in backward), tied embeddings, ZeRO-1 across the pipelines."""
    _run(cluster, {"sharded_optimizer": True, "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "A100-80GB", "layers": [0, 2]},
                                        {"kind": "H100", "tp": 2, "layers": [2, 6],
                                         "regather": True}]},
        {"micro_batches": 1, "stages": [{"kind": "BR104", "layers": [0, 6]}]},
    ]}, chunks=2, schedule="zero_bubble", model="tiny-tied")
