"""What a plan looks like to a reader: its pipeline shapes, stages and figures, as plain data.

The CLI renders these rows as tables and writes them into the summary JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.plan.schedule import build_schedule, in_plan_units
from hetrain.plan.types import Plan
from hetrain.plan.validate import GIB, check_memory, plan_memory_fn, validate_plan
from hetrain.planner.estimate import (
    StepEstimate,
    mfu_by_kind,
    route_signature,
    route_time_s,
    stage_time_s,
)


@dataclass(frozen=True)
class StageRow:
    stage: int
    kind: str
    tp: int
    layers: tuple[int, int]
    recompute: bool
    regather: bool
    memory_gib: float  # per device, at the schedule's peak of micro-batches in flight
    capacity_gib: float
    stage_ms: float  # forward + backward of one micro-batch


@dataclass(frozen=True)
class ShapeRow:
    """Pipelines that share one shape: their count, micro-batches and stages."""

    pipelines: int
    micro_batches: list[int]  # per pipeline, distinct values
    devices: int  # per pipeline
    route_s: float  # the slowest of them
    stages: list[StageRow]

    def describe(self) -> str:
        blocks: list[list] = []
        for st in self.stages:
            if blocks and blocks[-1][0] == (st.kind, st.tp):
                blocks[-1][1] += 1
            else:
                blocks.append([(st.kind, st.tp), 1])
        return " > ".join(f"{k}x{n}" + (f"(tp{tp})" if tp > 1 else "") for (k, tp), n in blocks)


def checked_memory_bytes(plan: Plan, cost: CostModel) -> dict[str, float]:
    """Validate the plan (PlanError if it is not runnable) and return each group's bytes per
    device at the peak of the schedule the executors run."""
    cost = in_plan_units(plan, cost)
    fn = plan_memory_fn(plan, cost)
    validate_plan(plan, cost.cluster, cost.spec)
    schedule = build_schedule(plan, cost)
    return check_memory(plan, cost.cluster, fn, schedule.peak_in_flight)


def shape_rows(plan: Plan, cost: CostModel, memory_bytes: dict[str, float],
               estimate: StepEstimate | None = None) -> list[ShapeRow]:
    """One row per pipeline shape; its time is when its copies' last actions end in the
    priced schedule (`estimate`), else the 1F1B closed form."""
    cost = in_plan_units(plan, cost)
    by_shape: dict[tuple, list[int]] = {}
    for r, route in enumerate(plan.routes):
        by_shape.setdefault(route_signature(plan, route), []).append(r)
    rows = []
    for routes in by_shape.values():
        first = plan.routes[routes[0]]
        stages = []
        for s, name in enumerate(first.stages):
            g = plan.group_by_name[name]
            stages.append(StageRow(
                stage=s, kind=g.kind, tp=g.tp, layers=tuple(g.layers), recompute=g.recompute,
                regather=g.regather and not g.recompute and g.tp > 1,
                memory_gib=memory_bytes[name] / GIB,
                capacity_gib=cost.cluster.kinds[g.kind].memory_gib,
                stage_ms=1e3 * stage_time_s(cost, g, first.micro_batch_size, plan.seq_len)))
        rows.append(ShapeRow(
            pipelines=len(routes),
            micro_batches=sorted({plan.routes[r].micro_batches for r in routes}),
            devices=sum(plan.group_by_name[n].tp for n in first.stages),
            route_s=max(estimate.route_s[r] if estimate is not None
                        else route_time_s(plan, plan.routes[r], cost) for r in routes),
            stages=stages))
    return rows


def kind_rows(plan: Plan, cost: CostModel, estimate: StepEstimate) -> list[dict]:
    """Per kind: devices the plan uses, devices in the cluster, and MFU."""
    used: dict[str, int] = {}
    for g in plan.stage_groups:
        used[g.kind] = used.get(g.kind, 0) + g.tp
    mfu = mfu_by_kind(plan, cost, estimate.step_s)
    return [{"kind": k, "used": used.get(k, 0), "devices": n, "mfu": mfu.get(k, 0.0)}
            for k, n in cost.cluster.kind_counts().items()]


def unused_devices_note(plan: Plan, cluster: Cluster) -> str | None:
    """One line naming the cluster's devices the plan gives no samples (whole kinds, or how
    many of a kind), and why when the batch is the cause; None when every device has some."""
    used = {d for g in plan.stage_groups if plan.samples_of(g.name) > 0 for d in g.devices}
    parts = []
    for kind, n in cluster.kind_counts().items():
        idle = sum(d.id not in used for d in cluster.devices_of(kind))
        if idle:
            parts.append(f"{kind} (all {n})" if idle == n else f"{kind} ({idle} of {n})")
    if not parts:
        return None
    n_devices = len(cluster.devices)
    why = (f"global batch {plan.global_batch} is smaller than the {n_devices} devices; raise "
           "it to give each a share" if plan.global_batch < n_devices else
           "the plan leaves them idle")
    return f"no samples for {', '.join(parts)}: {why}"
