"""Property: data-parallel shares add up to the global batch, and every sample of the batch
goes to exactly one micro-batch, for any speeds and batch sizes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import model_config, model_spec
from hetrain.planner import balanced_shares, data_parallel_plan, proportional_shares

speeds = st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=12)


@given(speeds, st.integers(min_value=0, max_value=5000))
def test_balanced_shares_sum_and_balance(times, total):
    shares = balanced_shares(times, total)
    assert sum(shares) == total and all(s >= 0 for s in shares)
    # No single move of a sample would finish the step earlier.
    finish = max(n * t for n, t in zip(shares, times, strict=True))
    for i, n in enumerate(shares):
        if n and n * times[i] == finish:
            assert all((m + 1) * t >= finish - 1e-9 * finish for m, t in zip(shares, times,
                                                                             strict=True))


@given(speeds, st.integers(min_value=0, max_value=5000))
def test_proportional_shares_within_one_of_ideal(weights, total):
    shares = proportional_shares(weights, total)
    assert sum(shares) == total
    for share, w in zip(shares, weights, strict=True):
        assert abs(share - total * w / sum(weights)) < 1 + 1e-9


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=1e12, max_value=2e15), min_size=1, max_size=6),
       st.integers(min_value=1, max_value=600), st.integers(min_value=1, max_value=16))
def test_every_sample_is_seen_exactly_once(flops, global_batch, micro_batch_size):
    cluster = cluster_from_dict({
        "kinds": [{"name": f"k{i}", "vendor": "x", "backend": "gloo", "flops": {"fp32": f},
                   "memory_gib": 80, "memory_bandwidth_gbps": 1000}
                  for i, f in enumerate(flops)],
        "nodes": [{"name": f"n{i}", "kind": f"k{i}"} for i in range(len(flops))]})
    cost = CostModel(cluster, model_spec(model_config("tiny"), 32))
    plan = data_parallel_plan(cluster, cost, global_batch, micro_batch_size=micro_batch_size)
    assert sum(plan.samples_of(g.name) for g in plan.stage_groups) == global_batch
    seen = [0] * global_batch
    for mb in plan.micro_batches:
        for s in range(mb.first_sample, mb.first_sample + mb.size):
            seen[s] += 1
    assert seen == [1] * global_batch
