"""Baseline plans to compare the search against.

- `homogeneous_plan`: what a tool that assumes identical devices runs (Megatron-style): one
  tp x pp x dp layout over every device in rank order, blocks split evenly over the stages,
  the batch split evenly over the pipelines, one dtype and one recomputation setting for all.
  Of those layouts that fit in memory, the one the estimate likes best (a generous baseline).
- `single_kind_plans`: the search's best plan on each kind alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import CostModel
from hetrain.errors import PlannerError
from hetrain.plan.schedule import splits
from hetrain.plan.types import Plan, Route, StageGroup
from hetrain.planner.estimate import StepEstimate, estimate_step, stage_time_s
from hetrain.planner.options import MICRO_BATCH_SIZES, TP_SIZES, SearchOptions
from hetrain.planner.partition import MEMORY_SLACK
from hetrain.planner.search import search_plan


@dataclass(frozen=True)
class Baseline:
    name: str
    plan: Plan | None
    estimate: StepEstimate | None
    note: str = ""  # the layout, or why there is none


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: bool
    regather: bool = False  # under sequence parallelism (tp > 1): gathered inputs as shards


def common_dtype(cluster: Cluster, kinds: Sequence[str]) -> str:
    for dtype in ("bf16", "fp16", "fp32"):
        if all(cluster.kinds[k].supports(dtype) for k in kinds):
            return dtype
    raise PlannerError(f"kinds {', '.join(kinds)} share no dtype")


def even_layer_ranges(n_layers: int, pp: int) -> list[tuple[int, int]]:
    """Blocks split as evenly as possible (earlier stages take the remainder); the embedding
    joins the first stage and the head the last."""
    blocks = n_layers - 2
    sizes = [blocks // pp + (s < blocks % pp) for s in range(pp)]
    out, start = [], 0
    for s, size in enumerate(sizes):
        end = start + size + (1 if s == 0 else 0) + (1 if s == pp - 1 else 0)
        out.append((start, end))
        start = end
    return out


def layouts(cluster: Cluster, n_layers: int, global_batch: int, tp_sizes: Sequence[int],
            micro_batch_sizes: Sequence[int]) -> Iterator[Layout]:
    world = len(cluster.devices)
    node_sizes = {n.count for n in cluster.nodes}
    for tp in tp_sizes:
        if any(size % tp for size in node_sizes):
            continue  # a tensor-parallel group would straddle two nodes
        for pp in range(1, min(world // tp, n_layers - 2) + 1):
            if (world // tp) % pp or world % tp:
                continue
            dp = world // (tp * pp)
            for mbs in micro_batch_sizes:
                if global_batch % (dp * mbs) == 0:
                    for recompute in (False, True):
                        yield Layout(tp, pp, dp, mbs, recompute)
                    if tp > 1:
                        yield Layout(tp, pp, dp, mbs, False, regather=True)


def layout_plan(cluster: Cluster, cost: CostModel, global_batch: int, layout: Layout,
                dtype: str, schedule: str = "1f1b", sharded_optimizer: bool = False) -> Plan:
    """Megatron's rank order (tp fastest, then dp, then pp) over the cluster's devices."""
    spec = cost.spec
    ranges = even_layer_ranges(spec.n_layers, layout.pp)
    devices = cluster.devices
    groups, routes = [], []
    m = global_batch // (layout.dp * layout.micro_batch_size)
    for p in range(layout.dp):
        names = []
        for s in range(layout.pp):
            first = (s * layout.dp + p) * layout.tp
            ids = [d.id for d in devices[first:first + layout.tp]]
            names.append(f"p{p}s{s}")
            groups.append(StageGroup(name=names[-1], kind=devices[first].kind, devices=ids,
                                     layers=ranges[s], dtype=dtype, recompute=layout.recompute,
                                     regather=layout.regather))
        routes.append(Route(stages=names, micro_batches=m,
                            micro_batch_size=layout.micro_batch_size))
    return Plan(model=spec.name, seq_len=spec.seq_len, global_batch=global_batch,
                stage_groups=groups, routes=routes, schedule=schedule,
                sharded_optimizer=sharded_optimizer, half_layers=spec.half_layers)


def _stage_kinds(cluster: Cluster, layout: Layout) -> list[set[str]]:
    devices = cluster.devices
    per_stage = layout.dp * layout.tp
    return [{d.kind for d in devices[s * per_stage:(s + 1) * per_stage]}
            for s in range(layout.pp)]


def _fits_and_bound(cluster: Cluster, cost: CostModel, layout: Layout, dtype: str,
                    global_batch: int, schedule: str) -> float | None:
    """None when a stage is over memory, else a lower bound on the step (compute only: m
    slots of the slowest stage, which no schedule's fill can undercut)."""
    ranges = even_layer_ranges(cost.spec.n_layers, layout.pp)
    m = global_batch // (layout.dp * layout.micro_batch_size)  # per route, one route a group
    slot = 0.0
    for s, kinds in enumerate(_stage_kinds(cluster, layout)):
        for kind in kinds:
            group = StageGroup(name="probe", kind=kind, devices=["x"] * layout.tp,
                               layers=ranges[s], dtype=dtype, recompute=layout.recompute,
                               regather=layout.regather)
            # one whole backward a step
            single = m == 1 and not splits(schedule, s == 0, layout.recompute)
            need = cost.stage_memory_bytes(group, layout.micro_batch_size, layout.pp - s,
                                           single_backward=single)
            if need > cluster.kinds[kind].memory_bytes * (1 - MEMORY_SLACK):
                return None
            slot = max(slot, stage_time_s(cost, group, layout.micro_batch_size, cost.spec.seq_len))
    return m * slot


def homogeneous_plan(cluster: Cluster, cost: CostModel, global_batch: int,
                     tp_sizes: Sequence[int] = TP_SIZES,
                     micro_batch_sizes: Sequence[int] = MICRO_BATCH_SIZES,
                     options: SearchOptions | None = None) -> Baseline:
    """The search's schedule and optimizer options apply here too (a fair yardstick), at
    1F1B's in-flight memory."""
    options = options or SearchOptions()
    kinds = list(cluster.kind_counts())
    dtype = common_dtype(cluster, kinds)
    bounded = []
    for layout in layouts(cluster, cost.spec.n_layers, global_batch, tp_sizes, micro_batch_sizes):
        bound = _fits_and_bound(cluster, cost, layout, dtype, global_batch, options.schedule)
        if bound is not None:
            bounded.append((bound, layout))
    best: tuple[StepEstimate, Plan, Layout] | None = None
    for bound, layout in sorted(bounded, key=lambda x: x[0]):
        if best is not None and bound >= best[0].step_s:
            break
        plan = layout_plan(cluster, cost, global_batch, layout, dtype, options.schedule,
                           options.sharded_optimizer)
        est = estimate_step(plan, cost)
        if best is None or est.step_s < best[0].step_s:
            best = (est, plan, layout)
    if best is None:
        return Baseline("homogeneous", None, None,
                        "no even tp x pp x dp layout fits every kind's memory")
    est, plan, layout = best
    plan = plan.model_copy(update={"predicted": est.predicted()})
    note = (f"tp={layout.tp} pp={layout.pp} dp={layout.dp} micro-batch={layout.micro_batch_size}"
            f"{' recompute' if layout.recompute else ''}"
            f"{' regather' if layout.regather else ''} {dtype}")
    return Baseline("homogeneous", plan, est, note)


def single_kind_plans(cluster: Cluster, cost: CostModel, global_batch: int,
                      options: SearchOptions | None = None) -> list[Baseline]:
    options = options or SearchOptions()
    out = []
    for kind in cluster.kind_counts():
        only = replace(options, kinds=(kind,))
        try:
            result = search_plan(cluster, cost, global_batch, only)
        except PlannerError as err:
            out.append(Baseline(f"{kind} alone", None, None, str(err)))
            continue
        n = len(result.plan.routes)
        out.append(Baseline(f"{kind} alone", result.plan, result.estimate,
                            f"{n} pipeline{'s' if n != 1 else ''}"))
    return out


def speedup(result: StepEstimate, baseline: Baseline) -> float:
    """How many times faster than the baseline (tokens per second); nan without one."""
    if baseline.estimate is None:
        return math.nan
    return baseline.estimate.step_s / result.step_s


@dataclass(frozen=True)
class StrictEfficiency:
    """DESIGN's strict yardstick: the mix's tokens/s over the sum of each kind's tokens/s
    alone (each alone-plan searched with the same options, model and global batch). Kinds
    that cannot hold the model alone are left out of the sum and named."""

    value: float
    alone_tokens_per_s: dict[str, float]
    left_out: list[str]


def strict_efficiency(result: StepEstimate, baselines: list[Baseline]) -> StrictEfficiency:
    alone = {b.name.removesuffix(" alone"): b.estimate.tokens_per_s
             for b in baselines if b.name.endswith(" alone") and b.estimate is not None}
    left_out = [b.name.removesuffix(" alone") for b in baselines
                if b.name.endswith(" alone") and b.estimate is None]
    total = sum(alone.values())
    return StrictEfficiency(result.tokens_per_s / total if total else math.nan, alone, left_out)
