"""Gradient sync, defined once: which stage groups sum which gradients, in which buckets and
order, when each bucket may start, and how long the sync and optimizer tail of a step lasts.

The runtime (runtime/grad_sync.py), the simulator (sim/engine.py) and the planner's estimate
(planner/estimate.py) all read these definitions, so they cannot price or run sync differently.

- A layer's gradient is summed over its holders (Plan.gradient_holders; a tied embedding also
  over the head's holders). Consecutive layers with the same holders form buckets of at most
  `bucket_params` parameters (a layer is never split).
- Buckets are ordered by their last layer, highest first (backward finalises the last layers
  first), then by holders; every rank starts its buckets in this global order.
- A bucket may start once every holder has passed its layers in its last weight-gradient
  action of the step (backward runs from a stage's last layer down), and once each member
  device's previous bucket is done (one comm stream per device). It overlaps compute.
- Holders of one TP degree sum shard by shard (tp side-by-side collectives of 1/tp of the
  bytes on disjoint devices); holders of mixed degrees sum full tensors over all their devices.
- Each collective is sharded (cost.sync_s prices it): reduce-scatter inside each kind, each
  rank sums its shard with its peers of the other kinds, all-gather inside each kind.
- The optimizer of a group runs once all its buckets are summed; with a sharded optimizer
  (ZeRO-1) each device updates only its share of every bucket (shard_weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from hetrain.cluster.kinds import DTYPE_BYTES
from hetrain.model.spec import ModelSpec
from hetrain.plan.types import Plan, StageGroup

BUCKET_PARAMS = 8 * 2**20  # about 32 MiB of fp32 gradients


@dataclass(frozen=True)
class SyncBucket:
    index: int  # position in the global order
    holders: tuple[str, ...]  # stage groups summing it, sorted
    layers: tuple[int, int]  # [start, end) of the layers whose gradients it carries
    params: int  # parameters (of full tensors) whose gradients it carries
    # Of its holders (the plan's, read once: planning asks for them per group and bucket):
    same_tp: bool = True  # holders of one TP degree: summed shard by shard
    weight_sum: float = 0.0  # sum of shard_weight
    device_weight_sum: float = 0.0  # sum of shard_weight x tp

    @property
    def layer_list(self) -> range:
        return range(*self.layers)


class SyncCost(Protocol):
    """What pricing the sync needs from a cost model (cost.CostModel implements it)."""

    def sync_s(self, devices: list[str], nbytes: float) -> float: ...

    def optimizer_s(self, kind: str, params: float) -> float: ...


class FreeSync:
    """A SyncCost whose gradient sums take no time: the step with all sync hidden."""

    def __init__(self, cost: SyncCost):
        self.cost = cost

    def sync_s(self, devices: list[str], nbytes: float) -> float:
        return 0.0

    def optimizer_s(self, kind: str, params: float) -> float:
        return self.cost.optimizer_s(kind, params)


def tied_last(spec: ModelSpec) -> int | None:
    return spec.n_layers - 1 if spec.tie_embeddings else None


def own_params(spec: ModelSpec, layer: int) -> int:
    """Parameters whose gradient a layer's holders sum: a tied head's output weight is the
    embedding's, summed with layer 0."""
    params = spec.layers[layer].params
    if layer == tied_last(spec):
        params -= spec.vocab_size * spec.dim
    return params


def sync_buckets(plan: Plan, spec: ModelSpec, bucket_params: int = BUCKET_PARAMS
                 ) -> list[SyncBucket]:
    """Every bucket of two or more holders, in the global order."""
    spec = spec.units(plan.half_layers)
    tied = tied_last(spec)
    runs: list[tuple[tuple[str, ...], int, int, int]] = []  # holders, start, end, params
    for layer in range(spec.n_layers - 1, -1, -1):
        holders = plan.gradient_holders(layer, tied)
        params = own_params(spec, layer)
        if len(holders) < 2:
            continue
        if runs and runs[-1][0] == holders and runs[-1][1] == layer + 1 \
                and runs[-1][3] + params <= bucket_params:
            h, _, end, total = runs[-1]
            runs[-1] = (h, layer, end, total + params)
        else:
            runs.append((holders, layer, layer + 1, params))
    runs.sort(key=lambda r: (-r[2], r[0]))
    out = []
    for i, (h, a, b, p) in enumerate(runs):
        groups = [plan.group_by_name[g] for g in h]
        out.append(SyncBucket(index=i, holders=h, layers=(a, b), params=p,
                              same_tp=len({len(g.devices) for g in groups}) == 1,
                              weight_sum=sum(g.shard_weight for g in groups),
                              device_weight_sum=sum(g.shard_weight * len(g.devices)
                                                    for g in groups)))
    return out


def reductions(plan: Plan, bucket: SyncBucket) -> list[tuple[str, ...]]:
    """Device ids of each collective of the bucket: tp rank j of every holder together when
    the holders share a TP degree, else every device of every holder."""
    groups = [plan.group_by_name[g] for g in bucket.holders]
    if bucket.same_tp:
        return [tuple(g.devices[j] for g in groups) for j in range(groups[0].tp)]
    return [tuple(d for g in groups for d in g.devices)]


def bucket_bytes(plan: Plan, bucket: SyncBucket) -> float:
    """Bytes each rank of one of the bucket's collectives sums (gradients in the holders'
    widest dtype; shard-wise: 1/tp of the bucket)."""
    groups = [plan.group_by_name[g] for g in bucket.holders]
    nbytes = bucket.params * max(DTYPE_BYTES[g.dtype] for g in groups)
    return nbytes / groups[0].tp if bucket.same_tp else nbytes


def sync_buffer_bytes(plan: Plan, spec: ModelSpec, group: StageGroup, gloo_kinds: set[str],
                      buckets: list[SyncBucket]) -> float:
    """Peak bytes of the gradient-sync buffers on one device of `group`, as
    runtime/grad_sync.py and comm/sharded.py allocate them, one bucket at a time: its flat
    fp32 gradients; unless one kind summed it whole (an all-reduce on gloo), the all-gather
    of its kind's shards (a padded shard and one output per member); with a sharded
    optimizer also the flat parameters and, across kinds, the exchange of the pieces."""
    peak = 0.0
    for bucket in buckets:
        if group.name not in bucket.holders:
            continue
        whole = not bucket.same_tp
        numel = bucket.params if whole else _bucket_device_params(spec, bucket, group.tp)
        holders = [plan.group_by_name[g] for g in bucket.holders]
        kinds = {g.kind for g in holders}
        # Members of this device's kind in its collective (reductions): shard-wise one device
        # of each holder, else every device of every holder.
        members = sum(g.tp if whole else 1 for g in holders if g.kind == group.kind)
        copies = 1.0
        gathered = plan.sharded_optimizer or len(kinds) > 1 or group.kind not in gloo_kinds
        if gathered and members > 1:
            copies += (members + 1) / members
        if plan.sharded_optimizer:
            copies += 1 + (2 / members if len(kinds) > 1 else 0)
        nbytes = max(DTYPE_BYTES[group.dtype], 4)  # gradients stay in the master dtype
        peak = max(peak, numel * copies * nbytes)
    return peak


def _bucket_device_params(spec: ModelSpec, bucket: SyncBucket, tp: int) -> float:
    """A bucket's parameters on one device of a `tp`-way holder summing shard-wise."""
    whole = sum(spec.layers[i].params for i in bucket.layer_list)
    return bucket.params - whole + spec.device_params(*bucket.layers, tp)


def ready_fraction(spec: ModelSpec, group: StageGroup, bucket: SyncBucket) -> float:
    """Share of the group's last weight-gradient action after which the bucket's gradients
    are final on it: backward runs from the group's last layer down, each layer taking its
    share of the FLOPs (a tied head counts as holding the embedding's weight)."""
    a, b = group.layers
    lo = max(a, bucket.layers[0])
    if lo >= min(b, bucket.layers[1]):  # holds it only through the tied head
        lo = b - 1
    weights = spec.backward_weights[a:b]
    return sum(weights[lo - a:]) / sum(weights)


def shard_bounds(weights: list[float], numel: int) -> list[tuple[int, int]]:
    """Uneven contiguous shards of `numel` elements in proportion to `weights` (ZeRO-1)."""
    total = sum(weights)
    bounds, acc = [], 0.0
    start = 0
    for w in weights:
        acc += w
        end = round(numel * acc / total)
        bounds.append((start, end))
        start = end
    return bounds


def optimizer_params(plan: Plan, spec: ModelSpec, buckets: list[SyncBucket]
                     ) -> dict[str, float]:
    """Per group, the parameters one of its devices steps: its 1/tp of the stage, less, with
    a sharded optimizer, what other holders step of each bucket it shares. Shard-wise, a
    device steps its weight's share of its 1/tp of the bucket among one device per holder;
    in full-tensor mode (mixed TP degrees) its weight's share of the whole bucket among every
    device."""
    out = {g.name: spec.device_params(*g.layers, g.tp) for g in plan.stage_groups}
    if not plan.sharded_optimizer:
        return out
    groups = plan.group_by_name
    for bucket in buckets:
        for name in bucket.holders:
            group = groups[name]
            held = _bucket_device_params(spec, bucket, group.tp)
            if bucket.same_tp:
                stepped = held * group.shard_weight / bucket.weight_sum
            else:
                stepped = bucket.params * group.shard_weight / bucket.device_weight_sum
            out[name] -= held - stepped
    return {g: max(params, 0.0) for g, params in out.items()}


@dataclass
class SyncTimeline:
    """The priced tail of one step: when every bucket ran and when each group finished."""

    bucket_ready_s: list[float]  # every holder has its gradients
    bucket_start_s: list[float]
    bucket_s: list[float]
    group_synced_s: dict[str, float]  # all its buckets summed (its last compute if none)
    group_end_s: dict[str, float]  # optimizer done
    group_optimizer_s: dict[str, float]
    group_last_compute_s: dict[str, float]
    exposed_sync_s: dict[str, float] = field(default_factory=dict)  # synced - last compute

    @property
    def step_s(self) -> float:
        return max(self.group_end_s.values())

    def comm_wait_s(self, buckets: list[SyncBucket]) -> dict[str, float]:
        """Per group, the time it waits on its collectives after its compute and after every
        other holder of its buckets is ready (waiting for those holders is a bubble)."""
        since = dict(self.group_last_compute_s)
        for b in buckets:
            ready = self.bucket_ready_s[b.index]
            for g in b.holders:
                since[g] = max(since[g], ready)
        return {g: max(0.0, self.group_synced_s[g] - t) for g, t in since.items()}


def price_sync(plan: Plan, spec: ModelSpec, buckets: list[SyncBucket], cost: SyncCost,
               last_weight_grad_s: dict[str, tuple[float, float]],
               last_compute_s: dict[str, float]) -> SyncTimeline:
    """The sync and optimizer tail, given each group's last weight-gradient action
    (start, end) and the end of its last compute action."""
    groups = plan.group_by_name
    comm_free: dict[str, float] = {}
    readies, starts, durs = [], [], []
    synced = dict(last_compute_s)
    for bucket in buckets:
        ready = max(last_weight_grad_s[g][0] + ready_fraction(spec, groups[g], bucket)
                    * (last_weight_grad_s[g][1] - last_weight_grad_s[g][0])
                    for g in bucket.holders)
        sets = reductions(plan, bucket)
        devices = [d for s in sets for d in s]
        start = max([ready] + [comm_free.get(d, 0.0) for d in devices])
        dur = max(cost.sync_s(list(s), bucket_bytes(plan, bucket)) for s in sets)
        for d in devices:
            comm_free[d] = start + dur
        for g in bucket.holders:
            synced[g] = max(synced[g], start + dur)
        readies.append(ready)
        starts.append(start)
        durs.append(dur)
    stepped = optimizer_params(plan, spec, buckets)
    opt = {g.name: cost.optimizer_s(g.kind, stepped[g.name]) for g in plan.stage_groups}
    end = {g: synced[g] + opt[g] for g in groups}
    exposed = {g: synced[g] - last_compute_s[g] for g in groups}
    return SyncTimeline(bucket_ready_s=readies, bucket_start_s=starts, bucket_s=durs,
                        group_synced_s=synced, group_end_s=end, group_optimizer_s=opt,
                        group_last_compute_s=dict(last_compute_s), exposed_sync_s=exposed)
