"""The plan table's note on devices the plan leaves without samples."""

from __future__ import annotations

from hetrain.cluster import load_cluster
from hetrain.cost.model import CostModel
from hetrain.model.config import model_config
from hetrain.model.spec import model_spec
from hetrain.planner.data_parallel import data_parallel_plan
from hetrain.planner.report import unused_devices_note
from tests.conftest import EXAMPLES


def _dp(cluster, global_batch, **kwargs):
    cost = CostModel(cluster, model_spec(model_config("tiny"), 16))
    return data_parallel_plan(cluster, cost, global_batch, **kwargs)


def test_a_batch_smaller_than_the_devices_is_named_with_the_idle_kinds():
    mixed = load_cluster(EXAMPLES / "clusters" / "test-mixed.yaml")  # 4 H100, 4 A100, 2 BR104
    plan = _dp(mixed, 3)
    note = unused_devices_note(plan, mixed)
    idle = len(mixed.devices) - len({d for g in plan.stage_groups if plan.samples_of(g.name)
                                     for d in g.devices})
    assert idle >= 7 and note.startswith("no samples for ")
    assert "global batch 3 is smaller than the 10 devices" in note
    counts = mixed.kind_counts()
    for kind in counts:
        used = sum(g.tp for g in plan.stage_groups if g.kind == kind and plan.samples_of(g.name))
        if used == 0:
            assert f"{kind} (all {counts[kind]})" in note
        elif used < counts[kind]:
            assert f"{kind} ({counts[kind] - used} of {counts[kind]})" in note


def test_a_plan_leaving_a_kind_idle_says_so_and_a_full_one_says_nothing(three_kinds):
    assert unused_devices_note(_dp(three_kinds, 48), three_kinds) is None
    only_h100 = _dp(three_kinds, 48, kinds=["H100"])
    note = unused_devices_note(only_h100, three_kinds)
    assert "BR104 (all 1)" in note and "A100-80GB (all 1)" in note and "H100" not in note
    assert "the plan leaves them idle" in note
