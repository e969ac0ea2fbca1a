"""Read a measured run's trace back into cost figures: per stage action, per transfer, per
gradient all-reduce and per optimizer step, over the steady steps only.

The runtime's trace has, per device lane and step, "recv F3"/"recv B3" waits, "F3"/"B3"/"W3"
compute, a "sync b{index}" event per gradient bucket on its comm stream, and an "optimizer"
event. Nothing here knows how emulated kinds are
paced: durations are read off the clock, so a MeasuredCost built from them checks the
simulator's scheduling and communication, not the pacing formula.
"""

from __future__ import annotations

import statistics
from typing import Any

from hetrain.cost.measured import MeasuredFigures, allreduce_phases, stage_key
from hetrain.cost.model import CostModel
from hetrain.plan.schedule import Schedule, in_plan_units
from hetrain.plan.sync import bucket_bytes, reductions, sync_buckets
from hetrain.plan.types import Plan, StageGroup

Event = dict[str, Any]
Steps = dict[str, list[dict[str, Event]]]  # lane -> per step: event name -> event


def split_steps(events: list[Event]) -> Steps:
    """Per lane, the events of each step by name (a lane's step ends with its optimizer)."""
    lanes: dict[str, list[Event]] = {}
    for e in sorted(events, key=lambda e: e["start_s"]):
        lanes.setdefault(e["lane"], []).append(e)
    out: Steps = {}
    for lane, evs in lanes.items():
        steps: list[dict[str, Event]] = [{}]
        for e in evs:
            steps[-1][e["name"]] = e
            if e["name"] == "optimizer":
                steps.append({})
        out[lane] = [s for s in steps if "optimizer" in s]
    return out


def measured_figures(plan: Plan, cost: CostModel, schedule: Schedule, events: list[Event],
                     skip_steps: int = 1) -> MeasuredFigures:
    """Figures of the steps after the first `skip_steps` (warm-up) of a run of `plan` that
    executed `schedule`; `cost` gives transfer and gradient sizes (bytes, not times)."""
    cost = in_plan_units(plan, cost)
    steps = split_steps(events)
    n_steps = min((len(s) for s in steps.values()), default=0)
    figures = MeasuredFigures()
    for k in range(min(skip_steps, n_steps - 1), n_steps):
        at = {lane: s[k] for lane, s in steps.items()}
        _compute(plan, schedule, at, figures)
        _transfers(plan, cost, schedule, at, figures)
        _allreduces(plan, cost, at, figures)
        _optimizer(plan, cost, at, figures)
    return figures


def _compute(plan: Plan, schedule: Schedule, at: dict[str, dict[str, Event]],
             figures: MeasuredFigures) -> None:
    """Each action's duration on each device of its group, by the schedule the run executed
    (a trace event is named by its action's label: "F12", "W12", "F12.1" a second piece)."""
    for g in plan.stage_groups:
        for action in schedule.actions[g.name]:
            durations = [at[lane][action.label]["dur_s"] for lane in g.devices
                         if action.label in at.get(lane, {})]
            if durations:
                tokens = plan.micro_batches[action.micro_batch].size * plan.chunk_len
                key = stage_key(g, action.op, plan.half_layers)
                figures.compute_s.setdefault(key, {}).setdefault(tokens, []).extend(durations)


def _transfers(plan: Plan, cost: CostModel, schedule: Schedule,
               at: dict[str, dict[str, Event]], figures: MeasuredFigures) -> None:
    """The receive of an action is posted as the action before it starts. Where the receiver
    waited for the tensor, a receive posted after the send times the handshake and transfer
    (from the post); one posted well before it (by more than those take) times the transfer
    alone (from the send's end). Posts in between mix the two and are left out."""
    groups = plan.group_by_name
    early: list[tuple[float, float, float]] = []  # (bytes, transfer, post-to-send slack)
    for g in plan.stage_groups:
        actions = schedule.actions[g.name]
        for i, action in enumerate(actions):
            if action.recv_from is None or i == 0:
                continue
            src = groups[action.recv_from]
            tag, before = action.label, actions[i - 1].label
            nbytes = _transfer_bytes(plan, cost, src, action.op, action.micro_batch)
            for j, lane in enumerate(g.devices):
                mine, sender = at.get(lane, {}), at.get(src.devices[j % src.tp], {})
                wait, work, sent = mine.get("recv " + tag), mine.get(tag), sender.get(tag)
                prev = mine.get(before)
                if work is None or sent is None or prev is None or wait is None:
                    continue
                sent_end_s = sent["start_s"] + sent["dur_s"]
                posted_s = prev["start_s"]
                if posted_s >= sent_end_s:
                    figures.late_recv.append((nbytes, work["start_s"] - posted_s))
                else:
                    early.append((nbytes, work["start_s"] - sent_end_s, sent_end_s - posted_s))
    late = [s for _, s in figures.late_recv]
    handshake_bound_s = max(late) if late else 0.0
    figures.p2p.extend((b, s) for b, s, slack in early if slack >= handshake_bound_s)


def _transfer_bytes(plan: Plan, cost: CostModel, src: StageGroup, op: str, mb: int) -> float:
    # As the simulator sizes it: a stage's output forward, its input's gradient backward.
    boundary = src.layers[1] if op == "forward" else src.layers[0]
    return cost.activation_bytes(boundary, plan.micro_batches[mb].size, src.dtype) \
        / plan.seq_chunks


def _allreduces(plan: Plan, cost: CostModel, at: dict[str, dict[str, Event]],
                figures: MeasuredFigures) -> None:
    """Each bucket's sum, from the runtime's "sync b{index}" events on its holders' comm
    streams: from the last member's start (the collective's rendezvous) to the members' mean
    end. Shard-wise collectives of a TP degree run side by side and time alike."""
    kinds = {d.id: d.kind for d in cost.cluster.devices}
    groups = plan.group_by_name
    for b in sync_buckets(plan, cost.spec):
        lanes = [d for g in b.holders for d in groups[g].devices]
        events = [at.get(lane, {}).get(f"sync b{b.index}") for lane in lanes]
        if any(e is None for e in events):
            continue
        last_s = max(e["start_s"] for e in events)
        end_s = statistics.fmean(e["start_s"] + e["dur_s"] for e in events)
        phases = allreduce_phases([kinds[d] for d in reductions(plan, b)[0]])
        if phases:
            figures.allreduce.append((phases, bucket_bytes(plan, b), max(0.0, end_s - last_s)))


def _optimizer(plan: Plan, cost: CostModel, at: dict[str, dict[str, Event]],
               figures: MeasuredFigures) -> None:
    for g in plan.stage_groups:
        params = cost.spec.range_params(*g.layers) / g.tp
        for lane in g.devices:
            e = at.get(lane, {}).get("optimizer")
            if e is not None:
                figures.optimizer.setdefault(g.kind, []).append((params, e["dur_s"]))
