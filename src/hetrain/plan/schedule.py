"""The one schedule both executors run: per stage group, its ordered forward/backward actions.

The order comes from a greedy list scheduling of the plan's micro-batches (1F1B: a group runs a
ready backward first, else a ready forward while fewer than its limit are in flight), timed
with compute durations from a cost model (or unit durations per layer). Each group's list is
sorted by that run's start times, a linear extension of the dependencies, so executing every
list in order can never deadlock, whatever the real durations turn out to be.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Literal, Protocol

from hetrain.errors import PlanError
from hetrain.plan.types import Plan, StageGroup

Op = Literal["forward", "backward"]


class StageCost(Protocol):
    """What the schedule needs from a cost model (cost.CostModel implements it)."""

    def stage_compute_s(self, group: StageGroup, op: Op, samples: int, seq_len: int) -> float: ...


@dataclass(frozen=True)
class Action:
    """One compute step of a stage group, with the transfers around it.

    forward: receive the activation from `recv_from` (if any), compute, send to `send_to`.
    backward: receive the output gradient from `recv_from` (if any), compute, send the input
    gradient to `send_to`.
    """

    op: Op
    micro_batch: int
    route: int
    stage: int  # position of the group in the route
    recv_from: str | None
    send_to: str | None


@dataclass
class Schedule:
    actions: dict[str, list[Action]]  # group name -> ordered actions
    peak_in_flight: dict[str, int]  # forwards held for backward at once, per group
    estimated_step_s: float  # makespan of the ordering run (compute only)
    start_s: dict[tuple[str, int], float] = field(default_factory=dict)  # (group, index) -> start

    def compute_actions(self) -> int:
        return sum(len(a) for a in self.actions.values())


def in_flight_limit(plan: Plan, group: str) -> int:
    """Sum over routes through the group of the stages from it to the route's end (1F1B)."""
    limit = 0
    for r in plan.routes_through(group):
        stages = plan.routes[r].stages
        limit += len(stages) - stages.index(group)
    return max(limit, 1)


def _unit_duration(group: StageGroup, op: Op, samples: int) -> float:
    return group.n_layers * samples * (2.0 if op == "backward" else 1.0) / group.tp


def build_schedule(plan: Plan, cost: StageCost | None = None) -> Schedule:
    groups = plan.group_by_name

    def duration(group: StageGroup, op: Op, samples: int) -> float:
        if cost is None:
            return _unit_duration(group, op, samples)
        return cost.stage_compute_s(group, op, samples, plan.seq_len)

    ready_f: dict[str, list] = {g: [] for g in groups}
    ready_b: dict[str, list] = {g: [] for g in groups}
    in_flight = dict.fromkeys(groups, 0)
    peak = dict.fromkeys(groups, 0)
    limit = {g: in_flight_limit(plan, g) for g in groups}
    busy = dict.fromkeys(groups, False)
    order: dict[str, list[Action]] = {g: [] for g in groups}
    starts: dict[tuple[str, int], float] = {}
    events: list = []
    seq = itertools.count()

    for mb in plan.micro_batches:
        heapq.heappush(ready_f[plan.routes[mb.route].stages[0]], (0.0, mb.id, 0))

    def try_start(g: str, now: float) -> None:
        if busy[g]:
            return
        if ready_b[g]:
            _, mb_id, pos = heapq.heappop(ready_b[g])
            op: Op = "backward"
            in_flight[g] -= 1
        elif ready_f[g] and in_flight[g] < limit[g]:
            _, mb_id, pos = heapq.heappop(ready_f[g])
            op = "forward"
            in_flight[g] += 1
            peak[g] = max(peak[g], in_flight[g])
        else:
            return
        mb = plan.micro_batches[mb_id]
        stages = plan.routes[mb.route].stages
        prev = stages[pos - 1] if pos > 0 else None
        nxt = stages[pos + 1] if pos + 1 < len(stages) else None
        action = Action(op=op, micro_batch=mb_id, route=mb.route, stage=pos,
                        recv_from=prev if op == "forward" else nxt,
                        send_to=nxt if op == "forward" else prev)
        starts[(g, len(order[g]))] = now
        order[g].append(action)
        busy[g] = True
        end = now + duration(groups[g], op, mb.size)
        heapq.heappush(events, (end, next(seq), g, action))

    for g in groups:
        try_start(g, 0.0)
    now = 0.0
    while events:
        now, _, g, action = heapq.heappop(events)
        busy[g] = False
        if action.op == "forward":
            if action.send_to is None:  # last stage: its backward is ready at once
                heapq.heappush(ready_b[g], (now, action.micro_batch, action.stage))
            else:
                heapq.heappush(ready_f[action.send_to], (now, action.micro_batch,
                                                         action.stage + 1))
                try_start(action.send_to, now)
        elif action.send_to is not None:
            heapq.heappush(ready_b[action.send_to], (now, action.micro_batch, action.stage - 1))
            try_start(action.send_to, now)
        try_start(g, now)

    for g in groups:
        want = 2 * sum(plan.routes[r].micro_batches for r in plan.routes_through(g))
        if len(order[g]) != want:
            raise PlanError(f"schedule stalled at stage group {g!r}: {len(order[g])} of {want} "
                            "actions could run; check that routes visit layers in order")
    return Schedule(actions=order, peak_in_flight=peak, estimated_step_s=now, start_s=starts)
