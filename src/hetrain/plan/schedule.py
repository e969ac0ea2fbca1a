"""The one schedule both executors run: per stage group, its ordered compute actions.

The order comes from a greedy list scheduling of the plan's micro-batches, timed with compute
and transfer durations from a cost model (or unit durations per layer). Each group's list is
sorted by that run's start times, a linear extension of the dependencies, so executing every
list in order can never deadlock, whatever the real durations turn out to be.

Two kinds (Plan.schedule):
- "1f1b": a group runs a ready backward first, else a ready forward while fewer than its
  in-flight limit are held for backward.
- "zero_bubble" (Qi et al. 2024): each backward is split into an input-gradient action (on the
  critical path: its result goes to the previous stage) and a weight-gradient action (no
  transfer, needed only by the optimizer). Priority: input gradient; a forward while fewer
  than its limit await their input gradient and the group holds fewer than the limit plus
  its cap; any pending weight gradient. A weight gradient so waits while a forward may run
  in the group's memory, and fills the gaps where 1F1B idles (run at once after its input
  gradient, it delayed the forwards the stages after a slower one wait for: six-2048's plan
  11.20 -> 10.64 s at 1F1B's memory). With in-flight scale a, the forward limit is a x the
  1F1B limit and the cap 2 (a - 1) x the stages before the group: later stages keep weight
  gradients for the cool-down, earlier ones run ahead in the warm-up (on S equal stages the
  fill is 2/3 of 1F1B's at a = 1, about 1/3 at a = 1.75). A micro-batch holds its
  activations until its weight gradient: `peak_in_flight` counts those, for memory; a group
  holds at most its limit plus its cap.
  A group that is first on every route through it keeps whole backwards (splits_backward):
  no stage waits for its input gradient, and a split would only finalise its weight
  gradients later, leaving more of the gradient sync after its last action. So does a
  recomputing group: every backward pass over its checkpointed layers recomputes them.

Sequence chunks (Plan.seq_chunks = c > 1, TeraPipe, Li et al. 2021): each micro-batch runs
as c actions per op, one per consecutive piece of its sequence; a piece's forward attends to
the earlier pieces' keys and values, so the gradient of a piece's input needs the later
pieces' backward at the same group first: a piece's (input) gradient is ready once it has
arrived and the next piece's (input-gradient) action at this group is done. Limits and caps
count pieces (c x those above: the same activation memory); compute and transfers last 1/c
of a whole micro-batch's. The pipeline so fills and drains in steps c times shorter.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import Literal, NamedTuple, Protocol, TypeVar

from hetrain.errors import PlanError
from hetrain.gcpause import cyclic_gc_paused
from hetrain.plan.types import Plan, StageGroup

CostT = TypeVar("CostT")

Op = Literal["forward", "backward", "backward_input", "backward_weight"]
# Ops that produce weight gradients: after a group's last one, its gradients are final.
WEIGHT_GRAD_OPS = ("backward", "backward_weight")
# A group posts the receives of its next RECV_AHEAD actions as it starts an action (runtime,
# simulator and this schedule's timing agree on it), so transfers move under compute.
RECV_AHEAD = 1
# Short names in traces and Gantt charts.
OP_LETTER = {"forward": "F", "backward": "B", "backward_input": "B", "backward_weight": "W"}


class StageCost(Protocol):
    """What the schedule needs from a cost model (cost.CostModel implements it)."""

    def stage_compute_s(self, group: StageGroup, op: Op, samples: int, seq_len: int) -> float: ...


class LinkCost(Protocol):
    """What timing transfers needs (cost.CostModel implements it)."""

    def activation_bytes(self, layer_end: int, samples: int, dtype: str) -> float: ...

    def p2p_s(self, src_device: str, dst_device: str, nbytes: float) -> float: ...

    def p2p_handshake_s(self, src_device: str, dst_device: str) -> float: ...


# (sending group, receiving group, "forward" | "backward", samples) -> (handshake s, transfer s)
TransferFn = Callable[[str, str, str, int], tuple[float, float]]


def in_plan_units(plan: Plan, cost: CostT) -> CostT:
    """`cost` over the partition units the plan's layer ranges count (Plan.half_layers:
    cost.CostModel.units, PlanError where the model has no such units). Every function that
    prices a plan's ranges starts here, so a plan is priced in its own units whatever cost
    model of its model it is given."""
    units = getattr(cost, "units", None)
    return cost if units is None else units(plan.half_layers)


def transfer_times(plan: Plan, cost: LinkCost) -> TransferFn:
    """Transfers as the runtime makes them (gloo's rendezvous): once the receiver has posted
    and its ready notice (the handshake) has reached the sender, the bytes move. A forward
    sends the stage's output, a backward the gradient of its input; one TP rank per side
    carries the tensor."""
    cost = in_plan_units(plan, cost)
    groups = plan.group_by_name
    cache: dict[tuple[str, str, str, int], tuple[float, float]] = {}

    def transfer(src: str, dst: str, direction: str, samples: int) -> tuple[float, float]:
        key = (src, dst, direction, samples)
        if key not in cache:
            a, b = groups[src], groups[dst]
            boundary = a.layers[1] if direction == "forward" else a.layers[0]
            nbytes = cost.activation_bytes(boundary, samples, a.dtype) / plan.seq_chunks
            cache[key] = (cost.p2p_handshake_s(a.devices[0], b.devices[0]),
                          cost.p2p_s(a.devices[0], b.devices[0], nbytes))
        return cache[key]

    return transfer


class Action(NamedTuple):
    """One compute step of a stage group, with the transfers around it.

    forward: receive the activation from `recv_from` (if any), compute, send to `send_to`.
    backward / backward_input: receive the output gradient from `recv_from` (if any),
    compute, send the input gradient to `send_to`. backward_weight: no transfer.
    """

    op: Op
    micro_batch: int
    route: int
    stage: int  # position of the group in the route
    recv_from: str | None
    send_to: str | None
    chunk: int = 0  # piece of the sequence (Plan.seq_chunks), 0 without chunks

    @property
    def label(self) -> str:
        text = OP_LETTER[self.op] + str(self.micro_batch)
        return f"{text}.{self.chunk}" if self.chunk else text

    @property
    def is_backward(self) -> bool:
        """Carries gradients (its transfers are tagged as backward ones)."""
        return self.op != "forward"


@dataclass
class Schedule:
    actions: dict[str, list[Action]]  # group name -> ordered actions
    peak_in_flight: dict[str, int]  # micro-batches (sequence pieces) holding activations at once
    estimated_step_s: float  # makespan of the ordering run (compute and transfers)
    starts: dict[str, list[float]] = field(default_factory=dict)  # per group, per action
    ends: dict[str, list[float]] = field(default_factory=dict)
    comm_wait_s: dict[str, float] = field(default_factory=dict)  # per group, on transfers

    @functools.cached_property
    def start_s(self) -> dict[tuple[str, int], float]:
        """(group, action index) -> start."""
        return {(g, i): t for g, ts in self.starts.items() for i, t in enumerate(ts)}

    @functools.cached_property
    def end_s(self) -> dict[tuple[str, int], float]:
        return {(g, i): t for g, ts in self.ends.items() for i, t in enumerate(ts)}

    def compute_actions(self) -> int:
        return sum(len(a) for a in self.actions.values())

    def last_weight_grad(self, group: str) -> int:
        """Index of the group's last action producing weight gradients."""
        return last_weight_grad_index(self.actions[group])

    def last_weight_grad_end_s(self, group: str) -> float:
        return self.ends[group][self.last_weight_grad(group)]


def last_weight_grad_index(actions: Sequence[Action]) -> int:
    """Index of the last action of a list that produces weight gradients."""
    return max(i for i, a in enumerate(actions) if a.op in WEIGHT_GRAD_OPS)


@dataclass(frozen=True)
class PathSegment:
    """Consecutive actions of one group on a schedule's critical path. `wait_s` is the time
    between the previous segment's end and this one's start: the transfer (and handshake)
    of the tensor its first action received."""

    group: str
    first: str  # label of its first action ("F0", "B63", ...)
    actions: int
    start_s: float
    end_s: float
    wait_s: float

    def to_dict(self) -> dict[str, object]:
        return {"group": self.group, "first": self.first, "actions": self.actions,
                "start_s": self.start_s, "end_s": self.end_s, "wait_s": self.wait_s}


def critical_path(schedule: Schedule) -> list[PathSegment]:
    """The chain of actions behind the schedule's makespan, first action first. From the
    action that ends last, each action's start is bound either by its group's previous
    action (it started as that one ended: the group was the bottleneck) or by its input
    (the action of another group that sent it, plus the transfer). The segments' times and
    the waits between them add up to the makespan: the longest segment is the bottleneck's
    run; the segments before it are the pipeline's fill, those after it its drain."""
    ends = schedule.end_s
    if not ends:
        return []
    g, i = max(ends, key=ends.__getitem__)  # the first in plan order on a tie
    index: dict[str, dict[tuple[bool, int, int], int]] = {}

    def sender(group: str, action: Action) -> int:
        if group not in index:
            index[group] = {(a.op == "forward", a.micro_batch, a.chunk): j
                            for j, a in enumerate(schedule.actions[group])
                            if a.op != "backward_weight"}
        return index[group][(action.op == "forward", action.micro_batch, action.chunk)]

    steps: list[tuple[str, int, float]] = []  # (group, index, wait before it), last first
    while True:
        action = schedule.actions[g][i]
        start = schedule.start_s[(g, i)]
        prev_end = schedule.end_s[(g, i - 1)] if i > 0 else 0.0
        tol = 1e-9 * max(1.0, start)
        if action.recv_from is not None and start > prev_end + tol:
            j = sender(action.recv_from, action)
            steps.append((g, i, start - schedule.end_s[(action.recv_from, j)]))
            g, i = action.recv_from, j
            continue
        steps.append((g, i, max(0.0, start - prev_end)))
        if i == 0:
            break
        i -= 1
    segments: list[PathSegment] = []
    for g, i, wait in reversed(steps):
        last = segments[-1] if segments else None
        if last is not None and last.group == g and wait <= 1e-9 * max(1.0, last.end_s):
            segments[-1] = PathSegment(g, last.first, last.actions + 1, last.start_s,
                                       schedule.end_s[(g, i)], last.wait_s)
        else:
            segments.append(PathSegment(g, schedule.actions[g][i].label, 1,
                                        schedule.start_s[(g, i)], schedule.end_s[(g, i)], wait))
    return segments


def critical_path_summary(plan: Plan, schedule: Schedule) -> dict[str, object]:
    """critical_path as figures: the bottleneck (the longest segment: its group, kind,
    layers, actions and seconds), the fill before it and the drain after it (seconds,
    actions), and every segment."""
    segments = critical_path(schedule)
    if not segments:
        return {"segments": []}
    top = max(range(len(segments)), key=lambda k: segments[k].end_s - segments[k].start_s)
    b = segments[top]
    group = plan.group_by_name[b.group]
    return {"pipeline_s": segments[-1].end_s,
            "bottleneck": {**b.to_dict(), "kind": group.kind, "layers": list(group.layers),
                           "tp": group.tp, "busy_s": b.end_s - b.start_s},
            "fill_s": b.start_s, "fill_actions": sum(s.actions for s in segments[:top]),
            "drain_s": segments[-1].end_s - b.end_s,
            "drain_actions": sum(s.actions for s in segments[top + 1:]),
            "segments": [s.to_dict() for s in segments]}


def in_flight_limit(plan: Plan, group: str) -> int:
    """Forwards awaiting their (input) gradient at once: the sum over routes through the group
    of the stages from it to the route's end (1F1B), times the group's in-flight scale; in
    sequence pieces (x Plan.seq_chunks)."""
    limit = 0
    for r in plan.routes_through(group):
        stages = plan.routes[r].stages
        limit += len(stages) - stages.index(group)
    scaled = max(math.floor(limit * plan.group_by_name[group].in_flight_scale + 1e-9), 1)
    return scaled * plan.seq_chunks


def weight_grad_cap(plan: Plan, group: str) -> int:
    """Zero-bubble: micro-batches (sequence pieces) a group may hold beyond its in-flight
    limit (weight gradients kept pending; none at in-flight scale 1, where it holds what
    1F1B holds)."""
    upstream = sum(plan.routes[r].stages.index(group) for r in plan.routes_through(group))
    scale = plan.group_by_name[group].in_flight_scale
    return math.floor(2 * (scale - 1) * upstream + 1e-9) * plan.seq_chunks


def splits(schedule: str, first: bool, recompute: bool) -> bool:
    """The rule behind splits_backward, for callers that have no Plan yet (the planner's
    templates and baselines): backwards split under zero-bubble, except on a stage that is
    first on every route through it or recomputes (each backward pass over checkpointed
    layers runs their forward again: a split would recompute in both actions, and in the
    weight action once per parameter group)."""
    return schedule == "zero_bubble" and not first and not recompute


def splits_backward(plan: Plan, group: str) -> bool:
    """Whether the group's backwards are split into input- and weight-gradient actions."""
    first = all(plan.routes[r].stages.index(group) == 0 for r in plan.routes_through(group))
    return splits(plan.schedule, first, plan.group_by_name[group].recompute)


def imbalance_s(busy_s: dict[str, float], bubble_s: dict[str, float]) -> dict[str, float]:
    """Per group, the part of its bubble (idle not waiting on communication) that no order of
    actions can fill: the step lasts at least as long as the busiest group computes, so a group
    computing less idles at least the difference (whole layers that do not divide evenly
    between kinds, uneven data-parallel shares). The rest of the bubble is pipeline fill and
    drain and waiting on slower neighbours, what schedules can fill. The planner's estimate
    and the simulator both report it from this definition."""
    top = max(busy_s.values(), default=0.0)
    return {g: min(bubble_s[g], top - b) for g, b in busy_s.items()}


def _unit_duration(group: StageGroup, op: Op, samples: int, chunks: int) -> float:
    scale = {"forward": 1.0, "backward": 2.0, "backward_input": 1.0, "backward_weight": 1.0}[op]
    return group.n_layers * samples * scale / group.tp / chunks


@dataclass(slots=True)
class _GroupState:
    split: bool  # backwards split into input- and weight-gradient actions
    limit: int  # forwards awaiting their (input) gradient at most
    w_cap: int  # micro-batches held beyond the limit (weight gradients kept pending)
    ready_f: list = field(default_factory=list)  # heap of (ready at, micro-batch, position)
    ready_b: list = field(default_factory=list)
    pending_w: list = field(default_factory=list)  # micro-batches whose weight grad is left
    in_flight: int = 0  # forwards awaiting their (input) gradient
    held: int = 0  # micro-batches holding activations (until their last backward action)
    peak: int = 0  # of held
    busy: bool = False
    free_s: float = 0.0  # end of its last action
    comm_wait_s: float = 0.0  # idle while a tensor it needs is on its way
    order: list = field(default_factory=list)
    starts: list = field(default_factory=list)  # per action in `order`
    ends: list = field(default_factory=list)
    durations: dict = field(default_factory=dict)  # (op, samples) -> seconds
    most_held: float = math.inf  # the run stops (HeldOver) when held exceeds it
    # Sequence chunks: pieces whose (input) gradient was sent before the next piece's
    # backward ran here (piece -> (sent at, position)), and pieces whose backward ran here.
    early_b: dict = field(default_factory=dict)
    done_b: set = field(default_factory=set)
    sent_early: dict = field(default_factory=dict)  # released piece -> its gradient's send


# (group before, group after, (handshake, transfer) of the input from before, from after)
_Link = tuple[str | None, str | None, tuple[float, float] | None, tuple[float, float] | None]


class HeldOver(Exception):
    """A run given `most_held` (what each group's memory holds): a group would hold
    activations of more micro-batches than that."""


class _ListScheduler:
    """The greedy run behind build_schedule: event-driven, one action at a time per group.
    It lists some 100,000 actions of a large plan and runs once per template the search
    completes, so its loop reads plain lists, not the plan's models."""

    def __init__(self, plan: Plan, cost: StageCost | None, transfer: TransferFn | None,
                 routes: Sequence[int] | None = None, layout: _Layout | None = None):
        self.plan, self.cost, self.transfer = plan, cost, transfer
        self.layout = layout or _Layout(plan)
        self.routes = range(len(plan.routes)) if routes is None else routes
        if routes is None:
            self.groups = plan.group_by_name
        else:  # in the plan's order
            names = {g for r in routes for g in plan.routes[r].stages}
            self.groups = {g: plan.group_by_name[g]
                           for g in sorted(names, key=self.layout.order.__getitem__)}
        self.state = {g: _GroupState(splits_backward(plan, g), in_flight_limit(plan, g),
                                     weight_grad_cap(plan, g),
                                     durations=self.layout.durations.setdefault(g, {}))
                      for g in self.groups}
        self.mb_info = self.layout.mb_info
        self.chunks = plan.seq_chunks
        self.route_links: dict[int, list[_Link]] = {}
        self.events: list = []
        self.seq = itertools.count()

    def duration(self, g: str, st: _GroupState, op: Op, samples: int) -> float:
        key = (op, samples)
        dur = st.durations.get(key)
        if dur is None:
            group = self.groups[g]
            plan = self.plan
            dur = st.durations[key] = (
                _unit_duration(group, op, samples, plan.seq_chunks) if self.cost is None
                else self.cost.stage_compute_s(group, op, samples, plan.chunk_len))
        return dur

    def signature(self) -> tuple:
        """Everything the run's timing and order depend on, in the run's own numbering: two
        sets of routes with equal signatures run alike."""
        index = {g: i for i, g in enumerate(self.groups)}
        groups = []
        for g, st in self.state.items():
            sizes = sorted({self.plan.routes[r].micro_batch_size
                            for r in self.plan.routes_through(g)})
            ops = ("forward",) + (("backward_input", "backward_weight") if st.split
                                  else ("backward",))
            groups.append((st.split, st.limit, st.w_cap, st.most_held,
                           tuple(self.duration(g, st, op, n) for op in ops for n in sizes)))
        routes = []
        for r in self.routes:
            route = self.plan.routes[r]
            stages, size = route.stages, route.micro_batch_size
            links = () if self.transfer is None else tuple(
                (self.transfer(a, b, "forward", size), self.transfer(b, a, "backward", size))
                for a, b in itertools.pairwise(stages))
            routes.append((route.micro_batches, size, tuple(index[g] for g in stages), links))
        return tuple(groups), tuple(routes)

    def _links(self, route: int) -> list[_Link]:
        """Per position of the route: the groups before and after it, and the (handshake,
        transfer) seconds of its input from each (None without transfer times)."""
        links = self.route_links.get(route)
        if links is None:
            r, tr = self.plan.routes[route], self.transfer
            stages, size, links = r.stages, r.micro_batch_size, []
            for pos, g in enumerate(stages):
                prev = stages[pos - 1] if pos > 0 else None
                nxt = stages[pos + 1] if pos + 1 < len(stages) else None
                links.append((prev, nxt,
                              None if tr is None or prev is None else tr(prev, g, "forward", size),
                              None if tr is None or nxt is None else tr(nxt, g, "backward", size)))
            self.route_links[route] = links
        return links

    def _start(self, g: str, st: _GroupState, now: float) -> None:
        """Start the group's next action by priority, if it has one it may run (the group is
        idle): an input gradient first, then a forward within its in-flight limit while it
        holds fewer than the limit plus its cap, then any weight gradient."""
        if st.ready_b:
            sent, mb_id, pos = heappop(st.ready_b)
            if st.sent_early:
                sent = st.sent_early.pop(mb_id, sent)
            st.in_flight -= 1
            if st.split:
                op = "backward_input"
            else:
                op = "backward"
                st.held -= 1
        elif st.ready_f and st.in_flight < st.limit and st.held < st.limit + st.w_cap:
            sent, mb_id, pos = heappop(st.ready_f)
            st.in_flight += 1
            st.held += 1
            if st.held > st.peak:
                st.peak = st.held
                if st.held > st.most_held:
                    raise HeldOver
            op = "forward"
        elif st.pending_w:
            _, mb_id, pos = heappop(st.pending_w)
            st.held -= 1
            op, sent = "backward_weight", 0.0
        else:
            return
        route, _, size = self.mb_info[mb_id]
        if op == "backward_weight":
            recv = send = wait = None
        else:
            links = self.route_links.get(route)  # computed once per route (_links)
            prev, nxt, from_prev, from_next = (links or self._links(route))[pos]
            if op == "forward":
                recv, send, wait = prev, nxt, from_prev
            else:
                recv, send, wait = nxt, prev, from_next
        # Action(...) without the NamedTuple's argument handling: the run lists 100,000s
        chunks = self.chunks
        action = tuple.__new__(Action, (op, mb_id, route, pos, recv, send, 0) if chunks == 1
                               else (op, mb_id // chunks, route, pos, recv, send,
                                     mb_id % chunks))
        starts = st.starts
        start = now
        if wait is not None:
            # posted as the group started the action RECV_AHEAD before; the bytes move after
            # the handshake (comparisons, not max(): the loop's hottest lines)
            handshake_s, bytes_s = wait
            index = len(starts)
            arrive = (starts[index - RECV_AHEAD] if index >= RECV_AHEAD else 0.0) + handshake_s
            if sent > arrive:
                arrive = sent
            arrive += bytes_s
            if arrive > start:
                start = arrive
            idle_from = st.free_s if st.free_s > sent else sent
            if start > idle_from:
                st.comm_wait_s += start - idle_from
        starts.append(start)
        st.order.append(action)
        st.busy = True
        dur = st.durations.get((op, size))
        end = start + (self.duration(g, st, op, size) if dur is None else dur)
        st.ends.append(end)
        heappush(self.events, (end, next(self.seq), g, action))

    def _gradient_in(self, st: _GroupState, now: float, unit: int, pos: int) -> None:
        """A piece's output gradient was sent at `now`: ready, unless a later piece of its
        sequence has yet to run its backward at this group (its keys' and values'
        gradients)."""
        if self.chunks == 1 or unit % self.chunks == self.chunks - 1 or unit + 1 in st.done_b:
            heappush(st.ready_b, (now, unit, pos))
        else:
            st.early_b[unit] = (now, pos)

    def _backward_done(self, st: _GroupState, now: float, unit: int) -> None:
        """Sequence chunks: the previous piece's gradient, if it came early, is ready now,
        queued as ready now; its transfer is timed from its own send (it moved while the
        group waited)."""
        st.done_b.add(unit)
        early = st.early_b.pop(unit - 1, None)
        if early is not None:
            sent, pos = early
            st.sent_early[unit - 1] = sent
            heappush(st.ready_b, (now, unit - 1, pos))

    def run(self) -> float:
        state, events, seq, chunks = self.state, self.events, self.seq, self.chunks
        # the hot loop reads units (micro-batch x chunks + piece) as micro-batch ids
        for r in self.routes:
            first = self.plan.routes[r].stages[0]
            for mb_id in self.layout.route_mbs[r]:
                heappush(state[first].ready_f, (0.0, mb_id, 0))
        for g in self.groups:
            self._start(g, state[g], 0.0)
        now = 0.0
        while events:
            now, _, g, what = heappop(events)
            st = state[g]
            if not isinstance(what, Action):  # an input was sent: (forward?, unit, position)
                self._arrived(st, now, *what)
                if not st.busy:
                    self._start(g, st, now)
                continue
            # done: its output goes on (to `send`), the group is free
            st.busy = False
            st.free_s = now
            op, mb_id, pos, send = what.op, what.micro_batch, what.stage, what.send_to
            if chunks > 1:
                mb_id = mb_id * chunks + what.chunk
            if op == "forward":
                if send is None:  # last stage: its backward is ready at once
                    self._gradient_in(st, now, mb_id, pos)
            elif op != "backward_weight":  # (a weight gradient sends nothing)
                if chunks > 1:
                    self._backward_done(st, now, mb_id)
                if op == "backward_input":
                    heappush(st.pending_w, (now, mb_id, pos))
            sent = None if send is None else (op == "forward", mb_id,
                                              pos + 1 if op == "forward" else pos - 1)
            if sent is not None and (not events or events[0][0] > now):
                # no event of this time is queued before the output's arrival: it would be
                # the next one taken, so it is taken here, after the group's start (its
                # number drawn as if queued: ties among later events break alike). A
                # third of the run's heap operations spared.
                next(seq)
                self._start(g, st, now)
                st = state[send]
                self._arrived(st, now, *sent)
                if not st.busy:
                    self._start(send, st, now)
                continue
            if sent is not None:
                heappush(events, (now, next(seq), send, sent))
            self._start(g, st, now)
        return now

    def _arrived(self, st: _GroupState, now: float, forward: bool, unit: int, pos: int
                 ) -> None:
        """An activation (`forward`) or a gradient reached the group at stage `pos`."""
        if forward:
            heappush(st.ready_f, (now, unit, pos))
        else:
            self._gradient_in(st, now, unit, pos)


class _Layout:
    """What every run over a plan reads: per micro-batch (route, its stages, samples), each
    route's micro-batch ids, and the compute durations found so far, per group. With
    sequence chunks, per unit (micro-batch x chunks + piece): the ids the run schedules."""

    def __init__(self, plan: Plan):
        stages = [tuple(route.stages) for route in plan.routes]
        c = plan.seq_chunks
        self.mb_info = [(mb.route, stages[mb.route], mb.size) for mb in plan.micro_batches
                        for _ in range(c)]
        self.route_mbs: list[range] = []
        first = 0
        for route in plan.routes:
            self.route_mbs.append(range(first, first + route.micro_batches * c))
            first += route.micro_batches * c
        self.chunks = c
        self.durations: dict[str, dict[tuple[str, int], float]] = {}
        self.order = {g.name: i for i, g in enumerate(plan.stage_groups)}


@cyclic_gc_paused()
def build_schedule(plan: Plan, cost: StageCost | None = None,
                   most_held: dict[str, int] | None = None,
                   transfer: TransferFn | None = None) -> Schedule:
    """Every group's ordered actions, from a run timed with `cost`: compute, and transfers
    too when it prices links (LinkCost), as the simulator times them. With `most_held`
    (micro-batches whose activations each group's memory holds), HeldOver as soon as a group
    would hold more: a schedule that does not fit costs its warm-up, not a whole run.

    Routes that share no group never wait on each other, so each set of routes linked by
    shared groups runs alone, and a set identical to one already run (the same groups'
    durations, limits and transfer times, the same routes over them: the copies of a
    pipeline) takes that run's schedule under its own names. The result is the one run of
    the whole plan would give: inside a set, events and micro-batch ids keep their order."""
    cost = in_plan_units(plan, cost)
    transfer = transfer or _transfers(plan, cost)
    parts = _linked_routes(plan)
    most_held = most_held or {}
    if len(parts) == 1:
        return _listed(plan, _held_to(_ListScheduler(plan, cost, transfer), most_held))
    layout = _Layout(plan)
    runs: dict[tuple, tuple[list[int], list[str], Schedule]] = {}
    done: list[Schedule] = []
    for routes in parts:
        run = _held_to(_ListScheduler(plan, cost, transfer, routes, layout), most_held)
        key = run.signature()
        if key in runs:
            done.append(_renamed(layout, runs[key], routes, list(run.groups)))
        else:
            done.append(_listed(plan, run))
            runs[key] = (routes, list(run.groups), done[-1])
    return _merged(plan, done)


def _transfers(plan: Plan, cost: StageCost | None) -> TransferFn | None:
    """Transfer times when the cost model prices links, else none (compute only)."""
    return transfer_times(plan, cost) if hasattr(cost, "p2p_s") else None


def _linked_routes(plan: Plan) -> list[list[int]]:
    """The routes in sets linked by shared stage groups, each set in route order (a union-find:
    scipy's connected_components would add 0.2 s of imports to every worker's start)."""
    root = list(range(len(plan.routes)))

    def find(r: int) -> int:
        while root[r] != r:
            root[r] = root[root[r]]
            r = root[r]
        return r

    owner: dict[str, int] = {}
    for r, route in enumerate(plan.routes):
        for g in route.stages:
            if g in owner:
                root[find(r)] = find(owner[g])
            else:
                owner[g] = r
    sets: dict[int, list[int]] = {}
    for r in range(len(plan.routes)):
        sets.setdefault(find(r), []).append(r)
    return list(sets.values())


def _renamed(layout: _Layout, run: tuple[list[int], list[str], Schedule], routes: list[int],
             groups: list[str]) -> Schedule:
    """The schedule of an identical set of routes, under this set's group names, routes and
    micro-batch ids."""
    their_routes, their_groups, schedule = run
    name = dict(zip(their_groups, groups, strict=True))
    route = dict(zip(their_routes, routes, strict=True))
    shift = {r: (layout.route_mbs[route[r]].start - layout.route_mbs[r].start) // layout.chunks
             for r in their_routes}
    actions = {name[g]: [Action(a.op, a.micro_batch + shift[a.route], route[a.route], a.stage,
                                name.get(a.recv_from), name.get(a.send_to), a.chunk)
                         for a in acts]
               for g, acts in schedule.actions.items()}
    return Schedule(actions=actions,
                    peak_in_flight={name[g]: n for g, n in schedule.peak_in_flight.items()},
                    estimated_step_s=schedule.estimated_step_s,
                    starts={name[g]: ts for g, ts in schedule.starts.items()},
                    ends={name[g]: ts for g, ts in schedule.ends.items()},
                    comm_wait_s={name[g]: t for g, t in schedule.comm_wait_s.items()})


def _merged(plan: Plan, parts: list[Schedule]) -> Schedule:
    order = [g.name for g in plan.stage_groups]
    actions = {g: acts for part in parts for g, acts in part.actions.items()}
    peak = {g: n for part in parts for g, n in part.peak_in_flight.items()}
    wait = {g: t for part in parts for g, t in part.comm_wait_s.items()}
    starts = {g: ts for part in parts for g, ts in part.starts.items()}
    ends = {g: ts for part in parts for g, ts in part.ends.items()}
    return Schedule(actions={g: actions[g] for g in order},
                    peak_in_flight={g: peak[g] for g in order},
                    estimated_step_s=max(part.estimated_step_s for part in parts),
                    starts={g: starts[g] for g in order}, ends={g: ends[g] for g in order},
                    comm_wait_s={g: wait[g] for g in order})


def schedule_within(plan: Plan, cost: StageCost | None, most_held: dict[str, int],
                    transfer: TransferFn | None = None) -> Schedule | None:
    """build_schedule, or None once a group holds activations of more micro-batches than
    `most_held` gives it (what its memory holds). `transfer`: the transfer times to run
    with instead of the cost model's (the planner's templates give theirs per boundary)."""
    try:
        return build_schedule(plan, cost, most_held, transfer)
    except HeldOver:
        return None


def _held_to(run: _ListScheduler, most_held: dict[str, int]) -> _ListScheduler:
    for g, st in run.state.items():
        st.most_held = most_held.get(g, math.inf)
    return run


def _checked_run(plan: Plan, run: _ListScheduler) -> float:
    """The run's makespan; PlanError if it stalled before every action ran."""
    makespan = run.run()
    for g, st in run.state.items():
        per_mb = 3 if st.split else 2
        want = per_mb * plan.micro_batches_of(g) * plan.seq_chunks
        if len(st.order) != want:
            raise PlanError(f"schedule stalled at stage group {g!r}: {len(st.order)} of {want} "
                            "actions could run; check that routes visit layers in order")
    return makespan


def _listed(plan: Plan, run: _ListScheduler) -> Schedule:
    makespan = _checked_run(plan, run)
    return Schedule(actions={g: st.order for g, st in run.state.items()},
                    peak_in_flight={g: st.peak for g, st in run.state.items()},
                    estimated_step_s=makespan,
                    starts={g: st.starts for g, st in run.state.items()},
                    ends={g: st.ends for g, st in run.state.items()},
                    comm_wait_s={g: st.comm_wait_s for g, st in run.state.items()})
