"""Data-parallel plans: every device holds the whole model; shares follow each kind's speed."""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Sequence

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.errors import PlannerError
from hetrain.plan.types import Plan, Route, StageGroup


def proportional_shares(speeds: Sequence[float], total: int, minimum: int = 0) -> list[int]:
    """Split `total` items in proportion to `speeds` (largest remainder): the result sums to
    `total` exactly and each share differs from its ideal by less than one."""
    if total < 0 or not speeds or any(s <= 0 for s in speeds):
        raise PlannerError("shares need a non-negative total and positive speeds")
    if minimum * len(speeds) > total:
        raise PlannerError(f"global batch {total} is smaller than {minimum} per device x "
                           f"{len(speeds)} devices")
    rest = total - minimum * len(speeds)
    scale = sum(speeds)
    ideal = [rest * s / scale for s in speeds]
    shares = [int(x) for x in ideal]
    order = sorted(range(len(speeds)), key=lambda i: (shares[i] - ideal[i], i))
    for i in order[: rest - sum(shares)]:
        shares[i] += 1
    return [s + minimum for s in shares]


def balanced_shares(seconds_per_sample: Sequence[float], total: int) -> list[int]:
    """Split `total` samples so the slowest device finishes first: minimise
    max(share_i x seconds_per_sample_i)."""
    if any(t <= 0 for t in seconds_per_sample) or total < 0:
        raise PlannerError("shares need positive per-sample times and a non-negative total")
    return balanced_shares_by([lambda n, t=t: n * t for t in seconds_per_sample], total)


def balanced_shares_by(finish_s: Sequence[Callable[[int], float]], total: int) -> list[int]:
    """Split `total` samples over devices whose time for n samples is `finish_s[i](n)` (non-
    decreasing): each sample in turn goes to the device that would finish it earliest, which
    minimises the slowest device's time for such functions (unit jobs, list scheduling)."""
    shares = [0] * len(finish_s)
    heap = [(f(1), i) for i, f in enumerate(finish_s)]
    heapq.heapify(heap)
    for _ in range(total):
        _, i = heapq.heappop(heap)
        shares[i] += 1
        heapq.heappush(heap, (finish_s[i](shares[i] + 1), i))
    return shares


def data_parallel_plan(cluster: Cluster, cost: CostModel, global_batch: int,
                       *, even: bool = False, kinds: Sequence[str] | None = None,
                       micro_batch_size: int = 8, dtype: str = "fp32") -> Plan:
    """One full-model replica per device; each device's share of the global batch balances
    the devices' finishing times under the cost model (`even`: equal shares, as plain DDP
    does). A share runs as micro-batches of `micro_batch_size`, plus one smaller micro-batch
    for the remainder (a second route through the same stage group)."""
    spec = cost.spec
    devices = [d for d in cluster.devices if kinds is None or d.kind in kinds]
    if not devices:
        raise PlannerError(f"no devices of kinds {list(kinds or [])} in the cluster")
    if even:
        shares = proportional_shares([1.0] * len(devices), global_batch)
    else:
        # A share runs as full micro-batches plus one remainder, and each micro-batch pays the
        # weight-reading floor: time is not linear in samples, so balance the real function.
        @functools.cache
        def micro_batch_s(kind: str, size: int) -> float:
            if size == 0:
                return 0.0
            return sum(cost.layers_compute_s(kind, (0, spec.n_layers), size * spec.seq_len,
                                             op, dtype) for op in ("forward", "backward"))

        def finish_fn(kind: str) -> Callable[[int], float]:
            return lambda n: (n // micro_batch_size * micro_batch_s(kind, micro_batch_size)
                              + micro_batch_s(kind, n % micro_batch_size))

        shares = balanced_shares_by([finish_fn(d.kind) for d in devices], global_batch)
    groups, routes = [], []
    for i, (dev, share) in enumerate(zip(devices, shares, strict=True)):
        if share == 0:
            continue
        name = f"dp{i}"
        groups.append(StageGroup(name=name, kind=dev.kind, devices=[dev.id],
                                 layers=(0, spec.n_layers), dtype=dtype))
        full, rest = divmod(share, micro_batch_size)
        if full:
            routes.append(Route(stages=[name], micro_batches=full,
                                micro_batch_size=micro_batch_size))
        if rest:
            routes.append(Route(stages=[name], micro_batches=1, micro_batch_size=rest))
    return Plan(model=spec.name, seq_len=spec.seq_len, global_batch=global_batch,
                stage_groups=groups, routes=routes)
