"""Zero-bubble schedules (backward split into input- and weight-gradient actions) run exactly:
after a few steps every parameter equals one-process training (rtol 1e-5)."""

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


def _run(cluster, raw, model="tiny", steps=2, **cfg):
    plan = expand_plan({"model": model, "seq_len": 16, "micro_batch_size": 2,
                        "schedule": "zero_bubble", **raw}, cluster)
    result = run_plan(cluster, plan, steps=steps, **cfg)
    assert_matches_reference(result, steps=steps)
    return result


def test_three_kinds_uneven_stages_tied_embeddings(cluster):
    """Later stages split their backwards, the first keeps them whole (nothing waits for
    its input gradient); the tied head's weight meets the embedding's in the sync."""
    result = _run(cluster, {"pipelines": [
        {"micro_batches": 4, "stages": [{"kind": "A100-80GB", "layers": [0, 1]},
                                        {"kind": "H100", "layers": [1, 4]},
                                        {"kind": "BR104", "layers": [4, 6]}]},
    ]}, model="tiny-tied", trace=True)
    actions = build_schedule(result.plan).actions
    first, *later = result.plan.routes[0].stages
    assert {a.op for a in actions[first]} == {"forward", "backward"}
    for g in later:
        assert {a.op for a in actions[g]} == {"forward", "backward_input", "backward_weight"}
    weight = [e for e in result.events if e["category"] == "weight"]
    assert len(weight) == 2 * 2 * 4  # per step, split stage and micro-batch


def test_pipelines_partitioned_differently_with_tensor_parallel(cluster):
    """Gradients of layers held by groups of both pipelines meet in the sync; one stage is TP 2
    (DTensor weights in the split backward)."""
    _run(cluster, {"pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "H100", "tp": 2, "layers": [0, 3]},
                                        {"kind": "A100-80GB", "layers": [3, 6]}]},
        {"micro_batches": 2, "stages": [{"kind": "BR104", "layers": [0, 2]},
                                        {"kind": "A100-80GB", "layers": [2, 6]}]},
    ]})


def test_recomputing_stage_keeps_whole_backwards(cluster):
    """A recomputing stage after the first runs whole backwards: each backward pass over
    checkpointed layers runs their forward again, so a split one would recompute in both of
    its actions (the cost model prices one recomputation). The stages around it split."""
    result = _run(cluster, {"pipelines": [
        {"micro_batches": 3, "stages": [{"kind": "H100", "layers": [0, 2]},
                                        {"kind": "A100-80GB", "layers": [2, 4],
                                         "recompute": True},
                                        {"kind": "BR104", "layers": [4, 6]}]},
    ]}, trace=True)
    first, middle, last = result.plan.routes[0].stages
    assert result.plan.group_by_name[middle].recompute
    actions = build_schedule(result.plan).actions
    assert {a.op for a in actions[middle]} == {"forward", "backward"}
    assert {a.op for a in actions[last]} == {"forward", "backward_input", "backward_weight"}
    weight = [e for e in result.events if e["category"] == "weight"]
    assert len(weight) == 2 * 3  # only the last stage's, per step and micro-batch


def test_users_module_data_parallel_with_sharded_optimizer(cluster):
    """A user's module is one stage fed with tokens: a first stage, so whole backwards; the
    replicas' sums and ZeRO-1 shards follow."""
    import torch

    from tests.runtime.test_user_models import TinyLM

    torch.manual_seed(0)
    model = TinyLM().double()
    plan = expand_plan({"model": "TinyLM", "seq_len": 16, "micro_batch_size": 2,
                        "schedule": "zero_bubble", "sharded_optimizer": True, "n_layers": 1,
                        "data_parallel": [{"kind": "H100", "samples": 4},
                                          {"kind": "BR104", "samples": 2}]}, cluster)
    result = run_plan(cluster, plan, steps=2, model=model)
    assert_matches_reference(result, steps=2, model=model)
