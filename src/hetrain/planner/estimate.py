"""The planner's price of a plan, from the definitions the simulator and runtime use.

    step = the shared schedule's run (plan.build_schedule: compute and transfers, as the
           runtime orders them) + the sync and optimizer tail of plan.sync.price_sync

The closed forms below (a route with S stages and m micro-batches takes m + S - 1 slots of
its slowest stage under 1F1B) serve the search's templates and the baselines' bounds; a plan
the search returns is priced by `estimate_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hetrain.cost.model import CostModel
from hetrain.model.spec import ModelSpec
from hetrain.plan.schedule import (
    Schedule,
    build_schedule,
    imbalance_s,
    in_plan_units,
    transfer_times,
)
from hetrain.plan.sync import (
    FreeSync,
    SyncBucket,
    SyncCost,
    SyncTimeline,
    price_sync,
    sync_buckets,
)
from hetrain.plan.types import Plan, Route, StageGroup


@dataclass(frozen=True)
class StepEstimate:
    step_s: float
    pipeline_s: float  # slowest route, compute and point-to-point
    sync_s: float  # slowest group, gradient sync + optimizer
    route_s: list[float]  # when each route's last action ends in the schedule's run
    group_sync_s: dict[str, float] = field(default_factory=dict)
    group_optimizer_s: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    peak_in_flight: dict[str, int] = field(default_factory=dict)  # per group, for memory
    bubble_share: float = 0.0  # mean over devices of idle time not waiting on communication
    # (the simulator's definition: sim.result.DeviceTime.bubble_share)
    imbalance_share: float = 0.0  # the part no schedule can fill (plan.schedule.imbalance_s)
    exposed_sync_s: float = 0.0  # how much longer the step is than with free gradient sync

    def predicted(self) -> dict[str, float]:
        """The figures a Plan carries in `predicted`."""
        return {"step_s": self.step_s, "tokens_per_s": self.tokens_per_s,
                "pipeline_s": self.pipeline_s, "sync_s": self.sync_s,
                "bubble_share": self.bubble_share, "imbalance_share": self.imbalance_share,
                "exposed_sync_s": self.exposed_sync_s}


def stage_time_s(cost: CostModel, group: StageGroup, micro_batch_size: int, seq_len: int) -> float:
    """Forward + backward of one micro-batch on `group` (recomputation included)."""
    return (cost.stage_compute_s(group, "forward", micro_batch_size, seq_len)
            + cost.stage_compute_s(group, "backward", micro_batch_size, seq_len))


def wait_s(cost: CostModel, sender: StageGroup, receiver: StageGroup, boundary: int,
           micro_batch_size: int) -> float:
    """What `receiver` waits, per micro-batch, for the tensor crossing layer `boundary` from
    `sender`: it posts its receive when it gets to the action, then the handshake and the
    transfer pass (the runtime's gloo rendezvous)."""
    a, b = sender.devices[0], receiver.devices[0]
    nbytes = cost.activation_bytes(boundary, micro_batch_size, sender.dtype)
    return cost.p2p_handshake_s(a, b) + cost.p2p_s(a, b, nbytes)


def stage_slot_s(cost: CostModel, groups: list[StageGroup], s: int, micro_batch_size: int,
                 seq_len: int) -> float:
    """Stage s of a route: forward + backward of a micro-batch and the waits for its inputs."""
    g = groups[s]
    total = stage_time_s(cost, g, micro_batch_size, seq_len)
    if s > 0:
        total += wait_s(cost, groups[s - 1], g, g.layers[0], micro_batch_size)
    if s + 1 < len(groups):
        total += wait_s(cost, groups[s + 1], g, g.layers[1], micro_batch_size)
    return total


def route_time_s(plan: Plan, route: Route, cost: CostModel) -> float:
    """1F1B time of one route: m + S - 1 slots of its slowest stage (waits included)."""
    groups = [plan.group_by_name[name] for name in route.stages]
    slot = max(stage_slot_s(cost, groups, s, route.micro_batch_size, plan.seq_len)
               for s in range(len(groups)))
    return (route.micro_batches + len(groups) - 1) * slot


def route_signature(plan: Plan, route: Route) -> tuple:
    return tuple((g.kind, g.tp, tuple(g.layers))
                 for g in (plan.group_by_name[name] for name in route.stages))


@dataclass(frozen=True)
class GroupTimes:
    """What the tail and the shares need of one group's run of the shared schedule."""

    last_weight_grad_s: tuple[float, float]  # its last weight-gradient action
    last_end_s: float
    busy_s: float  # compute
    comm_wait_s: float  # waiting for transfers
    peak_in_flight: int  # micro-batches holding activations at once


def _times_of(schedule: Schedule, g: str) -> GroupTimes:
    starts, ends = schedule.starts[g], schedule.ends[g]
    i = schedule.last_weight_grad(g)
    busy = sum(e - s for s, e in zip(starts, ends, strict=True))
    return GroupTimes((starts[i], ends[i]), ends[-1], busy, schedule.comm_wait_s[g],
                      schedule.peak_in_flight[g])


def schedule_times(plan: Plan, cost: CostModel, most_held: dict[str, int] | None = None
                   ) -> dict[str, GroupTimes]:
    """Every group's times in the shared schedule's run (plan.build_schedule; HeldOver past
    `most_held`). Copies of a pipeline that share no group with another route, carry the
    same micro-batches and see the same transfer times run alike, so one copy of each is run
    and stands for the rest."""
    cost = in_plan_units(plan, cost)
    owners: dict[str, int] = {}
    for route in plan.routes:
        for g in route.stages:
            owners[g] = owners.get(g, 0) + 1
    transfer = transfer_times(plan, cost)
    groups = plan.group_by_name
    rep_of: dict[int, int] = {}
    reps: dict[tuple, int] = {}
    for r, route in enumerate(plan.routes):
        if any(owners[g] > 1 for g in route.stages):
            rep_of[r] = r
            continue
        stages = [groups[g] for g in route.stages]
        links = tuple(transfer(a, b, d, route.micro_batch_size)
                      for a, b in zip(route.stages, route.stages[1:], strict=False)
                      for d in ("forward", "backward"))
        key = (tuple((g.kind, g.tp, g.layers, g.dtype, g.recompute, g.regather,
                      g.in_flight_scale)
                     for g in stages), route.micro_batches, route.micro_batch_size, links)
        rep_of[r] = reps.setdefault(key, r)
    kept = sorted(set(rep_of.values()))
    names = {g for r in kept for g in plan.routes[r].stages}
    # A new Plan, not model_copy: that would keep the original's cached micro-batches.
    reduced = Plan(model=plan.model, seq_len=plan.seq_len,
                   global_batch=sum(plan.routes[r].samples for r in kept),
                   stage_groups=[g for g in plan.stage_groups if g.name in names],
                   routes=[plan.routes[r] for r in kept], schedule=plan.schedule,
                   sharded_optimizer=plan.sharded_optimizer, seq_chunks=plan.seq_chunks,
                   half_layers=plan.half_layers)
    schedule = build_schedule(reduced, cost, most_held)
    out = {g: _times_of(schedule, g) for g in names}
    for r, rep in rep_of.items():
        for g, twin in zip(plan.routes[r].stages, plan.routes[rep].stages, strict=True):
            out[g] = out[twin]
    return out


def schedule_tail(plan: Plan, spec: ModelSpec, cost: SyncCost, times: dict[str, GroupTimes],
                  buckets: list[SyncBucket]) -> SyncTimeline:
    """The sync and optimizer tail after the schedule's run (plan.sync.price_sync) over the
    plan's sync buckets."""
    return price_sync(plan, spec, buckets, cost,
                      {g: t.last_weight_grad_s for g, t in times.items()},
                      {g: t.last_end_s for g, t in times.items()})


def estimate_step(plan: Plan, cost: CostModel, most_held: dict[str, int] | None = None
                  ) -> StepEstimate:
    """The plan's step: the shared schedule's timed run, then the one sync definition.
    With `most_held` (per group, the micro-batches whose activations its memory holds),
    plan.schedule.HeldOver as soon as the run holds more."""
    cost = in_plan_units(plan, cost)
    times = schedule_times(plan, cost, most_held)
    buckets = sync_buckets(plan, cost.spec)
    tail = schedule_tail(plan, cost.spec, cost, times, buckets)
    bare = schedule_tail(plan, cost.spec, FreeSync(cost), times, buckets)
    step = tail.step_s
    pipeline = max(t.last_end_s for t in times.values())
    busy = {g: t.busy_s + tail.group_optimizer_s[g] for g, t in times.items()}
    waits = tail.comm_wait_s(buckets)
    bubble = {g: max(0.0, step - busy[g] - times[g].comm_wait_s - waits[g]) for g in busy}
    devices = {g.name: g.tp for g in plan.stage_groups}
    weight = step * sum(devices.values())
    bubble_share = sum(bubble[g] * n for g, n in devices.items()) / weight
    imbalance = imbalance_s(busy, bubble)
    imbalance_share = sum(imbalance[g] * n for g, n in devices.items()) / weight
    sync = {g: tail.group_synced_s[g] - tail.group_last_compute_s[g] for g in busy}
    return StepEstimate(step_s=step, pipeline_s=pipeline, sync_s=step - pipeline,
                        route_s=[max(times[g].last_end_s for g in route.stages)
                                 for route in plan.routes],
                        group_sync_s=sync, group_optimizer_s=dict(tail.group_optimizer_s),
                        tokens_per_s=plan.global_batch * plan.seq_len / step,
                        peak_in_flight={g: t.peak_in_flight for g, t in times.items()},
                        bubble_share=bubble_share, imbalance_share=imbalance_share,
                        exposed_sync_s=step - bare.step_s)


def estimate_step_s(plan: Plan, cost: CostModel) -> float:
    return estimate_step(plan, cost).step_s


def mfu_by_kind(plan: Plan, cost: CostModel, step_s: float) -> dict[str, float]:
    """Model FLOPs (forward + backward, no recomputation) per second over the peak of the
    devices of each kind the plan uses."""
    cost = in_plan_units(plan, cost)
    done: dict[str, float] = {}
    peak: dict[str, float] = {}
    for g in plan.stage_groups:
        kind = cost.cluster.kinds[g.kind]
        flops = plan.samples_of(g.name) * plan.seq_len * cost.spec.flops_per_token(*g.layers)
        done[g.kind] = done.get(g.kind, 0.0) + flops
        peak[g.kind] = peak.get(g.kind, 0.0) + g.tp * kind.peak_flops(g.dtype)
    return {k: done[k] / (step_s * peak[k]) for k in done}
