"""Pipeline templates: the shape of one pipeline copy and everything the count program needs.

A template is an ordered list of blocks, one per kind it uses: `count` consecutive stages of
that kind, each a tensor-parallel group of `tp` devices. Its layers are split by the partition
DP; from that follow its slot (slowest stage, waits for inputs included), devices per copy,
and the sync + optimizer tail of its slowest group for n copies in a plan with u shapes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from hetrain.cluster.topology import Cluster
from hetrain.cost.model import DTYPE_BYTES, CostModel, ring_allreduce_s
from hetrain.planner.links import LinkModel
from hetrain.planner.partition import Partition, Partitioner

StageShape = tuple[str, int]  # (kind, tp)


class Block(NamedTuple):
    kind: str
    tp: int
    count: int


Shape = tuple[Block, ...]


@dataclass(frozen=True)
class Template:
    """One pipeline shape. An outline has the slot and the devices; a complete template also
    has its partition, P2P time and tails (TemplateBuilder.complete)."""

    blocks: Shape
    slot_s: float
    devices: dict[str, int]  # per copy, by kind
    demand: dict[tuple[str, int], int]  # per copy: devices in groups of tp >= t, by (kind, t)
    n_max: int
    partition: Partition | None = None
    dtypes: tuple[str, ...] = ()  # per stage
    tail_s: np.ndarray | None = None  # [n - 1, u - 1]: slowest group's sync + optimizer

    @property
    def stages(self) -> tuple[StageShape, ...]:
        return tuple((b.kind, b.tp) for b in self.blocks for _ in range(b.count))

    @property
    def n_stages(self) -> int:
        return sum(b.count for b in self.blocks)

    def route_s(self, micro_batches: int) -> float:
        """1F1B time of one copy: m + S - 1 slots of the slowest stage (waits included)."""
        return (micro_batches + self.n_stages - 1) * self.slot_s



    def describe(self) -> str:
        return " > ".join(f"{b.kind}x{b.count}" + (f"(tp{b.tp})" if b.tp > 1 else "")
                          for b in self.blocks)


def tp_capacity(cluster: Cluster, kind: str, tp: int) -> int:
    """Devices of `kind` that groups of `tp` (or larger powers of two) can occupy."""
    return sum(node.count // tp * tp * node.replicas for node in cluster.nodes if node.kind == kind)


class TemplateBuilder:
    """Turns block shapes into Templates for one micro-batch size."""

    def __init__(self, cost: CostModel, partitioner: Partitioner, links: LinkModel,
                 micro_batches: int, max_shapes: int):
        self.cost = cost
        self.spec = cost.spec
        self.partitioner = partitioner
        self.links = links
        self.micro_batches = micro_batches
        self.max_shapes = max_shapes
        self._capacity: dict[tuple[str, int], int] = {}

    def capacity(self, kind: str, tp: int) -> int:
        if (kind, tp) not in self._capacity:
            self._capacity[(kind, tp)] = tp_capacity(self.cost.cluster, kind, tp)
        return self._capacity[(kind, tp)]

    def keys(self, blocks: Shape) -> tuple[tuple[str, int, int, bool], ...]:
        """The blocks as the partitioner takes them: with whether a copy's devices of the kind
        fit in one node (then its stages talk inside the node)."""
        return tuple((b.kind, b.tp, b.count, self.links.fits_node(b.kind, b.tp * b.count))
                     for b in blocks)

    def outline(self, blocks: Shape) -> Template | None:
        """The slot and device needs of a shape; None when it fits no memory or no cluster."""
        demand: dict[tuple[str, int], int] = {}
        for b in blocks:
            t = 1
            while t <= b.tp:
                demand[(b.kind, t)] = demand.get((b.kind, t), 0) + b.tp * b.count
                t *= 2
        n_max = self.micro_batches
        for (kind, t), need in demand.items():
            n_max = min(n_max, self.capacity(kind, t) // need)
        if n_max < 1:
            return None
        slot = self.partitioner.slot_s(self.keys(blocks))
        if not np.isfinite(slot):
            return None
        devices = {b.kind: b.tp * b.count for b in blocks}
        return Template(blocks=blocks, slot_s=slot, devices=devices, demand=demand, n_max=n_max)

    def complete(self, template: Template) -> Template:
        part = self.partitioner.best(self.keys(template.blocks))
        assert part is not None
        stages = template.stages
        dtypes = tuple(self.partitioner.dtypes[kind] for kind, _ in stages)
        return replace(template, partition=part, dtypes=dtypes,
                       tail_s=self._tail_s(stages, part, dtypes, template.devices,
                                           template.n_max))

    def build(self, blocks: Shape) -> Template | None:
        outline = self.outline(blocks)
        return None if outline is None else self.complete(outline)

    def _tail_s(self, stages, part: Partition, dtypes, devices, n_max: int) -> np.ndarray:
        # Sync and optimizer times grow with a group's parameters, so within a block (one
        # kind, tp and dtype) only its largest stage can be the slowest.
        largest: dict[tuple[str, int, str], int] = {}
        for (kind, tp), (a, b), dtype in zip(stages, part.layers, dtypes, strict=True):
            key = (kind, tp, dtype)
            largest[key] = max(largest.get(key, 0), self.spec.range_params(a, b))
        out = np.zeros((n_max, self.max_shapes))
        for (kind, tp, dtype), params in largest.items():
            nbytes = params * DTYPE_BYTES[dtype] / tp
            opt = self.cost.optimizer_s(kind, params / tp)
            bridge = [self.cost.bridge_allreduce_s(u, nbytes)
                      for u in range(1, self.max_shapes + 1)]
            for n in range(1, n_max + 1):
                link = self.links.same_kind(kind, self.links.fits_node(kind, n * devices[kind]))
                replica = ring_allreduce_s(n, nbytes, link.gbps, link.latency_s)
                row = [replica + x + opt for x in bridge]
                out[n - 1] = np.maximum(out[n - 1], row)
        return out


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


def proportional_shapes(counts: dict[str, int], tps: dict[str, list[int]], n_layers: int,
                        order_key) -> Iterator[Shape]:
    """Mixed shapes for large clusters: for each set of two or more kinds (in one order) and
    each number of copies n, every kind gives a copy all its devices / n."""
    seen: set[Shape] = set()
    kinds = sorted(counts, key=order_key)
    for r in range(len(kinds), 1, -1):
        for subset in itertools.combinations(kinds, r):
            n_top = max(counts[k] for k in subset)
            for tp_choice in itertools.product(*(tps[k] for k in subset)):
                for n in range(1, n_top + 1):
                    blocks = tuple(Block(k, tp, counts[k] // (n * tp))
                                   for k, tp in zip(subset, tp_choice, strict=True))
                    if any(b.count == 0 for b in blocks):
                        break
                    if sum(b.count for b in blocks) > n_layers or blocks in seen:
                        continue
                    seen.add(blocks)
                    yield blocks
