"""Brute-force references for the planner's exact parts, written independently of them."""

from __future__ import annotations

import heapq
import itertools
import math

import numpy as np

from hetrain.errors import PlannerError
from hetrain.plan.types import StageGroup
from hetrain.planner.partition import MEMORY_SLACK
from hetrain.planner.placement import DevicePool


def brute_partition(cost, comm, dtypes, mbs, stages, allow_recompute=True):
    """Least slowest stage over every cut of the layers into len(stages) non-empty ranges.
    `stages`: (kind, tp, in one node) per stage, first first. Times from CostModel calls."""
    n, s_count = cost.spec.n_layers, len(stages)
    peers = [(k, local) for k, _, local in stages]
    best = math.inf
    for cuts in itertools.combinations(range(1, n), s_count - 1):
        bounds = (0, *cuts, n)
        worst = 0.0
        for s, (kind, tp, _) in enumerate(stages):
            layers = (bounds[s], bounds[s + 1])
            cap = cost.cluster.kinds[kind].memory_bytes * (1 - MEMORY_SLACK)
            t = math.inf
            # the fastest that fits: plain, regathering (sequence parallelism), recomputation
            modes = ((False, False), (False, True), (True, False))
            for rc, rg in (modes if allow_recompute else modes[:2]):
                g = StageGroup(name="g", kind=kind, devices=["x"] * tp, layers=layers,
                               dtype=dtypes[kind], recompute=rc, regather=rg)
                if cost.stage_memory_bytes(g, mbs, s_count - s) <= cap:
                    t = sum(cost.stage_compute_s(g, op, mbs, cost.spec.seq_len)
                            for op in ("forward", "backward"))
                    break
            prev = peers[s - 1] if s else None
            nxt = peers[s + 1] if s + 1 < s_count else None
            fwd, bwd = comm.recv_s(prev, peers[s], nxt)
            worst = max(worst, t + fwd[layers[0]] + bwd[layers[1]])
        best = min(best, worst)
    return best


def min_max_split(copies, micro_batches):
    """copies: (slot_s, fill_s) per pipeline copy. The least latest finish over every split of
    the micro-batches (each copy at least one), by filling the copy that finishes soonest."""
    if len(copies) > micro_batches:
        return math.inf
    count = [1] * len(copies)

    def finish(i, m):
        slot, fill = copies[i]
        return fill + m * slot

    heap = [(finish(i, 2), i) for i in range(len(copies))]
    heapq.heapify(heap)
    for _ in range(micro_batches - len(copies)):
        _, i = heapq.heappop(heap)
        count[i] += 1
        heapq.heappush(heap, (finish(i, count[i] + 1), i))
    return max(finish(i, count[i]) for i in range(len(copies)))


def packs(cluster, templates, selection):
    """Whether the selection's groups can be placed (tried group by group, largest tp first)."""
    pool = DevicePool(cluster)
    groups = [tp for t, n in selection for _ in range(n) for _, tp in templates[t].stages]
    kinds = [k for t, n in selection for _ in range(n) for k, _ in templates[t].stages]
    try:
        for tp, kind in sorted(zip(groups, kinds, strict=True), key=lambda x: -x[0]):
            pool.take(kind, tp)
    except PlannerError:
        return False
    return True


def brute_counts(cluster, templates, micro_batches, max_shapes):
    """The least pipeline + tail over every set of templates with copy counts that fits."""
    counts = cluster.kind_counts()
    best = math.inf

    def rec(i, left, chosen):
        nonlocal best
        if chosen:
            u = len(chosen)
            copies = [(templates[t].slot_s, templates[t].fill_s) for t, n in chosen
                      for _ in range(n)]
            pipeline = min_max_split(copies, micro_batches)
            if np.isfinite(pipeline) and packs(cluster, templates, chosen):
                tail = max(templates[t].tail_s[n - 1, u - 1] for t, n in chosen)
                best = min(best, pipeline + tail)
        if i == len(templates) or len(chosen) == max_shapes:
            return
        for t in range(i, len(templates)):
            need = templates[t].devices
            for n in itertools.count(1):
                if any(need[k] * n > left[k] for k in need):
                    break
                rec(t + 1, {k: v - need.get(k, 0) * n for k, v in left.items()},
                    [*chosen, (t, n)])

    rec(0, dict(counts), [])
    return best
