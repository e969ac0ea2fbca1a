"""Uneven layer partitions: the split of a pipeline's layers that minimises its slowest stage.

A stage's time per micro-batch is its forward and backward plus the waits for its inputs
(links.BoundaryComm). Dynamic programming over suffixes: under 1F1B the stage d places from
the end holds d micro-batches in flight, so a suffix's best split depends only on the stage
before it (whose kind sets the link its activations come over), and pipelines that end alike
share work. A pipeline is given as blocks (kind, tp, stages, whether the copy's devices of
that kind share a node), so a suffix is the same blocks with fewer stages in the first. A
stage runs without recomputation when that fits in memory, else with it, else the range is
infeasible for it.

A large cluster's search partitions some 20,000 outlines, so each DP step is kept small: a
stage's costs depend only on (stage before, its kind, tp, node, in-flight, stage after), so
they are built once per such signature, as a band of the ranges that fit in memory (a range
[a, b) fits up to some end b, and a big model's stage holds few layers); a whole pipeline
(no stage before) needs only its best from layer 0; and the steps of many pipelines run
level by level as array operations (solve_many).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from hetrain.cost.model import PLAIN, RECOMPUTE, REGATHER
from hetrain.cost.tables import StageTables, TableCache
from hetrain.planner.links import BoundaryComm

# Memory checks keep this slack so that float rounding never turns a fit into an overflow.
MEMORY_SLACK = 1e-9

BlockKey = tuple[str, int, int, bool]  # (kind, tp, stages, the copy's devices of it share a node)
Blocks = tuple[BlockKey, ...]
Peer = tuple[str, bool] | None  # (kind, in one node) of a neighbour stage


@dataclass(frozen=True)
class Partition:
    """Per stage: layer range, memory mode (cost.model PLAIN, RECOMPUTE, REGATHER),
    forward+backward seconds of one micro-batch, and seconds waiting for its inputs."""

    layers: tuple[tuple[int, int], ...]
    modes: tuple[int, ...]
    stage_s: tuple[float, ...]
    wait_s: tuple[float, ...]

    @property
    def slot_s(self) -> float:
        return max(t + w for t, w in zip(self.stage_s, self.wait_s, strict=True))


@dataclass(frozen=True)
class _Band:
    """A stage's seconds per range [a, b) kept only where some start's ranges are finite:
    cost[a, j] is range [a, first[a] + j), inf past the row's last finite range."""

    first: np.ndarray  # (starts,) the least end b with a finite cost, per start
    cost: np.ndarray  # (starts, width) seconds

    @staticmethod
    def of(matrix: np.ndarray) -> _Band:
        """The band of a (starts, ends) matrix: per row from its first finite entry to its
        last, as wide as the widest row (the same values, so argmin picks the same end)."""
        n = matrix.shape[1]
        finite = np.isfinite(matrix)
        any_finite = finite.any(axis=1)
        first = np.where(any_finite, finite.argmax(axis=1), n - 1)
        last = np.where(any_finite, n - 1 - finite[:, ::-1].argmax(axis=1), n - 1)
        width = int((last - first).max()) + 1
        cols = first[:, None] + np.arange(width)[None, :]
        inside = cols <= last[:, None]
        rows = np.arange(len(matrix))[:, None]
        return _Band(first=first, cost=np.where(inside, matrix[rows, np.minimum(cols, n - 1)],
                                                np.inf))


def drop_first_stage(blocks: Blocks) -> Blocks:
    kind, tp, count, local = blocks[0]
    return ((kind, tp, count - 1, local), *blocks[1:]) if count > 1 else blocks[1:]


def n_stages(blocks: Blocks) -> int:
    return sum(b[2] for b in blocks)


def peer(blocks: Blocks) -> Peer:
    return (blocks[0][0], blocks[0][3]) if blocks else None


class Partitioner:
    """Best partitions of one micro-batch size's pipelines, memoised by suffix."""

    def __init__(self, tables: TableCache, dtypes: dict[str, str], micro_batch_size: int,
                 comm: BoundaryComm, allow_recompute: bool = True, optimizer_shards: int = 1):
        self.tables = tables
        self.optimizer_shards = optimizer_shards  # memory: ZeRO-1 over at least this many
        self.comm = comm
        self.dtypes = dtypes
        self.micro_batch_size = micro_batch_size
        self.allow_recompute = allow_recompute
        self.n_layers = tables.n_layers
        end = np.full(self.n_layers + 1, np.inf)
        end[-1] = 0.0
        self._end = end
        self._best: dict[tuple[Peer, Blocks], np.ndarray] = {}
        self._costs: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._bands: dict[tuple, _Band] = {}
        self._compute_bands: dict[tuple[str, int, int], tuple[_Band, np.ndarray]] = {}
        self._lo: dict[tuple[Peer, Blocks], int] = {}  # least start computed, per suffix

    def stage_tables(self, kind: str, tp: int) -> StageTables:
        return self.tables.get(kind, tp, self.dtypes[kind], self.micro_batch_size,
                               self.optimizer_shards)

    def stage_costs(self, kind: str, tp: int, in_flight: int) -> tuple[np.ndarray, np.ndarray]:
        """Seconds per range for this stage (inf where it does not fit) and its memory mode:
        the fastest that fits (plain, then regathering, then recomputation)."""
        key = (kind, tp, in_flight)
        if key not in self._costs:
            t = self.stage_tables(kind, tp)
            cap = t.capacity_bytes * (1 - MEMORY_SLACK)
            floor_fits = t.floor_bytes <= cap  # states and gradient-sync buffers
            cost = np.full(t.floor_bytes.shape, np.inf)
            mode = np.zeros(t.floor_bytes.shape, dtype=np.int8)
            modes = (PLAIN, REGATHER, RECOMPUTE) if self.allow_recompute else (PLAIN, REGATHER)
            for m in modes:
                if m == REGATHER and not t.sequence_parallel:
                    continue  # nothing to regather
                fits = (t.fixed_bytes[m] + in_flight * t.per_in_flight_bytes[m] <= cap) \
                    & floor_fits & ~np.isfinite(cost)
                cost = np.where(fits, t.time_s[m], cost)
                mode = np.where(fits, m, mode)
            self._costs[key] = (cost, mode)
        return self._costs[key]

    def stage_matrix(self, before: Peer, blocks: Blocks) -> tuple[np.ndarray, np.ndarray]:
        """Seconds per range of the first stage of `blocks` (compute + waits), and its memory
        mode."""
        kind, tp, _, local = blocks[0]
        cost, rc = self.stage_costs(kind, tp, n_stages(blocks))
        fwd, bwd = self.comm.recv_s(before, (kind, local), peer(drop_first_stage(blocks)))
        return cost + fwd[:, None] + bwd[None, :], rc

    def stage_band(self, before: Peer, blocks: Blocks, depth: int | None = None) -> _Band:
        """stage_matrix as a band of the ranges each start can take, memoised by signature
        (`depth`: the stages of `blocks`, when the caller knows them). The band's limits
        are where the stage fits in memory (waits are finite): one per (kind, tp, in-flight)."""
        rest = drop_first_stage(blocks)
        kind, tp, _, local = blocks[0]
        depth = depth or n_stages(blocks)
        key = (before, kind, tp, local, depth, peer(rest))
        band = self._bands.get(key)
        if band is None:
            compute, ends = self._compute_band(kind, tp, depth)
            fwd, bwd = self.comm.recv_s(before, (kind, local), peer(rest))
            # as stage_matrix, in the same order of sums
            band = self._bands[key] = _Band(compute.first,
                                            compute.cost + fwd[:, None] + bwd[ends])
        return band

    def _compute_band(self, kind: str, tp: int, in_flight: int) -> tuple[_Band, np.ndarray]:
        """The band of stage_costs, and its ends b per (start, column)."""
        key = (kind, tp, in_flight)
        if key not in self._compute_bands:
            band = _Band.of(self.stage_costs(kind, tp, in_flight)[0])
            ends = np.minimum(band.first[:, None] + np.arange(band.cost.shape[1])[None, :],
                              self.n_layers)
            self._compute_bands[key] = (band, ends)
        return self._compute_bands[key]

    def _after(self, before: Peer, blocks: Blocks) -> np.ndarray:
        return self._end if not blocks else self._best[(before, blocks)]

    def solve_many(self, pipelines: Iterable[Blocks], batch: int = 512) -> None:
        """Fill the memo for whole pipelines: their DP steps level by level (a suffix of k
        stages needs its suffix of k - 1), the steps of a level with bands of one width as
        one array operation, which spares the per-step overhead on some 200,000 steps. A
        suffix of d stages behind p others starts at a layer in [p, n_layers - d]: only
        those starts are computed (the least p over the pipelines that end in it)."""
        levels: dict[int, dict[tuple[Peer, Blocks], list]] = {}
        for blocks in pipelines:
            key: tuple[Peer, Blocks] = (None, blocks)
            depth = n_stages(blocks)
            lo = 0  # stages before the suffix: its least start
            while depth and self._lo.get(key, lo + 1) > lo:
                level = levels.setdefault(depth, {})
                if key in level:
                    if level[key][1] <= lo:
                        break  # another pipeline ends alike: its suffixes are listed
                    level[key][1] = lo
                else:
                    level[key] = [(peer(key[1]), drop_first_stage(key[1])), lo]
                key, depth, lo = level[key][0], depth - 1, lo + 1
        for depth in sorted(levels):
            groups: dict[int, list] = {}
            for key, (after, lo) in levels[depth].items():
                band = self.stage_band(*key, depth)
                last = 0 if key[0] is None else self.n_layers - depth
                groups.setdefault(band.cost.shape[1], []).append(
                    (key, after, lo, last - lo + 1, band))
            for items in groups.values():
                items.sort(key=lambda item: -item[3])
                for i in range(0, len(items), batch):
                    self._steps(items[i:i + batch])

    def _steps(self, items: list) -> None:
        """best[a] = min over ends b of max(first stage on [a, b), best of the rest from b),
        for a batch of (suffix, its rest, least start, starts, band) whose bands have one
        width; starts before the least are left inf. The choice of b is found again only
        for the few pipelines completed (best)."""
        n = self.n_layers + 1
        rows = max(items[0][3], 1)
        width = items[0][4].cost.shape[1]
        offsets = np.array([min(item[2], n - rows) for item in items])
        first = np.stack([item[4].first[o:o + rows] for o, item in zip(offsets, items,
                                                                          strict=True)])
        both = np.stack([item[4].cost[o:o + rows] for o, item in zip(offsets, items,
                                                                        strict=True)])
        # the rest's best from each end b = first[a] + j: rows of a sliding window over it
        after = np.full((len(items), n + width), np.inf)
        after[:, :n] = np.stack([self._after(*item[1]) for item in items])
        windows = np.lib.stride_tricks.sliding_window_view(after, width, axis=1)
        batch = np.arange(len(items))[:, None]
        np.maximum(both, windows[batch, first], out=both)
        # starts below each suffix's least read unlisted ends: left inf
        starts = offsets[:, None] + np.arange(rows)[None, :]
        lo = np.array([item[2] for item in items])
        best = np.full((len(items), n), np.inf)
        best[batch, starts] = np.where(starts >= lo[:, None], both.min(axis=2), np.inf)
        for i, item in enumerate(items):
            self._best[item[0]] = best[i]
            self._lo[item[0]] = item[2]

    def _choice(self, before: Peer, blocks: Blocks, a: int) -> int:
        """The end of the first stage of `blocks` from layer `a` in the best partition (the
        least such end, as np.argmin picks)."""
        band = self.stage_band(before, blocks)
        after = self._after(peer(blocks), drop_first_stage(blocks))
        first, width = int(band.first[a]), band.cost.shape[1]
        ends = np.full(width, np.inf)
        tail = after[first:first + width]
        ends[:len(tail)] = tail
        return first + int(np.maximum(band.cost[a], ends).argmin())

    def solved(self, blocks: Blocks) -> bool:
        """Whether the whole pipeline's partition is in the memo."""
        return (None, blocks) in self._best

    def slot_s(self, blocks: Blocks) -> float:
        """The slowest stage of the best partition; inf when nothing fits."""
        best = self._best.get((None, blocks))
        if best is None:
            self.solve_many([blocks])
            best = self._best[(None, blocks)]
        return float(best[0])

    def best(self, blocks: Blocks) -> Partition | None:
        if not np.isfinite(self.slot_s(blocks)):
            return None
        layers, modes, times, waits = [], [], [], []
        a, before, key = 0, None, blocks
        while key:
            b = self._choice(before, key, a)
            kind, tp, _, _ = key[0]
            cost, rc = self.stage_costs(kind, tp, n_stages(key))
            fwd, bwd = self.comm.recv_s(before, peer(key), peer(drop_first_stage(key)))
            layers.append((a, b))
            modes.append(int(rc[a, b]))
            times.append(float(cost[a, b]))
            waits.append(float(fwd[a] + bwd[b]))
            a, before, key = b, peer(key), drop_first_stage(key)
        return Partition(layers=tuple(layers), modes=tuple(modes), stage_s=tuple(times),
                         wait_s=tuple(waits))


class ScaledSlots:
    """Lower bounds on the slots of a larger micro-batch size, from a smaller size's exact
    partitions (the larger size's exact slot where the smaller has none). For a factor r,
    every stage time per range (compute with or without recomputation) at the larger size is
    at least r times the smaller's less some d_c, every wait at least r times less d_w (the
    figures of the two tables say how much); a range that fits in memory at the larger size
    fits at the smaller. So the larger size's best
    partition, priced at the smaller size, bounds: slot >= r * smaller slot - d_c - 2 d_w,
    for every r tried (those near the typical growth, and 1)."""

    def __init__(self, smaller: Partitioner, larger: Partitioner, tps: dict[str, list[int]]):
        self.smaller = smaller
        self.larger = larger
        compute, waits = _pairs(smaller, larger, tps)
        ratios = compute[1] / compute[0]
        self.terms = []
        for r in {1.0, *np.quantile(ratios, (0.01, 0.05, 0.2, 0.5)).tolist()}:
            d_c = max(float((r * compute[0] - compute[1]).max(initial=0.0)), 0.0)
            d_w = max(float((r * waits[0] - waits[1]).max(initial=0.0)), 0.0)
            self.terms.append((r, d_c + 2 * d_w))

    def solve_many(self, pipelines: Iterable[Blocks]) -> None:
        """Pipelines the smaller size has not partitioned get the larger size's exact
        partition (as costly, and kept should the larger size be searched)."""
        self.larger.solve_many(p for p in pipelines if not self.smaller.solved(p))

    def slot_s(self, blocks: Blocks) -> float:
        if not self.smaller.solved(blocks):
            return self.larger.slot_s(blocks)
        slot = self.smaller.slot_s(blocks)
        if not np.isfinite(slot):
            return slot
        # never above the true slot by rounding
        return max(0.0, *(r * slot - d for r, d in self.terms)) * (1 - 1e-9)


def _pairs(smaller: Partitioner, larger: Partitioner, tps: dict[str, list[int]]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(smaller, larger) stage times of every range where the smaller is finite, and every
    wait, as two 2-row arrays."""
    compute = []
    for kind, sizes in tps.items():
        for tp in sizes:
            small, large = smaller.stage_tables(kind, tp), larger.stage_tables(kind, tp)
            for rc in (PLAIN, RECOMPUTE, REGATHER):
                ok = np.isfinite(small.time_s[rc])
                compute.append(np.stack([small.time_s[rc][ok], large.time_s[rc][ok]]))
    peers = [(kind, local) for kind in tps for local in (True, False)]
    waits = []
    for x in peers:
        for y in peers:
            link = smaller.comm.link(x, y)
            for sender in {x[0], y[0]}:
                for boundary in range(1, smaller.n_layers + 1):
                    waits.append((smaller.comm.wait_s(link, boundary, sender),
                                  larger.comm.wait_s(link, boundary, sender)))
    return np.concatenate(compute, axis=1), np.array(waits).T
