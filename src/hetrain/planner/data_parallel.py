"""Data-parallel plans: every device holds the whole model; shares follow each kind's speed."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

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
    max(share_i x seconds_per_sample_i). Floors of the proportional split, then each
    remaining sample to the device that would finish it earliest (optimal for unit jobs on
    machines of different speeds)."""
    if any(t <= 0 for t in seconds_per_sample) or total < 0:
        raise PlannerError("shares need positive per-sample times and a non-negative total")
    speeds = [1.0 / t for t in seconds_per_sample]
    shares = [int(total * s / sum(speeds)) for s in speeds]
    heap = [((n + 1) * t, i) for i, (n, t) in enumerate(zip(shares, seconds_per_sample,
                                                             strict=True))]
    heapq.heapify(heap)
    for _ in range(total - sum(shares)):
        _, i = heapq.heappop(heap)
        shares[i] += 1
        heapq.heappush(heap, ((shares[i] + 1) * seconds_per_sample[i], i))
    return shares


def _micro_batch_size(samples: int, max_size: int) -> int:
    """Largest divisor of `samples` not above `max_size`, so micro-batches are even."""
    return max(d for d in range(1, min(samples, max_size) + 1) if samples % d == 0)


def data_parallel_plan(cluster: Cluster, cost: CostModel, global_batch: int,
                       *, even: bool = False, kinds: Sequence[str] | None = None,
                       max_micro_batch: int = 8, dtype: str = "fp32") -> Plan:
    """One full-model replica per device; each device's share of the global batch is
    proportional to its kind's estimated speed (`even`: equal shares, as plain DDP does)."""
    spec = cost.spec
    devices = [d for d in cluster.devices if kinds is None or d.kind in kinds]
    if not devices:
        raise PlannerError(f"no devices of kinds {list(kinds or [])} in the cluster")
    if even:
        shares = proportional_shares([1.0] * len(devices), global_batch)
    else:
        shares = balanced_shares([1.0 / cost.tokens_per_s(d.kind, dtype) for d in devices],
                                 global_batch)
    groups, routes = [], []
    for i, (dev, share) in enumerate(zip(devices, shares, strict=True)):
        if share == 0:
            continue
        name = f"dp{i}"
        groups.append(StageGroup(name=name, kind=dev.kind, devices=[dev.id],
                                 layers=(0, spec.n_layers), dtype=dtype))
        size = _micro_batch_size(share, max_micro_batch)
        routes.append(Route(stages=[name], micro_batches=share // size, micro_batch_size=size))
    return Plan(model=spec.name, seq_len=spec.seq_len, global_batch=global_batch,
                stage_groups=groups, routes=routes)
