"""simulate_plan: predict one training step of a plan on a cluster under a cost model.

The entry point for the CLI and for the accuracy bench, which compares it with measured runs.
"""

from __future__ import annotations

from dataclasses import replace

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.errors import SimError
from hetrain.gcpause import cyclic_gc_paused
from hetrain.plan.schedule import Schedule, build_schedule, imbalance_s, in_plan_units
from hetrain.plan.sync import sync_buckets
from hetrain.plan.types import Plan
from hetrain.plan.validate import validate_plan
from hetrain.sim.engine import StepEngine
from hetrain.sim.result import DeviceTime, SimResult


@cyclic_gc_paused()
def simulate_plan(plan: Plan, cluster: Cluster, cost: CostModel, *,
                  schedule: Schedule | None = None, trace: bool = True) -> SimResult:
    """Simulate one step of `plan`: the shared schedule with compute, P2P, gradient sync
    and optimizer times from `cost`. `schedule` defaults to build_schedule(plan, cost); pass
    the one the runtime executes to predict that exact order. `trace=False` skips the events
    (faster for search loops)."""
    cost = in_plan_units(plan, cost)
    if plan.model != cost.spec.name:
        raise SimError(f"plan is for model {plan.model!r} but the cost model describes "
                       f"{cost.spec.name!r}")
    validate_plan(plan, cluster, cost.spec)
    if schedule is None:
        schedule = build_schedule(plan, cost)
    elif set(schedule.actions) != set(plan.group_by_name):
        raise SimError("the schedule was built for another plan: its stage groups "
                       f"{sorted(schedule.actions)} differ from the plan's")
    buckets = sync_buckets(plan, cost.spec)
    run = StepEngine(plan, cluster, cost, schedule, buckets, record=trace).run()
    # The same order with free communication: the step it would take if comm were all hidden.
    bare = StepEngine(plan, cluster, cost, schedule, buckets, comm=False, record=False).run()
    if run.step_s <= 0:
        raise SimError("simulated step took no time; the cost model returned zero durations")
    # one group's devices share its times; the bubble is DeviceTime's
    times = {g.name: DeviceTime(device="", kind=g.kind, group=g.name, step_s=run.step_s,
                                busy_s=run.groups[g.name].busy_s,
                                comm_wait_s=run.groups[g.name].comm_wait_s)
             for g in plan.stage_groups}
    imbalance = imbalance_s({g: t.busy_s for g, t in times.items()},
                            {g: t.bubble_s for g, t in times.items()})
    devices = {d: replace(times[g.name], device=d, imbalance_s=imbalance[g.name])
               for g in plan.stage_groups for d in g.devices}
    return SimResult(step_s=run.step_s,
                     tokens_per_s=plan.global_batch * plan.seq_len / run.step_s,
                     compute_only_step_s=bare.step_s, devices=devices, events=run.events,
                     action_starts_s={g: t.starts_s for g, t in run.groups.items()})
