"""Half layers (Plan.half_layers): stage boundaries inside a block, between its attention
half and its MLP half. Training stays exact: after a few steps every parameter equals
one-process training (rtol 1e-5, float64). The tiny decoder has 4 blocks: 10 half-layer
units (embedding 0, block i's attention half 2i + 1 and MLP half 2i + 2, head 9)."""

from __future__ import annotations

import pytest

from hetrain.cluster import load_cluster
from hetrain.errors import PlanError
from hetrain.model.loading import load_model
from hetrain.plan import expand_plan
from hetrain.plan.validate import validate_plan
from tests.conftest import EXAMPLES
from tests.helpers import assert_matches_reference, run_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")


def _run(cluster, raw, schedule="1f1b", model="tiny", steps=2, **extra):
    plan = expand_plan({"model": model, "seq_len": 16, "micro_batch_size": 2,
                        "schedule": schedule, "half_layers": True, **extra, **raw}, cluster)
    result = run_plan(cluster, plan, steps=steps)
    assert_matches_reference(result, steps=steps)
    return result


def test_three_kinds_cut_inside_blocks_zero_bubble(cluster):
    """Each boundary between a block's halves: A100 holds the embedding and block 0's
    attention, H100 the rest of block 0 to block 2's attention, BR104 the rest; a second
    pipeline cut elsewhere sums the gradients of the halves both hold."""
    _run(cluster, {"pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "A100-80GB", "layers": [0, 2]},
                                        {"kind": "H100", "layers": [2, 6]},
                                        {"kind": "BR104", "layers": [6, 10]}]},
        {"micro_batches": 1, "stages": [{"kind": "A100-80GB", "layers": [0, 5]},
                                        {"kind": "BR104", "layers": [5, 10]}]},
    ]}, schedule="zero_bubble", model="tiny-tied")


def test_tensor_parallel_halves_with_pieces_and_recompute(cluster):
    """A TP-2 stage (sequence parallel) starting and ending on MLP halves, a recomputing
    stage, sequences in two pieces (the attention half reads the earlier piece's keys)."""
    _run(cluster, {"sharded_optimizer": True, "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "A100-80GB", "layers": [0, 3],
                                         "recompute": True},
                                        {"kind": "H100", "tp": 2, "layers": [3, 8]},
                                        {"kind": "BR104", "layers": [8, 10]}]},
    ]}, schedule="zero_bubble", seq_chunks=2)


def test_whole_layer_units_refused_where_the_model_has_none(cluster):
    """A plan in half layers for a model that is not the reference decoder is refused,
    the field named; a range past the half-layer count too."""
    plan = expand_plan({"model": "tiny", "seq_len": 16, "half_layers": True, "pipelines": [
        {"micro_batches": 1, "stages": [{"kind": "A100-80GB", "layers": [0, 11]}]}]},
        cluster)
    spec = load_model("tiny").spec(16)
    with pytest.raises(PlanError, match="10 half layers"):
        validate_plan(plan, cluster, spec)
    whole_only = spec.model_copy(update={"halves": None})
    with pytest.raises(PlanError, match="half_layers"):
        validate_plan(plan, cluster, whole_only)
    # another model: refused before any worker starts, the field named
    from torch import nn

    from hetrain.model.source import WholeModule
    from hetrain.runtime import TrainConfig, train

    whole = WholeModule(nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 100)), "bigram")
    with pytest.raises(PlanError, match="half_layers: model 'bigram' is cut at whole layers"):
        train(cluster, plan, TrainConfig(model="tiny", steps=1), model=whole)
