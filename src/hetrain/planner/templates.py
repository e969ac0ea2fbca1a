"""Pipeline templates: the shape of one pipeline copy and everything the count program needs.

A template is an ordered list of blocks, one per kind it uses: `count` consecutive stages of
that kind, each a tensor-parallel group of `tp` devices. Its layers are split by the partition
DP; from that follow its slot (slowest stage, waits for inputs included), devices per copy,
its fill (a copy with m micro-batches takes fill + m slots), and the sync + optimizer tail of
its slowest group for n copies in a plan with u shapes.

The fill comes from the shared schedule function itself (plan.build_schedule) run on one copy
with the template's stage times: 1F1B fills S - 1 slots; zero-bubble schedules fill part of
that with weight-gradient actions, more so when memory lets a stage hold more micro-batches
in flight (the largest in-flight scale that fits is chosen per template). Gradient sync
overlaps the last weight-gradient action of each stage (plan.sync): the tail is what is left.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import DTYPE_BYTES, RECOMPUTE, CostModel, ring_allreduce_s
from hetrain.plan.schedule import Schedule, schedule_within, splits
from hetrain.plan.sync import BUCKET_PARAMS
from hetrain.plan.types import Plan, Route, ScheduleKind, StageGroup
from hetrain.planner.links import LinkModel
from hetrain.planner.partition import Partition, Partitioner, ScaledSlots

StageShape = tuple[str, int]  # (kind, tp)
# Fill of S equal stages in slots per stage beyond the first, from plan.build_schedule at
# in-flight scale 1 (tests/planner check it): the outline's guess before its partition.
UNIT_FILL = {"1f1b": 1.0, "zero_bubble": 2.0 / 3.0}
OPS = ("forward", "backward", "backward_input", "backward_weight")  # Template.compute_s
# A template's cycle is the pace of stage 0's forwards after its warm-up, in a run of at
# least 2 S micro-batches (S stages) and S / 2 past the warm-up. On stages of unequal times
# the greedy's steady state drifts for tens of micro-batches; longer windows (2 or 3 S, or
# S after S more to settle) were tried on 30 random clusters and the tests' shapes
# (2026-12-01): closer on some shapes, further on others, and 1.7 times the runs (over the
# search's 10 s on eight kinds).
RERUN_SPAN = 2  # run_route_s runs at most this many S micro-batches past the warm-up


class Block(NamedTuple):
    kind: str
    tp: int
    count: int


Shape = tuple[Block, ...]  # each kind in at most one block


@dataclass(frozen=True)
class Template:
    """One pipeline shape. An outline has the slot (its partition's slowest stage, waits
    included) and the devices; a complete template also has its partition, tails, and in
    `slot_s` the cycle a run of it through the shared schedule keeps (TemplateBuilder.complete)."""

    blocks: Shape
    slot_s: float
    devices: dict[str, int]  # per copy, by kind
    demand: dict[tuple[str, int], int]  # per copy: devices in groups of tp >= t, by (kind, t)
    n_max: int
    fill_s: float  # a copy with m micro-batches takes fill_s + m * slot_s (route_s)
    partition: Partition | None = None
    dtypes: tuple[str, ...] = ()  # per stage
    tail_s: np.ndarray | None = None  # [n - 1, u - 1]: slowest group's sync + optimizer
    in_flight_scale: float = 1.0  # of every stage's 1F1B in-flight limit
    compute_s: tuple[tuple[float, ...], ...] = ()  # per stage: seconds of each of OPS

    @property
    def stages(self) -> tuple[StageShape, ...]:
        return tuple((b.kind, b.tp) for b in self.blocks for _ in range(b.count))

    @property
    def n_stages(self) -> int:
        return sum(b.count for b in self.blocks)

    def route_s(self, micro_batches: int) -> float:
        """Time of one copy: its fill and m slots of the slowest stage (waits included)."""
        return self.fill_s + micro_batches * self.slot_s

    def describe(self) -> str:
        return " > ".join(f"{b.kind}x{b.count}" + (f"(tp{b.tp})" if b.tp > 1 else "")
                          for b in self.blocks)


def tp_capacity(cluster: Cluster, kind: str, tp: int) -> int:
    """Devices of `kind` that groups of `tp` (or larger powers of two) can occupy."""
    return sum(node.count // tp * tp * node.replicas for node in cluster.nodes if node.kind == kind)


class TemplateBuilder:
    """Turns block shapes into Templates for one micro-batch size."""

    def __init__(self, cost: CostModel, partitioner: Partitioner, links: LinkModel,
                 micro_batches: int, max_shapes: int, schedule: ScheduleKind = "1f1b",
                 in_flight_scales: tuple[float, ...] = (1.0,), sharded_optimizer: bool = False):
        self.cost = cost
        self.spec = cost.spec
        self.partitioner = partitioner
        self.links = links
        self.micro_batches = micro_batches
        self.max_shapes = max_shapes
        self.schedule = schedule
        self.in_flight_scales = sorted(set(in_flight_scales) | {1.0}, reverse=True)
        self.sharded_optimizer = sharded_optimizer
        self._capacity: dict[tuple[str, int], int] = {}
        self._keys: dict[Shape, tuple[tuple[str, int, int, bool], ...]] = {}
        self._demands: dict[Block, tuple[tuple[tuple[tuple[str, int], int], ...], int]] = {}
        self._ops: dict[tuple, tuple[float, ...]] = {}

    def capacity(self, kind: str, tp: int) -> int:
        if (kind, tp) not in self._capacity:
            self._capacity[(kind, tp)] = tp_capacity(self.cost.cluster, kind, tp)
        return self._capacity[(kind, tp)]

    def keys(self, blocks: Shape) -> tuple[tuple[str, int, int, bool], ...]:
        """The blocks as the partitioner takes them: with whether a copy's devices of the kind
        fit in one node (then its stages talk inside the node)."""
        out = self._keys.get(blocks)
        if out is None:
            out = self._keys[blocks] = tuple(
                (b.kind, b.tp, b.count, self.links.fits_node(b.kind, b.tp * b.count))
                for b in blocks)
        return out

    def _block_demand(self, block: Block) -> tuple[tuple[tuple[tuple[str, int], int], ...], int]:
        """((kind, t), the block's devices in groups of tp >= t) for t = 1, 2, 4, ... up to
        its tp, and the most copies of the block those groups' devices hold."""
        out = self._demands.get(block)
        if out is None:
            need = block.tp * block.count
            keys = tuple(((block.kind, 1 << i), need) for i in range(block.tp.bit_length()))
            out = self._demands[block] = (keys, min(self.capacity(*key) // need
                                                    for key, _ in keys))
        return out

    def outline(self, blocks: Shape) -> Template | None:
        """The slot and device needs of a shape; None when it fits no memory or no cluster."""
        parts = [self._block_demand(b) for b in blocks]
        n_max = min(self.micro_batches, *(most for _, most in parts))
        if n_max < 1:
            return None
        slot = self.partitioner.slot_s(self.keys(blocks))
        if not np.isfinite(slot):
            return None
        devices = {b.kind: b.tp * b.count for b in blocks}
        demand = {key: need for keys, _ in parts for key, need in keys}  # each kind once
        fill = UNIT_FILL[self.schedule] * (sum(b.count for b in blocks) - 1) * slot
        return Template(blocks=blocks, slot_s=slot, devices=devices, demand=demand, n_max=n_max,
                        fill_s=fill)

    def complete(self, template: Template) -> Template:
        part = self.partitioner.best(self.keys(template.blocks))
        assert part is not None
        stages = template.stages
        dtypes = tuple(self.partitioner.dtypes[kind] for kind, _ in stages)
        compute = self._op_times(stages, part, dtypes)
        fill, cycle, scale, slack = self._fill_s(stages, part, compute)
        return replace(template, partition=part, dtypes=dtypes, in_flight_scale=scale,
                       slot_s=cycle, fill_s=fill, compute_s=compute,
                       tail_s=self._tail_s(stages, part, dtypes, template.devices,
                                           template.n_max, compute, slack))

    def bounded(self, slots: ScaledSlots) -> TemplateBuilder:
        """A builder whose outlines take their slots from `slots` (partition.ScaledSlots:
        lower bounds, without partitioning)."""
        out = copy.copy(self)
        out.partitioner = slots
        return out

    def build(self, blocks: Shape) -> Template | None:
        outline = self.outline(blocks)
        return None if outline is None else self.complete(outline)

    # --- the fill, from the shared schedule -----------------------------------------------
    def _op_times(self, stages, part: Partition, dtypes) -> tuple[tuple[float, ...], ...]:
        """Per stage, the cost model's seconds of each action of OPS for one micro-batch (a
        split backward's input-gradient action carries the TP collectives)."""
        tokens = self.partitioner.micro_batch_size * self.spec.seq_len
        out = []
        for (kind, tp), layers, mode, dtype in zip(stages, part.layers, part.modes, dtypes,
                                                   strict=True):
            key = (kind, tp, layers, mode, dtype)
            if key not in self._ops:
                self._ops[key] = tuple(self.cost.layers_compute_s(kind, layers, tokens, op,
                                                                  dtype, tp, mode)
                                       for op in OPS)
            out.append(self._ops[key])
        return tuple(out)

    def _fill_s(self, stages, part: Partition, compute: tuple[tuple[float, ...], ...]
                ) -> tuple[float, float, float, list[float]]:
        """(fill, cycle, in-flight scale, slack) of a copy, from a run of it through the shared
        schedule with each stage's compute and each boundary's transfers. Stage 0 runs its
        in-flight limit of forwards, then one forward each time a backward frees a place:
        the pace of those forwards (see the note at the top) is the cycle, a micro-batch's
        time in the steady state (longer than the slot where in-flight limits do not cover a
        round trip or neighbours are out of step, shorter where transfers hide under
        compute). The fill is what the run takes beyond its micro-batches' cycles.
        Zero-bubble runs at the largest allowed in-flight scale whose held micro-batches fit
        every stage (more in flight fills more of the warm-up). A stage's slack is the run's
        time after its last weight-gradient action: its sync can move under the drain of the
        stages before it."""
        n = len(stages)
        for scale in self.in_flight_scales if self.schedule == "zero_bubble" else [1.0]:
            limit = max(math.floor(n * scale + 1e-9), 1)  # plan.schedule.in_flight_limit
            m = max(limit + max(n // 2, 2), 2 * n, 8)  # forwards paced by backwards
            # scale 1 holds what 1F1B holds (the partition's memory); a larger one stops
            # once a stage holds more than its memory does
            run = _copy_run(self.spec.name, self.schedule, stages, part, compute, scale, m,
                            None if scale == 1.0 else self._most_held(stages, part))
            if run is None:
                continue
            starts = _forward_starts(run)
            # never under the busiest stage's compute: early on, stage 0 runs ahead of a
            # slower stage further down until the micro-batches it may hold are used up
            cycle = max((starts[-1] - starts[limit]) / (m - 1 - limit), max(part.stage_s))
            slack = [run.estimated_step_s - run.last_weight_grad_end_s(f"s{i}") for i in range(n)]
            return max(run.estimated_step_s - m * cycle, 0.0), cycle, scale, slack
        raise AssertionError("in-flight scale 1 is always allowed")

    def _most_held(self, stages, part: Partition) -> dict[str, int]:
        """Per stage, the most micro-batches whose activations its memory holds (-1: not even
        its states)."""
        return {f"s{i}": self.partitioner.most_held(kind, tp, rc, a, b)
                for i, ((kind, tp), (a, b), rc) in enumerate(zip(stages, part.layers,
                                                                  part.modes, strict=True))}

    def _tail_s(self, stages, part: Partition, dtypes, devices, n_max: int,
                compute: tuple[tuple[float, ...], ...], slack: list[float]) -> np.ndarray:
        """Per (copies n, shapes u): how far past the pipeline's end the slowest stage's sync
        (what is left of it after its last weight-gradient action) and optimizer step reach,
        less its slack (the drain of the stages before it). Sync is plan.sync's sharded sum:
        a ring among the n replicas, then the shards (1/n) across the u shapes."""
        out = np.zeros((n_max, self.max_shapes))
        n = np.arange(1, n_max + 1, dtype=float)[:, None]
        u = np.arange(1, self.max_shapes + 1, dtype=float)[None, :]
        links = self.cost.cluster.links
        bridge_bw = min(links.bridge_gbps, links.inter_node_gbps) * 1e9
        bridge_lat = links.inter_node_latency_us * 1e-6
        for i, ((kind, tp), (a, b), dtype, ops) in enumerate(zip(stages, part.layers, dtypes,
                                                                 compute, strict=True)):
            # the last weight-gradient action: a split backward's weight-gradient half, else
            # the whole backward
            split = splits(self.schedule, i == 0, part.modes[i] == RECOMPUTE)
            last_weight_s = ops[OPS.index("backward_weight" if split else "backward")]
            params = self.spec.range_params(a, b)
            nbytes = params * DTYPE_BYTES[dtype] / tp
            replica = np.array([self._replica_s(kind, int(k), devices[kind], nbytes)
                                for k in n[:, 0]])[:, None]
            # CostModel.bridge_allreduce_s(u, nbytes / n), for every (n, u) at once
            bridge = np.where(u > 1, 2 * (u - 1) / u * (nbytes / n) / bridge_bw
                              + 2 * (u - 1) * bridge_lat, 0.0)
            sync = replica + bridge
            # the bucket holding the stage's first layer finishes last: its share of the sync
            # (a layer, or a whole bucket of them: plan.sync) cannot overlap
            last = max(self.spec.layers[a].params, min(BUCKET_PARAMS, params)) / max(params, 1)
            left = np.maximum(sync - last_weight_s, sync * min(last, 1.0))
            shards = n if self.sharded_optimizer else np.ones_like(n)
            opt = self.cost.optimizer_s(kind, params / tp) / shards
            # what the stage's slack (the drain after its last weight gradient) leaves over
            out = np.maximum(out, left + opt - slack[i])
        # More copies shrink the bridge and optimizer shares but grow the ring; the count
        # program is far faster when tails never shrink with copies, so keep the running max
        # (an overstatement the final pricing of the plan corrects).
        return np.maximum.accumulate(out, axis=0)

    def _replica_s(self, kind: str, n: int, per_copy: int, nbytes: float) -> float:
        link = self.links.same_kind(kind, self.links.fits_node(kind, n * per_copy))
        return ring_allreduce_s(n, nbytes, link.gbps, link.latency_s)


class _OpTimes:
    """A StageCost over a template's per-stage action seconds (OPS order), stage i being the
    group named f"s{i}"."""

    def __init__(self, times: Sequence[tuple[float, ...]]):
        self.times = times

    def stage_compute_s(self, group, op, samples, seq_len) -> float:
        return self.times[int(group.name[1:])][OPS.index(op)]


def _copy_run(model: str, schedule: ScheduleKind, stages, part: Partition,
              compute: Sequence[tuple[float, ...]], scale: float, micro_batches: int,
              most_held: dict[str, int] | None = None) -> Schedule | None:
    """One copy of a template through the shared schedule: stage i is the group s{i}, with
    its compute and the partition's transfers; None once a stage holds more than
    `most_held` gives it."""
    n = len(stages)
    plan = Plan(model=model, seq_len=1, global_batch=micro_batches,
                stage_groups=[StageGroup(name=f"s{i}", kind=kind, devices=[f"s{i}"],
                                         layers=(i, i + 1), in_flight_scale=scale,
                                         recompute=part.modes[i] == RECOMPUTE)
                              for i, (kind, _) in enumerate(stages)],
                routes=[Route(stages=[f"s{i}" for i in range(n)],
                              micro_batches=micro_batches, micro_batch_size=1)],
                schedule=schedule)
    return schedule_within(plan, _OpTimes(compute), most_held or {}, _boundary_transfers(part))


def run_route_s(template: Template, model: str, schedule: ScheduleKind,
                micro_batches: int) -> float:
    """A complete template's copy with `micro_batches`, run through the shared schedule of
    kind `schedule` (1F1B at in-flight scale 1): what its closed form (route_s) stands for,
    to tell near ties apart. Beyond RERUN_SPAN x S micro-batches after the warm-up, the run
    stops there and the rest go at the pace of its last 2 S forwards (at least the busiest
    stage's compute)."""
    part = template.partition
    assert part is not None
    n = template.n_stages
    scale = template.in_flight_scale if schedule == "zero_bubble" else 1.0
    limit = max(math.floor(n * scale + 1e-9), 1)
    m = min(micro_batches, max(limit + RERUN_SPAN * n, 8))
    run = _copy_run(model, schedule, template.stages, part, template.compute_s, scale, m)
    assert run is not None
    if m == micro_batches:
        return run.estimated_step_s
    starts = _forward_starts(run)
    first = max(limit, m - 2 * n)
    pace = max((starts[-1] - starts[first]) / (m - 1 - first), max(part.stage_s))
    return run.estimated_step_s + (micro_batches - m) * pace


def _forward_starts(run: Schedule) -> list[float]:
    """When stage 0 of a template's run started each forward."""
    return [t for a, t in zip(run.actions["s0"], run.starts["s0"], strict=True)
            if a.op == "forward"]


def _boundary_transfers(part: Partition):
    """A TransferFn over a template's stages s0, s1, ...: each boundary's handshake and
    transfer as the partition prices them (links.BoundaryComm)."""

    def transfer(src: str, dst: str, direction: str, samples: int) -> tuple[float, float]:
        waits = part.forward_wait_s if direction == "forward" else part.backward_wait_s
        return waits[int(dst[1:])]

    return transfer


# --- which shapes to try -----------------------------------------------------------------------
def tp_options(cluster: Cluster, kind: str, allowed: Sequence[int]) -> list[int]:
    largest = max(n.count for n in cluster.nodes if n.kind == kind)
    return [t for t in allowed if t <= largest]


def block_options(count: int, tps: Sequence[int], n_layers: int) -> list[tuple[int, int]]:
    """(tp, stages) pairs one kind can contribute to a pipeline copy."""
    return [(tp, c) for tp in tps for c in range(1, min(count // tp, n_layers) + 1)]


def all_shapes_count(counts: dict[str, int], tps: dict[str, list[int]], n_layers: int) -> int:
    """How many shapes the exhaustive enumeration would try (an upper bound)."""
    sizes = {k: len(block_options(counts[k], tps[k], n_layers)) for k in counts}
    total = 0
    for r in range(1, len(counts) + 1):
        for subset in itertools.combinations(counts, r):
            total += math.factorial(r) * math.prod(sizes[k] for k in subset)
    return total


def all_shapes(counts: dict[str, int], tps: dict[str, list[int]], n_layers: int) -> Iterator[Shape]:
    """Every ordered choice of kinds with (tp, stages) per kind, at most n_layers stages."""
    options = {k: block_options(counts[k], tps[k], n_layers) for k in counts}
    for r in range(1, len(counts) + 1):
        for order in itertools.permutations(counts, r):
            for choice in itertools.product(*(options[k] for k in order)):
                if sum(c for _, c in choice) <= n_layers:
                    yield tuple(Block(k, tp, c) for k, (tp, c) in zip(order, choice, strict=True))


# Sets of fewer kinds (for plans of several shapes, or one leaving slow kinds out): every set
# up to this many kinds; beyond, those leaving out one or two (eight kinds: 247 sets, 3,800
# shapes, 4 s of a 12 s search; the plans of three 8-kind clusters tried kept every kind).
EVERY_SUBSET_UP_TO = 6


def tp_combination(blocks: Shape) -> frozenset[StageShape]:
    return frozenset((b.kind, b.tp) for b in blocks)


def kind_orders(kinds: Sequence[str]) -> list[tuple[str, ...]]:
    """The orders mixed shapes try their kinds in: `kinds` as given, then each other kind
    moved to the front. A pipeline's first stage holds the most micro-batches in flight (so
    the roomiest kind comes first by default), but it also keeps whole backwards and idles
    through the warm-up until its first gradient returns, which no weight gradient fills:
    a roomy kind with time to spare does better there than the fastest kind when that kind
    bounds the pipeline (mixed-1280 + llama-70b: 18.36 -> 17.41 s a step)."""
    first = tuple(kinds)
    return list(dict.fromkeys([first] + [(k, *(x for x in first if x != k)) for k in first]))


def proportional_shapes(counts: dict[str, int], tps: dict[str, list[int]], n_layers: int,
                        orders: Sequence[Sequence[str]],
                        combos: Collection[frozenset[StageShape]] | None = None
                        ) -> Iterator[Shape]:
    """Mixed shapes for large clusters: for each set of two or more kinds in the first of
    `orders`, and for the set of all kinds in each further order, and each number of copies
    n, every kind gives a copy all its devices / n. The set of all kinds tries every
    combination of the kinds' `tps`; a set of fewer kinds (for plans of several shapes) only
    each kind's first, its most efficient (2^k combinations of 26 sets made six kinds take
    30 s to plan); beyond EVERY_SUBSET_UP_TO kinds, only sets leaving out one or two.
    `combos`: the tp combinations (as sets of (kind, tp)) further orders try; all when
    None."""
    seen: set[Shape] = set()
    first, *others = (tuple(o) for o in orders)
    least = 2 if len(first) <= EVERY_SUBSET_UP_TO else len(first) - 2
    sets = [s for r in range(len(first), least - 1, -1)
            for s in itertools.combinations(first, r)]
    for i, subset in enumerate(sets + others):
        n_top = max(counts[k] for k in subset)
        options = [tps[k] if len(subset) == len(first) else tps[k][:1] for k in subset]
        for tp_choice in itertools.product(*options):
            if i >= len(sets) and combos is not None and frozenset(zip(
                    subset, tp_choice, strict=True)) not in combos:
                continue
            last: tuple[int, ...] = ()
            for n in range(1, n_top + 1):
                sizes = tuple(counts[k] // (n * tp) for k, tp in zip(subset, tp_choice,
                                                                     strict=True))
                if 0 in sizes:
                    break
                if sizes == last or sum(sizes) > n_layers:
                    last = sizes
                    continue
                last = sizes
                blocks = tuple(Block(k, tp, c) for k, tp, c in zip(subset, tp_choice, sizes,
                                                                    strict=True))
                if blocks not in seen:
                    seen.add(blocks)
                    yield blocks
