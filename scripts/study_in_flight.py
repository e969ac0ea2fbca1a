"""Study: what would more memory buy the bubble, and would steps without a barrier help?

Plans the cluster, then simulates the returned plan again with every stage group's in-flight
scale raised (zero-bubble: more forwards ahead in the warm-up, more weight gradients kept for
the cool-down), memory ignored. Prints, per scale, the simulated step, mean bubble share and
the worst group's memory at the schedule's peak against its capacity: the bubble a plan could
reach if its devices held that many micro-batches.

Then runs the plan's steps back to back with no barrier between them (each stage group starts
its next step as soon as its own optimizer step ends: exact without gradient clipping, whose
global norm joins every group) and prints the steady period against the one-step time.

    python scripts/study_in_flight.py examples/clusters/mixed-1024.yaml

A study, not part of hetrain: the runtime keeps a step's loss all-reduce, and the planner
keeps each group's schedule within its memory.
"""

from __future__ import annotations

import heapq
import json

from study_common import planning_args

from hetrain.cost.model import CostModel
from hetrain.model import model_spec
from hetrain.plan.schedule import build_schedule
from hetrain.plan.sync import sync_buckets
from hetrain.plan.types import Plan
from hetrain.plan.validate import plan_memory_fn
from hetrain.planner.search import SearchOptions, search_plan
from hetrain.sim.engine import _ARRIVE, _DONE, StepEngine
from hetrain.sim.simulate import simulate_plan

_WAKE = 2


class _OffsetEngine(StepEngine):
    """A step whose groups start at their own times (the end of their previous step)."""

    def __init__(self, *args, starts: dict[str, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.starts = starts

    def run(self):
        for g in self.groups:
            at = self.starts.get(g, 0.0)
            self.free_s[g], self.busy[g] = at, True
            self._push(at, _WAKE, g)
        while self.heap:
            now, _, what, payload = heapq.heappop(self.heap)
            if what == _DONE:
                self._on_done(payload[0], payload[1], now)
            else:
                if what == _WAKE:
                    self.busy[payload] = False
                assert what in (_ARRIVE, _WAKE)
                self._try_start(payload, now)
        return self._price_sync()


def steady_period_s(plan: Plan, cluster, cost: CostModel, steps: int = 5) -> float:
    """The time between the last two of `steps` steps run without a barrier."""
    schedule, buckets = build_schedule(plan, cost), sync_buckets(plan, cost.spec)
    starts: dict[str, float] = {}
    ends = []
    for _ in range(steps):
        sync = _OffsetEngine(plan, cluster, cost, schedule, buckets, record=False,
                             starts=starts).run()
        starts = dict(sync.group_end_s)
        ends.append(max(starts.values()))
    return ends[-1] - ends[-2]


def scaled(plan: Plan, scale: float) -> Plan:
    data = plan.model_dump()
    for g in data["stage_groups"]:
        g["in_flight_scale"] = scale
    return Plan.model_validate(data)


def main() -> None:
    args, cluster, cfg = planning_args(__doc__)
    cost = CostModel(cluster, model_spec(cfg, args.seq_len))
    plan = search_plan(cluster, cost, args.global_batch, SearchOptions()).plan
    for scale in (1.0, 1.25, 1.5, 1.75, 2.0, 2.5):
        trial = scaled(plan, scale) if plan.schedule == "zero_bubble" else plan
        schedule = build_schedule(trial, cost)
        sim = simulate_plan(trial, cluster, cost, schedule=schedule, trace=False)
        memory = plan_memory_fn(trial, cost)
        worst = max(trial.stage_groups, key=lambda g: memory(g, schedule.peak_in_flight[g.name])
                    / cluster.kinds[g.kind].memory_bytes)
        held = memory(worst, schedule.peak_in_flight[worst.name])
        print(json.dumps({"in_flight_scale": scale, "step_s": round(sim.step_s, 3),
                          "mean_bubble_share": round(sim.mean_share("bubble_share"), 4),
                          "mean_imbalance_share": round(sim.mean_share("imbalance_share"), 4),
                          "worst_memory": f"{worst.kind} {held / 2**30:.1f} of "
                                          f"{cluster.kinds[worst.kind].memory_bytes / 2**30:.0f}"
                                          " GiB"}))
        if plan.schedule != "zero_bubble":
            break
    print(json.dumps({"schedule": plan.schedule, "one_step_s": round(simulate_plan(
        plan, cluster, cost, trace=False).step_s, 3),
        "steady_period_without_barrier_s": round(steady_period_s(plan, cluster, cost), 3)}))


if __name__ == "__main__":
    main()
