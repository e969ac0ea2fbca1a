"""Discrete-event execution of one training step, as the runtime runs it.

Each stage group runs its schedule actions in the given order (never reordered here): an
action starts once the group is free and its input has arrived. Sends are asynchronous
(the runtime isends staged host tensors), but the bytes move only once the receiver has
posted its receive (gloo's rendezvous), which it does RECV_AHEAD actions before: a
receiver that posts late still waits the handshake and the transfer. Transfers between one
pair of nodes (or of devices, inside a node) share the link: the bytes of one go after
those of the other, while their latencies (the cost model's p2p time of no bytes) overlap.
Gradient sync and the optimizer are priced by plan.sync.price_sync (the one definition the
runtime and the planner use): buckets start under the last weight-gradient actions and
overlap compute. One heap of timed events: O(events log events).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.errors import SimError
from hetrain.plan.schedule import RECV_AHEAD, WEIGHT_GRAD_OPS, Action, Schedule
from hetrain.plan.sync import FreeSync, SyncBucket, SyncTimeline, price_sync, reductions
from hetrain.plan.types import Plan
from hetrain.trace import TraceEvent

_DONE, _ARRIVE = 0, 1
_Key = tuple[str, bool, int, int]


@dataclass
class GroupTime:
    """What one stage group did during the step (every device of the group did the same)."""

    busy_s: float = 0.0  # forward, backward and optimizer compute
    comm_wait_s: float = 0.0  # idle while a transfer or sync it needs was in flight
    last_compute_s: float = 0.0  # end of its last compute action
    last_weight_grad_s: tuple[float, float] = (0.0, 0.0)  # its last weight-gradient action
    end_s: float = 0.0  # end of its optimizer step
    starts_s: list[float] = field(default_factory=list)  # start of each schedule action


@dataclass
class StepRun:
    step_s: float
    groups: dict[str, GroupTime]
    events: list[TraceEvent]
    sync: SyncTimeline | None = None


class StepEngine:
    """One simulated step. `comm=False` makes every transfer and sync free (compute only)."""

    def __init__(self, plan: Plan, cluster: Cluster, cost: CostModel, schedule: Schedule,
                 buckets: list[SyncBucket], *, comm: bool = True, record: bool = True):
        self.plan, self.cluster, self.cost = plan, cluster, cost
        self.actions = schedule.actions
        self.buckets, self.comm, self.record = buckets, comm, record
        self.groups = plan.group_by_name
        self.time = {g: GroupTime() for g in self.groups}
        self.pos = dict.fromkeys(self.groups, 0)
        self.busy = dict.fromkeys(self.groups, False)
        self.free_s = dict.fromkeys(self.groups, 0.0)
        # Keyed by (receiving group, backward?, micro-batch, sequence piece), as the runtime
        # tags transfers: a split sender's input-gradient action feeds a whole backward alike.
        self.sent: dict[_Key, tuple[str, Action, float]] = {}  # -> src, action, at
        self.posted: dict[_Key, float] = {}  # receive posted at
        self.arrived: dict[_Key, tuple[float, float]] = {}  # -> (arrive, sent)
        self.link_free_s: dict[tuple[str, str], float] = {}
        self.events: list[TraceEvent] = []
        self.heap: list[tuple] = []
        self.seq = itertools.count()
        self._compute_s: dict[tuple[str, str, int], float] = {}

    # --- costs -------------------------------------------------------------------------------
    def compute_s(self, g: str, op: str, samples: int) -> float:
        key = (g, op, samples)
        if key not in self._compute_s:
            self._compute_s[key] = self.cost.stage_compute_s(self.groups[g], op, samples,
                                                             self.plan.chunk_len)
        return self._compute_s[key]

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> StepRun:
        for g in self.groups:
            self._try_start(g, 0.0)
        while self.heap:
            now, _, what, payload = heapq.heappop(self.heap)
            if what == _DONE:
                self._on_done(payload[0], payload[1], now)
            else:
                self._try_start(payload, now)
        stuck = [g for g in self.groups if self.pos[g] < len(self.actions[g])]
        if stuck:
            g = stuck[0]
            raise SimError(f"simulation stalled at stage group {g!r}: action {self.pos[g]} of "
                           f"{len(self.actions[g])} never got its input; the schedule does not "
                           "match the plan")
        sync = self._price_sync()
        return StepRun(step_s=sync.step_s, groups=self.time, events=self.events, sync=sync)

    def _push(self, at_s: float, what: int, payload: object) -> None:
        heapq.heappush(self.heap, (at_s, next(self.seq), what, payload))

    def _try_start(self, g: str, now: float) -> None:
        if self.busy[g] or self.pos[g] == len(self.actions[g]):
            return
        action = self.actions[g][self.pos[g]]
        if action.recv_from is not None:
            key = (g, action.is_backward, action.micro_batch, action.chunk)
            got = self.arrived.get(key)
            if got is None:
                if key not in self.posted:
                    self.posted[key] = now
                    if key in self.sent:
                        self._transfer(key)
                return  # the arrival wakes this group again
            if got[0] > now:
                return
            arrive_s, sent_s = got
            self.time[g].comm_wait_s += max(0.0, arrive_s - max(self.free_s[g], sent_s))
        size = self.plan.micro_batches[action.micro_batch].size
        dur = self.compute_s(g, action.op, size)
        self.busy[g] = True
        self.pos[g] += 1
        self.time[g].busy_s += dur
        self.time[g].starts_s.append(now)
        if action.op in WEIGHT_GRAD_OPS:
            self.time[g].last_weight_grad_s = (now, now + dur)
        self._push(now + dur, _DONE, (g, action))
        self._post_next(g, now)
        if self.record:
            args = {"group": g, "micro_batch": action.micro_batch, "route": action.route,
                    "stage": action.stage, "samples": size, "chunk": action.chunk}
            category = {"forward": "forward", "backward_weight": "weight"}.get(action.op,
                                                                            "backward")
            self._emit(self.groups[g].devices, g, action.label, category, now, dur, args,
                       "compute")

    def _post_next(self, g: str, now: float) -> None:
        """The runtime posts the receives of the next RECV_AHEAD actions as it starts an
        action, so the handshakes and the bytes move under compute."""
        for nxt in self.actions[g][self.pos[g]:self.pos[g] + RECV_AHEAD]:
            if nxt.recv_from is None:
                continue
            key = (g, nxt.is_backward, nxt.micro_batch, nxt.chunk)
            if key not in self.posted:
                self.posted[key] = now
                if key in self.sent:
                    self._transfer(key)

    def _on_done(self, g: str, action: Action, now: float) -> None:
        self.busy[g] = False
        self.free_s[g] = now
        if action.send_to is not None:
            key = (action.send_to, action.is_backward, action.micro_batch, action.chunk)
            self.sent[key] = (g, action, now)
            if key in self.posted:
                self._transfer(key)
        if self.pos[g] < len(self.actions[g]):
            self._try_start(g, now)
        else:
            self.time[g].last_compute_s = now

    def _transfer(self, key: _Key) -> None:
        """Sent and posted: queue the transfer on its link and schedule its arrival."""
        g, action, sent_s = self.sent[key]
        src, dst = self.groups[g], self.groups[action.send_to]
        # forward sends this stage's output; backward the gradient of its input (same size as
        # the previous stage's output)
        boundary = src.layers[1] if action.op == "forward" else src.layers[0]
        size = self.plan.micro_batches[action.micro_batch].size
        nbytes = self.cost.activation_bytes(boundary, size, src.dtype) / self.plan.seq_chunks
        # One TP rank per side carries the tensor (the others hold the same replica).
        a, b = src.devices[0], dst.devices[0]
        if not self.comm:
            start, total_s = max(sent_s, self.posted[key]), 0.0
        else:
            ready_s = max(sent_s, self.posted[key] + self.cost.p2p_handshake_s(a, b))
            total_s = self.cost.p2p_s(a, b, nbytes)
            # The cost model's own latency (a measured one is the fit's fixed part, not the
            # cluster's spec figure), so that only the bytes' time occupies the link.
            latency_s = min(total_s, self.cost.p2p_s(a, b, 0.0))
            nodes = (self.cluster.device_by_id[a].node, self.cluster.device_by_id[b].node)
            # Between nodes transfers share the NICs; inside a node each pair has its own
            # path (NVLink / switch fabric).
            link = nodes if nodes[0] != nodes[1] else (a, b)
            start = max(ready_s, self.link_free_s.get(link, 0.0))
            # The link is taken for the bytes only: latency of back-to-back messages overlaps.
            self.link_free_s[link] = start + total_s - latency_s
        self.arrived[key] = (start + total_s, sent_s)
        self._push(start + total_s, _ARRIVE, action.send_to)
        if not self.comm:
            return
        if self.record:
            args = {"micro_batch": action.micro_batch, "op": action.op, "bytes": nbytes,
                    "from": g, "to": action.send_to, "queued_s": start - sent_s}
            self._emit([a], g, "send", "comm", start, total_s, args, "comm")
            self._emit([b], action.send_to, "recv", "comm", start, total_s, args, "comm")

    def _price_sync(self) -> SyncTimeline:
        """Sync and optimizer from the one definition (plan.sync), then their trace events."""
        cost = self.cost if self.comm else FreeSync(self.cost)
        sync = price_sync(self.plan, self.cost.spec, self.buckets, cost,
                          {g: t.last_weight_grad_s for g, t in self.time.items()},
                          {g: t.last_compute_s for g, t in self.time.items()})
        # Waiting for a bucket's other holders is a bubble; its collective is comm wait.
        waits = sync.comm_wait_s(self.buckets)
        for g, t in self.time.items():
            t.comm_wait_s += waits[g]
            t.busy_s += sync.group_optimizer_s[g]
            t.end_s = sync.group_end_s[g]
        if self.record:
            self._emit_sync(sync)
        return sync

    def _emit_sync(self, sync: SyncTimeline) -> None:
        for bucket, start, dur in zip(self.buckets, sync.bucket_start_s, sync.bucket_s,
                                      strict=True):
            if dur <= 0:
                continue
            args = {"bucket": bucket.index, "groups": len(bucket.holders),
                    "layers": list(bucket.layers),
                    "devices": sum(len(s) for s in reductions(self.plan, bucket))}
            for g in bucket.holders:
                self._emit(self.groups[g].devices, g, "allreduce", "comm", start, dur, args,
                           "comm")
        for g in self.groups:
            dur = sync.group_optimizer_s[g]
            self._emit(self.groups[g].devices, g, "optimizer", "optimizer",
                       sync.group_synced_s[g], dur, {"group": g}, "compute")

    def _emit(self, devices: list[str], group: str, name: str, category: str, start_s: float,
              dur_s: float, args: dict, stream: str) -> None:
        kind = self.groups[group].kind
        for d in devices:
            self.events.append(TraceEvent(lane=d, name=name, category=category, start_s=start_s,
                                          dur_s=dur_s, args=args, kind=kind, stream=stream))
