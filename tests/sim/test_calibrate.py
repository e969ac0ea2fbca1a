"""Reading a trace back into cost figures: a trace written as the runtime writes it, from a
simulated step, gives back a MeasuredCost that predicts that same step."""

from __future__ import annotations

import pytest

from hetrain.cost.measured import MeasuredCost
from hetrain.plan import build_schedule
from hetrain.sim import simulate_plan
from hetrain.sim.calibrate import measured_figures, split_steps

from .helpers import FixedCost, line_cluster, pipeline_plan


def runtime_trace(plan, schedule, result, steps: int) -> list[dict]:
    """The runtime's events for `steps` identical steps of a simulated one: compute, a
    "recv" wait before an action that waited for its input, a "sync b{index}" per gradient
    bucket, "optimizer"."""
    by_lane: dict[str, list] = {}
    syncs: dict[str, list] = {}
    for e in result.events:
        if e.stream == "compute":
            by_lane.setdefault(e.lane, []).append(e)
        elif e.name == "allreduce":
            syncs.setdefault(e.lane, []).append(e)
    out = []
    for k in range(steps):
        t0 = k * result.step_s
        for g in plan.stage_groups:
            for lane in g.devices:
                free_s = 0.0
                events = sorted(by_lane[lane], key=lambda e: e.start_s)
                for action, e in zip(schedule.actions[g.name], events, strict=False):
                    if action.recv_from is not None and e.start_s - free_s > 1e-4:
                        out.append(_event(lane, f"recv {e.name}", "comm", t0 + free_s,
                                          e.start_s - free_s))
                    out.append(_event(lane, e.name, e.category, t0 + e.start_s, e.dur_s))
                    free_s = e.start_s + e.dur_s
                opt = events[-1]
                for e in syncs.get(lane, []):
                    out.append(_event(lane, f"sync b{e.args['bucket']}", "comm",
                                      t0 + e.start_s, e.dur_s))
                out.append(_event(lane, "optimizer", "optimizer", t0 + opt.start_s, opt.dur_s))
    return out


def _event(lane, name, category, start_s, dur_s) -> dict:
    return {"lane": lane, "name": name, "category": category, "start_s": start_s,
            "dur_s": dur_s, "kind": "H100", "stream": "comm" if category == "comm" else "compute"}


def test_a_trace_of_a_step_predicts_that_step():
    cluster = line_cluster(4)
    plan = pipeline_plan(cluster, 2, 4, pipelines=2)
    truth = FixedCost(cluster, f=1.0, b=2.0, p2p=2.5, sync=0.5, opt=0.125)
    schedule = build_schedule(plan, truth)
    result = simulate_plan(plan, cluster, truth, schedule=schedule)
    events = runtime_trace(plan, schedule, result, steps=3)
    assert len(split_steps(events)["n0:0"]) == 3

    figures = measured_figures(plan, truth, schedule, events)
    assert figures.p2p and figures.late_recv and figures.allreduce
    cost = MeasuredCost(cluster, truth.spec, figures)
    assert cost.p2p_handshake_s("n0:0", "n1:0") == pytest.approx(2.5)
    predicted = simulate_plan(plan, cluster, cost, schedule=schedule)
    assert predicted.step_s == pytest.approx(result.step_s)
