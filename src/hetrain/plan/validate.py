"""Check a plan against the cluster and the model; refuse it with a message naming the problem."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from hetrain.cluster.topology import Cluster
from hetrain.errors import PlanError
from hetrain.model.spec import ModelSpec
from hetrain.plan.schedule import in_plan_units, splits_backward
from hetrain.plan.types import Plan, StageGroup

GIB = 1024**3
# bytes one device of the group needs, given its peak count of micro-batches in flight
MemoryFn = Callable[[StageGroup, int], float]


class StageMemory(Protocol):
    """What the plan's memory check needs from a cost model (cost.CostModel implements it)."""

    spec: ModelSpec

    def stage_memory_bytes(self, group: StageGroup, micro_batch_size: int, in_flight: int,
                           optimizer_params: float | None = None,
                           sync_bytes: float | None = None,
                           single_backward: bool = False, pieces: int = 1) -> float: ...


def plan_memory_fn(plan: Plan, cost: StageMemory) -> MemoryFn:
    """The cost model's memory at each group's (largest) micro-batch size, with its share of
    the optimizer state under a sharded optimizer (plan.sync.optimizer_params), and whether
    it runs one whole backward a step (one micro-batch, its backward not split: its
    gradients and activations are never all held at once)."""
    from hetrain.plan.sync import optimizer_params, sync_buckets, sync_buffer_bytes

    cost = in_plan_units(plan, cost)
    sizes: dict[str, int] = {}
    for route in plan.routes:
        for name in route.stages:
            sizes[name] = max(sizes.get(name, 0), route.micro_batch_size)
    # With sequence chunks a micro-batch's later pieces keep their activations while the
    # gradients build up: never priced as one whole backward.
    single = {g.name: not splits_backward(plan, g.name) and plan.micro_batches_of(g.name) == 1
              and plan.seq_chunks == 1 for g in plan.stage_groups}
    buckets = sync_buckets(plan, cost.spec)
    stepped: dict[str, float | None] = dict.fromkeys(plan.group_by_name)
    if plan.sharded_optimizer:
        stepped = dict(optimizer_params(plan, cost.spec, buckets))
    gloo = {k for k in plan.kinds() if getattr(cost, "cluster", None) is None
            or cost.cluster.kinds[k].backend == "gloo"}
    # Keyed by dtype too: a run in another precision prices the group in the dtype it
    # computes in (runtime.precision.run_memory_fn), and gradients stay in its master dtype.
    sync: dict[tuple[str, str], float] = {}

    def sync_bytes(g: StageGroup) -> float:
        key = (g.name, g.dtype)
        if key not in sync:
            sync[key] = sync_buffer_bytes(plan, cost.spec, g, gloo, buckets)
        return sync[key]

    # Every worker draws the whole global batch: int64 inputs and targets.
    batch = plan.global_batch * plan.seq_len * 16
    # In flight counts sequence pieces (plan.schedule): their activations, whole micro-batches'
    # worth rounded up (a piece's working set priced as a whole micro-batch's: the safe side).
    chunks = plan.seq_chunks
    return lambda g, in_flight: batch + cost.stage_memory_bytes(
        g, sizes[g.name], -(-in_flight // chunks), stepped[g.name], sync_bytes(g),
        single[g.name], chunks)


def validate_plan(plan: Plan, cluster: Cluster, spec: ModelSpec,
                  memory_fn: MemoryFn | None = None) -> None:
    """Raise PlanError on the first problem found; return None for a valid plan."""
    spec = spec.units(plan.half_layers)
    _check_groups(plan, cluster, spec)
    _check_routes(plan, spec)
    if memory_fn is not None:
        check_memory(plan, cluster, memory_fn)


def _check_groups(plan: Plan, cluster: Cluster, spec: ModelSpec) -> None:
    seen_names: set[str] = set()
    owner: dict[str, str] = {}
    present = cluster.kind_counts()
    for g in plan.stage_groups:
        if g.name in seen_names:
            raise PlanError(f"stage group {g.name!r} is defined twice; give each a unique name")
        seen_names.add(g.name)
        if g.kind not in cluster.kinds or g.kind not in present:
            raise PlanError(f"stage group {g.name!r}: kind {g.kind!r} is not in the cluster "
                            f"(it has {', '.join(present)})")
        kind = cluster.kinds[g.kind]
        if not kind.supports(g.dtype):
            raise PlanError(f"stage group {g.name!r}: {g.kind} does not compute in {g.dtype}; "
                            f"use one of {', '.join(kind.flops)}")
        for dev in g.devices:
            device = cluster.device_by_id.get(dev)
            if device is None:
                raise PlanError(f"stage group {g.name!r}: device {dev!r} is not in the cluster")
            if device.kind != g.kind:
                raise PlanError(f"stage group {g.name!r}: device {dev!r} is a {device.kind}, "
                                f"not a {g.kind}; a stage group holds one kind")
            if dev in owner:
                raise PlanError(f"device {dev!r} is used twice: in stage groups "
                                f"{owner[dev]!r} and {g.name!r}")
            owner[dev] = g.name
        if g.layers[1] > spec.n_layers:
            raise PlanError(f"stage group {g.name!r}: layers {list(g.layers)} go past the "
                            f"model's {spec.describe_layers()}")
        if g.tp > 1 and len({cluster.device_by_id[d].node for d in g.devices}) > 1:
            raise PlanError(f"stage group {g.name!r}: a tensor-parallel group must sit in one "
                            "node")


def _check_routes(plan: Plan, spec: ModelSpec) -> None:
    groups = plan.group_by_name
    used: set[str] = set()
    for r, route in enumerate(plan.routes):
        expect = 0
        for name in route.stages:
            g = groups.get(name)
            if g is None:
                raise PlanError(f"routes[{r}]: stage group {name!r} is not defined")
            start, end = g.layers
            if start > expect:
                raise PlanError(f"routes[{r}]: layer gap: layers {expect}..{start - 1} are in no "
                                f"stage (before {name!r})")
            if start < expect:
                raise PlanError(f"routes[{r}]: layer overlap: {name!r} starts at layer {start} "
                                f"but layers up to {expect - 1} are already covered")
            expect = end
            used.add(name)
        if len(set(route.stages)) != len(route.stages):
            raise PlanError(f"routes[{r}]: a stage group appears twice in one route")
        if expect != spec.n_layers:
            raise PlanError(f"routes[{r}]: layer gap: layers {expect}..{spec.n_layers - 1} are "
                            "in no stage (the route stops early)")
    unused = [g.name for g in plan.stage_groups if g.name not in used]
    if unused:
        raise PlanError(f"stage group {unused[0]!r} is on no route; add it to one or remove it")
    samples = sum(route.samples for route in plan.routes)
    if samples != plan.global_batch:
        raise PlanError(f"routes carry {samples} samples (micro_batches x micro_batch_size) but "
                        f"global_batch is {plan.global_batch}; make them equal")
    if plan.seq_len > 0 and spec.seq_len != plan.seq_len:
        raise PlanError(f"plan seq_len {plan.seq_len} differs from the model spec's "
                        f"{spec.seq_len}")
    for g in plan.stage_groups:
        if plan.seq_chunks > 1 and spec.sequence_parallel(g.tp) and plan.chunk_len % g.tp:
            raise PlanError(f"seq_chunks: pieces of {plan.chunk_len} tokens do not split "
                            f"evenly over stage group {g.name!r}'s {g.tp} tensor-parallel "
                            "ranks (sequence parallelism); use fewer sequence chunks")


def check_memory(plan: Plan, cluster: Cluster, memory_fn: MemoryFn,
                 peak_in_flight: dict[str, int] | None = None) -> dict[str, float]:
    """Estimated bytes per device of each group; PlanError if one is over its capacity."""
    if peak_in_flight is None:
        from hetrain.plan.schedule import build_schedule

        peak_in_flight = build_schedule(plan).peak_in_flight
    out = {}
    for g in plan.stage_groups:
        need = memory_fn(g, peak_in_flight[g.name])
        have = cluster.kinds[g.kind].memory_bytes
        if need > have:
            raise PlanError(f"stage group {g.name!r} is over memory: needs {need / GIB:.1f} GiB "
                            f"per {g.kind}, which has {have / GIB:.0f} GiB; use fewer layers, "
                            "more tensor parallelism, smaller micro-batches or recomputation")
        out[g.name] = need
    return out
