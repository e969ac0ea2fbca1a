"""The simulator replays the shared schedule: same order, same times when comm is free."""

from __future__ import annotations

import pytest

from hetrain.cost import CostModel
from hetrain.errors import SimError
from hetrain.model import model_config, model_spec
from hetrain.plan import Plan, build_schedule
from hetrain.plan.sync import bucket_bytes, reductions, sync_buckets
from hetrain.sim import simulate_plan

from .helpers import SEQ_LEN, FreeComm, line_cluster, pipeline_plan


def _shared_group_plan() -> Plan:
    """Two routes share an H100 first stage and split the rest between BR104 and A100."""
    return Plan.model_validate({
        "model": "small", "seq_len": SEQ_LEN, "global_batch": 14,
        "stage_groups": [
            {"name": "head", "kind": "H100", "devices": ["h100:0"], "layers": [0, 4]},
            {"name": "br", "kind": "BR104", "devices": ["br104:0"], "layers": [4, 10]},
            {"name": "a100", "kind": "A100-80GB", "devices": ["a100:0"], "layers": [4, 10]},
        ],
        "routes": [{"stages": ["head", "br"], "micro_batches": 4, "micro_batch_size": 2},
                   {"stages": ["head", "a100"], "micro_batches": 3, "micro_batch_size": 2}],
    })


def _spec():
    return model_spec(model_config("small"), SEQ_LEN)


def test_free_comm_matches_the_schedule_exactly(three_kinds):
    plan = _shared_group_plan()
    cost = FreeComm(three_kinds, _spec())
    schedule = build_schedule(plan, cost)
    result = simulate_plan(plan, three_kinds, cost)
    assert result.step_s == pytest.approx(schedule.estimated_step_s, rel=1e-12)
    assert result.compute_only_step_s == pytest.approx(result.step_s, rel=1e-12)
    assert result.exposed_comm_s == pytest.approx(0.0, abs=1e-15)
    for group, actions in schedule.actions.items():
        want = [schedule.start_s[(group, i)] for i in range(len(actions))]
        assert result.action_starts_s[group] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_events_follow_the_schedule_order(three_kinds):
    plan = _shared_group_plan()
    cost = CostModel(three_kinds, _spec())
    schedule = build_schedule(plan, cost)
    result = simulate_plan(plan, three_kinds, cost)
    for group in plan.stage_groups:
        names = [e.name for e in result.events
                 if e.lane == group.devices[0] and e.category in ("forward", "backward")]
        want = [("F" if a.op == "forward" else "B") + str(a.micro_batch)
                for a in schedule.actions[group.name]]
        assert names == want


def test_results_are_reproducible(three_kinds):
    plan = _shared_group_plan()
    cost = CostModel(three_kinds, _spec())
    first = simulate_plan(plan, three_kinds, cost)
    again = simulate_plan(plan, three_kinds, CostModel(three_kinds, _spec()))
    assert first.to_dict() == again.to_dict()
    assert first.events == again.events


def test_comm_only_lengthens_the_step_and_shares_add_up(three_kinds):
    plan = _shared_group_plan()
    cost = CostModel(three_kinds, _spec())
    result = simulate_plan(plan, three_kinds, cost)
    assert result.step_s >= result.compute_only_step_s > 0
    assert result.exposed_comm_s > 0  # the BR104/A100 bridge sync and the P2P hops cost time
    for dev in result.devices.values():
        total = dev.busy_share + dev.bubble_share + dev.comm_wait_share
        assert total == pytest.approx(1.0)
        assert dev.idle_s == pytest.approx(dev.bubble_s + dev.comm_wait_s)
    assert result.tokens_per_s == pytest.approx(14 * SEQ_LEN / result.step_s)


def test_sync_buckets_group_layers_by_holders(three_kinds):
    plan = _shared_group_plan()
    cost = CostModel(three_kinds, _spec())
    (only,) = sync_buckets(plan, cost.spec)
    assert only.holders == ("a100", "br")
    assert only.layers == (4, 10)
    assert bucket_bytes(plan, only) == cost.spec.range_params(4, 10) * 4  # fp32 gradients
    syncs = [e for e in simulate_plan(plan, three_kinds, cost).events if e.name == "allreduce"]
    assert {e.lane for e in syncs} == {"br104:0", "a100:0"}


def test_a_tied_embedding_is_summed_with_the_head():
    cluster = line_cluster(2)
    cost = CostModel(cluster, model_spec(model_config("tiny-tied"), SEQ_LEN))
    plan = pipeline_plan(cluster, 2, 2, model="tiny-tied")
    (tied,) = sync_buckets(plan, cost.spec)
    assert tied.holders == ("p0s0", "p0s1") and tied.layers == (0, 1)
    assert bucket_bytes(plan, tied) == cost.spec.vocab_size * cost.spec.dim * 4


@pytest.mark.parametrize(("tps", "devices", "shard"), [((2, 2), 2, 2), ((2, 1), 3, 1)])
def test_tensor_parallel_holders_sum_shards(tps, devices, shard):
    cluster = line_cluster(2, per_node=2)
    groups = [{"name": f"g{i}", "kind": "H100", "devices": [f"n{i}:{j}" for j in range(tp)],
               "layers": [0, 6]} for i, tp in enumerate(tps)]
    plan = Plan.model_validate({
        "model": "tiny", "seq_len": SEQ_LEN, "global_batch": 2, "stage_groups": groups,
        "routes": [{"stages": [g["name"]], "micro_batches": 1, "micro_batch_size": 1}
                   for g in groups]})
    cost = CostModel(cluster, model_spec(model_config("tiny"), SEQ_LEN))
    (only,) = sync_buckets(plan, cost.spec)
    assert sum(len(r) for r in reductions(plan, only)) == devices * (2 if shard == 2 else 1)
    assert len(reductions(plan, only)[0]) == devices
    assert bucket_bytes(plan, only) == cost.spec.range_params(0, 6) * 4 / shard
    result = simulate_plan(plan, cluster, cost)
    lanes = {e.lane for e in result.events if e.name == "allreduce"}
    assert len(lanes) == sum(tps)  # every device of the holders takes part


def test_a_schedule_of_another_plan_is_refused(three_kinds):
    plan = _shared_group_plan()
    cost = CostModel(three_kinds, _spec())
    schedule = build_schedule(plan, cost)
    schedule.actions.pop("br")
    with pytest.raises(SimError, match="another plan"):
        simulate_plan(plan, three_kinds, cost, schedule=schedule)
