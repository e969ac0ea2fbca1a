"""Emulated links: over a deliberately slow link, a two-stage emulated pipeline's measured step
takes about what the simulator gives it, transfers included (they dominate here)."""

from __future__ import annotations

import pytest

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.plan import expand_plan
from hetrain.runtime.results import steady_step_s
from hetrain.sim.simulate import simulate_plan
from tests.helpers import assert_matches_reference, run_plan

pytestmark = pytest.mark.slow


def test_a_slow_link_holds_the_step_to_the_simulated_one():
    # 0.15 s per message across nodes: far above the real CPU work of this tiny pipeline,
    # whose compute the time scale of 1 (real seconds) makes negligible once paced.
    cluster = cluster_from_dict({
        "nodes": [{"name": "h", "kind": "H100", "count": 1},
                  {"name": "a", "kind": "A100-80GB", "count": 1}],
        "links": {"inter_node_latency_us": 150_000}})
    plan = expand_plan({"model": "tiny", "seq_len": 16, "micro_batch_size": 2, "pipelines": [
        {"micro_batches": 2, "stages": [{"kind": "H100", "layers": [0, 3]},
                                        {"kind": "A100-80GB", "layers": [3, 6]}]}]}, cluster)
    cost = CostModel(cluster, model_spec(model_config("tiny"), 16))
    simulated = simulate_plan(plan, cluster, cost, trace=False)
    assert simulated.exposed_comm_s > 0.5 * simulated.step_s  # the links dominate
    result = run_plan(cluster, plan, steps=3, time_scale=1.0)
    assert_matches_reference(result, steps=3)  # pacing delays, never changes, the maths
    measured = steady_step_s(result.step_s)
    # Without link pacing the step would be the real CPU work: a few ms, not ~1 s.
    assert 0.7 * simulated.step_s < measured < 2.5 * simulated.step_s
