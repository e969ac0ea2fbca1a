"""The analytic step estimate: consistent with the shared 1F1B schedule, and its sync terms."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetrain.cluster import cluster_from_dict
from hetrain.cost import CostModel
from hetrain.model import LayerSpec, ModelSpec, model_config, model_spec
from hetrain.plan import Plan, Route, StageGroup, build_schedule
from hetrain.plan.sync import bucket_bytes, sync_buckets
from hetrain.planner import data_parallel_plan
from hetrain.planner.estimate import estimate_step, mfu_by_kind
from hetrain.sim import simulate_plan

# Links so fast that transfers take no time: the estimate is then compute only, as the
# schedule's own makespan is.
FREE_LINKS = {"inter_node_gbps": 1e15, "bridge_gbps": 1e15, "inter_node_latency_us": 0,
              "intra_node_latency_us": 0}
CLUSTER = cluster_from_dict({
    "nodes": [{"name": "h", "kind": "H100", "count": 4, "intra_node_gbps": 1e15},
              {"name": "a", "kind": "A100-80GB", "count": 4, "intra_node_gbps": 1e15}],
    "links": FREE_LINKS})
LAYER = LayerSpec(name="block", params=1_000_000, forward_flops_per_token=2e6,
                  activation_elems_per_token=100, recompute_elems_per_token=10,
                  output_elems_per_token=64)
SPEC = ModelSpec(name="uniform", seq_len=128, dim=64, vocab_size=10, tie_embeddings=False,
                 layers=[LAYER.model_copy(update={"name": f"block.{i}"}) for i in range(8)])
COST = CostModel(CLUSTER, SPEC)


def pipeline_plan(splits: list[list[tuple[str, str, int, int]]], micro_batches: list[int],
                  mbs: int = 2) -> Plan:
    """splits: per route, (name, device, start, end) per stage."""
    groups, routes = [], []
    for stages, m in zip(splits, micro_batches, strict=True):
        for name, dev, a, b in stages:
            kind = CLUSTER.device_by_id[dev].kind
            groups.append(StageGroup(name=name, kind=kind, devices=[dev], layers=(a, b),
                                     dtype="bf16"))
        routes.append(Route(stages=[s[0] for s in stages], micro_batches=m, micro_batch_size=mbs))
    return Plan(model="uniform", seq_len=128, global_batch=sum(micro_batches) * mbs,
                stage_groups=groups, routes=routes)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_equal_stages_match_the_schedule(m, stages):
    per = 8 // stages
    splits = [[(f"r{r}s{s}", f"h:{s}" if r == 0 else f"a:{s}", s * per, (s + 1) * per)
               for s in range(stages)] for r in range(2)]
    plan = pipeline_plan(splits[:1], [m])  # one kind: every stage takes the same time
    est = estimate_step(plan, COST)
    assert est.pipeline_s == pytest.approx(build_schedule(plan, COST).estimated_step_s, rel=1e-9)
    # two pipelines, one per kind: the step is the slower one's
    plan = pipeline_plan(splits, [m, m])
    sched = build_schedule(plan, COST)
    assert estimate_step(plan, COST).pipeline_s == pytest.approx(sched.estimated_step_s, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(1, 7), min_size=1, max_size=3, unique=True),
       kinds=st.lists(st.sampled_from(["h", "a"]), min_size=4, max_size=4),
       m=st.integers(1, 6))
def test_uneven_stages_stay_near_the_estimate(cuts, kinds, m):
    """With unequal stages every slot of the estimate is as long as the slowest stage, which
    mostly overstates the schedule. It can understate it: the schedule runs a ready backward
    first, and a fast stage behind a slow one can bunch its work as F F B B, idling the slow
    stage (at worst 1/0.857 of the estimate over every split of this model)."""
    bounds = [0, *sorted(cuts), 8]
    stages = [(f"s{i}", f"{kinds[i]}:{i}", a, b)
              for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]
    plan = pipeline_plan([stages], [m])
    sched = build_schedule(plan, COST).estimated_step_s
    assert estimate_step(plan, COST).pipeline_s >= 0.85 * sched


def test_sync_is_priced_from_the_one_sync_definition(three_kinds):
    spec = model_spec(model_config("tiny"), 64)
    cost = CostModel(three_kinds, spec)
    # one replica per kind: every bucket is a sharded sum over the three kinds
    plan = data_parallel_plan(three_kinds, cost, 24, micro_batch_size=4, dtype="fp32")
    est = estimate_step(plan, cost)
    buckets = sync_buckets(plan, spec)
    assert buckets and all(set(b.holders) == set(plan.group_by_name) for b in buckets)
    devices = [g.devices[0] for g in plan.stage_groups]
    serial = sum(cost.sync_s(devices, bucket_bytes(plan, b)) for b in buckets)
    # every group waits for the slowest one's gradients, then the buckets one after another
    assert max(est.group_sync_s.values()) >= serial * (1 - 1e-9)
    assert est.exposed_sync_s > 0
    # no P2P: the simulator runs the same schedule and the same tail, to the rounding
    assert simulate_plan(plan, three_kinds, cost, trace=False).step_s == pytest.approx(
        est.step_s, rel=1e-9)
    # two copies of one pipeline: replicas sum inside their kind
    cluster = cluster_from_dict({"nodes": [{"name": "h", "kind": "H100", "count": 4}]})
    cost = CostModel(cluster, spec)
    plan = Plan(model="tiny", seq_len=64, global_batch=8, stage_groups=[
        StageGroup(name=f"p{p}s{s}", kind="H100", devices=[f"h:{2 * p + s}"],
                   layers=(0, 3) if s == 0 else (3, 6)) for p in range(2) for s in range(2)],
        routes=[Route(stages=[f"p{p}s0", f"p{p}s1"], micro_batches=2, micro_batch_size=2)
                for p in range(2)])
    est = estimate_step(plan, cost)
    assert est.step_s == pytest.approx(simulate_plan(plan, cluster, cost).step_s, rel=0.01)
    assert est.tokens_per_s == pytest.approx(8 * 64 / est.step_s)
    mfu = mfu_by_kind(plan, cost, est.step_s)
    assert 0 < mfu["H100"] < cluster.kinds["H100"].efficiency
