"""The planner's plan for a small mixed cluster runs in the pipelines runtime, exactly."""

from __future__ import annotations

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.planner.search import SearchOptions, search_plan
from tests.helpers import assert_matches_reference, run_plan

pytestmark = pytest.mark.slow


def test_searched_plan_trains_like_one_device():
    # At the tiny model's real-GPU step time (microseconds) link latencies would make any
    # mixing pointless; free links let the search mix kinds, which is what is under test.
    cluster = cluster_from_dict({
        "nodes": [{"name": "h100", "kind": "H100", "count": 2},
                  {"name": "a100", "kind": "A100-80GB"}, {"name": "br104", "kind": "BR104"}],
        "links": {"inter_node_latency_us": 0, "intra_node_latency_us": 0,
                  "inter_node_gbps": 1e6, "bridge_gbps": 1e6}})
    cost = CostModel(cluster, model_spec(model_config("tiny"), 64))
    plan = search_plan(cluster, cost, 32, SearchOptions(dtype="fp32")).plan
    assert plan.predicted["step_s"] > 0
    assert len(plan.kinds()) >= 2, f"expected a plan mixing kinds, got {plan.stage_groups}"
    result = run_plan(cluster, plan, steps=3)
    assert_matches_reference(result, steps=3)
